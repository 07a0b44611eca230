"""One decode step of the KV-SSM recurrence as a single Triton kernel, updating the state in place.

For each row b and head h (rows that start a segment begin from a zero state):

    S = exp(dt A_h) S [b does not start a segment] + dt u ⊗ B;   y = S C + D_h u

In PyTorch the step is several kernels at decode time (the decayed state written out, read back by
a batched matrix-vector product for y, then copied into the cache): at batch 16 and 64 heads' worth
of [head_dim, state_dim] fp32 states they moved the state three times. Here each program reads its
slice of the state once, writes it back once and reduces y on the way.

The conv and dt that precede the recurrence are a second kernel (:func:`conv_step_`): compiled
PyTorch split them, the paired concatenation and the conv state's shift into four or five small
kernels a layer, and at batch 1 a decode step is made of such launches. It cannot be folded into
the recurrence's kernel: every head of a group reads the group's B and C channels, whose conv
state one program would have to shift while the others still read it.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before import), which the CPU tests use.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Rows of a head's [head_dim, state_dim] state per program: 16 x 128 fp32 is 8 KiB of registers.
BLOCK_HEAD_DIM = 16


@triton.jit
def _start_flag(start_ptr, positions_ptr, b, BY_POSITION: tl.constexpr):
    """Row b's segment-start flag: start[b], or start[positions[b]] from a table by position."""
    if BY_POSITION:
        return tl.load(start_ptr + tl.load(positions_ptr + b))
    return tl.load(start_ptr + b)


