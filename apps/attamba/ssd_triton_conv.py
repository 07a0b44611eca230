"""Triton kernels (forward and backward) for the KV-SSM's segment-aware depthwise causal conv.

Same signature and semantics as ``ssd_reference.causal_conv_reference``:
out_t = bias + Σ_{i<k} weight[:, k-1-i] · x_{t-i}, where a tap reaching before the start of t's
segment reads zero. Each token's distance to its segment start (capped at k - 1: all a tap asks)
is computed once and shared by both kernels; a tap i is live at t iff i <= that distance.

With ``silu`` the kernels also apply the KV-SSM's SiLU to the output: the forward writes only
SiLU(out), and the backward, given the gradient w.r.t. SiLU(out), recomputes out from the taps it
reads anyway. Neither the SiLU nor its gradient is then a pass over memory of its own, and the
pre-activation is neither written nor kept for the backward.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from apps.attamba.ssd_reference import with_first_start

BLOCK_N = 64
BLOCK_C = 64
NUM_WARPS = 4
"""Tiles of the one-kernel backward (and the channels of the forward's): 64×64 tiles on 4 warps
were the fastest of benchmarks/tune_ssm_kernels.py's variants (8 warps; 32- or 128-token tiles) on
an H200 and an H100. A backward that walks 128–1024 tokens a program and reduces its weight
gradients once took 167–224 µs a layer against this one's 136 on the H100 (docs/benchmarks.md,
twelfth session) and was removed."""
FORWARD_BLOCK_N = 64
FORWARD_TILES = 1
"""The forward's tiles of tokens (its channels are BLOCK_C), and how many of them one program walks.
Isolated (benchmarks/tune_ssm_kernels.py, the same input every repeat), 32-token tiles two a program
took 41.3 µs at a 60M layer against 49.3, but inside the training step 505 µs a step against 461
(H200, twenty-first session, docs/benchmarks.md; ``profile_step.py --knobs`` times a step so)."""
SPLIT_BACKWARD = True
"""Run the backward (for convs of at most 4 taps) as two kernels: dx as a stencil like the
forward's (:func:`_conv_dx_kernel`), and the weight and bias gradients with each program summing
SPLIT_TOKENS tokens elementwise before one reduction (:func:`_conv_dw_kernel`), instead of one
kernel (:func:`_conv_bwd_kernel`) that reduces five [64, 64] products over tokens per tile. At a
60M layer's paired conv on an H200: 45.6 + 46.8 µs against 133.3 (docs/benchmarks.md, twelfth
session)."""
SPLIT_TOKENS = 128
SPLIT_BLOCK_N = 8
SPLIT_WARPS = 2
"""With the SiLU's gradient in the weight-gradient kernel (the model's path), 128-token spans of
16-token tiles on 2 warps took 101.6 µs at a 60M layer's paired conv on an H100, against 128.3 with
the 1024-token spans of 32-token tiles on 4 warps that were fastest without it (46.8 µs then;
fourteenth session). 8-token tiles: 88.9–89.2 µs against 101.8–102.1 with 16 (4-token tiles 92.6,
other spans 93.5–100.9; H100, seventeenth session). benchmarks/tune_ssm_kernels.py, docs/benchmarks.md."""

DX_BLOCK_N = 64
DX_BLOCK_C = 32
DX_WARPS = 2
"""Tokens and channels of a tile, and warps, of the split backward's dx kernel: 45.4 µs a 60M
layer against 50.2–50.4 with 64 channels on 4 warps (H100, seventeenth session; 32 on 1 warp 48.4,
64 on 2 warps 48.1). Several tiles a program, as the forward can walk, were slower: 32-token tiles
four a program 46.9 µs against 36.4 (H200, twenty-first session; that loop was then removed)."""

PLAIN_SPLIT_TOKENS = 1024
PLAIN_SPLIT_BLOCK_N = 32
PLAIN_SPLIT_WARPS = 4
"""The weight-gradient kernel's spans, tiles and warps without the SiLU (the plain conv): the
thirteenth session's settings, fastest then without the SiLU (46.8 µs a 60M layer, H200); 53.2 µs
against 60.6 with SPLIT_*'s (H100, sixteenth session)."""

