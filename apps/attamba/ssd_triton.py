"""Triton kernels (forward and backward) for the KV-SSM's segmented SSD scan.

Same signature and semantics as ``ssd_reference.ssd_reference`` (see DESIGN.md, "KV-SSM"):

    S_t = exp(dt_t * A_h) * S_{t-1} * [t does not start a segment] + dt_t * u_t ⊗ B_t
    y_t = S_t C_t + D_h * u_t

Algorithm (chunked SSD over fixed blocks of Q tokens, with segment masks):

- inside a block the output is the masked quadratic form (L ∘ C Bᵀ)(dt·u), where
  L[t, j] = exp(cs_t - cs_j) when j <= t lie in the same segment (cs: the block-local cumsum of
  dt·A); the state entering the block reaches only the tokens before its first segment start;
- forward: (1) every block, in parallel, computes the state its own tokens leave at its end;
  (2) a sequential pass over blocks, elementwise over [p, s], turns those into the state entering
  each block (carried state times the block's decay, zero once a segment starts in it);
  (3) every block, in parallel, computes its outputs;
- backward mirrors it: per-block gradients reaching the entering state, a reverse elementwise
  pass, then one parallel kernel for all input gradients (it re-reads the entering states).

Every matmul accumulates in fp32. fp32 inputs use 3xTF32 dots (near-fp32 accuracy on tensor
cores; see FP32_DOT_PRECISION); bf16/fp16 inputs use plain TF32, finer than their own mantissa.

Importing this module needs ``triton``; it runs on CUDA tensors, or on CPU tensors under the
Triton interpreter (``TRITON_INTERPRET=1`` set before import), which the CPU tests use.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from apps.attamba.ssd_triton_conv import causal_conv_segmented_triton

__all__ = ["ssd_segmented_triton", "causal_conv_segmented_triton"]

# Tokens per block and warps of the per-block kernels; benchmarks/bench_ssm.py sweeps both.
# Q=32, 4 warps, 32-wide state tiles: the fastest forward+backward measured on an H100 for fp32
# and the configuration verified there for bf16 (docs/benchmarks.md).
DEFAULT_BLOCK_Q = 32
DEFAULT_NUM_WARPS = 4
# Widest tile of the state dimension the block kernels hold at once (narrowed when the device
# lacks the resources; see _launch).
MAX_TILE_S = 32
_LAUNCH_CHOICE: dict = {}  # launch configuration key -> (TILE_S, num_stages or None)
# Elements of [p, s] per program of the sequential state pass.
STATE_PASS_BLOCK = 256
# Dot precision for fp32 inputs: "tf32x3" keeps fp32-level accuracy (rel. error ~1e-6 measured);
# "tf32" is faster and about 1e-3.
FP32_DOT_PRECISION = "tf32x3"

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_precision(dtype: torch.dtype) -> str:
    if _INTERPRETED:
        return "ieee"  # the interpreter multiplies in numpy; no tensor-core modes
    return "tf32" if dtype in (torch.bfloat16, torch.float16) else FP32_DOT_PRECISION


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
    # e_t: how much of the entering state reaches t; w_j: how much of token j reaches the
    # block's exit state; f: how much of the entering state reaches the exit.
    e = tl.where(seg == 0, tl.exp(cs), 0.0)
    w = tl.where(seg == seg_last, tl.exp(cs_last - cs), 0.0)
    f = tl.where(seg_last == 0, tl.exp(cs_last), 0.0)
    return t, in_seq, dt, L, e, w, f


# The decay gradients sum each exponent's gradient over the a_i = dt_i·A it spans directly. The
# shorter forms, per-token +/- terms with one cumsum, or an inclusive cumsum minus its own term,
# cancel: they lost fp32 precision over long blocks, and on the GPU left ~1e-7 residues where the
# gradient is exactly 0 (the compiler may recompute a term in another layout, rounded differently).


@triton.jit
def _spanned_sum(dE, BLOCK_Q: tl.constexpr):
    """[Q] Σ_{t >= i} Σ_{j < i} dE[t, j] for every i: the gradient of a_i from exponents cs_t - cs_j."""
    offs = tl.arange(0, BLOCK_Q)
    from_i = tl.cumsum(dE, axis=0, reverse=True)  # [i, j]: Σ_{t >= i} dE[t, j]
    return tl.sum(tl.where(offs[None, :] < offs[:, None], from_i, 0.0), axis=1)


@triton.jit
def _sum_before(x, BLOCK_Q: tl.constexpr):
    """[Q] Σ_{j < i} x_j for every i (an exclusive cumsum that never subtracts)."""
    offs = tl.arange(0, BLOCK_Q)
    return tl.sum(tl.where(offs[None, :] < offs[:, None], x[None, :], 0.0), axis=1)


@triton.jit
def _this_block(A_ptr, dt_ptr, start_ptr, n, h, stride_dt_b, stride_dt_n, BLOCK_Q: tl.constexpr):
    """The (head, block, batch row) of a block kernel's program, its b·h index, A of its head,
    and the block's decay terms (_block_scan_terms)."""
    hi = tl.program_id(0)
    blk = tl.program_id(1)
    bi = tl.program_id(2).to(tl.int64)
    A_h = tl.load(A_ptr + hi).to(tl.float32)
    t, in_seq, dt, L, e, w, f = _block_scan_terms(
        dt_ptr, start_ptr, A_h, bi, hi, blk, n, stride_dt_b, stride_dt_n, BLOCK_Q
    )
    return hi, blk, bi, bi * h + hi, A_h, t, in_seq, dt, L, e, w, f


