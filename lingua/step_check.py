"""The training loop's check for a non-finite loss or gradient, without the GPU waiting for it.

Checking a step's loss and gradient norm on the host before its optimizer update makes the host
wait for the step's backward, then leaves the GPU idle while the host queues the update and the
next step's forward: on an H200 the 60M Attamba's host reaches its first block 1.2 ms after a step
begins, and paces the whole forward (docs/benchmarks.md, twentieth session). Instead, the optimizer
learns on the device whether the step is finite (fused AdamW's ``found_inf``: where it is 1,
parameters, moments and step counts stay as they were), the step's loss and gradient norm are
copied to pinned host memory without waiting, and the host reads them a step later, once the next
step is queued; at steps that log, evaluate or save it reads them at once.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class StepStats:
    """A finished step's loss and gradient norm, as the host reads them."""

    step: int
    loss: float
    grad_norm: float

    @property
    def finite(self) -> bool:
        """False when the update of this step was skipped on the device."""
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


class DeferredStepCheck:
    """Arms an optimizer to skip non-finite updates on the device and hands back each step's
    statistics when they are ready: ``arm`` before ``optimizer.step()``, ``finished`` after."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        # Only the fused optimizers read found_inf (GradScaler's protocol); the others would apply
        # a non-finite update.
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            raise ValueError(
                f"{type(optimizer).__name__} cannot skip an update on the device: the training loop needs a fused "
                "optimizer (torch.optim.AdamW(fused=True)), which reads found_inf"
            )
        self._optimizer = optimizer
        self._cuda = device.type == "cuda"
        self._pending: deque[tuple[int, torch.Tensor, Optional[torch.cuda.Event]]] = deque()

    def arm(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Before step ``step``'s ``optimizer.step()``: on the device, skip its update if ``loss`` or
        ``grad_norm`` (0-d tensors) is not finite, and start copying both to the host."""
        stats = torch.stack([loss.detach().float(), grad_norm.detach().float()])
        self._optimizer.found_inf = (~torch.isfinite(stats).all()).float()
        event = None
        if self._cuda:
            host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            host.copy_(stats, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = stats
        self._pending.append((step, host, event))

    def finished(self, wait_for_all: bool = False) -> list[StepStats]:
        """The armed steps' statistics not yet handed back, oldest first: all but the latest one
        (whose GPU work may still be queued; waiting for the one before it keeps the host at most a
        step ahead), or all of them with ``wait_for_all``."""
        keep = 0 if wait_for_all else 1
        done = []
        while len(self._pending) > keep:
            step, host, event = self._pending.popleft()
            if event is not None:
                event.synchronize()
            loss, grad_norm = host.tolist()
            done.append(StepStats(step, loss, grad_norm))
        return done