FORWARD_CHANNELS_FASTEST = False
DX_CHANNELS_FASTEST = True
DW_CHANNELS_FASTEST = False
"""Whether a kernel's programs are launched channel block first (programs running side by side then
read whole rows of their inputs together) or batch row first. dx is faster channel block first:
36.7 µs a 60M layer against 38.8 isolated, 320 µs a step against 344 in the training step; the
weight-gradient kernel is slower (86.8 µs against 83.0 isolated); the forward was faster isolated
(49.5 against 50.7) but was not timed alone in the step (H200, twenty-first session)."""

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _grid(b: int, blocks: int, channel_blocks: int, channels_fastest: bool) -> tuple[int, int, int]:
    """The launch grid of (batch row, token block or span, channel block), channel blocks first or last."""
    return (channel_blocks, blocks, b) if channels_fastest else (b, blocks, channel_blocks)


@triton.jit
def _program_position(CHANNELS_FASTEST: tl.constexpr):
    """(batch row as int64, token block or span, channel block) of this program; see _grid."""
    if CHANNELS_FASTEST:
        bi, ci = tl.program_id(2), tl.program_id(0)
    else:
        bi, ci = tl.program_id(0), tl.program_id(2)
    return bi.to(tl.int64), tl.program_id(1), ci


@triton.jit
def _earlier_input(x_ptr, bi, t, ch, dist, in_seq, in_ch, i, stride_x_b, stride_x_n):
    """What tap i reads at tokens t: x_{t-i} [N, C] (zero before t's segment), fp32."""
    live = in_seq & (dist >= i)
    x = tl.load(
        x_ptr + bi * stride_x_b + (t - i).to(tl.int64)[:, None] * stride_x_n + ch[None, :],
        mask=live[:, None] & in_ch[None, :],
        other=0.0,
    )
    return x.to(tl.float32)


@triton.jit
def _tap(w_ptr, ch, in_ch, i, K: tl.constexpr):
    """Tap i's weights [C] (the one applied to x_{t-i}), fp32."""
    return tl.load(w_ptr + ch * K + (K - 1 - i), mask=in_ch, other=0.0).to(tl.float32)


@triton.jit
def _tap_and_input(x_ptr, w_ptr, bi, t, ch, dist, in_seq, in_ch, i, stride_x_b, stride_x_n,
                   K: tl.constexpr):
    """Tap i's weights [C] and what it reads, x_{t-i} [N, C] (zero before t's segment), fp32."""
    return _tap(w_ptr, ch, in_ch, i, K), _earlier_input(x_ptr, bi, t, ch, dist, in_seq, in_ch, i, stride_x_b, stride_x_n)


@triton.jit
def _later_grad(dout_ptr, dist_ptr, bi, t, ch, in_ch, i, n, stride_d_b, stride_d_n):
    """dout_{t+i} [N, C] where token t+i's tap i read x_t (t+i is i or more into its segment), else
    zero; fp32."""
    later = t + i
    later_live = (later < n) & (tl.load(dist_ptr + bi * n + later, mask=later < n, other=0) >= i)
    dout = tl.load(
        dout_ptr + bi * stride_d_b + later.to(tl.int64)[:, None] * stride_d_n + ch[None, :],
        mask=later_live[:, None] & in_ch[None, :],
        other=0.0,
    )
    return dout.to(tl.float32)


@triton.jit
def _silu_grad(grad, pre):
    """grad · SiLU'(pre), fp32."""
    sig = tl.sigmoid(pre)
    return grad * (sig * (1.0 + pre * (1.0 - sig)))


@triton.jit
def _store_weight_grad(dw_part_ptr, part, c, ch, in_ch, column, value, K: tl.constexpr):
    """Partial weight gradient ``value`` [C] into column ``column`` of slot ``part`` of dw_part
    [parts, c, K + 1]: tap i's in column K-1-i (the weight's column), the bias's in column K."""
    tl.store(dw_part_ptr + (part * c + ch) * (K + 1) + column, value, mask=in_ch)