@triton.jit
def _load_stored(ptr, bi, t, col0, stride_b, stride_n, in_seq, width, BLOCK_W: tl.constexpr):
    """[Q, W] tile in the tensor's own dtype: tokens t of batch row bi, columns col0 .. col0 + width - 1."""
    offs_w = tl.arange(0, BLOCK_W)
    offs = bi * stride_b + t.to(tl.int64)[:, None] * stride_n + col0 + offs_w[None, :]
    mask = in_seq[:, None] & (offs_w[None, :] < width)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _load_rows(ptr, bi, t, col0, stride_b, stride_n, in_seq, width, BLOCK_W: tl.constexpr):
    """:func:`_load_stored`'s tile in fp32."""
    return _load_stored(ptr, bi, t, col0, stride_b, stride_n, in_seq, width, BLOCK_W).to(tl.float32)


@triton.jit
def _state_tile_offsets(bh, blk, num_blocks, s0, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
                        TILE_S: tl.constexpr):
    """Offsets of columns s0 .. s0 + TILE_S of block blk's [P, S] state in a
    [b·h, num_blocks, P, S] buffer."""
    offs_p = tl.arange(0, BLOCK_P)
    offs_s = tl.arange(0, TILE_S)
    base = (bh.to(tl.int64) * num_blocks + blk) * BLOCK_P * BLOCK_S + s0
    return base + offs_p[:, None] * BLOCK_S + offs_s[None, :]


# The block kernels walk the state dimension in tiles of TILE_S columns, which bounds their
# registers and shared memory whatever s is. One program = one (head, block, batch row).