@triton.jit
def _ssm_step_kernel(
    xbc_ptr, dt_ptr, A_ptr, D_ptr, start_ptr, positions_ptr, state_ptr, y_ptr,
    u_width, bc_width, heads_per_group, head_dim, state_dim,
    stride_xbc_b, stride_dt_b, stride_state_b, stride_state_h, stride_state_p, stride_y_b,
    BY_POSITION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    s = tl.arange(0, BLOCK_S)
    p_in, s_in = p < head_dim, s < state_dim
    group = h // heads_per_group
    row = xbc_ptr + b * stride_xbc_b
    u = tl.load(row + h * head_dim + p, mask=p_in, other=0.0).to(tl.float32)
    B = tl.load(row + u_width + group * state_dim + s, mask=s_in, other=0.0).to(tl.float32)
    C = tl.load(row + u_width + bc_width + group * state_dim + s, mask=s_in, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * stride_dt_b + h).to(tl.float32)
    A = tl.load(A_ptr + h).to(tl.float32)
    D = tl.load(D_ptr + h).to(tl.float32)
    starts = _start_flag(start_ptr, positions_ptr, b, BY_POSITION) != 0

    tile = state_ptr + b * stride_state_b + h * stride_state_h + p[:, None] * stride_state_p + s[None, :]
    tile_in = p_in[:, None] & s_in[None, :]
    state = tl.load(tile, mask=tile_in, other=0.0).to(tl.float32)
    # where, not a multiply by zero: a fresh segment must not inherit an inf or nan.
    decay = tl.where(starts, 0.0, tl.exp(dt * A))
    state = tl.where(starts, 0.0, state) * decay + (dt * u)[:, None] * B[None, :]
    tl.store(tile, state.to(state_ptr.dtype.element_ty), mask=tile_in)
    y = tl.sum(state * C[None, :], axis=1) + D * u
    tl.store(y_ptr + b * stride_y_b + h * head_dim + p, y.to(y_ptr.dtype.element_ty), mask=p_in)


@triton.jit
def _conv_step_kernel(
    first_ptr, second_ptr, weight_ptr, bias_ptr, dt_bias_ptr, start_ptr, positions_ptr, conv_state_ptr, conv_out_ptr, dt_out_ptr,
    hidden, bc_width, heads,
    stride_first_b, stride_second_b, stride_state_b, stride_state_c, stride_out_b, stride_dt_b,
    HAS_DT_BIAS: tl.constexpr, BY_POSITION: tl.constexpr, KERNEL: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0)
    which = tl.program_id(1)  # 0: the first SSM's projection, 1: the second's
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # the SSM's own conv channel: u, B, C
    channels = hidden + 2 * bc_width
    z_width = hidden  # a projection row is [z | u B C | dt]
    c_in = c < channels
    # The same channel in the side-by-side order [u_1, u_2, B_1, B_2, C_1, C_2] of the state.
    paired = tl.where(
        c < hidden, which * hidden + c,
        tl.where(c < hidden + bc_width, 2 * hidden + which * bc_width + c - hidden,
                 2 * (hidden + bc_width) + which * bc_width + c - hidden - bc_width),
    )
    from_first, from_second = c_in & (which == 0), c_in & (which == 1)
    x = (tl.load(first_ptr + b * stride_first_b + z_width + c, mask=from_first, other=0.0)
         + tl.load(second_ptr + b * stride_second_b + z_width + c, mask=from_second, other=0.0)).to(tl.float32)
    keep = _start_flag(start_ptr, positions_ptr, b, BY_POSITION) == 0

    k = tl.arange(0, BLOCK_K)
    taps = conv_state_ptr + b * stride_state_b + paired[:, None] * stride_state_c
    stored = k[None, :] < KERNEL - 1
    older = tl.load(taps + k[None, :], mask=c_in[:, None] & stored, other=0.0).to(tl.float32)
    # The window [state..., x], oldest first; a segment start forgets the state.
    window = tl.where(k[None, :] == KERNEL - 1, x[:, None], tl.where(keep, older, 0.0))
    weight = tl.load(weight_ptr + paired[:, None] * KERNEL + k[None, :], mask=c_in[:, None] & (k[None, :] < KERNEL), other=0.0)
    out = tl.sum(window * weight.to(tl.float32), axis=1) + tl.load(bias_ptr + paired, mask=c_in, other=0.0).to(tl.float32)
    out = out / (1.0 + tl.exp(-out))  # SiLU
    tl.store(conv_out_ptr + b * stride_out_b + paired, out.to(conv_out_ptr.dtype.element_ty), mask=c_in)

    newer = tl.load(taps + k[None, :] + 1, mask=c_in[:, None] & (k[None, :] < KERNEL - 2), other=0.0).to(tl.float32)
    shifted = tl.where(k[None, :] == KERNEL - 2, x[:, None], tl.where(keep, newer, 0.0))
    # Other threads of this program read the taps that the stores below overwrite.
    tl.debug_barrier()
    tl.store(taps + k[None, :], shifted.to(conv_state_ptr.dtype.element_ty), mask=c_in[:, None] & stored)

    if tl.program_id(2) == 0:  # dt = softplus(raw + bias) of this SSM's heads
        h = tl.arange(0, BLOCK_H)
        h_in = h < heads
        raw_at = z_width + channels + h
        raw = (tl.load(first_ptr + b * stride_first_b + raw_at, mask=h_in & (which == 0), other=0.0)
               + tl.load(second_ptr + b * stride_second_b + raw_at, mask=h_in & (which == 1), other=0.0)).to(tl.float32)
        if HAS_DT_BIAS:
            raw += tl.load(dt_bias_ptr + which * heads + h, mask=h_in, other=0.0).to(tl.float32)
        e = tl.exp(raw)
        grown = 1.0 + e
        # log1p(e) without a log1p: exact where 1 + e rounds, as torch's softplus above 20 is raw.
        log1p = tl.where(grown == 1.0, e, tl.log(grown) * (e / (grown - 1.0)))
        dt = tl.where(raw > 20.0, raw, log1p)
        tl.store(dt_out_ptr + b * stride_dt_b + which * heads + h, dt.to(dt_out_ptr.dtype.element_ty), mask=h_in)


# The kernels read every row through its stride, so the ops take their inputs in whatever layout
# a compiled step has them (flexible_layout): by default Inductor copies an input whose strides
# differ from eager's, and it pads the rows of matmul outputs (the projections these ops read),
# which cost two copy kernels a layer on the H100. Only the last dimension must be dense: the ops
# make it so where it is not.
_ANY_ROW_STRIDE = (torch.Tag.flexible_layout,)


def _dense_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("attamba::conv_step_", mutates_args=("conv_state",), tags=_ANY_ROW_STRIDE)
def _conv_step(
    first: torch.Tensor, second: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    dt_bias: Optional[torch.Tensor], segment_start: torch.Tensor, positions: Optional[torch.Tensor],
    conv_state: torch.Tensor, hidden: int, bc_width: int, heads: int, dt_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, paired_channels, _ = conv_state.shape
    first, second = _dense_rows(first), _dense_rows(second)
    weight, bias, segment_start = weight.contiguous(), bias.contiguous(), segment_start.contiguous()
    dt_bias, positions = (None if x is None else x.contiguous() for x in (dt_bias, positions))
    conv_out = torch.empty(batch, paired_channels, device=conv_state.device, dtype=conv_state.dtype)
    dt = torch.empty(batch, 2 * heads, device=conv_state.device, dtype=dt_dtype)
    block_c = 128
    grid = (batch, 2, triton.cdiv(hidden + 2 * bc_width, block_c))  # rows, the two SSMs, channels
    _conv_step_kernel[grid](
        first, second, weight, bias, dt_bias, segment_start, positions, conv_state, conv_out, dt,
        hidden, bc_width, heads,
        first.stride(0), second.stride(0), conv_state.stride(0), conv_state.stride(1), conv_out.stride(0), dt.stride(0),
        HAS_DT_BIAS=dt_bias is not None, BY_POSITION=positions is not None, KERNEL=weight.shape[1], BLOCK_C=block_c,
        BLOCK_K=triton.next_power_of_2(weight.shape[1]), BLOCK_H=triton.next_power_of_2(heads),
    )
    return conv_out, dt


@_conv_step.register_fake
def _(first, second, weight, bias, dt_bias, segment_start, positions, conv_state, hidden, bc_width, heads, dt_dtype):
    return conv_state.new_empty(conv_state.shape[:2]), conv_state.new_empty(conv_state.shape[0], 2 * heads, dtype=dt_dtype)


def conv_step_(
    first: torch.Tensor, second: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    dt_bias: Optional[torch.Tensor], segment_start: torch.Tensor, conv_state: torch.Tensor,
    hidden: int, bc_width: int, heads: int, dt_dtype: torch.dtype = torch.float32,
    positions: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv and dt of two KV-SSMs side by side for one token, from their in_proj outputs.

    first, second [B, hidden + conv channels + heads] (z, then u B C, then raw dt; rows may be
    strided views of one matmul's output); weight [2·channels, conv_size] and bias [2·channels]
    in the side-by-side order [u_1, u_2, B_1, B_2, C_1, C_2] that ``conv_state`` [B, 2·channels,
    conv_size - 1] (updated in place) uses too; dt_bias [2·heads] or None; segment_start: rows
    whose conv forgets its state before this token (see :func:`ssm_step_`).
    -> (SiLU(conv) [B, 2·channels] in the state's dtype, softplus(dt + dt_bias) [B, 2·heads] in
    ``dt_dtype``): what :func:`ssm_step_` reads.
    """
    channels = hidden + 2 * bc_width
    batch, paired_channels, taps = conv_state.shape
    width = channels + hidden + heads
    if paired_channels != 2 * channels or weight.shape != (paired_channels, taps + 1) or bias.shape != (paired_channels,):
        raise ValueError(
            f"expected conv_state [B, {2 * channels}, K-1], weight [{2 * channels}, K] and bias [{2 * channels}], "
            f"got {tuple(conv_state.shape)}, {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if first.shape != (batch, width) or second.shape != (batch, width):
        raise ValueError(f"expected both projections [{batch}, {width}], got {tuple(first.shape)} and {tuple(second.shape)}")
    if dt_bias is not None and dt_bias.shape != (2 * heads,):
        raise ValueError(f"expected dt_bias [{2 * heads}], got {tuple(dt_bias.shape)}")
    if not conv_state.is_contiguous():
        raise ValueError("expected a contiguous conv_state")
    segment_start, positions = _checked_starts(segment_start, positions, batch)
    if conv_state.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError("conv_step_ needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    return _conv_step(
        first, second, weight, bias, dt_bias, segment_start, positions, conv_state, hidden, bc_width, heads, dt_dtype,
    )


@torch.library.custom_op("attamba::ssm_step_", mutates_args=("state",), tags=_ANY_ROW_STRIDE)
def _ssm_step(
    xbc: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, D: torch.Tensor, segment_start: torch.Tensor,
    positions: Optional[torch.Tensor], state: torch.Tensor, groups: int,
) -> torch.Tensor:
    batch, heads, head_dim, state_dim = state.shape
    xbc, dt = _dense_rows(xbc), _dense_rows(dt)
    A, D, segment_start = A.contiguous(), D.contiguous(), segment_start.contiguous()
    positions = None if positions is None else positions.contiguous()
    y = torch.empty(batch, heads, head_dim, device=state.device, dtype=state.dtype)
    grid = (batch, heads, triton.cdiv(head_dim, BLOCK_HEAD_DIM))
    _ssm_step_kernel[grid](
        xbc, dt, A, D, segment_start, positions, state, y,
        heads * head_dim, groups * state_dim, heads // groups, head_dim, state_dim,
        xbc.stride(0), dt.stride(0), state.stride(0), state.stride(1), state.stride(2), y.stride(0),
        BY_POSITION=positions is not None, BLOCK_P=BLOCK_HEAD_DIM, BLOCK_S=triton.next_power_of_2(state_dim),
    )
    return y


@_ssm_step.register_fake
def _(xbc, dt, A, D, segment_start, positions, state, groups):
    return state.new_empty(state.shape[:3])


def ssm_step_(
    xbc: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, D: torch.Tensor, segment_start: torch.Tensor,
    state: torch.Tensor, groups: int, positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Advance ``state`` [B, heads, head_dim, state_dim] (fp32, updated in place) by one token;
    return y [B, heads, head_dim] in the state's dtype.

    xbc [B, heads·head_dim + 2·groups·state_dim]: the conv outputs (u, then B, then C; heads of a
    group share its B and C); dt [B, heads] after the softplus; A, D [heads]; segment_start [B]
    (bool): rows whose state resets before this token, or, with ``positions`` [B], a table [T]
    of whether each position starts a segment, read at the rows' positions inside the kernel
    (a decode step passes its cache's table, so that a compiled step need not materialize each
    layer's looked-up flags for the op: a buffer, and a kernel filling it, per layer).
    """
    batch, heads, head_dim, state_dim = state.shape
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"the state must be a contiguous float32 tensor, got {state.dtype}")
    if heads % groups:
        raise ValueError(f"heads ({heads}) must be a multiple of groups ({groups})")
    if xbc.shape != (batch, heads * head_dim + 2 * groups * state_dim) or dt.shape != (batch, heads):
        raise ValueError(
            f"expected xbc [{batch}, {heads * head_dim + 2 * groups * state_dim}] and dt [{batch}, {heads}], "
            f"got {tuple(xbc.shape)} and {tuple(dt.shape)}"
        )
    if A.shape != (heads,) or D.shape != (heads,):
        raise ValueError(f"expected A, D [{heads}]")
    segment_start, positions = _checked_starts(segment_start, positions, batch)
    if state.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError("ssm_step_ needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    return _ssm_step(xbc, dt, A, D, segment_start, positions, state, groups)


def _checked_starts(
    segment_start: torch.Tensor, positions: Optional[torch.Tensor], batch: int
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """segment_start [B] (or a table [T] with positions [B]) as the kernels read them."""
    if positions is None:
        if segment_start.shape != (batch,):
            raise ValueError(f"expected segment_start [{batch}], got {tuple(segment_start.shape)}")
    elif segment_start.dim() != 1 or positions.shape != (batch,):
        raise ValueError(
            f"expected a segment_start table [T] and positions [{batch}], got {tuple(segment_start.shape)} "
            f"and {tuple(positions.shape)}"
        )
    return segment_start.to(torch.bool), positions