@triton.jit
def _bias(bias_ptr, ch, in_ch, HAS_BIAS: tl.constexpr):
    """The bias [C] in fp32 (zeros without one)."""
    if HAS_BIAS:
        return tl.load(bias_ptr + ch, mask=in_ch, other=0.0).to(tl.float32)
    else:
        return tl.zeros(ch.shape, dtype=tl.float32)


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, dist_ptr, out_ptr,
    n, c, stride_x_b, stride_x_n,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    CHANNELS_FASTEST: tl.constexpr, TILES: tl.constexpr,
):
    """TILES tiles of BLOCK_N tokens, one after the other, for one (row, channel block)."""
    bi, block_n, block_c = _program_position(CHANNELS_FASTEST)
    ch = block_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_ch = ch < c
    for tile in range(TILES):
        t = (block_n * TILES + tile) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_seq = t < n
        dist = tl.load(dist_ptr + bi * n + t, mask=in_seq, other=0)  # [N] tokens since segment start
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for i in tl.static_range(K):
            tap, x = _tap_and_input(x_ptr, w_ptr, bi, t, ch, dist, in_seq, in_ch, i, stride_x_b, stride_x_n, K)
            acc += x * tap[None, :]
        acc += _bias(bias_ptr, ch, in_ch, HAS_BIAS)[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        out_offs = (bi * n + t.to(tl.int64)[:, None]) * c + ch[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=in_seq[:, None] & in_ch[None, :])


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, dist_ptr, dout_ptr, dx_ptr, dw_part_ptr,
    n, c, stride_x_b, stride_x_n, stride_d_b, stride_d_n,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_FASTEST: tl.constexpr,
):
    bi, block_n, block_c = _program_position(CHANNELS_FASTEST)
    t = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ch = block_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_seq = t < n
    in_ch = ch < c
    dout = tl.load(
        dout_ptr + bi * stride_d_b + t.to(tl.int64)[:, None] * stride_d_n + ch[None, :],
        mask=in_seq[:, None] & in_ch[None, :],
        other=0.0,
    ).to(tl.float32)  # [N, C]
    dist = tl.load(dist_ptr + bi * n + t, mask=in_seq, other=0)
    dx = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    # The partial weight gradients of this (row, token block) go to their own slot, summed later;
    # the slot's column K takes the bias gradient (Σ dout), saving the caller a pass over dout.
    part = bi * tl.num_programs(1) + block_n
    _store_weight_grad(dw_part_ptr, part, c, ch, in_ch, K, tl.sum(dout, axis=0), K)
    for i in tl.static_range(K):
        # Weight: token t's tap i read x_{t-i}.
        tap, x = _tap_and_input(x_ptr, w_ptr, bi, t, ch, dist, in_seq, in_ch, i, stride_x_b, stride_x_n, K)
        dw = tl.sum(dout * x, axis=0)  # [C]
        _store_weight_grad(dw_part_ptr, part, c, ch, in_ch, K - 1 - i, dw, K)
        # Input: x_t was read by token t+i's tap i.
        dx += _later_grad(dout_ptr, dist_ptr, bi, t, ch, in_ch, i, n, stride_d_b, stride_d_n) * tap[None, :]
    dx_offs = (bi * n + t.to(tl.int64)[:, None]) * c + ch[None, :]
    tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=in_seq[:, None] & in_ch[None, :])


@triton.jit
def _conv_dx_kernel(
    w_ptr, dist_ptr, dout_ptr, dx_ptr,
    n, c, stride_d_b, stride_d_n,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_FASTEST: tl.constexpr,
):
    """dx of the split backward (SPLIT_BACKWARD): the forward's stencil run on later tokens."""
    bi, block_n, block_c = _program_position(CHANNELS_FASTEST)
    t = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ch = block_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_ch = ch < c
    dx = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(K):
        tap = _tap(w_ptr, ch, in_ch, i, K)
        dx += _later_grad(dout_ptr, dist_ptr, bi, t, ch, in_ch, i, n, stride_d_b, stride_d_n) * tap[None, :]
    dx_offs = (bi * n + t.to(tl.int64)[:, None]) * c + ch[None, :]
    tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=(t < n)[:, None] & in_ch[None, :])