@triton.jit
def _block_exit_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, start_ptr, states_ptr, decay_ptr,
    n, h, p, s, heads_per_group, num_blocks,
    stride_u_b, stride_u_n, stride_u_h, stride_dt_b, stride_dt_n, stride_bc_b, stride_bc_n, stride_bc_g,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, TILE_S: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per block: the state its own tokens leave at its end, Σ_j w_j x_j ⊗ B_j, and its decay f."""
    hi, blk, bi, bh, A_h, t, in_seq, dt, L, e, w, f = _this_block(
        A_ptr, dt_ptr, start_ptr, n, h, stride_dt_b, stride_dt_n, BLOCK_Q
    )
    u = _load_rows(u_ptr, bi, t, hi * stride_u_h, stride_u_b, stride_u_n, in_seq, p, BLOCK_P)
    x_t = tl.trans(u * (dt * w)[:, None])  # [P, Q]
    bc_col = (hi // heads_per_group) * stride_bc_g
    for s0 in range(0, BLOCK_S, TILE_S):
        Bt = _load_rows(B_ptr, bi, t, bc_col + s0, stride_bc_b, stride_bc_n, in_seq, s - s0, TILE_S)
        local = tl.dot(x_t, Bt, input_precision=PRECISION)  # [P, TILE_S]
        tile = _state_tile_offsets(bh, blk, num_blocks, s0, BLOCK_P, BLOCK_S, TILE_S)
        tl.store(states_ptr + tile, local)
    tl.store(decay_ptr + bh * num_blocks + blk, f)


@triton.jit
def _state_pass_kernel(
    states_ptr, decay_ptr, final_ptr, num_blocks, state_size,
    REVERSE: tl.constexpr, STORE_FINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """In place, per (b·h, slice of [p, s]): block-local states -> carried ones.

    Forward: entering_k = f_{k-1} entering_{k-1} + local_{k-1}. Reverse (gradients):
    d_exit_k = f_{k+1} d_exit_{k+1} + local_{k+1}, where local is what block k+1's outputs
    send back into its entering state.
    """
    bh = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    carried = tl.zeros((BLOCK,), dtype=tl.float32)
    first = num_blocks - 1 if REVERSE else 0
    local = tl.load(states_ptr + (bh * num_blocks + first) * state_size + offs)
    for step in range(0, num_blocks):
        blk = num_blocks - 1 - step if REVERSE else step
        following = blk - 1 if REVERSE else blk + 1
        # Fetch the next block's tile before this one's arithmetic: the loop is latency-bound.
        # (The mask is a comparison of offs: Triton 3.9's interpreter refuses a scalar and-ed in.)
        has_next = (following >= 0) & (following < num_blocks)
        upcoming = tl.load(
            states_ptr + (bh * num_blocks + following) * state_size + offs,
            mask=offs < tl.where(has_next, state_size, 0),
            other=0.0,
        )
        tl.store(states_ptr + (bh * num_blocks + blk) * state_size + offs, carried)
        carried = tl.load(decay_ptr + bh * num_blocks + blk) * carried + local
        local = upcoming
    if STORE_FINAL:
        tl.store(final_ptr + bh * state_size + offs, carried)


@triton.jit
def _block_output_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, start_ptr, states_ptr, y_ptr,
    n, h, p, s, heads_per_group, num_blocks,
    stride_u_b, stride_u_n, stride_u_h, stride_dt_b, stride_dt_n, stride_bc_b, stride_bc_n, stride_bc_g,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, TILE_S: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per block: y = (C Bᵀ ∘ L)(dt·u) + e ∘ (C S_inᵀ) + D u."""
    hi, blk, bi, bh, A_h, t, in_seq, dt, L, e, w, f = _this_block(
        A_ptr, dt_ptr, start_ptr, n, h, stride_dt_b, stride_dt_n, BLOCK_Q
    )
    D_h = tl.load(D_ptr + hi).to(tl.float32)
    bc_col = (hi // heads_per_group) * stride_bc_g
    G = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)  # C Bᵀ
    C_entering = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)  # C S_inᵀ
    for s0 in range(0, BLOCK_S, TILE_S):
        Bt = _load_rows(B_ptr, bi, t, bc_col + s0, stride_bc_b, stride_bc_n, in_seq, s - s0, TILE_S)
        Ct = _load_rows(C_ptr, bi, t, bc_col + s0, stride_bc_b, stride_bc_n, in_seq, s - s0, TILE_S)
        entering = tl.load(states_ptr + _state_tile_offsets(bh, blk, num_blocks, s0, BLOCK_P, BLOCK_S, TILE_S))
        G = tl.dot(Ct, tl.trans(Bt), acc=G, input_precision=PRECISION)
        C_entering = tl.dot(Ct, tl.trans(entering), acc=C_entering, input_precision=PRECISION)
    u = _load_rows(u_ptr, bi, t, hi * stride_u_h, stride_u_b, stride_u_n, in_seq, p, BLOCK_P)
    y = tl.dot(G * L, u * dt[:, None], input_precision=PRECISION)  # [Q, P]
    y += e[:, None] * C_entering + D_h * u
    offs_p = tl.arange(0, BLOCK_P)
    y_offs = (bi * n + t.to(tl.int64)[:, None]) * h * p + hi * p + offs_p[None, :]
    tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=in_seq[:, None] & (offs_p[None, :] < p))


