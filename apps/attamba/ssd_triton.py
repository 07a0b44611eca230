"""Fused Triton kernels (forward and backward) for the KV-SSM's segmented SSD scan.

Same signature and semantics as ``ssd_reference.ssd_reference`` (see DESIGN.md, "KV-SSM"):

    S_t = exp(dt_t * A_h) * S_{t-1} * [t does not start a segment] + dt_t * u_t ⊗ B_t
    y_t = S_t C_t + D_h * u_t

Algorithm: one program per (batch row, head) walks the sequence in blocks of Q tokens and keeps
the state S [p, s] in registers. Inside a block the output is the masked quadratic form
(L ∘ C Bᵀ)(dt·u), where L[t, j] = exp(cs_t - cs_j) when j <= t lie in the same segment (cs is the
block-local cumsum of dt·A); the carried state reaches only the tokens before the block's first
segment start. The backward kernel walks the blocks in reverse, carrying dS, and re-reads the
block-entry states that the forward pass stored (fp32, [b·h, n/Q, p, s]).

Every matmul accumulates in fp32. fp32 inputs use 3xTF32 dots (near-fp32 accuracy on tensor
cores); bf16/fp16 inputs use plain TF32, finer than their own mantissa.

Importing this module needs ``triton``; it runs on CUDA tensors, or on CPU tensors under the
Triton interpreter (``TRITON_INTERPRET=1`` set before import), which the CPU tests use.
"""

from __future__ import annotations

import os
from typing import Union

import torch
import triton
import triton.language as tl

from apps.attamba.ssd_triton_conv import causal_conv_segmented_triton

__all__ = ["ssd_segmented_triton", "causal_conv_segmented_triton"]

# Tokens per block of the chunked scan. 32 keeps the backward's [Q, s] tiles in registers at
# s = 128; the benchmark (benchmarks/bench_ssm.py) sweeps it.
DEFAULT_BLOCK_Q = 32
DEFAULT_NUM_WARPS = 4

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_precision(dtype: torch.dtype) -> str:
    if _INTERPRETED:
        return "ieee"  # the interpreter multiplies in numpy; no tensor-core modes
    return "tf32" if dtype in (torch.bfloat16, torch.float16) else "tf32x3"


def _padded(size: int) -> int:
    # tl.arange needs powers of two and tl.dot needs every dimension >= 16.
    return max(16, triton.next_power_of_2(size))


@triton.jit
def _block_scan_terms(dt_ptr, start_ptr, A_h, bi, hi, blk, n, stride_dt_b, stride_dt_n,
                      BLOCK_Q: tl.constexpr):
    """Per-token decay terms of one block: dt, the block-local cumsum of dt·A, segment ids."""
    offs_q = tl.arange(0, BLOCK_Q)
    t = blk * BLOCK_Q + offs_q
    in_seq = t < n
    dt = tl.load(dt_ptr + bi * stride_dt_b + t * stride_dt_n + hi, mask=in_seq, other=0.0)
    dt = dt.to(tl.float32)
    starts = tl.load(start_ptr + bi * n + t, mask=in_seq, other=0).to(tl.int32)
    starts = tl.where(t == 0, 1, starts)
    cs = tl.cumsum(dt * A_h, axis=0)  # [Q] log-decay from the block start through t
    seg = tl.cumsum(starts, axis=0)  # [Q] 0 while no segment has started inside the block
    cs_last = tl.sum(dt * A_h, axis=0)  # padded tokens have dt = 0, so this is cs at row Q-1
    seg_last = tl.max(seg, axis=0)
    same = (seg[:, None] == seg[None, :]) & (offs_q[:, None] >= offs_q[None, :])
    # L[t, j]: decay from j to t inside one segment, else 0.
    L = tl.exp(tl.where(same, cs[:, None] - cs[None, :], float("-inf")))  # [Q, Q]
    # e_t: how much of the carried-in state reaches t; w_j: how much of token j reaches the
    # block's exit state; f: how much of the carried-in state reaches the exit.
    e = tl.where(seg == 0, tl.exp(cs), 0.0)
    w = tl.where(seg == seg_last, tl.exp(cs_last - cs), 0.0)
    f = tl.where(seg_last == 0, tl.exp(cs_last), 0.0)
    return t, in_seq, dt, L, e, w, f