@triton.jit
def _conv_dw_kernel(
    x_ptr, w_ptr, bias_ptr, dist_ptr, dout_ptr, dw_part_ptr, dpre_ptr,
    n, c, stride_x_b, stride_x_n, stride_d_b, stride_d_n,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    SPAN: tl.constexpr, CHANNELS_FASTEST: tl.constexpr,
):
    """Weight and bias gradients of the split backward over SPAN tokens of one (row, channel
    block): each tap's products summed elementwise tile by tile, reduced over tokens once at the
    end. At most 4 taps (one accumulator each; Triton has no list of tensors).

    With ``SILU``, dout is the gradient w.r.t. SiLU(out): the kernel recomputes out from the
    inputs the taps read (the weight gradients read them anyway), turns dout into the gradient
    w.r.t. out, and writes that to dpre ([b, n, c], dense) for :func:`_conv_dx_kernel`."""
    bi, span, block_c = _program_position(CHANNELS_FASTEST)
    ch = block_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_ch = ch < c
    acc_bias = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc_0 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc_1 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc_2 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc_3 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for first in range(span * SPAN, tl.minimum(span * SPAN + SPAN, n), BLOCK_N):
        t = first + tl.arange(0, BLOCK_N)
        in_seq = t < n
        dout = tl.load(
            dout_ptr + bi * stride_d_b + t.to(tl.int64)[:, None] * stride_d_n + ch[None, :],
            mask=in_seq[:, None] & in_ch[None, :], other=0.0,
        ).to(tl.float32)
        dist = tl.load(dist_ptr + bi * n + t, mask=in_seq, other=0)
        x_0 = _earlier_input(x_ptr, bi, t, ch, dist, in_seq, in_ch, 0, stride_x_b, stride_x_n)
        if K > 1:
            x_1 = _earlier_input(x_ptr, bi, t, ch, dist, in_seq, in_ch, 1, stride_x_b, stride_x_n)
        if K > 2:
            x_2 = _earlier_input(x_ptr, bi, t, ch, dist, in_seq, in_ch, 2, stride_x_b, stride_x_n)
        if K > 3:
            x_3 = _earlier_input(x_ptr, bi, t, ch, dist, in_seq, in_ch, 3, stride_x_b, stride_x_n)
        if SILU:
            pre = _bias(bias_ptr, ch, in_ch, HAS_BIAS)[None, :] + x_0 * _tap(w_ptr, ch, in_ch, 0, K)[None, :]
            if K > 1:
                pre += x_1 * _tap(w_ptr, ch, in_ch, 1, K)[None, :]
            if K > 2:
                pre += x_2 * _tap(w_ptr, ch, in_ch, 2, K)[None, :]
            if K > 3:
                pre += x_3 * _tap(w_ptr, ch, in_ch, 3, K)[None, :]
            dout = _silu_grad(dout, pre)
            dpre_offs = (bi * n + t.to(tl.int64)[:, None]) * c + ch[None, :]
            tl.store(dpre_ptr + dpre_offs, dout.to(dpre_ptr.dtype.element_ty), mask=in_seq[:, None] & in_ch[None, :])
        acc_bias += dout
        acc_0 += dout * x_0
        if K > 1:
            acc_1 += dout * x_1
        if K > 2:
            acc_2 += dout * x_2
        if K > 3:
            acc_3 += dout * x_3
    part = bi * tl.num_programs(1) + span
    _store_weight_grad(dw_part_ptr, part, c, ch, in_ch, K, tl.sum(acc_bias, axis=0), K)
    _store_weight_grad(dw_part_ptr, part, c, ch, in_ch, K - 1, tl.sum(acc_0, axis=0), K)
    if K > 1:
        _store_weight_grad(dw_part_ptr, part, c, ch, in_ch, K - 2, tl.sum(acc_1, axis=0), K)
    if K > 2:
        _store_weight_grad(dw_part_ptr, part, c, ch, in_ch, K - 3, tl.sum(acc_2, axis=0), K)
    if K > 3:
        _store_weight_grad(dw_part_ptr, part, c, ch, in_ch, K - 4, tl.sum(acc_3, axis=0), K)