@triton.jit
def _block_entry_grad_kernel(
    dt_ptr, A_ptr, C_ptr, start_ptr, dy_ptr, dstates_ptr, n, h, p, s, heads_per_group, num_blocks,
    stride_dt_b, stride_dt_n, stride_bc_b, stride_bc_n, stride_bc_g, stride_dy_b, stride_dy_n, stride_dy_h,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, TILE_S: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per block: what its outputs send back into its entering state, (e ∘ dy)ᵀ C."""
    hi, blk, bi, bh, A_h, t, in_seq, dt, L, e, w, f = _this_block(
        A_ptr, dt_ptr, start_ptr, n, h, stride_dt_b, stride_dt_n, BLOCK_Q
    )
    dy = _load_rows(dy_ptr, bi, t, hi * stride_dy_h, stride_dy_b, stride_dy_n, in_seq, p, BLOCK_P)
    dy_t = tl.trans(dy * e[:, None])  # [P, Q]
    bc_col = (hi // heads_per_group) * stride_bc_g
    for s0 in range(0, BLOCK_S, TILE_S):
        Ct = _load_rows(C_ptr, bi, t, bc_col + s0, stride_bc_b, stride_bc_n, in_seq, s - s0, TILE_S)
        local = tl.dot(dy_t, Ct, input_precision=PRECISION)  # [P, TILE_S]
        tile = _state_tile_offsets(bh, blk, num_blocks, s0, BLOCK_P, BLOCK_S, TILE_S)
        tl.store(dstates_ptr + tile, local)


@triton.jit
def _block_grad_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, start_ptr, dy_ptr, states_ptr, dstates_ptr,
    du_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr,
    n, h, p, s, heads_per_group, num_blocks,
    stride_u_b, stride_u_n, stride_u_h, stride_dt_b, stride_dt_n, stride_bc_b, stride_bc_n, stride_bc_g,
    stride_dy_b, stride_dy_n, stride_dy_h,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, TILE_S: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per block, given its entering state and the gradient of its exit state: every input grad.

    Two sweeps over the state dimension: the first accumulates the products that reduce over s,
    the second emits dB and dC tile by tile.
    """
    hi, blk, bi, bh, A_h, t, in_seq, dt, L, e, w, f = _this_block(
        A_ptr, dt_ptr, start_ptr, n, h, stride_dt_b, stride_dt_n, BLOCK_Q
    )
    gi = hi // heads_per_group
    bc_col = gi * stride_bc_g
    D_h = tl.load(D_ptr + hi).to(tl.float32)
    u = _load_rows(u_ptr, bi, t, hi * stride_u_h, stride_u_b, stride_u_n, in_seq, p, BLOCK_P)
    dy = _load_rows(dy_ptr, bi, t, hi * stride_dy_h, stride_dy_b, stride_dy_n, in_seq, p, BLOCK_P)
    x = u * dt[:, None]

    G = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)  # C Bᵀ
    B_dexit = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)  # B dS_exitᵀ
    C_entering = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)  # C S_inᵀ
    dexit_entering = tl.zeros((BLOCK_P,), dtype=tl.float32)  # row sums of dS_exit ∘ S_in
    for s0 in range(0, BLOCK_S, TILE_S):
        Bt = _load_rows(B_ptr, bi, t, bc_col + s0, stride_bc_b, stride_bc_n, in_seq, s - s0, TILE_S)
        Ct = _load_rows(C_ptr, bi, t, bc_col + s0, stride_bc_b, stride_bc_n, in_seq, s - s0, TILE_S)
        tile = _state_tile_offsets(bh, blk, num_blocks, s0, BLOCK_P, BLOCK_S, TILE_S)
        entering = tl.load(states_ptr + tile)  # [P, TILE_S]
        d_exit = tl.load(dstates_ptr + tile)  # [P, TILE_S] dLoss/d(state leaving the block)
        G = tl.dot(Ct, tl.trans(Bt), acc=G, input_precision=PRECISION)
        B_dexit = tl.dot(Bt, tl.trans(d_exit), acc=B_dexit, input_precision=PRECISION)
        C_entering = tl.dot(Ct, tl.trans(entering), acc=C_entering, input_precision=PRECISION)
        dexit_entering += tl.sum(d_exit * entering, axis=1)

    # Intra-block quadratic form y = (G ∘ L) x.
    dx = tl.dot(tl.trans(G * L), dy, input_precision=PRECISION) + w[:, None] * B_dexit
    dG = tl.dot(dy, tl.trans(x), input_precision=PRECISION) * L  # [Q, Q]
    dL_L = dG * G  # dLoss/dL ∘ L, the gradient reaching (cs_t - cs_j)
    # cs is the cumsum of a = dt·A, so a_i gets the gradient of every exponent that spans it
    # (summed directly: see the note above _spanned_sum).
    d_a = _spanned_sum(dL_L, BLOCK_Q)  # intra-block cs_t - cs_j spans j < i <= t
    # Entering state read by the tokens before the first segment start: e_t = exp(cs_t) spans i <= t.
    d_a += tl.cumsum(tl.sum(dy * C_entering, axis=1) * e, axis=0, reverse=True)
    # Exit state f S_in + Σ_j w_j x_j ⊗ B_j: w_j = exp(cs_last - cs_j) spans i > j, f every i.
    d_a += _sum_before(tl.sum(x * B_dexit, axis=1) * w, BLOCK_Q) + f * tl.sum(dexit_entering, axis=0)
    ddt = tl.sum(dx * u, axis=1) + d_a * A_h
    du = dx * dt[:, None] + D_h * dy

    t64 = t.to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    du_offs = (bi * n + t64[:, None]) * h * p + hi * p + offs_p[None, :]
    tl.store(du_ptr + du_offs, du.to(du_ptr.dtype.element_ty), mask=in_seq[:, None] & (offs_p[None, :] < p))
    tl.store(ddt_ptr + (bi * n + t64) * h + hi, ddt.to(ddt_ptr.dtype.element_ty), mask=in_seq)
    tl.store(dA_part_ptr + bh * num_blocks + blk, tl.sum(d_a * dt, axis=0))
    tl.store(dD_part_ptr + bh * num_blocks + blk, tl.sum(tl.sum(dy * u, axis=1), axis=0))

    offs_s = tl.arange(0, TILE_S)
    dG_t = tl.trans(dG)
    dy_e = dy * e[:, None]
    x_w = x * w[:, None]
    for s0 in range(0, BLOCK_S, TILE_S):
        Bt = _load_rows(B_ptr, bi, t, bc_col + s0, stride_bc_b, stride_bc_n, in_seq, s - s0, TILE_S)
        Ct = _load_rows(C_ptr, bi, t, bc_col + s0, stride_bc_b, stride_bc_n, in_seq, s - s0, TILE_S)
        tile = _state_tile_offsets(bh, blk, num_blocks, s0, BLOCK_P, BLOCK_S, TILE_S)
        entering = tl.load(states_ptr + tile)
        d_exit = tl.load(dstates_ptr + tile)
        dC = tl.dot(dy_e, entering, acc=tl.dot(dG, Bt, input_precision=PRECISION), input_precision=PRECISION)
        dB = tl.dot(x_w, d_exit, acc=tl.dot(dG_t, Ct, input_precision=PRECISION), input_precision=PRECISION)
        # One row per head (the heads of a group share B and C); the caller sums over each
        # group's heads, instead of atomics that the 8 heads of the 60M model would contend on.
        dbc_offs = ((bi * n + t64[:, None]) * h + hi) * s + s0 + offs_s[None, :]
        bc_mask = in_seq[:, None] & (s0 + offs_s[None, :] < s)
        tl.store(dB_ptr + dbc_offs, dB, mask=bc_mask)
        tl.store(dC_ptr + dbc_offs, dC, mask=bc_mask)


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


