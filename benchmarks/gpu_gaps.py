"""Where the GPU waits for the host: idle gaps between kernels and what the host was running then.

A step whose wall time exceeds its kernel time has idle gaps on the GPU. A kernel table cannot say
where they are; this module finds them in a profiler's events and names the host operators that
were running in the middle of each gap (outermost first), summed over gaps with the same names.

    from benchmarks.gpu_gaps import gap_report
    print(gap_report(prof.events(), steps=3))
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch


@dataclass(frozen=True)
class Interval:
    """[start, end) in microseconds."""

    start: float
    end: float


@dataclass(frozen=True)
class HostOp:
    """A host (CPU) operator's span and its nesting depth (0: outermost)."""

    name: str
    start: float
    end: float
    depth: int


def idle_gaps(kernels: Iterable[Interval], min_us: float = 0.0) -> list[Interval]:
    """The spans between the first kernel's start and the last kernel's end where no kernel runs,
    of at least ``min_us``. Kernels may overlap (several streams); overlaps count as busy."""
    gaps = []
    busy_until = None
    for kernel in sorted(kernels, key=lambda interval: interval.start):
        if busy_until is not None and kernel.start - busy_until >= max(min_us, 1e-9):
            gaps.append(Interval(busy_until, kernel.start))
        busy_until = kernel.end if busy_until is None else max(busy_until, kernel.end)
    return gaps


def active_stack(ops: Sequence[HostOp], at: float) -> list[str]:
    """Names of the host operators running at time ``at``, outermost first."""
    running = [op for op in ops if op.start <= at < op.end]
    return [op.name for op in sorted(running, key=lambda op: (op.depth, op.start))]


def attribute_gaps(gaps: Sequence[Interval], ops: Sequence[HostOp], levels: int = 3) -> dict[str, float]:
    """Idle microseconds per host call chain at each gap's midpoint: the ``levels`` outermost
    operators and the innermost one, joined by ' > ' ('(host idle)' when nothing ran)."""
    totals: dict[str, float] = defaultdict(float)
    for gap in gaps:
        stack = active_stack(ops, (gap.start + gap.end) / 2)
        if len(stack) > levels + 1:
            stack = stack[:levels] + ["…", stack[-1]]
        totals[" > ".join(stack) or "(host idle)"] += gap.end - gap.start
    return dict(totals)


def _depth(event) -> int:
    depth, parent = 0, event.cpu_parent
    while parent is not None:
        depth, parent = depth + 1, parent.cpu_parent
    return depth


def is_device_work(event) -> bool:
    """Whether a profiler event (or ``key_averages()`` row) is work on the GPU: a kernel, copy or
    memset. A ``record_function`` range (the optimizer's ``Optimizer.step#AdamW.step``) is also
    mirrored on the GPU's timeline, spanning its kernels and the idle time between them; it is
    not work, and counting it would add its kernels twice and hide its gaps."""
    return event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def intervals_from_profile(events) -> tuple[list[Interval], list[HostOp]]:
    """(kernel spans, host operator spans) from ``torch.profiler.profile(...).events()``."""
    kernels, ops = [], []
    for event in events:
        span = event.time_range
        if is_device_work(event):
            kernels.append(Interval(span.start, span.end))
        elif event.device_type == torch.autograd.DeviceType.CPU:
            ops.append(HostOp(event.name, span.start, span.end, _depth(event)))
    return kernels, ops


def gap_report(events, steps: int, rows: int = 15, min_us: float = 2.0) -> str:
    """A table of GPU idle time per step, by what the host was running in the gaps, after a line
    with the kernels a step and the idle time in gaps shorter than ``min_us``."""
    kernels, ops = intervals_from_profile(events)
    every = idle_gaps(kernels)
    gaps = [gap for gap in every if gap.end - gap.start >= min_us]
    short = [gap for gap in every if gap.end - gap.start < min_us]
    totals = attribute_gaps(gaps, ops)
    lines = [
        # Inside a CUDA graph the host cannot be the cause: short gaps are each kernel's launch
        # latency and tail, so their total grows with the number of kernels, not with host work.
        f"GPU kernels (and copies) a step: {len(kernels) / steps:.0f}; idle in gaps shorter than {min_us:g} µs "
        f"between them: {sum(g.end - g.start for g in short) / steps / 1e3:.2f} ms/step in {len(short) / steps:.0f} gaps/step",
        f"GPU idle in gaps of at least {min_us:g} µs: {sum(g.end - g.start for g in gaps) / steps / 1e3:.2f} ms/step "
        f"in {len(gaps) / steps:.0f} gaps/step; host call chain at each gap's middle:",
    ]
    for chain, us in sorted(totals.items(), key=lambda item: -item[1])[:rows]:
        lines.append(f"  {us / steps / 1e3:7.3f} ms/step  {chain}")
    return "\n".join(lines)