def _distance_to_segment_start(segment_start: torch.Tensor, cap: int) -> torch.Tensor:
    """[b, n] int32: t minus the position of the segment start at or before t, capped at ``cap``
    (a conv of k taps only asks whether that distance reaches i < k, so k - 1 is enough). Made of
    ``cap`` shifted copies of the starts rather than a scan: a compiled caller fuses them into one
    kernel, where the cummax this replaced ran as a kernel of its own in every layer."""
    starts = with_first_start(segment_start)
    n = starts.shape[1]
    dist = torch.full(starts.shape, cap, dtype=torch.int32, device=starts.device)
    for i in range(min(cap, n) - 1, -1, -1):  # the nearest start before t wins
        start_i_before = F.pad(starts[:, : n - i], (i, 0), value=False)
        dist = torch.where(start_i_before, i, dist)
    return dist


# Custom ops rather than an autograd.Function, so that torch.compile keeps the calling block in
# one graph (see apps.attamba.ssd_triton).
def _launch_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dist: torch.Tensor,
                    silu: bool) -> torch.Tensor:
    b, n, c = x.shape
    out = torch.empty((b, n, c), device=x.device, dtype=x.dtype)
    _conv_fwd_kernel[_grid(b, triton.cdiv(n, FORWARD_BLOCK_N * FORWARD_TILES), triton.cdiv(c, BLOCK_C), FORWARD_CHANNELS_FASTEST)](
        x, weight, bias if bias is not None else weight, dist, out,
        n, c, x.stride(0), x.stride(1),
        K=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu, BLOCK_N=FORWARD_BLOCK_N, BLOCK_C=BLOCK_C,
        CHANNELS_FASTEST=FORWARD_CHANNELS_FASTEST, TILES=FORWARD_TILES, num_warps=NUM_WARPS,
    )
    return out


def _dense_inputs(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (x if x.stride(-1) == 1 else x.contiguous()), weight.contiguous()


@torch.library.custom_op("attamba::causal_conv_segmented_fwd", mutates_args=())
def _conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dist: torch.Tensor,
                  silu: bool) -> torch.Tensor:
    """-> the conv's output, or its SiLU with ``silu``."""
    x, weight = _dense_inputs(x, weight)
    return _launch_forward(x, weight, bias, dist, silu)


@_conv_forward.register_fake
def _conv_forward_fake(x, weight, bias, dist, silu):
    return x.new_empty(x.shape)


def _weight_grad_span(k: int, silu: bool) -> int:
    """Tokens whose weight gradients one partial sum of the backward covers: a span of the split
    backward's weight-gradient kernel, or a token block of the one-kernel backward."""
    if SPLIT_BACKWARD and k <= 4:
        return SPLIT_TOKENS if silu else PLAIN_SPLIT_TOKENS
    return BLOCK_N