@triton.jit
def _ssd_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, start_ptr, y_ptr, states_ptr, final_ptr,
    n, h, p, s, heads_per_group, num_blocks,
    stride_u_b, stride_u_n, stride_u_h,
    stride_dt_b, stride_dt_n,
    stride_bc_b, stride_bc_n, stride_bc_g,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    STORE_STATES: tl.constexpr, STORE_FINAL: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    bi = (pid // h).to(tl.int64)
    hi = pid % h
    gi = hi // heads_per_group
    A_h = tl.load(A_ptr + hi).to(tl.float32)
    D_h = tl.load(D_ptr + hi).to(tl.float32)
    offs_p = tl.arange(0, BLOCK_P)
    offs_s = tl.arange(0, BLOCK_S)
    state = tl.zeros((BLOCK_P, BLOCK_S), dtype=tl.float32)
    for blk in range(0, num_blocks):
        t, in_seq, dt, L, e, w, f = _block_scan_terms(
            dt_ptr, start_ptr, A_h, bi, hi, blk, n, stride_dt_b, stride_dt_n, BLOCK_Q
        )
        t64 = t.to(tl.int64)
        u_mask = in_seq[:, None] & (offs_p[None, :] < p)
        u_offs = bi * stride_u_b + t64[:, None] * stride_u_n + hi * stride_u_h + offs_p[None, :]
        u = tl.load(u_ptr + u_offs, mask=u_mask, other=0.0).to(tl.float32)  # [Q, P]
        bc_mask = in_seq[:, None] & (offs_s[None, :] < s)
        bc_offs = bi * stride_bc_b + t64[:, None] * stride_bc_n + gi * stride_bc_g + offs_s[None, :]
        Bq = tl.load(B_ptr + bc_offs, mask=bc_mask, other=0.0).to(tl.float32)  # [Q, S]
        Cq = tl.load(C_ptr + bc_offs, mask=bc_mask, other=0.0).to(tl.float32)  # [Q, S]
        x = u * dt[:, None]
        G = tl.dot(Cq, tl.trans(Bq), input_precision=PRECISION)  # [Q, Q]
        y = tl.dot(G * L, x, input_precision=PRECISION)  # [Q, P]
        y += e[:, None] * tl.dot(Cq, tl.trans(state), input_precision=PRECISION)
        y += D_h * u
        y_offs = (bi * n + t64[:, None]) * h * p + hi * p + offs_p[None, :]
        tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=u_mask)
        if STORE_STATES:
            st_offs = ((pid.to(tl.int64) * num_blocks + blk) * BLOCK_P + offs_p[:, None]) * BLOCK_S
            tl.store(states_ptr + st_offs + offs_s[None, :], state)
        state = f * state + tl.dot(tl.trans(x * w[:, None]), Bq, input_precision=PRECISION)
    if STORE_FINAL:
        final_offs = (pid.to(tl.int64) * BLOCK_P + offs_p[:, None]) * BLOCK_S + offs_s[None, :]
        tl.store(final_ptr + final_offs, state)


