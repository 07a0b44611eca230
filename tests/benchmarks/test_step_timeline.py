"""benchmarks/step_timeline.py: the points a training step passes, in order, on CPU."""

from __future__ import annotations

import pytest
import torch

from benchmarks.profile_step import make_training_step, record_timeline
from benchmarks.step_timeline import StepTimeline


@pytest.mark.parametrize("compile", [False, True])
def test_a_step_passes_every_block_forward_then_backward_in_order(compile):
    training = make_training_step(["config=apps/attamba/configs/debug.yaml", "model.n_layers=2"], seq_len=32,
                                  batch=2, mean_doc=16, device=torch.device("cpu"), compile=compile)
    timeline = record_timeline(training, steps=2, device=torch.device("cpu"))
    rows = timeline.rows()
    assert [name for name, _, _ in rows] == [
        "step begins", "forward of block 0", "forward of block 1", "loss",
        "backward of block 1", "backward of block 0", "backward done", "optimizer done", "step ends",
    ]
    hosts = [host for _, host, _ in rows]
    assert hosts[0] == 0 and hosts == sorted(hosts)
    # Off CUDA "the GPU" reaches a point when the host does: no lag.
    assert all(abs(gpu - host) < 1.0 for _, host, gpu in rows)
    assert "medians of 2 steps" in timeline.report()
    # The hooks are gone afterwards: a plain step marks nothing.
    other = StepTimeline(torch.device("cpu"))
    other.begin_step()
    training.run()
    other.end_step()
    assert [name for name, _, _ in other.rows()] == ["step begins", "step ends"]


def test_rows_are_medians_over_steps():
    timeline = StepTimeline(torch.device("cpu"))
    timeline._steps = [[("step begins", 0.0, 0.0), ("loss", 1.0, 5.0)],
                       [("step begins", 0.0, 0.0), ("loss", 3.0, 6.0)],
                       [("step begins", 0.0, 0.0), ("loss", 2.0, 9.0)]]
    assert timeline.rows() == [("step begins", 0.0, 0.0), ("loss", 2.0, 6.0)]
    assert timeline.report().splitlines()[-1].split() == ["loss", "2.00", "6.00", "4.00"]