@torch.library.custom_op("attamba::causal_conv_segmented_bwd", mutates_args=())
def _conv_backward(
    dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dist: torch.Tensor,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dx, and the weight's and bias's gradients as float32 partial sums [parts, c, k + 1] (the
    bias's in the last column, computed with or without a bias; one part per batch row and span of
    :func:`_weight_grad_span` tokens), which the autograd formula sums: compiled, that reduction
    fuses with the split and casts that follow. With ``silu``, dout is the gradient w.r.t. the SiLU
    of the output (the bias then enters the recomputed output)."""
    b, n, c = x.shape
    k = weight.shape[1]
    x, weight = _dense_inputs(x, weight)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dx = torch.empty((b, n, c), device=x.device, dtype=x.dtype)
    channel_blocks = triton.cdiv(c, BLOCK_C)
    span = _weight_grad_span(k, silu)
    spans = triton.cdiv(n, span)
    dw_part = torch.empty((b * spans, c, k + 1), device=x.device, dtype=torch.float32)
    if SPLIT_BACKWARD and k <= 4:
        block_n, warps = (SPLIT_BLOCK_N, SPLIT_WARPS) if silu else (PLAIN_SPLIT_BLOCK_N, PLAIN_SPLIT_WARPS)
        if span % block_n:
            knobs = "" if silu else "PLAIN_"
            raise ValueError(f"{knobs}SPLIT_TOKENS ({span}) must be a multiple of {knobs}SPLIT_BLOCK_N ({block_n})")
        # With the SiLU, this kernel turns dout into the gradient w.r.t. the conv's output, which
        # the dx kernel then reads.
        dpre = torch.empty((b, n, c), device=x.device, dtype=x.dtype) if silu else dout
        _conv_dw_kernel[_grid(b, spans, channel_blocks, DW_CHANNELS_FASTEST)](
            x, weight, bias if bias is not None else weight, dist, dout, dw_part, dpre,
            n, c, x.stride(0), x.stride(1), dout.stride(0), dout.stride(1),
            K=k, HAS_BIAS=bias is not None, SILU=silu, BLOCK_N=block_n, BLOCK_C=BLOCK_C, SPAN=span,
            CHANNELS_FASTEST=DW_CHANNELS_FASTEST, num_warps=warps,
        )
        _conv_dx_kernel[_grid(b, triton.cdiv(n, DX_BLOCK_N), triton.cdiv(c, DX_BLOCK_C), DX_CHANNELS_FASTEST)](
            weight, dist, dpre, dx, n, c, dpre.stride(0), dpre.stride(1),
            K=k, BLOCK_N=DX_BLOCK_N, BLOCK_C=DX_BLOCK_C, CHANNELS_FASTEST=DX_CHANNELS_FASTEST, num_warps=DX_WARPS,
        )
    else:
        if silu:  # the one-kernel backward takes the gradient w.r.t. the output itself
            pre = _launch_forward(x, weight, bias, dist, silu=False).float()
            dout = torch.ops.aten.silu_backward(dout.float(), pre).to(x.dtype)
        _conv_bwd_kernel[_grid(b, spans, channel_blocks, False)](  # spans of BLOCK_N tokens
            x, weight, dist, dout, dx, dw_part, n, c, x.stride(0), x.stride(1), dout.stride(0), dout.stride(1),
            K=k, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, CHANNELS_FASTEST=False, num_warps=NUM_WARPS,
        )
    return dx, dw_part


@_conv_backward.register_fake
def _conv_backward_fake(dout, x, weight, bias, dist, silu):
    b, n, _ = x.shape
    c, k = weight.shape
    spans = triton.cdiv(n, _weight_grad_span(k, silu))
    return x.new_empty(x.shape), x.new_empty((b * spans, c, k + 1), dtype=torch.float32)


def _conv_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, dist, silu = inputs
    ctx.save_for_backward(x, weight, bias, dist)
    ctx.silu = silu


def _conv_autograd(ctx, dout):
    x, weight, bias, dist = ctx.saved_tensors
    dx, dweight_bias = _conv_backward(dout, x, weight, bias, dist, ctx.silu)
    dweight_bias = dweight_bias.sum(0)  # the weight's and bias's gradients in one reduction
    k = weight.shape[1]
    dbias = dweight_bias[:, k].to(bias.dtype) if bias is not None else None
    return dx, dweight_bias[:, :k].to(weight.dtype), dbias, None, None


torch.library.register_autograd("attamba::causal_conv_segmented_fwd", _conv_autograd, setup_context=_conv_setup_context)


def causal_conv_segmented_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    segment_start: torch.Tensor,
    silu: bool = False,
) -> torch.Tensor:
    """Depthwise causal conv that never reaches back across a segment start (Triton).

    x [b, n, c]; weight [c, k], tap k-1 multiplying the current token; bias [c] or None;
    segment_start [b, n] bool (position 0 always starts a segment). Returns x.dtype: the conv's
    output, or with ``silu`` its SiLU, applied inside the kernels (see the module's docstring).
    """
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"expected x [b, n, c] and weight [c, k]; got {tuple(x.shape)}, {tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[2],):
        raise ValueError(f"bias must be [{x.shape[2]}], got {tuple(bias.shape)}")
    if segment_start.shape != x.shape[:2]:
        raise ValueError(f"segment_start must be {list(x.shape[:2])}, got {tuple(segment_start.shape)}")
    if x.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError("causal_conv_segmented_triton needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    return _conv_forward(x, weight, bias, _distance_to_segment_start(segment_start, weight.shape[1] - 1), silu)


def causal_conv_silu_segmented_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], segment_start: torch.Tensor
) -> torch.Tensor:
    """SiLU(:func:`causal_conv_segmented_triton`), with the SiLU and its gradient in the conv's kernels."""
    return causal_conv_segmented_triton(x, weight, bias, segment_start, silu=True)
