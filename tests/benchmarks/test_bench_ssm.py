"""benchmarks/bench_ssm.py's model-layer case runs the scan as the model calls it (timing needs CUDA)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_ssm import Shape, packed_scan_case, uniform_segment_starts  # noqa: E402

from apps.attamba.ssd_reference import split_scan_inputs, ssd_reference  # noqa: E402
from tests.triton_interpreter import allow_one_element_index_in_interpreter  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_packed_scan_case_is_the_scan_over_its_inputs():
    if DEVICE.type == "cpu":
        allow_one_element_index_in_interpreter()
    shape = Shape(batch=1, seq_len=24, heads=2, head_dim=8, groups=2, state_dim=16, chunk=8)
    scan, (x, dt, A, D) = packed_scan_case(shape, torch.float32, DEVICE)
    starts = uniform_segment_starts(shape, DEVICE)
    u, B, C = split_scan_inputs(x.detach(), shape.heads, shape.groups, shape.state_dim)
    expected = ssd_reference(u.double(), dt.detach().double(), A.detach().double(), B.double(), C.double(),
                             D.detach().double(), starts)
    got = scan(x, dt, A, D, starts)
    assert got.shape == (1, 24, 2, 8) and x.requires_grad
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
