"""benchmarks/compare_steps.py: the ratio it reports, and a CPU smoke run of its loop."""

from __future__ import annotations

import gc

import pytest
import torch

from benchmarks.compare_steps import main, ratio_summary


def test_the_ratio_is_b_time_over_a_time_per_round():
    # A is slower in both rounds: 0.9 and 0.72 of B's tokens/s; medians of each model's times.
    text = ratio_summary([(20.0, 18.0), (25.0, 18.0)])
    assert text.startswith("A 22.50 ms/step, B 18.00 ms/step over 2 rounds")
    assert "A's tokens/s = 0.810x B's (rounds 0.720-0.900)" in text


def test_two_debug_models_run_in_turn_on_cpu(capsys):
    assert gc.isenabled()
    code = main(["--device", "cpu", "--no-compile", "--a", "config=apps/attamba/configs/debug.yaml",
                 "--b", "config=apps/main/configs/debug.yaml", "--rounds", "2", "--steps", "1", "--warmup", "1",
                 "--seq-len", "32", "--batch", "2", "--mean-doc", "16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "A: attamba" in out and "B: transformer" in out
    assert out.count("round ") == 2 and "A's tokens/s = " in out
    assert gc.isenabled(), "the caller's garbage collection is left on"


def test_bad_counts_are_refused():
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--a", "config=apps/attamba/configs/debug.yaml", "--b",
              "config=apps/main/configs/debug.yaml", "--rounds", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_without_cuda_it_says_so(capsys):
    assert main(["--a", "config=apps/attamba/configs/debug.yaml", "--b", "config=apps/main/configs/debug.yaml"]) == 0
    assert "needs a CUDA device" in capsys.readouterr().out
