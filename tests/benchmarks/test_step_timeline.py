"""benchmarks/step_timeline.py: the points a training step passes, in order, on CPU."""

from __future__ import annotations

import pytest
import torch

from benchmarks.profile_step import make_training_step, record_timeline
from benchmarks.step_timeline import StepTimeline, _HostEvent


@pytest.mark.parametrize("compile", [False, True])
def test_a_step_passes_every_block_forward_then_backward_in_order(compile):
    training = make_training_step(["config=apps/attamba/configs/debug.yaml", "model.n_layers=2"], seq_len=32,
                                  batch=2, mean_doc=16, device=torch.device("cpu"), compile=compile)
    timeline = record_timeline(training, steps=2, device=torch.device("cpu"))
    rows = timeline.rows()
    assert [name for name, _, _ in rows] == [
        "step begins", "forward of block 0", "forward of block 1", "loss",
        "backward of block 1", "backward of block 0", "backward done", "gradients clipped", "check armed",
        "parameters updated", "statistics read", "step ends",
    ]
    hosts = [host for _, host, _ in rows]
    assert hosts[0] == 0 and hosts == sorted(hosts)
    # Off CUDA "the GPU" reaches a point when the host does: no lag.
    assert all(abs(gpu - host) < 0.05 for _, host, gpu in rows)
    assert "medians of 2 steps" in timeline.report()
    # The hooks are gone afterwards: a plain step marks nothing.
    other = StepTimeline(torch.device("cpu"))
    other.begin_step()
    training.run()
    other.end_step()
    assert [name for name, _, _ in other.rows()] == ["step begins", "step ends"]


def test_rows_are_medians_over_steps_with_the_gpu_on_the_hosts_clock():
    def event(at):
        recorded = _HostEvent()
        recorded.at = at
        return recorded

    timeline = StepTimeline(torch.device("cpu"))
    timeline._origin = (100.0, event(100.0))  # host and "GPU" together at 100 s
    # Three steps begun by the host at 101, 102 and 103 s; the GPU reaches each "loss" later.
    timeline._steps = [
        [("step begins", 101.0, event(101.000)), ("loss", 101.001, event(101.005))],
        [("step begins", 102.0, event(102.002)), ("loss", 102.003, event(102.006))],
        [("step begins", 103.0, event(103.001)), ("loss", 103.002, event(103.009))],
    ]
    rows = timeline.rows()
    assert [name for name, _, _ in rows] == ["step begins", "loss"]
    assert rows[0][1:] == pytest.approx((0.0, 1.0), abs=1e-6)  # the GPU still on the previous step
    assert rows[1][1:] == pytest.approx((2.0, 6.0), abs=1e-6)
    assert timeline.report().splitlines()[-1].split() == ["loss", "2.00", "6.00", "4.00"]
