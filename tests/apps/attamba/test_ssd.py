"""The chunked PyTorch SSD scan and causal conv against their float64 loop references."""

from __future__ import annotations

import pytest
import torch

from apps.attamba.ssd_reference import causal_conv_reference, ssd_reference
from apps.attamba.ssd_torch import causal_conv_segmented, positions_in_segment, ssd_segmented

BLOCK = 8  # small blocks so that short test sequences span several of them


def starts_every(n: int, period: int, offset: int = 0) -> torch.Tensor:
    """[n] bool: a segment starts at t iff (t + offset) % period == 0 (uniform / cyclic chunks)."""
    t = torch.arange(n)
    return (t + offset) % period == 0


def starts_random(n: int, period: int, generator: torch.Generator) -> torch.Tensor:
    """[n] bool: segments of i.i.d. lengths in 1..2*period-1 (random chunks)."""
    starts = torch.zeros(n, dtype=torch.bool)
    t = 0
    while t < n:
        starts[t] = True
        t += int(torch.randint(1, 2 * period, (1,), generator=generator))
    return starts


def segmentation(kind: str, batch: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """segment_start [batch, n] for one named test case."""
    P = 5
    if kind == "uniform":
        row = starts_every(n, P)
        return row.expand(batch, n).clone()
    if kind == "cyclic":
        return starts_every(n, P, offset=3).expand(batch, n).clone()
    if kind == "random":
        return torch.stack([starts_random(n, P, generator) for _ in range(batch)])
    if kind == "single":  # one segment longer than several blocks; position 0 left unflagged
        return torch.zeros(batch, n, dtype=torch.bool)
    if kind == "chunks_and_documents":
        documents = torch.stack([starts_random(n, 12, generator) for _ in range(batch)])
        return documents | starts_every(n, P, offset=2)
    if kind == "mixed_rows":
        rows = [starts_every(n, P), starts_random(n, P, generator), torch.zeros(n, dtype=torch.bool)]
        return torch.stack([rows[i % len(rows)] for i in range(batch)])
    if kind == "every_token":
        return torch.ones(batch, n, dtype=torch.bool)
    raise ValueError(kind)


SEGMENTATIONS = ["uniform", "cyclic", "random", "single", "chunks_and_documents", "mixed_rows", "every_token"]


def ssd_inputs(batch, n, heads, head_dim, groups, state_dim, dtype, generator):
    """Random (u, dt, A, B, C, D) with dt in (0, 1) and A in [-4, -0.1]."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    u = randn(batch, n, heads, head_dim)
    dt = (torch.rand(batch, n, heads, generator=generator, dtype=torch.float64) * 0.9 + 0.05).to(dtype)
    A = -(torch.rand(heads, generator=generator, dtype=torch.float64) * 3.9 + 0.1).to(dtype)
    B = randn(batch, n, groups, state_dim)
    C = randn(batch, n, groups, state_dim)
    D = randn(heads)
    return u, dt, A, B, C, D


def assert_close(actual, expected, dtype):
    """fp64: ~1e-10 absolute; fp32: 1e-5 relative to the largest reference magnitude."""
    scale = expected.abs().max().item()
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5 * max(scale, 1.0)
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= tolerance, f"max abs error {error:.3g} > {tolerance:.3g} (reference scale {scale:.3g})"


@pytest.mark.parametrize("kind", SEGMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [1, 4])
def test_ssd_matches_reference(kind, dtype, groups):
    generator = torch.Generator().manual_seed(10 * SEGMENTATIONS.index(kind) + groups)
    inputs = ssd_inputs(3, 29, 4, 3, groups, 5, dtype, generator)
    segment_start = segmentation(kind, 3, 29, generator)
    expected, expected_state = ssd_reference(*inputs, segment_start, return_final_state=True)
    actual, actual_state = ssd_segmented(*inputs, segment_start, return_final_state=True, block_len=BLOCK)
    assert actual.dtype == dtype and actual.shape == (3, 29, 4, 3)
    assert_close(actual, expected, dtype)
    assert_close(actual_state, expected_state, dtype)


def test_ssd_long_single_segment_default_blocks():
    """A 300-token segment across five default-size blocks, in fp32."""
    generator = torch.Generator().manual_seed(1)
    inputs = ssd_inputs(1, 300, 2, 2, 1, 4, torch.float32, generator)
    segment_start = torch.zeros(1, 300, dtype=torch.bool)
    expected, expected_state = ssd_reference(*inputs, segment_start, return_final_state=True)
    actual, actual_state = ssd_segmented(*inputs, segment_start, return_final_state=True)
    assert_close(actual, expected, torch.float32)
    assert_close(actual_state, expected_state, torch.float32)


def test_ssd_bfloat16_inputs_return_bfloat16():
    generator = torch.Generator().manual_seed(2)
    inputs = ssd_inputs(1, 12, 2, 2, 1, 4, torch.bfloat16, generator)
    segment_start = segmentation("random", 1, 12, generator)
    actual = ssd_segmented(*inputs, segment_start, block_len=BLOCK)
    expected = ssd_reference(*inputs, segment_start)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_ssd_gradcheck():
    generator = torch.Generator().manual_seed(3)
    inputs = [t.requires_grad_() for t in ssd_inputs(1, 7, 2, 1, 1, 2, torch.float64, generator)]
    segment_start = torch.tensor([[False, False, True, False, False, False, True]])

    def scan(*args):
        return ssd_segmented(*args, segment_start, return_final_state=True, block_len=3)

    assert torch.autograd.gradcheck(scan, inputs, fast_mode=True)


@pytest.mark.parametrize("kind", ["chunks_and_documents", "single"])
def test_ssd_gradients_match_reference(kind):
    generator = torch.Generator().manual_seed(4)
    segment_start = segmentation(kind, 2, 23, generator)
    gradients = []
    for function in (ssd_reference, lambda *a: ssd_segmented(*a, block_len=BLOCK)):
        inputs = [t.requires_grad_() for t in ssd_inputs(2, 23, 4, 2, 2, 3, torch.float64, torch.Generator().manual_seed(5))]
        weights = torch.randn(2, 23, 4, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        (function(*inputs, segment_start) * weights).sum().backward()
        gradients.append([t.grad for t in inputs])
    for actual, expected in zip(gradients[1], gradients[0]):
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


def test_ssd_reset_cuts_the_past_exactly():
    """Tokens before a segment start cannot change any output from the start on; without the
    start they do."""
    generator = torch.Generator().manual_seed(7)
    u, dt, A, B, C, D = ssd_inputs(1, 30, 2, 2, 1, 3, torch.float32, generator)
    segment_start = torch.zeros(1, 30, dtype=torch.bool)
    segment_start[0, 13] = True
    changed_u, changed_B = u.clone(), B.clone()
    changed_u[:, :13] += 1.0
    changed_B[:, 5:13] -= 2.0
    for starts, unchanged in ((segment_start, True), (torch.zeros_like(segment_start), False)):
        before = ssd_segmented(u, dt, A, B, C, D, starts, block_len=BLOCK)
        after = ssd_segmented(changed_u, dt, A, changed_B, C, D, starts, block_len=BLOCK)
        assert not torch.equal(before[:, :13], after[:, :13])
        assert torch.equal(before[:, 13:], after[:, 13:]) == unchanged


def test_flag_at_position_zero_changes_nothing():
    generator = torch.Generator().manual_seed(8)
    inputs = ssd_inputs(2, 12, 2, 2, 1, 3, torch.float64, generator)
    x = torch.randn(2, 12, 5, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    unflagged = torch.zeros(2, 12, dtype=torch.bool)
    flagged = unflagged.clone()
    flagged[:, 0] = True
    for function in (ssd_segmented, ssd_reference):
        assert torch.equal(function(*inputs, unflagged), function(*inputs, flagged))
    for function in (causal_conv_segmented, causal_conv_reference):
        assert torch.equal(function(x, weight, None, unflagged), function(x, weight, None, flagged))


def test_positions_in_segment():
    segment_start = torch.tensor([[False, False, True, False, True, True, False]])
    assert positions_in_segment(segment_start).tolist() == [[0, 1, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize("kind", SEGMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_conv_matches_reference(kind, dtype, with_bias):
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(3, 17, 6, generator=generator, dtype=torch.float64).to(dtype)
    weight = torch.randn(6, 4, generator=generator, dtype=torch.float64).to(dtype)
    bias = torch.randn(6, generator=generator, dtype=torch.float64).to(dtype) if with_bias else None
    segment_start = segmentation(kind, 3, 17, generator)
    actual = causal_conv_segmented(x, weight, bias, segment_start)
    assert actual.dtype == dtype
    assert_close(actual, causal_conv_reference(x, weight, bias, segment_start), dtype)


def test_causal_conv_reference_by_hand():
    """Width 2, one channel: out_t = 10 * x_t + x_{t-1}, with x_{t-1} dropped at a start."""
    x = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    weight = torch.tensor([[1.0, 10.0]])
    segment_start = torch.tensor([[False, False, True, False]])
    expected = torch.tensor([[[10.0], [21.0], [30.0], [43.0]]])
    for function in (causal_conv_reference, causal_conv_segmented):
        assert torch.equal(function(x, weight, None, segment_start), expected)


def test_causal_conv_never_reaches_across_a_start():
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(1, 12, 3, generator=generator)
    weight = torch.randn(3, 4, generator=generator)
    segment_start = torch.zeros(1, 12, dtype=torch.bool)
    segment_start[0, 6] = True
    changed = x.clone()
    changed[:, 3:6] += 1.0
    before = causal_conv_segmented(x, weight, None, segment_start)
    after = causal_conv_segmented(changed, weight, None, segment_start)
    assert torch.equal(before[:, 6:], after[:, 6:])
    assert not torch.equal(before[:, 3:6], after[:, 3:6])
    no_start = torch.zeros_like(segment_start)
    assert not torch.equal(causal_conv_segmented(x, weight, None, no_start)[:, 6:8], causal_conv_segmented(changed, weight, None, no_start)[:, 6:8])


def test_causal_conv_gradcheck():
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, 9, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=generator, dtype=torch.float64, requires_grad=True)
    segment_start = segmentation("random", 2, 9, generator)
    assert torch.autograd.gradcheck(lambda *a: causal_conv_segmented(*a, segment_start), (x, weight, bias))


def test_groups_must_divide_heads():
    generator = torch.Generator().manual_seed(12)
    inputs = ssd_inputs(1, 4, 3, 2, 2, 2, torch.float64, generator)
    with pytest.raises(ValueError, match="multiple of the B/C groups"):
        ssd_segmented(*inputs, torch.zeros(1, 4, dtype=torch.bool))
