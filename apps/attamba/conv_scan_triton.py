"""The KV-SSM's conv, its SiLU and the windowed scan as one op (Triton): the conv's output is
never written.

A KV-SSM computes (u, B, C) = SiLU(conv(conv_in)) and scans them. Run apart
(:mod:`apps.attamba.ssd_triton_conv`, then :mod:`apps.attamba.ssd_triton_window`), the conv writes
its output, the scan reads it, autograd keeps it for the backward, and the conv's backward
recomputes its pre-activation for the SiLU's gradient. Here the windowed scan kernels compute
each tile of u, B and C from the conv's input with the conv's taps (CONV: four shifted reads of
rows already in L1/L2), forward and backward; the backward applies SiLU's derivative on its
recomputed pre-activations and hands the gradient w.r.t. the conv's output to the conv's own
weight and input gradient kernels (without their SiLU). Per 60M layer this drops the conv's
forward kernel, one [b, n, c] tensor kept for the backward, and the SiLU work of the conv's
weight-gradient kernel.

Same semantics as ``SiLU(causal_conv_reference(...))`` followed by ``ssd_reference``; applies
where the windowed kernels do (:func:`apps.attamba.ssd_triton_window.supports`) and the conv has at
most 4 taps, else runs the two apart. Runs on CUDA tensors, or under the Triton interpreter.
"""

from __future__ import annotations

from typing import Optional

import torch

from apps.attamba import ssd_triton_conv, ssd_triton_window
from apps.attamba.ssd_triton import _as_bytes, _check_inputs, _last_dim_contiguous
from apps.attamba.ssd_reference import split_scan_inputs
from apps.attamba.ssd_triton_window import ConvTaps, SegmentPeriod

FUSED = True
"""Compute the conv inside the scan kernels; False runs the conv's kernels and then the scan (for
comparisons)."""
MAX_TAPS = 4  # the conv's weight-gradient kernel keeps one accumulator a tap, four at most


@torch.library.custom_op("attamba::conv_ssd_window_fwd", mutates_args=())
def _conv_scan_forward(
    conv_in: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dist: torch.Tensor,
    dt: torch.Tensor, A: torch.Tensor, D: torch.Tensor, starts: torch.Tensor,
    groups: int, state_dim: int, block_q: int, block_shift: int,
) -> torch.Tensor:
    """-> y [b, n, h, p] of the scan over SiLU(conv(conv_in)) (u, B, C side by side)."""
    return ssd_triton_window.launch_forward(
        _last_dim_contiguous(conv_in), dt.contiguous(), A, D, starts, groups, state_dim, block_q, block_shift,
        conv=ConvTaps(weight.contiguous(), bias, dist))


