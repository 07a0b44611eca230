"""One decode step of the KV-SSM recurrence as a single Triton kernel, updating the state in place.

For each row b and head h (rows that start a segment begin from a zero state):

    S = exp(dt A_h) S [b does not start a segment] + dt u ⊗ B;   y = S C + D_h u

In PyTorch the step is several kernels at decode time (the decayed state written out, read back by
a batched matrix-vector product for y, then copied into the cache): at batch 16 and 64 heads' worth
of [head_dim, state_dim] fp32 states they moved the state three times. Here each program reads its
slice of the state once, writes it back once and reduces y on the way. The conv that precedes the
recurrence stays in PyTorch (torch.compile fuses it into one pointwise kernel).

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before import), which the CPU tests use.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Rows of a head's [head_dim, state_dim] state per program: 16 x 128 fp32 is 8 KiB of registers.
BLOCK_HEAD_DIM = 16


@triton.jit
def _ssm_step_kernel(
    xbc_ptr, dt_ptr, A_ptr, D_ptr, start_ptr, state_ptr, y_ptr,
    u_width, bc_width, heads_per_group, head_dim, state_dim,
    stride_xbc_b, stride_dt_b, stride_state_b, stride_state_h, stride_state_p, stride_y_b,
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
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
    starts = tl.load(start_ptr + b) != 0

    tile = state_ptr + b * stride_state_b + h * stride_state_h + p[:, None] * stride_state_p + s[None, :]
    tile_in = p_in[:, None] & s_in[None, :]
    state = tl.load(tile, mask=tile_in, other=0.0).to(tl.float32)
    # where, not a multiply by zero: a fresh segment must not inherit an inf or nan.
    decay = tl.where(starts, 0.0, tl.exp(dt * A))
    state = tl.where(starts, 0.0, state) * decay + (dt * u)[:, None] * B[None, :]
    tl.store(tile, state.to(state_ptr.dtype.element_ty), mask=tile_in)
    y = tl.sum(state * C[None, :], axis=1) + D * u
    tl.store(y_ptr + b * stride_y_b + h * head_dim + p, y.to(y_ptr.dtype.element_ty), mask=p_in)


@torch.library.custom_op("attamba::ssm_step_", mutates_args=("state",))
def _ssm_step(
    xbc: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, D: torch.Tensor, segment_start: torch.Tensor,
    state: torch.Tensor, groups: int,
) -> torch.Tensor:
    batch, heads, head_dim, state_dim = state.shape
    y = torch.empty(batch, heads, head_dim, device=state.device, dtype=state.dtype)
    grid = (batch, heads, triton.cdiv(head_dim, BLOCK_HEAD_DIM))
    _ssm_step_kernel[grid](
        xbc, dt, A, D, segment_start, state, y,
        heads * head_dim, groups * state_dim, heads // groups, head_dim, state_dim,
        xbc.stride(0), dt.stride(0), state.stride(0), state.stride(1), state.stride(2), y.stride(0),
        BLOCK_P=BLOCK_HEAD_DIM, BLOCK_S=triton.next_power_of_2(state_dim),
    )
    return y


@_ssm_step.register_fake
def _(xbc, dt, A, D, segment_start, state, groups):
    return state.new_empty(state.shape[:3])


def ssm_step_(
    xbc: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, D: torch.Tensor, segment_start: torch.Tensor,
    state: torch.Tensor, groups: int,
) -> torch.Tensor:
    """Advance ``state`` [B, heads, head_dim, state_dim] (fp32, updated in place) by one token;
    return y [B, heads, head_dim] in the state's dtype.

    xbc [B, heads·head_dim + 2·groups·state_dim]: the conv outputs (u, then B, then C; heads of a
    group share its B and C); dt [B, heads] after the softplus; A, D [heads]; segment_start [B]
    (bool): rows whose state resets before this token.
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
    if A.shape != (heads,) or D.shape != (heads,) or segment_start.shape != (batch,):
        raise ValueError(f"expected A, D [{heads}] and segment_start [{batch}]")
    if state.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError("ssm_step_ needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    if xbc.stride(-1) != 1 or dt.stride(-1) != 1:
        xbc, dt = xbc.contiguous(), dt.contiguous()
    return _ssm_step(xbc, dt, A.contiguous(), D.contiguous(), segment_start.to(torch.bool).contiguous(), state, groups)
