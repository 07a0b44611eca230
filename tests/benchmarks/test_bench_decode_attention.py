"""The decode-attention benchmark's shapes and its correctness check, on CPU under Triton's
interpreter with a stand-in timer (the timings themselves need CUDA)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.triton_interpreter import allow_one_element_index_in_interpreter

pytest.importorskip("triton", reason="the decode attention kernel needs the triton package")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_decode_attention as bench  # noqa: E402
from lingua import decode_attention as kernel_module  # noqa: E402

if not torch.cuda.is_available() and not kernel_module._INTERPRETED:
    pytest.skip("lingua.decode_attention was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
if kernel_module._INTERPRETED:
    allow_one_element_index_in_interpreter()


def test_cache_slots_follow_the_60m_models_caches():
    assert bench.cache_slots("attamba", 32768) == (4096 + 1 + 16, 4097)
    assert bench.cache_slots("transformer", 32768) == (32768, 0)


@pytest.mark.parametrize("model", ["attamba", "transformer"])
def test_every_launch_is_checked_against_sdpa_and_reported(model):
    calls = []

    def timer(fn):
        calls.append(fn().shape)
        return 10.0

    launches = [{}, dict(block_keys=32, num_warps=4, programs_per_sm=2)]
    rows = bench.measure_shape(model, 256, 2, launches, timer=timer, device="cpu")
    assert [r["impl"] for r in rows] == ["sdpa", "kernel", "kernel"] and len(calls) == 3
    slots = bench.cache_slots(model, 256)[0]
    assert all(r["slots"] == slots and r["tb_per_s"] == 2 * 2 * 8 * slots * 64 * 2 / 10.0 / 1e6 for r in rows)
    assert "block_keys=32" in bench.format_row(rows[2])
