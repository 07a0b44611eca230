"""Decode-time stacked weights compute what the separate layers compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lingua.decode_weights import (
    DecodeLinear, PairedLinear, StackedLinear, StackedSwiGLU, decode_linear, linear_by_reduction,
)
from lingua.transformer import SwiGLU


def test_stacked_linear_equals_its_layers():
    torch.manual_seed(0)
    layers = [nn.Linear(8, width, bias=False) for width in (8, 5, 3)]
    x = torch.randn(4, 8)
    for got, layer in zip(StackedLinear(*layers)(x), layers):
        torch.testing.assert_close(got, layer(x))


def test_paired_linear_applies_each_layer_to_its_input():
    torch.manual_seed(0)
    first, second = nn.Linear(6, 4, bias=False), nn.Linear(6, 4, bias=False)
    x_1, x_2 = torch.randn(3, 6), torch.randn(3, 6)
    got_1, got_2 = PairedLinear(first, second)(x_1, x_2)
    torch.testing.assert_close(got_1, first(x_1))
    torch.testing.assert_close(got_2, second(x_2))


def test_stacked_swiglu_equals_swiglu():
    torch.manual_seed(0)
    feed_forward = SwiGLU(8, 24)
    x = torch.randn(2, 1, 8)
    torch.testing.assert_close(StackedSwiGLU(feed_forward)(x), feed_forward(x))


def test_linear_by_reduction_equals_f_linear():
    torch.manual_seed(0)
    weight = torch.randn(2, 1, 7, 5)  # batch dims broadcast against x's
    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(linear_by_reduction(x, weight), torch.einsum("bmi,boi->bmo", x, weight[:, 0]))
    x, weight = torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(48, 64, dtype=torch.bfloat16)
    got = linear_by_reduction(x, weight)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, F.linear(x.double(), weight.double()).to(torch.bfloat16), rtol=1e-2, atol=1e-2)


def test_decode_linear_is_f_linear_outside_compiled_cuda_steps():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=False)
    x = torch.randn(1, 6)
    assert torch.equal(decode_linear(x, layer.weight), F.linear(x, layer.weight))
    compiled = torch.compile(lambda x: DecodeLinear(layer)(x), dynamic=False)
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the reduction form is chosen on CUDA only")
def test_compiled_one_row_matmuls_match_eager_on_cuda():
    torch.manual_seed(0)
    first, second = (nn.Linear(512, 384, bias=False).cuda().bfloat16() for _ in range(2))
    stacked, paired = StackedLinear(first, second), PairedLinear(first, second)
    for rows in (1, 2):  # the reduction form, then cuBLAS
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        pair = torch.stack([x, -x])
        got = torch.compile(lambda x, pair: (*stacked(x), paired.stacked(pair)), dynamic=False)(x, pair)
        expected = (*stacked(x), paired.stacked(pair))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2)


def test_layers_with_a_bias_or_unequal_shapes_are_refused():
    with pytest.raises(ValueError, match="bias-free"):
        StackedLinear(nn.Linear(4, 4, bias=True))
    with pytest.raises(ValueError, match="bias-free"):
        DecodeLinear(nn.Linear(4, 4, bias=True))
    with pytest.raises(ValueError, match="same shape"):
        PairedLinear(nn.Linear(4, 4, bias=False), nn.Linear(4, 5, bias=False))


def test_the_weights_are_a_snapshot():
    """A cache decodes with the weights it was made with (documented in lingua.decode_weights)."""
    layer = nn.Linear(4, 4, bias=False)
    stacked = StackedLinear(layer)
    x = torch.randn(1, 4)
    before = stacked(x)[0]
    with torch.no_grad():
        layer.weight.add_(1.0)
    torch.testing.assert_close(stacked(x)[0], before)
