"""GPU idle gaps and the host work in them (benchmarks/gpu_gaps.py), on synthetic spans."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from gpu_gaps import HostOp, Interval, attribute_gaps, gap_report, idle_gaps, intervals_from_profile  # noqa: E402


def test_gaps_are_the_uncovered_spans_between_kernels():
    kernels = [Interval(0, 10), Interval(5, 12), Interval(20, 30), Interval(31, 40), Interval(25, 26)]
    assert idle_gaps(kernels) == [Interval(12, 20), Interval(30, 31)]
    assert idle_gaps(kernels, min_us=2) == [Interval(12, 20)]
    # Order of the events does not matter, and a kernel inside another leaves no gap.
    assert idle_gaps(list(reversed(kernels)), min_us=2) == [Interval(12, 20)]
    assert idle_gaps([]) == []


def test_gaps_are_charged_to_the_host_ops_running_at_their_middle():
    ops = [
        HostOp("step", 0, 100, 0),
        HostOp("layer_1", 0, 40, 1),
        HostOp("guards", 10, 20, 2),
        HostOp("layer_2", 40, 90, 1),
        HostOp("launch", 60, 70, 2),
    ]
    gaps = [Interval(12, 16), Interval(60, 70), Interval(95, 97), Interval(120, 130)]
    assert attribute_gaps(gaps, ops) == pytest.approx({
        "step > layer_1 > guards": 4,
        "step > layer_2 > launch": 10,
        "step": 2,
        "(host idle)": 10,
    })
    # Deep chains keep the outer levels and the innermost op.
    deep = [HostOp(f"op{depth}", 0, 10, depth) for depth in range(6)]
    assert attribute_gaps([Interval(4, 6)], deep, levels=2) == {"op0 > op1 > … > op5": 2}


def test_a_record_function_range_on_the_gpu_timeline_is_not_kernel_time():
    """The optimizer's range spans its kernels and the idle time between them: not busy."""
    from types import SimpleNamespace

    cuda = torch.autograd.DeviceType.CUDA

    def event(name, start, end, annotation=False):
        return SimpleNamespace(name=name, device_type=cuda, time_range=SimpleNamespace(start=start, end=end),
                               is_user_annotation=annotation)

    events = [event("adam_kernel", 0, 10), event("adam_kernel", 30, 40), event("Optimizer.step#AdamW.step", 0, 40, True)]
    kernels, _ = intervals_from_profile(events)
    assert idle_gaps(kernels) == [Interval(10, 30)]


def test_report_of_a_cpu_profile_has_no_gaps():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(8).sum()
    lines = gap_report(prof.events(), steps=1).splitlines()
    assert lines[0] == "GPU kernels (and copies) a step: 0; idle in gaps shorter than 2 µs between them: 0.00 ms/step in 0 gaps/step"
    assert lines[1].startswith("GPU idle in gaps of at least 2 µs: 0.00 ms/step in 0 gaps/step")


def test_report_splits_idle_time_at_the_threshold():
    from types import SimpleNamespace

    cuda = torch.autograd.DeviceType.CUDA

    def kernel(start, end):
        return SimpleNamespace(name="k", device_type=cuda, time_range=SimpleNamespace(start=start, end=end))

    # Two steps, a 2 ms threshold: gaps of 1 and 1.5 ms (short) and one of 10 ms.
    events = [kernel(0, 5000), kernel(6000, 10000), kernel(11500, 20000), kernel(30000, 40000)]
    lines = gap_report(events, steps=2, min_us=2000).splitlines()
    assert lines[0] == "GPU kernels (and copies) a step: 2; idle in gaps shorter than 2000 µs between them: 1.25 ms/step in 1 gaps/step"
    assert lines[1].startswith("GPU idle in gaps of at least 2000 µs: 5.00 ms/step in 0 gaps/step")


def test_kernel_share_sums_the_named_kernels_only():
    from types import SimpleNamespace

    from profile_step import kernel_share

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    averages = [
        SimpleNamespace(key="_window_bwd_kernel", device_type=cuda, self_device_time_total=6000.0),
        SimpleNamespace(key="_conv_fwd_kernel", device_type=cuda, self_device_time_total=2000.0),
        SimpleNamespace(key="nvjet_gemm", device_type=cuda, self_device_time_total=9000.0),
        SimpleNamespace(key="_window_bwd_kernel", device_type=cpu, self_device_time_total=6000.0),  # a launch, not a kernel
    ]
    report = kernel_share(averages, ["_window_", "_conv_"], steps=2, step_ms=40.0)
    assert report.splitlines()[0].startswith("kernels matching ['_window_', '_conv_']: 4.000 ms/step = 10.0% of the 40.00 ms step")
    assert len(report.splitlines()) == 3
