"""Decode-time stacked weights compute what the separate layers compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lingua.decode_weights import PairedLinear, StackedLinear, StackedSwiGLU
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


def test_layers_with_a_bias_or_unequal_shapes_are_refused():
    with pytest.raises(ValueError, match="bias-free"):
        StackedLinear(nn.Linear(4, 4, bias=True))
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