def _kernel_inputs(u: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
    """(u, dt, B, C) laid out as the kernels read them: dense last dims, dt contiguous, and B and
    C with one set of strides (the kernels address both with it)."""
    u, B, C = (_last_dim_contiguous(t) for t in (u, B, C))
    if B.stride() != C.stride():
        B, C = B.contiguous(), C.contiguous()
    return u, dt.contiguous(), B, C


def _sum_group_heads(grad_heads: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """[b, n, h, s] per-head gradients of B or C -> [b, n, groups, s]: the heads of a group share it."""
    return grad_heads.unflatten(2, (groups, grad_heads.shape[2] // groups)).sum(3).to(dtype)


def _input_grads_fake(u, dt, A, B, C, D) -> tuple[torch.Tensor, ...]:
    """Fake (meta) du, ddt, dA, dB, dC, dD: contiguous, shaped and typed like the inputs."""
    return tuple(t.new_empty(t.shape) for t in (u, dt, A, B, C, D))


def _as_bytes(segment_start: torch.Tensor) -> torch.Tensor:
    return segment_start.to(torch.uint8).contiguous()  # [b, n]


def _launch(kernel, grid, args, block_s: int, **meta) -> None:
    """Launch a block kernel at the widest state tile (TILE_S) that compiles for the device.

    Triton reports registers and shared memory only when it compiles, so the first launch of
    each configuration tries MAX_TILE_S, then narrower tiles on OutOfResources, then the same
    without software pipelining (num_stages=1): Triton 3.6's pipeliner crashed ("PassManager::run
    failed") on the gradient kernel with bf16 inputs and 64-token blocks on an H100. What worked
    is remembered.
    """
    key = (id(kernel), block_s, MAX_TILE_S, tuple(sorted(meta.items())), tuple(
        arg.dtype for arg in args if isinstance(arg, torch.Tensor)
    ))
    widths = [width for width in (64, 32, 16) if width <= min(MAX_TILE_S, block_s)]
    options = [(width, stages) for stages in (None, 1) for width in widths]
    if key in _LAUNCH_CHOICE:  # first, but not alone: other integer specializations may differ
        options.remove(_LAUNCH_CHOICE[key])
        options.insert(0, _LAUNCH_CHOICE[key])
    error = None
    for width, stages in options:
        pipelining = {} if stages is None else {"num_stages": stages}
        try:
            kernel[grid](*args, BLOCK_S=block_s, TILE_S=width, **meta, **pipelining)
        except OutOfResources as out_of_resources:
            error = out_of_resources
            continue
        except RuntimeError as compile_error:
            if "PassManager::run failed" not in str(compile_error):
                raise
            error = compile_error
            continue
        _LAUNCH_CHOICE[key] = (width, stages)
        return
    raise error


def _carry_states(states: torch.Tensor, decay: torch.Tensor, final, reverse: bool) -> None:
    """Run the sequential pass over blocks on states [b·h, blocks, P, S] in place."""
    bh, num_blocks, block_p, block_s = states.shape
    state_size = block_p * block_s
    block = min(STATE_PASS_BLOCK, state_size)
    _state_pass_kernel[(bh, state_size // block)](
        states, decay, final if final is not None else states, num_blocks, state_size,
        REVERSE=reverse, STORE_FINAL=final is not None, BLOCK=block,
    )


def _forward_buffers(u, B, block_q: int):
    """Shapes of the forward pass's outputs: y, carried states, per-block decays, final state."""
    b, n, h, p = u.shape
    num_blocks = triton.cdiv(n, block_q)
    return (b, n, h, p), (b * h, num_blocks, _padded(p), _padded(B.shape[3])), (b * h, num_blocks)


# The kernels run inside torch.library custom ops, so that torch.compile keeps a block that calls
# them in one graph (an autograd.Function with this launcher would break the graph and cost
# host time on every call).
@torch.library.custom_op("attamba::ssd_segmented_fwd", mutates_args=())
def _ssd_forward(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor, starts: torch.Tensor, return_final_state: bool, block_q: int, num_warps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> y, the states entering each block, per-block decays (both for backward), final state
    ([b, h, p, s], or empty without ``return_final_state``)."""
    b, n, h, p = u.shape
    g, s = B.shape[2], B.shape[3]
    u, dt, B, C = _kernel_inputs(u, dt, B, C)
    y_shape, states_shape, decay_shape = _forward_buffers(u, B, block_q)
    num_blocks = states_shape[1]
    block_p, block_s = states_shape[2], states_shape[3]
    common = (n, h, p, s, h // g, num_blocks,
              u.stride(0), u.stride(1), u.stride(2), dt.stride(0), dt.stride(1),
              B.stride(0), B.stride(1), B.stride(2))
    meta = dict(BLOCK_Q=block_q, BLOCK_P=block_p, PRECISION=_dot_precision(u.dtype), num_warps=num_warps)
    grid = (h, num_blocks, b)
    # states: each block's local exit state, then (after the pass) its entering state.
    states = torch.empty(states_shape, device=u.device, dtype=torch.float32)
    decay = torch.empty(decay_shape, device=u.device, dtype=torch.float32)
    _launch(_block_exit_kernel, grid, (u, dt, A, B, starts, states, decay, *common), block_s, **meta)
    final = None
    if return_final_state:
        final = torch.empty((b * h, block_p, block_s), device=u.device, dtype=torch.float32)
    _carry_states(states, decay, final, reverse=False)
    y = torch.empty(y_shape, device=u.device, dtype=u.dtype)
    _launch(_block_output_kernel, grid, (u, dt, A, B, C, D, starts, states, y, *common), block_s, **meta)
    if final is None:
        final = torch.empty(0, device=u.device, dtype=torch.float32)
    else:
        final = final[:, :p, :s].reshape(b, h, p, s).clone()
    return y, states, decay, final


@_ssd_forward.register_fake
def _ssd_forward_fake(u, dt, A, B, C, D, starts, return_final_state, block_q, num_warps):
    y_shape, states_shape, decay_shape = _forward_buffers(u, B, block_q)
    b, n, h, p = u.shape
    final_shape = (b, h, p, B.shape[3]) if return_final_state else (0,)
    return (
        u.new_empty(y_shape),
        u.new_empty(states_shape, dtype=torch.float32),
        u.new_empty(decay_shape, dtype=torch.float32),
        u.new_empty(final_shape, dtype=torch.float32),
    )


@torch.library.custom_op("attamba::ssd_segmented_bwd", mutates_args=())
def _ssd_backward(
    dy: torch.Tensor, u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    C: torch.Tensor, D: torch.Tensor, starts: torch.Tensor, states: torch.Tensor, decay: torch.Tensor,
    block_q: int, num_warps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> du, ddt, dA, dB, dC, dD."""
    b, n, h, p = u.shape
    g, s = B.shape[2], B.shape[3]
    u, dt, B, C = _kernel_inputs(u, dt, B, C)
    dy = _last_dim_contiguous(dy)
    _, num_blocks, block_p, block_s = states.shape
    heads_per_group = h // g
    meta = dict(BLOCK_Q=block_q, BLOCK_P=block_p, PRECISION=_dot_precision(u.dtype), num_warps=num_warps)
    grid = (h, num_blocks, b)
    dstates = torch.empty_like(states)
    _launch(_block_entry_grad_kernel, grid, (
        dt, A, C, starts, dy, dstates, n, h, p, s, heads_per_group, num_blocks,
        dt.stride(0), dt.stride(1), C.stride(0), C.stride(1), C.stride(2),
        dy.stride(0), dy.stride(1), dy.stride(2),
    ), block_s, **meta)
    _carry_states(dstates, decay, None, reverse=True)
    du = torch.empty((b, n, h, p), device=u.device, dtype=u.dtype)
    ddt = torch.empty((b, n, h), device=u.device, dtype=dt.dtype)
    dB_heads = torch.empty((b, n, h, s), device=u.device, dtype=torch.float32)
    dC_heads = torch.empty((b, n, h, s), device=u.device, dtype=torch.float32)
    dA_part = torch.empty((b, h, num_blocks), device=u.device, dtype=torch.float32)
    dD_part = torch.empty((b, h, num_blocks), device=u.device, dtype=torch.float32)
    _launch(_block_grad_kernel, grid, (
        u, dt, A, B, C, D, starts, dy, states, dstates,
        du, ddt, dB_heads, dC_heads, dA_part, dD_part,
        n, h, p, s, heads_per_group, num_blocks,
        u.stride(0), u.stride(1), u.stride(2), dt.stride(0), dt.stride(1),
        B.stride(0), B.stride(1), B.stride(2), dy.stride(0), dy.stride(1), dy.stride(2),
    ), block_s, **meta)
    dB, dC = _sum_group_heads(dB_heads, g, B.dtype), _sum_group_heads(dC_heads, g, C.dtype)
    return du, ddt, dA_part.sum((0, 2)).to(A.dtype), dB, dC, dD_part.sum((0, 2)).to(D.dtype)


@_ssd_backward.register_fake
def _ssd_backward_fake(dy, u, dt, A, B, C, D, starts, states, decay, block_q, num_warps):
    return _input_grads_fake(u, dt, A, B, C, D)


def _ssd_setup_context(ctx, inputs, output) -> None:
    u, dt, A, B, C, D, starts, _, block_q, num_warps = inputs
    _, states, decay, _ = output
    ctx.save_for_backward(u, dt, A, B, C, D, starts, states, decay)
    ctx.block_q, ctx.num_warps = block_q, num_warps


def _ssd_autograd(ctx, dy, d_states, d_decay, d_final):
    u, dt, A, B, C, D, starts, states, decay = ctx.saved_tensors
    grads = _ssd_backward(dy, u, dt, A, B, C, D, starts, states, decay, ctx.block_q, ctx.num_warps)
    return (*grads, None, None, None, None)


torch.library.register_autograd("attamba::ssd_segmented_fwd", _ssd_autograd, setup_context=_ssd_setup_context)


def ssd_segmented_triton(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    segment_start: torch.Tensor,
    return_final_state: bool = False,
    max_segment_len: Optional[int] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Segmented SSD scan, fused in Triton (forward and backward).

    u [b, n, h, p]; dt [b, n, h] (already softplus'd, > 0); A [h] (< 0); B, C [b, n, g, s] with
    head i reading group i // (h // g); D [h]; segment_start [b, n] bool, True where the state
    resets (position 0 always does). Returns y [b, n, h, p] in u's dtype; accumulates in fp32.
    With ``return_final_state`` also the state after the last token, [b, h, p, s] fp32 (for
    prefill; no gradient flows through it).
    """
    _check_inputs(u, dt, A, B, C, D, segment_start)
    y, _, _, final = _ssd_forward(
        u, dt, A, B, C, D, _as_bytes(segment_start), return_final_state, DEFAULT_BLOCK_Q, DEFAULT_NUM_WARPS
    )
    return (y, final) if return_final_state else y
