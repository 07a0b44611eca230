"""When the host and the GPU each reach points of a training step, without a profiler.

A profiler slows the host several-fold, so its idle gaps exaggerate how long a host-bound step
starves the GPU. Here each point of a step (each block's forward, each block's backward, the loss,
the optimizer) records the host's clock and a CUDA event; the event's time says when the GPU got
there. Their difference, the GPU's lag, is the work the GPU still had queued when
the host passed the point: where it falls to ~0 the GPU has caught up and waits for the host.

    timeline = StepTimeline(device)
    handles = timeline.attach(model.layers)
    for _ in range(steps):
        timeline.begin_step()
        ...  # forward, timeline.mark("loss"), backward, ...
        timeline.end_step()
    print(timeline.report())
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable

import torch
from torch import nn


class _HostEvent:
    """A stand-in for ``torch.cuda.Event`` off CUDA: 'the device' reaches a point when the host does."""

    def __init__(self, enable_timing: bool = True):
        self.at = 0.0

    def record(self) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: "_HostEvent") -> float:
        return (end.at - self.at) * 1e3


class StepTimeline:
    """Host and GPU arrival times (ms since the host began the step) at named points of each step.

    Steps run as the training loop runs them, without waiting for the GPU in between: the GPU may
    still be on the previous step when the host begins the next (a positive lag at "step begins").
    The GPU's times come from events measured against one recorded after a synchronization, when
    the GPU and the host were at the same point."""

    def __init__(self, device: torch.device):
        self._event: Callable[..., object] = torch.cuda.Event if device.type == "cuda" else _HostEvent
        self._device = device
        self._origin: tuple[float, object] | None = None
        self._marks: list[tuple[str, float, object]] = []
        self._steps: list[list[tuple[str, float, object]]] = []

    def begin_step(self) -> None:
        if self._origin is None:
            self._synchronize()
            event = self._event(enable_timing=True)
            event.record()
            self._origin = (time.perf_counter(), event)
        self._marks = []
        self.mark("step begins")

    def mark(self, name: str) -> None:
        event = self._event(enable_timing=True)
        event.record()
        self._marks.append((name, time.perf_counter(), event))

    def end_step(self) -> None:
        self.mark("step ends")
        self._steps.append(self._marks)

    def _synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def attach(self, blocks: Iterable[nn.Module]) -> list:
        """Marks each block's forward as it starts and its backward as it starts (when the gradient
        of the block's output arrives). Returns the hook handles (``.remove()`` them to detach)."""
        handles = []
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(lambda module, inputs, index=index: self.mark(f"forward of block {index}")))
            handles.append(block.register_forward_hook(lambda module, inputs, output, index=index: self._on_output(index, output)))
        return handles

    def _on_output(self, index: int, output) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: self.mark(f"backward of block {index}"))

    def rows(self) -> list[tuple[str, float, float]]:
        """(name, host ms, GPU ms) per point, medians over the steps, in the order of the last step
        (waits for the GPU)."""
        if not self._steps:
            return []
        self._synchronize()
        host_0, event_0 = self._origin

        def since(begun: float, host: float, event) -> tuple[float, float]:
            """(host ms, GPU ms on the host's clock) since the host began the step."""
            return (host - begun) * 1e3, (host_0 - begun) * 1e3 + event_0.elapsed_time(event)

        resolved = [[(name, *since(marks[0][1], host, event)) for name, host, event in marks] for marks in self._steps]
        names = [name for name, _, _ in resolved[-1]]
        rows = []
        for position, name in enumerate(names):
            same = [step[position] for step in resolved if len(step) == len(names) and step[position][0] == name]
            rows.append((name, statistics.median(r[1] for r in same), statistics.median(r[2] for r in same)))
        return rows

    def report(self) -> str:
        rows = self.rows()
        lines = [f"When host and GPU reach each point of a step (ms since it began; medians of {len(self._steps)} steps).",
                 "Lag = GPU minus host: the GPU's queued work; near 0 the GPU waits for the host.",
                 f"  {'point':28s} {'host':>8s} {'GPU':>8s} {'lag':>8s}"]
        lines += [f"  {name:28s} {host:8.2f} {gpu:8.2f} {gpu - host:8.2f}" for name, host, gpu in rows]
        return "\n".join(lines)
