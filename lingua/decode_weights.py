"""Weights arranged for decoding: linear layers that read the same input, as one matmul.

A decode step multiplies a handful of rows by every weight matrix, so each matmul is a small,
launch-bound kernel: on the H100 the 60M Attamba's step at batch 1 ran 72 matmuls of ~3.4 µs
each among its 310 kernels (docs/benchmarks.md). Stacking the weights that read one input (the
query and key/value projections; SwiGLU's w1 and w3) makes one matmul of each group.

The stacked weights are a snapshot taken when a cache is made (every generation makes its own
cache): a cache must not outlive an update of the weights it decodes with.

At one row per matmul, inside a compiled CUDA step, :func:`decode_linear` writes the product as a
multiply and a sum, which Inductor makes one of its reduction kernels: on the H100 these took
1.5–2.2 µs where cuBLAS took 2.9–4.3 µs for the 60M models' shapes
(benchmarks/bench_decode_matvec.py, docs/benchmarks.md, eighth session). From two rows on cuBLAS
was as fast or faster, and outside torch.compile the product would be materialized, so everything
else stays F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear_by_reduction(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (x [..., in], weight [..., out, in], batch dims broadcasting) as a
    multiply and an fp32 sum over ``in``: one reduction kernel under torch.compile."""
    return (x[..., None, :].float() * weight.float()).sum(-1).to(x.dtype)


def _by_reduction(x: torch.Tensor, rows: int) -> bool:
    """Whether a product of ``rows`` rows of x runs as a reduction: one row, on CUDA, while
    torch.compile traces (see the module docstring)."""
    return rows == 1 and x.is_cuda and torch.compiler.is_compiling()


def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for x [..., in]: :func:`linear_by_reduction` for one row of x on
    CUDA under torch.compile, else F.linear."""
    if _by_reduction(x, x.numel() // x.shape[-1]):
        return linear_by_reduction(x, weight)
    return F.linear(x, weight)


class DecodeLinear:
    """A bias-free linear layer as a decode step runs it (:func:`decode_linear`); it reads the
    layer's own weight, no copy."""

    def __init__(self, linear: nn.Linear):
        if linear.bias is not None:
            raise ValueError("DecodeLinear takes bias-free linear layers only")
        self.weight = linear.weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight)


class StackedLinear:
    """Bias-free linear layers that read the same input, as one matmul: ``x -> (y_1, y_2, ...)``."""

    def __init__(self, *linears: nn.Linear):
        if any(linear.bias is not None for linear in linears):
            raise ValueError("StackedLinear stacks bias-free linear layers only")
        with torch.no_grad():
            self.weight = torch.cat([linear.weight for linear in linears], dim=0)
        self.sizes = [linear.out_features for linear in linears]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return decode_linear(x, self.weight).split(self.sizes, dim=-1)


class PairedLinear:
    """Two bias-free linear layers of the same shape applied to two inputs, as one batched matmul:
    ``(x_1, x_2) -> (first(x_1), second(x_2))``."""

    def __init__(self, first: nn.Linear, second: nn.Linear):
        if first.bias is not None or second.bias is not None or first.weight.shape != second.weight.shape:
            raise ValueError("PairedLinear pairs bias-free linear layers of the same shape")
        with torch.no_grad():
            self.weight = torch.stack([first.weight, second.weight])  # [2, out, in]

    def __call__(self, x_1: torch.Tensor, x_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_1, x_2 [B, in] -> [B, out] each."""
        y = self.stacked(torch.stack([x_1, x_2]))
        return y[0], y[1]

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        """Both inputs stacked, [2, B, in] -> [2, B, out]."""
        if _by_reduction(x, x.shape[1]):
            return linear_by_reduction(x, self.weight[:, None])
        return torch.bmm(x, self.weight.mT)


class StackedSwiGLU:
    """A SwiGLU feed-forward (lingua.transformer.SwiGLU) with w1 and w3 as one matmul."""

    def __init__(self, feed_forward: nn.Module):
        self.gate_and_up = StackedLinear(feed_forward.w1, feed_forward.w3)
        self.down = DecodeLinear(feed_forward.w2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_and_up(x)
        return self.down(F.silu(gate) * up)
