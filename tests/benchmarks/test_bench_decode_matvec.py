"""The batch-1 matmul benchmark's reduction form (benchmarks/bench_decode_matvec.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_decode_matvec as bench  # noqa: E402


def test_the_reduction_form_is_a_linear_layer():
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 24, generator=generator), torch.randn(40, 24, generator=generator)
    torch.testing.assert_close(bench.linear_by_reduction(x, weight), F.linear(x, weight))
    half = bench.linear_by_reduction(x.bfloat16(), weight.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), F.linear(x, weight), rtol=2e-2, atol=5e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_says_so_and_succeeds(capsys):
    assert bench.main([]) == 0
    assert "needs CUDA" in capsys.readouterr().out