@triton.jit
def _ssd_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, start_ptr, dy_ptr, states_ptr,
    du_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr,
    n, h, p, s, heads_per_group, num_blocks,
    stride_u_b, stride_u_n, stride_u_h,
    stride_dt_b, stride_dt_n,
    stride_bc_b, stride_bc_n, stride_bc_g,
    stride_dy_b, stride_dy_n, stride_dy_h,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    bi = (pid // h).to(tl.int64)
    hi = pid % h
    gi = hi // heads_per_group
    g = h // heads_per_group
    A_h = tl.load(A_ptr + hi).to(tl.float32)
    D_h = tl.load(D_ptr + hi).to(tl.float32)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_p = tl.arange(0, BLOCK_P)
    offs_s = tl.arange(0, BLOCK_S)
    d_state = tl.zeros((BLOCK_P, BLOCK_S), dtype=tl.float32)  # dLoss/d(state leaving the block)
    dA_acc = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for step in range(0, num_blocks):
        blk = num_blocks - 1 - step
        t, in_seq, dt, L, e, w, f = _block_scan_terms(
            dt_ptr, start_ptr, A_h, bi, hi, blk, n, stride_dt_b, stride_dt_n, BLOCK_Q
        )
        t64 = t.to(tl.int64)
        u_mask = in_seq[:, None] & (offs_p[None, :] < p)
        u_offs = bi * stride_u_b + t64[:, None] * stride_u_n + hi * stride_u_h + offs_p[None, :]
        u = tl.load(u_ptr + u_offs, mask=u_mask, other=0.0).to(tl.float32)  # [Q, P]
        dy_offs = bi * stride_dy_b + t64[:, None] * stride_dy_n + hi * stride_dy_h + offs_p[None, :]
        dy = tl.load(dy_ptr + dy_offs, mask=u_mask, other=0.0).to(tl.float32)  # [Q, P]
        bc_mask = in_seq[:, None] & (offs_s[None, :] < s)
        bc_offs = bi * stride_bc_b + t64[:, None] * stride_bc_n + gi * stride_bc_g + offs_s[None, :]
        Bq = tl.load(B_ptr + bc_offs, mask=bc_mask, other=0.0).to(tl.float32)  # [Q, S]
        Cq = tl.load(C_ptr + bc_offs, mask=bc_mask, other=0.0).to(tl.float32)  # [Q, S]
        st_offs = ((pid.to(tl.int64) * num_blocks + blk) * BLOCK_P + offs_p[:, None]) * BLOCK_S
        state_in = tl.load(states_ptr + st_offs + offs_s[None, :])  # [P, S]
        x = u * dt[:, None]
        G = tl.dot(Cq, tl.trans(Bq), input_precision=PRECISION)  # [Q, Q]

        # Intra-block quadratic form y = (G ∘ L) x.
        B_dstate = tl.dot(Bq, tl.trans(d_state), input_precision=PRECISION)  # [Q, P]
        dx = tl.dot(tl.trans(G * L), dy, input_precision=PRECISION) + w[:, None] * B_dstate
        dM = tl.dot(dy, tl.trans(x), input_precision=PRECISION)  # [Q, Q]
        dG = dM * L
        dC = tl.dot(dG, Bq, input_precision=PRECISION)  # [Q, S]
        dB = tl.dot(tl.trans(dG), Cq, input_precision=PRECISION)  # [Q, S]
        dL_L = dG * G  # dLoss/dL ∘ L, the gradient reaching (cs_t - cs_j)
        d_cs = tl.sum(dL_L, axis=1) - tl.sum(dL_L, axis=0)

        # Carried-in state read by the tokens before the first segment start: e_t (S_in C_t).
        C_state = tl.dot(Cq, tl.trans(state_in), input_precision=PRECISION)  # [Q, P]
        dC += e[:, None] * tl.dot(dy, state_in, input_precision=PRECISION)
        d_cs += tl.sum(dy * C_state, axis=1) * e

        # Exit state f S_in + Σ_j w_j x_j ⊗ B_j.
        dB += w[:, None] * tl.dot(x, d_state, input_precision=PRECISION)
        dw_w = tl.sum(x * B_dstate, axis=1) * w
        d_cs -= dw_w
        d_cs_last = tl.sum(dw_w, axis=0) + f * tl.sum(tl.sum(d_state * state_in, axis=1), axis=0)
        d_cs += tl.where(offs_q == BLOCK_Q - 1, d_cs_last, 0.0)

        # cs is the cumsum of a = dt·A, so da_i = Σ_{t >= i} d_cs_t.
        d_a = tl.cumsum(d_cs, axis=0, reverse=True)
        ddt = tl.sum(dx * u, axis=1) + d_a * A_h
        du = dx * dt[:, None] + D_h * dy
        dA_acc += d_a * dt
        dD_acc += tl.sum(dy * u, axis=1)

        du_offs = (bi * n + t64[:, None]) * h * p + hi * p + offs_p[None, :]
        tl.store(du_ptr + du_offs, du.to(du_ptr.dtype.element_ty), mask=u_mask)
        tl.store(ddt_ptr + (bi * n + t64) * h + hi, ddt.to(ddt_ptr.dtype.element_ty), mask=in_seq)
        # Heads of one group share B and C: their gradients meet in one fp32 buffer.
        dbc_offs = ((bi * n + t64[:, None]) * g + gi) * s + offs_s[None, :]
        if heads_per_group == 1:
            tl.store(dB_ptr + dbc_offs, dB, mask=bc_mask)
            tl.store(dC_ptr + dbc_offs, dC, mask=bc_mask)
        else:
            tl.atomic_add(dB_ptr + dbc_offs, dB, mask=bc_mask)
            tl.atomic_add(dC_ptr + dbc_offs, dC, mask=bc_mask)
        d_state = f * d_state + tl.dot(tl.trans(e[:, None] * dy), Cq, input_precision=PRECISION)
    tl.store(dA_part_ptr + pid, tl.sum(dA_acc, axis=0))
    tl.store(dD_part_ptr + pid, tl.sum(dD_acc, axis=0))


def _check_inputs(u, dt, A, B, C, D, segment_start) -> None:
    if u.dim() != 4:
        raise ValueError(f"u must be [b, n, h, p], got shape {tuple(u.shape)}")
    b, n, h, _ = u.shape
    if B.dim() != 4 or B.shape[:2] != (b, n) or B.shape != C.shape:
        raise ValueError(
            f"B and C must both be [b={b}, n={n}, g, s], got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    if h % B.shape[2]:
        raise ValueError(f"ssm heads ({h}) must be a multiple of the B/C groups ({B.shape[2]})")
    if dt.shape != (b, n, h) or A.shape != (h,) or D.shape != (h,):
        raise ValueError(
            f"expected dt [{b}, {n}, {h}], A [{h}], D [{h}]; got dt {tuple(dt.shape)}, "
            f"A {tuple(A.shape)}, D {tuple(D.shape)}"
        )
    if segment_start.shape != (b, n):
        raise ValueError(f"segment_start must be [{b}, {n}], got {tuple(segment_start.shape)}")
    if u.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(
            "ssd_segmented_triton needs CUDA tensors (or TRITON_INTERPRET=1 set before import)"
        )


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    # The kernels take any outer strides but read the innermost dimension densely.
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _as_bytes(segment_start: torch.Tensor) -> torch.Tensor:
    return segment_start.to(torch.uint8).contiguous()  # [b, n]


class _SegmentedSSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, B, C, D, segment_start, return_final_state, block_q, num_warps):
        _check_inputs(u, dt, A, B, C, D, segment_start)
        b, n, h, p = u.shape
        g, s = B.shape[2], B.shape[3]
        u, B, C = (_last_dim_contiguous(t) for t in (u, B, C))
        dt = dt.contiguous()
        starts = _as_bytes(segment_start)
        num_blocks = triton.cdiv(n, block_q)
        block_p, block_s = _padded(p), _padded(s)
        store_states = any(ctx.needs_input_grad[:6])
        states = torch.empty(
            (b * h, num_blocks, block_p, block_s) if store_states else (1,),
            device=u.device,
            dtype=torch.float32,
        )
        final = torch.empty(
            (b * h, block_p, block_s) if return_final_state else (1,),
            device=u.device,
            dtype=torch.float32,
        )
        y = torch.empty((b, n, h, p), device=u.device, dtype=u.dtype)
        _ssd_fwd_kernel[(b * h,)](
            u, dt, A, B, C, D, starts, y, states, final,
            n, h, p, s, h // g, num_blocks,
            u.stride(0), u.stride(1), u.stride(2),
            dt.stride(0), dt.stride(1),
            B.stride(0), B.stride(1), B.stride(2),
            BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_S=block_s,
            STORE_STATES=store_states, STORE_FINAL=return_final_state,
            PRECISION=_dot_precision(u.dtype),
            num_warps=num_warps,
        )
        if store_states:
            ctx.save_for_backward(u, dt, A, B, C, D, starts, states)
            ctx.block_q, ctx.num_warps = block_q, num_warps
        if not return_final_state:
            return y
        final = final[:, :p, :s].reshape(b, h, p, s)
        ctx.mark_non_differentiable(final)
        return y, final

    @staticmethod
    def backward(ctx, dy, *unused_final_state_grad):
        u, dt, A, B, C, D, starts, states = ctx.saved_tensors
        b, n, h, p = u.shape
        g, s = B.shape[2], B.shape[3]
        dy = _last_dim_contiguous(dy)
        num_blocks = states.shape[1]
        du = torch.empty((b, n, h, p), device=u.device, dtype=u.dtype)
        ddt = torch.empty((b, n, h), device=u.device, dtype=dt.dtype)
        heads_per_group = h // g
        make_bc_grad = torch.zeros if heads_per_group > 1 else torch.empty
        dB = make_bc_grad((b, n, g, s), device=u.device, dtype=torch.float32)
        dC = make_bc_grad((b, n, g, s), device=u.device, dtype=torch.float32)
        dA_part = torch.empty((b, h), device=u.device, dtype=torch.float32)
        dD_part = torch.empty((b, h), device=u.device, dtype=torch.float32)
        _ssd_bwd_kernel[(b * h,)](
            u, dt, A, B, C, D, starts, dy, states,
            du, ddt, dB, dC, dA_part, dD_part,
            n, h, p, s, heads_per_group, num_blocks,
            u.stride(0), u.stride(1), u.stride(2),
            dt.stride(0), dt.stride(1),
            B.stride(0), B.stride(1), B.stride(2),
            dy.stride(0), dy.stride(1), dy.stride(2),
            BLOCK_Q=ctx.block_q, BLOCK_P=states.shape[2], BLOCK_S=states.shape[3],
            PRECISION=_dot_precision(u.dtype),
            num_warps=ctx.num_warps,
        )
        dA = dA_part.sum(0).to(A.dtype)
        dD = dD_part.sum(0).to(D.dtype)
        return du, ddt, dA, dB.to(B.dtype), dC.to(C.dtype), dD, None, None, None, None


def ssd_segmented_triton(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    segment_start: torch.Tensor,
    return_final_state: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Segmented SSD scan, fused in Triton (forward and backward).

    u [b, n, h, p]; dt [b, n, h] (already softplus'd, > 0); A [h] (< 0); B, C [b, n, g, s] with
    head i reading group i // (h // g); D [h]; segment_start [b, n] bool, True where the state
    resets (position 0 always does). Returns y [b, n, h, p] in u's dtype; accumulates in fp32.
    With ``return_final_state`` also the state after the last token, [b, h, p, s] fp32 (for
    prefill; no gradient flows through it).
    """
    return _SegmentedSSD.apply(
        u, dt, A, B, C, D, segment_start, return_final_state, DEFAULT_BLOCK_Q, DEFAULT_NUM_WARPS
    )