@_conv_scan_forward.register_fake
def _conv_scan_forward_fake(conv_in, weight, bias, dist, dt, A, D, starts, groups, state_dim, block_q, block_shift):
    b, n, c = conv_in.shape
    return conv_in.new_empty((b, n, A.shape[0], (c - 2 * groups * state_dim) // A.shape[0]))


@torch.library.custom_op("attamba::conv_ssd_window_bwd", mutates_args=())
def _conv_scan_backward(
    dy: torch.Tensor, conv_in: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dist: torch.Tensor,
    dt: torch.Tensor, A: torch.Tensor, D: torch.Tensor, starts: torch.Tensor,
    groups: int, state_dim: int, block_q: int, block_shift: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> d conv_in, d weight, d bias (fp32; empty without a bias), ddt, dA, dD."""
    conv_in, weight = _last_dim_contiguous(conv_in), weight.contiguous()
    d_pre, ddt, dA, dD = ssd_triton_window.launch_backward(
        dy, conv_in, dt.contiguous(), A, D, starts, groups, state_dim, block_q, block_shift,
        conv=ConvTaps(weight, bias, dist))
    d_in, d_weight, d_bias = ssd_triton_conv.conv_backward(d_pre, conv_in, weight, bias, dist, silu=False)
    return d_in, d_weight, d_bias, ddt.to(dt.dtype), dA, dD


@_conv_scan_backward.register_fake
def _conv_scan_backward_fake(dy, conv_in, weight, bias, dist, dt, A, D, starts, groups, state_dim, block_q,
                             block_shift):
    d_bias = conv_in.new_empty((conv_in.shape[2],) if bias is not None else (0,), dtype=torch.float32)
    return conv_in.new_empty(conv_in.shape), weight.new_empty(weight.shape), d_bias, dt.new_empty(dt.shape), \
        A.new_empty(A.shape), D.new_empty(D.shape)


def _setup_context(ctx, inputs, output) -> None:
    conv_in, weight, bias, dist, dt, A, D, starts, *sizes = inputs
    ctx.save_for_backward(conv_in, weight, bias, dist, dt, A, D, starts)
    ctx.sizes = sizes


def _autograd(ctx, dy):
    conv_in, weight, bias, dist, dt, A, D, starts = ctx.saved_tensors
    d_in, d_weight, d_bias, ddt, dA, dD = _conv_scan_backward(dy, conv_in, weight, bias, dist, dt, A, D, starts,
                                                              *ctx.sizes)
    d_bias = d_bias.to(bias.dtype) if bias is not None else None
    return d_in, d_weight, d_bias, None, ddt, dA, dD, None, None, None, None, None


torch.library.register_autograd("attamba::conv_ssd_window_fwd", _autograd, setup_context=_setup_context)


def conv_silu_scan_window(
    conv_in: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    dt: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    segment_start: torch.Tensor,
    groups: int,
    state_dim: int,
    max_segment_len: Optional[int] = None,
    segment_period: Optional[SegmentPeriod] = None,
) -> torch.Tensor:
    """The windowed scan over (u, B, C) = SiLU(conv(conv_in)) -> y [b, n, h, p] (h = A's length).

    conv_in [b, n, h·p + 2·g·s] holds the conv's input channels in the scan's order (u, then B,
    then C, as :func:`apps.attamba.ssd_reference.split_scan_inputs` splits them); weight [c, k],
    bias [c] or None, as :func:`apps.attamba.ssd_triton_conv.causal_conv_segmented_triton` takes
    them; the rest as :func:`apps.attamba.ssd_triton_window.ssd_segmented_window_packed`. The
    segment bound and period are trusted, as there. Falls back to the conv and then the scan
    where the fused kernels do not apply (no usable bound, more than 4 taps, or FUSED off).
    """
    heads, channels = A.shape[0], conv_in.shape[-1]
    bc = groups * state_dim
    if conv_in.dim() != 3 or channels <= 2 * bc or (channels - 2 * bc) % heads:
        raise ValueError(
            f"conv_in must be [b, n, h·p + 2·g·s] with h={heads}, g={groups}, s={state_dim}; got {tuple(conv_in.shape)}"
        )
    if weight.dim() != 2 or weight.shape[0] != channels or (bias is not None and bias.shape != (channels,)):
        bias_shape = None if bias is None else tuple(bias.shape)
        raise ValueError(f"weight must be [{channels}, k] and bias [{channels}]; got {tuple(weight.shape)}, {bias_shape}")
    bound = ssd_triton_window._segment_bound(max_segment_len, segment_period)
    if not (FUSED and weight.shape[1] <= MAX_TAPS and ssd_triton_window.supports(bound, return_final_state=False)):
        conv_out = ssd_triton_conv.causal_conv_silu_segmented_triton(conv_in, weight, bias, segment_start)
        return ssd_triton_window.ssd_segmented_window_packed(conv_out, dt, A, D, segment_start, groups, state_dim,
                                                             max_segment_len, segment_period)
    u, B, C = split_scan_inputs(conv_in, heads, groups, state_dim)
    _check_inputs(u, dt, A, B, C, D, segment_start)
    dist = ssd_triton_conv.distance_to_segment_start(segment_start)
    return _conv_scan_forward(conv_in, weight, bias, dist, dt, A, D, _as_bytes(segment_start), groups, state_dim,
                              *ssd_triton_window.block_layout(bound, segment_period))
