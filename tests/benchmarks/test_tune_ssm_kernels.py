"""The knob handling of benchmarks/tune_ssm_kernels.py (the timing itself needs CUDA)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from tune_ssm_kernels import variant_applied  # noqa: E402

from apps.attamba import ssd_triton_conv, ssd_triton_window  # noqa: E402


def test_a_variant_sets_its_knobs_in_their_types_and_restores_them():
    before = (ssd_triton_conv.BLOCK_N, ssd_triton_conv.NUM_WARPS, ssd_triton_window.BF16_DOTS)
    with variant_applied("conv.BLOCK_N=32,conv.NUM_WARPS=8,window.BF16_DOTS=0"):
        assert ssd_triton_conv.BLOCK_N == 32
        assert ssd_triton_conv.NUM_WARPS == 8 and ssd_triton_window.BF16_DOTS is False
    assert (ssd_triton_conv.BLOCK_N, ssd_triton_conv.NUM_WARPS, ssd_triton_window.BF16_DOTS) == before
    with pytest.raises(RuntimeError), variant_applied("conv.NUM_WARPS=8"):
        raise RuntimeError("a failing variant")
    assert ssd_triton_conv.NUM_WARPS == 4
    with variant_applied("default"):
        assert (ssd_triton_conv.BLOCK_N, ssd_triton_conv.NUM_WARPS, ssd_triton_window.BF16_DOTS) == before
