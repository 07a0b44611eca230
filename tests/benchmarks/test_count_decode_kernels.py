"""The CPU kernel count of a compiled decode step (benchmarks/count_decode_kernels.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from count_decode_kernels import count_kernels  # noqa: E402


@pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor's CPU backend needs a C++ compiler")
def test_counts_grow_with_the_layers_a_step_runs():
    from tests.apps.attamba.test_cache import tiny_attamba

    counts = [count_kernels(tiny_attamba(n_layers=layers, max_seqlen=64), 40, 2) for layers in (1, 3)]
    assert 0 < counts[0] < counts[1]
