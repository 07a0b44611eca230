"""Triton kernels for the segmented SSD scan when every segment is short: no state is carried.

With resets every P tokens (Attamba's chunks, P = 8 in the 60M model), the state a token sees was
built inside its own segment, at most P - 1 tokens back. The scan is then a banded quadratic form
that needs no carried state at all (DESIGN.md, "KV-SSM"):

    y_t = Σ_{j <= t, no segment start in (j, t]} (C_t · B_j) exp(cs_t - cs_j) dt_j u_j + D u_t

with cs the cumsum of dt·A. Cut the sequence into blocks of Q tokens with Q >= the longest
segment: the keys of a query in block k lie in blocks k-1 and k, so one program computes block k's
outputs from two [Q, Q] score tiles, and its backward from three (queries of block k over keys of
blocks k-1 and k, and queries of block k+1 over keys of block k). Nothing of size [p, s] per block
is written, read or passed between programs, unlike the chunked kernels of
:mod:`apps.attamba.ssd_triton`. The score tiles C Bᵀ depend on the head group only, so a program
takes every head of one group: the tiles are computed once per group, and the heads' gradients
of them are summed before they become dB and dC (written once per group, no per-head copies).

When the segments start periodically (Attamba's uniform and cyclic chunks: ``segment_period``)
and the period divides Q, the blocks are shifted to start on segment starts
(:func:`block_layout`): no segment then crosses a block edge, and each program needs only its own
block's tile, forward and backward.

The decay gradient: a_i = dt_i·A enters every exponent cs_t - cs_j with j < i <= t, so its
gradient sums the exponent's gradient over those pairs; each program sums them for its own tokens
from the same three tiles, never subtracting (see the note above ``_spanned_sum`` in
:mod:`apps.attamba.ssd_triton`).

Callers guarantee the segment bound (``max_segment_len``); :func:`supports` says whether these
kernels apply. Runs on CUDA tensors, or under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from apps.attamba.ssd_triton import (
    _INTERPRETED,
    _as_bytes,
    _check_inputs,
    _dot_precision,
    _last_dim_contiguous,
    _load_stored,
    _padded,
    _spanned_sum,
    _sum_before,
    ssd_segmented_triton,
)
from apps.attamba.ssd_reference import join_scan_inputs, split_scan_inputs

MAX_BLOCK_Q = 64
"""Longest segment these kernels take (the block must hold a whole segment)."""
MIN_BLOCK_Q = 16
"""Smallest block. For P = 8 on an H200, 16-token blocks with a 1-warp forward and backward took
42 + 159 µs for a 60M layer's paired SSMs, against 57 + 283 with 32-token blocks on 2 and 4 warps
(benchmarks/tune_ssm_kernels.py, docs/benchmarks.md, twelfth session): the [16, 16] score tiles
leave the backward far fewer registers to spill. (Before the bf16 dots, in the tenth session,
16-token blocks on 4 warps had been the slower ones.)"""
FORWARD_WARPS = 1
"""Warps per program of the forward kernel with 16-token blocks (larger: LARGER_BLOCK_WARPS)."""
BACKWARD_WARPS = 1
"""Warps per program of the backward kernel with 16-token blocks."""
LARGER_BLOCK_WARPS = {32: (2, 4), 64: (4, 4)}
"""(forward, backward) warps for 32- and 64-token blocks (segments of 17 to 64 tokens: P of 32 or
64, random chunks from P = 16). One warp would spill kilobytes a thread there (offline sm_90
compile); 32-token blocks were tuned in the eleventh session, 64 keeps the earlier 4 warps."""
NUM_STAGES = 3  # Triton's default on CUDA
TILE_S = 32
ALIGNED_BLOCKS = True
"""With periodic segment starts (``segment_period``), start the blocks on them: a block's tokens then
see keys of their own block only, one score tile where the backward needs three (and the forward
two), and no tokens of the neighbouring blocks are read."""
FORWARD_TILE_P = 64
BACKWARD_TILE_P = 32
"""A head's columns taken this many at a time by the forward and the backward kernel (y, dx and du
are column by column; dy xᵀ sums over them). With 32-column tiles the backward took 90.5–91.1 µs a
60M layer against 101.2–102.1 with whole heads, the forward 34.9 against 30.6, so the forward keeps
whole heads (H100, benchmarks/tune_ssm_kernels.py, docs/benchmarks.md, sixteenth session)."""
BF16_DOTS = True
"""With bf16 inputs, multiply bf16 operands (fp32 accumulation, as Mamba2's kernels do) rather
than TF32 ones: half the operand registers and twice the tensor-core rate, at the cost of rounding
the decayed scores and dt·u to bf16 before they are multiplied."""


def _precision(dtype: torch.dtype) -> str:
    """The kernels' ``PRECISION``: 'bf16' (see BF16_DOTS), else ``_dot_precision``'s choice."""
    if BF16_DOTS and dtype == torch.bfloat16 and not _INTERPRETED:
        return "bf16"
    return _dot_precision(dtype)


def _warps(block_q: int, backward: bool) -> int:
    """Warps per program of the forward or backward kernel for blocks of ``block_q`` tokens."""
    if block_q in LARGER_BLOCK_WARPS:
        return LARGER_BLOCK_WARPS[block_q][backward]
    return BACKWARD_WARPS if backward else FORWARD_WARPS


def block_size(max_segment_len: int) -> int:
    """Tokens per block for segments of at most ``max_segment_len`` tokens."""
    return max(MIN_BLOCK_Q, triton.next_power_of_2(max_segment_len))


def supports(max_segment_len, return_final_state: bool) -> bool:
    """Whether the windowed kernels can run: a known bound within MAX_BLOCK_Q, no final state."""
    return max_segment_len is not None and 1 <= max_segment_len <= MAX_BLOCK_Q and not return_final_state


SegmentPeriod = tuple[int, int]
"""(P, offset): a segment starts at every position s with (s + offset) mod P == 0 (and perhaps at
others too), as with Attamba's periodic chunks (``LayerBoundaries.period``)."""


def _segment_bound(max_segment_len: Optional[int], segment_period: Optional[SegmentPeriod]) -> Optional[int]:
    """The bound on segment lengths the caller gave, or the period's (no segment outlasts it)."""
    if max_segment_len is None and segment_period is not None:
        return segment_period[0]
    return max_segment_len


def block_layout(max_segment_len: int, segment_period: Optional[SegmentPeriod]) -> tuple[int, int]:
    """(tokens per block, shift): blocks start at k·Q - shift. With a period that divides the block
    (ALIGNED_BLOCKS), the shift puts every block's first token on a segment start, so that no
    segment crosses into the next block and the kernels skip the neighbouring blocks' tiles; else
    shift -1: blocks at k·Q, three tiles."""
    if ALIGNED_BLOCKS and segment_period is not None:
        period, offset = segment_period
        block_q = block_size(period)
        if 1 <= period <= MAX_BLOCK_Q and block_q % period == 0:
            return block_q, offset % period
    return block_size(max_segment_len), -1


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """a @ b (+ acc), fp32 out; PRECISION 'bf16' multiplies bf16-rounded operands."""
    if PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc=acc)
    else:
        return tl.dot(a, b, acc=acc, input_precision=PRECISION)


@triton.jit
def _load_tile(ptr, bi, t, col0, stride_b, stride_n, in_seq, width, BLOCK_W: tl.constexpr, PRECISION: tl.constexpr):
    """A [Q, W] tile of tokens t (:func:`apps.attamba.ssd_triton._load_stored`): as stored (bf16) when the
    dots take bf16 operands, which halves the registers it holds, else in fp32."""
    tile = _load_stored(ptr, bi, t, col0, stride_b, stride_n, in_seq, width, BLOCK_W)
    if PRECISION == "bf16":
        return tile
    else:
        return tile.to(tl.float32)


@triton.jit
def _block_terms(dt_ptr, start_ptr, bi, hi, t, n, stride_dt_b, stride_dt_n, A_h, cs_before, seg_before):
    """Per token of one block (tokens outside 0 .. n-1 read as dt 0, no start): dt, the running
    log-decay cs (cumsum of dt·A) and the running segment number, both continuing from the
    previous block's ``cs_before`` and ``seg_before``; also their values at the block's end."""
    valid = (t >= 0) & (t < n)
    dt = tl.load(dt_ptr + bi * stride_dt_b + t.to(tl.int64) * stride_dt_n + hi, mask=valid, other=0.0).to(tl.float32)
    starts = tl.load(start_ptr + bi * n + t, mask=valid, other=0).to(tl.int32)
    starts = tl.where(t == 0, 1, starts)  # position 0 always starts a segment
    a = dt * A_h
    cs = cs_before + tl.cumsum(a, axis=0)
    seg = seg_before + tl.cumsum(starts, axis=0)
    return dt, cs, seg, cs_before + tl.sum(a, axis=0), seg_before + tl.sum(starts, axis=0)


@triton.jit
def _decay(cs_q, seg_q, cs_k, seg_k, key_valid, SAME_BLOCK: tl.constexpr, BLOCK_Q: tl.constexpr):
    """[Q, Q] exp(cs_t - cs_j) where key j reaches query t (same segment, j <= t), else 0."""
    reach = (seg_q[:, None] == seg_k[None, :]) & key_valid[None, :]
    if SAME_BLOCK:  # queries and keys are the same tokens: keep j <= t
        offs = tl.arange(0, BLOCK_Q)
        reach = reach & (offs[None, :] <= offs[:, None])
    return tl.exp(tl.where(reach, cs_q[:, None] - cs_k[None, :], float("-inf")))


@triton.jit
def _group_head(A_ptr, D_ptr, dt_ptr, start_ptr, gi, j, heads_per_group, bi, t_p, t_c, n, stride_dt_b, stride_dt_n,
                ALIGNED: tl.constexpr):
    """Head j of group gi: its index, A and D, and the decay terms (_block_terms) of the previous
    and this block, with the running cs and segment number at this block's end. ALIGNED: no key
    of this block's queries lies in the previous block, so its terms are neither loaded nor
    carried (cs and the segment number start at this block; the previous block's terms returned
    are this block's, unused)."""
    hi = gi * heads_per_group + j
    A_h = tl.load(A_ptr + hi).to(tl.float32)
    D_h = tl.load(D_ptr + hi).to(tl.float32)
    if ALIGNED:
        dt_c, cs_c, seg_c, cs_end, seg_end = _block_terms(
            dt_ptr, start_ptr, bi, hi, t_c, n, stride_dt_b, stride_dt_n, A_h, 0.0, 0)
        return hi, A_h, D_h, dt_c, cs_c, seg_c, dt_c, cs_c, seg_c, cs_end, seg_end
    else:
        dt_p, cs_p, seg_p, cs_end, seg_end = _block_terms(
            dt_ptr, start_ptr, bi, hi, t_p, n, stride_dt_b, stride_dt_n, A_h, 0.0, 0)
        dt_c, cs_c, seg_c, cs_end, seg_end = _block_terms(
            dt_ptr, start_ptr, bi, hi, t_c, n, stride_dt_b, stride_dt_n, A_h, cs_end, seg_end)
        return hi, A_h, D_h, dt_p, cs_p, seg_p, dt_c, cs_c, seg_c, cs_end, seg_end


@triton.jit
def _window_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, start_ptr, y_ptr,
    n, h, p, s, heads_per_group,
    stride_u_b, stride_u_n, stride_u_h, stride_dt_b, stride_dt_n, stride_bc_b, stride_bc_n, stride_bc_g, shift,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, TILE: tl.constexpr, TILE_P: tl.constexpr,
    PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):
    """One (head group, block, batch row): y of the block's tokens, for every head of the group,
    from keys in this and the previous block (only this one when ALIGNED: blocks start at
    ``blk·Q - shift``, where segments start, so none reaches back into the previous block). The
    group's heads share B and C, so the score tiles C Bᵀ are computed once for all of them."""
    gi, blk, bi = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs = tl.arange(0, BLOCK_Q)
    t_c = blk * BLOCK_Q - shift + offs  # this block: queries, and keys of the diagonal tile
    t_p = t_c - BLOCK_Q  # the previous block: keys
    valid_p, valid_c = (t_p >= 0) & (t_p < n), (t_c >= 0) & (t_c < n)

    bc_col = gi * stride_bc_g
    G_p = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)  # C_c B_pᵀ
    G_c = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)  # C_c B_cᵀ
    for s0 in range(0, BLOCK_S, TILE):
        C_c = _load_tile(C_ptr, bi, t_c, bc_col + s0, stride_bc_b, stride_bc_n, valid_c, s - s0, TILE, PRECISION)
        B_c = _load_tile(B_ptr, bi, t_c, bc_col + s0, stride_bc_b, stride_bc_n, valid_c, s - s0, TILE, PRECISION)
        G_c = _dot(C_c, tl.trans(B_c), G_c, PRECISION)
        if not ALIGNED:
            B_p = _load_tile(B_ptr, bi, t_p, bc_col + s0, stride_bc_b, stride_bc_n, valid_p, s - s0, TILE, PRECISION)
            G_p = _dot(C_c, tl.trans(B_p), G_p, PRECISION)

    offs_p = tl.arange(0, TILE_P)
    for j in range(heads_per_group):
        hi, A_h, D_h, dt_p, cs_p, seg_p, dt_c, cs_c, seg_c, _, _ = _group_head(
            A_ptr, D_ptr, dt_ptr, start_ptr, gi, j, heads_per_group, bi, t_p, t_c, n, stride_dt_b, stride_dt_n,
            ALIGNED)
        P_c = G_c * _decay(cs_c, seg_c, cs_c, seg_c, valid_c, True, BLOCK_Q)
        if not ALIGNED:
            P_p = G_p * _decay(cs_c, seg_c, cs_p, seg_p, valid_p, False, BLOCK_Q)
        # The head's columns TILE_P at a time: y's columns are independent.
        for p0 in range(0, BLOCK_P, TILE_P):
            u_c = _load_tile(u_ptr, bi, t_c, hi * stride_u_h + p0, stride_u_b, stride_u_n, valid_c, p - p0, TILE_P,
                              PRECISION)
            y = _dot(P_c, u_c * dt_c[:, None], None, PRECISION) + D_h * u_c
            if not ALIGNED:
                u_p = _load_tile(u_ptr, bi, t_p, hi * stride_u_h + p0, stride_u_b, stride_u_n, valid_p, p - p0,
                                  TILE_P, PRECISION)
                y = _dot(P_p, u_p * dt_p[:, None], y, PRECISION)
            y_offs = (bi * n + t_c.to(tl.int64)[:, None]) * h * p + hi * p + p0 + offs_p[None, :]
            tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=valid_c[:, None] & (p0 + offs_p[None, :] < p))


@triton.jit
def _window_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, start_ptr, dy_ptr,
    du_ptr, ddt_ptr, dA_part_ptr, dD_part_ptr, dB_ptr, dC_ptr,
    n, h, p, s, g, heads_per_group,
    stride_u_b, stride_u_n, stride_u_h, stride_dt_b, stride_dt_n, stride_bc_b, stride_bc_n, stride_bc_g,
    stride_dy_b, stride_dy_n, stride_dy_h, stride_du_b, stride_du_n, stride_dbc_b, stride_dbc_n, shift,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, TILE: tl.constexpr, TILE_P: tl.constexpr,
    PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):
    """One (head group, block, batch row): the gradients of the block's tokens, as queries (over
    keys of blocks k-1 and k) and as keys (for queries of blocks k and k+1), for every head of
    the group.

    Writes du, ddt, the block's sums of the gradients of A and D per head (the caller sums them
    over blocks), and dB, dC of the group: its heads share B and C, so their score gradients are
    summed before the one pass over the state that turns them into dB and dC. du, dB and dC are
    addressed by their own (batch, token) strides. ALIGNED (blocks start where segments start, see
    the forward): the block's own tile is the only one.
    """
    gi, blk, bi = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs = tl.arange(0, BLOCK_Q)
    t_c = blk * BLOCK_Q - shift + offs
    t_p = t_c - BLOCK_Q
    t_n = t_c + BLOCK_Q
    valid_p, valid_c, valid_n = (t_p >= 0) & (t_p < n), (t_c >= 0) & (t_c < n), t_n < n

    # Score tiles, named query block then key block: G_cp = C_c B_pᵀ, G_cc = C_c B_cᵀ, G_nc = C_n B_cᵀ.
    bc_col = gi * stride_bc_g
    G_cp = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)
    G_cc = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)
    G_nc = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)
    for s0 in range(0, BLOCK_S, TILE):
        B_c = _load_tile(B_ptr, bi, t_c, bc_col + s0, stride_bc_b, stride_bc_n, valid_c, s - s0, TILE, PRECISION)
        C_c = _load_tile(C_ptr, bi, t_c, bc_col + s0, stride_bc_b, stride_bc_n, valid_c, s - s0, TILE, PRECISION)
        G_cc = _dot(C_c, tl.trans(B_c), G_cc, PRECISION)
        if not ALIGNED:
            B_p = _load_tile(B_ptr, bi, t_p, bc_col + s0, stride_bc_b, stride_bc_n, valid_p, s - s0, TILE, PRECISION)
            C_n = _load_tile(C_ptr, bi, t_n, bc_col + s0, stride_bc_b, stride_bc_n, valid_n, s - s0, TILE, PRECISION)
            G_cp = _dot(C_c, tl.trans(B_p), G_cp, PRECISION)
            G_nc = _dot(C_n, tl.trans(B_c), G_nc, PRECISION)

    # Σ over the group's heads of the gradient reaching each score tile.
    dG_cp_sum = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)
    dG_cc_sum = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)
    dG_nc_sum = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)
    t64 = t_c.to(tl.int64)
    offs_p = tl.arange(0, TILE_P)
    for j in range(heads_per_group):
        hi, A_h, D_h, dt_p, cs_p, seg_p, dt_c, cs_c, seg_c, cs_end, seg_end = _group_head(
            A_ptr, D_ptr, dt_ptr, start_ptr, gi, j, heads_per_group, bi, t_p, t_c, n, stride_dt_b, stride_dt_n,
            ALIGNED)
        # The neighbouring blocks' terms (not ALIGNED) are interleaved in this order, which the
        # compiler turns into fewer spilled registers than with them all at the end.
        if not ALIGNED:
            _, cs_n, seg_n, _, _ = _block_terms(
                dt_ptr, start_ptr, bi, hi, t_n, n, stride_dt_b, stride_dt_n, A_h, cs_end, seg_end)
            L_cp = _decay(cs_c, seg_c, cs_p, seg_p, valid_p, False, BLOCK_Q)
            L_nc = tl.where(valid_n[:, None], _decay(cs_n, seg_n, cs_c, seg_c, valid_c, False, BLOCK_Q), 0.0)
            W_nc = tl.trans(G_nc * L_nc)
        L_cc = _decay(cs_c, seg_c, cs_c, seg_c, valid_c, True, BLOCK_Q)
        W_cc = tl.trans(G_cc * L_cc)

        # y_t = Σ_j (G ∘ L)[t, j] x_j with x = u·dt: the gradient reaching G is (dy xᵀ) ∘ L, and the
        # one reaching the exponent cs_t - cs_j is that times G. The head's columns go TILE_P at a
        # time: dy xᵀ sums over them, dx and du are column by column.
        dG_cc = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)
        dG_cp = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)
        dG_nc = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)
        dx_u = tl.zeros((BLOCK_Q,), dtype=tl.float32)  # Σ_p dx·u per token (for ddt)
        dy_u = tl.zeros((BLOCK_Q,), dtype=tl.float32)  # Σ_p dy·u per token (for dD)
        for p0 in range(0, BLOCK_P, TILE_P):
            u_c = _load_tile(u_ptr, bi, t_c, hi * stride_u_h + p0, stride_u_b, stride_u_n, valid_c, p - p0, TILE_P,
                              PRECISION)
            dy_c = _load_tile(dy_ptr, bi, t_c, hi * stride_dy_h + p0, stride_dy_b, stride_dy_n, valid_c, p - p0, TILE_P,
                              PRECISION)
            x_c = u_c * dt_c[:, None]
            dG_cc = _dot(dy_c, tl.trans(x_c), dG_cc, PRECISION)
            dx = _dot(W_cc, dy_c, None, PRECISION)
            if not ALIGNED:
                u_p = _load_tile(u_ptr, bi, t_p, hi * stride_u_h + p0, stride_u_b, stride_u_n, valid_p, p - p0,
                                  TILE_P, PRECISION)
                dy_n = _load_tile(dy_ptr, bi, t_n, hi * stride_dy_h + p0, stride_dy_b, stride_dy_n, valid_n, p - p0,
                                  TILE_P, PRECISION)
                dG_cp = _dot(dy_c, tl.trans(u_p * dt_p[:, None]), dG_cp, PRECISION)
                dG_nc = _dot(dy_n, tl.trans(x_c), dG_nc, PRECISION)
                dx = _dot(W_nc, dy_n, dx, PRECISION)
            du = dx * dt_c[:, None] + D_h * dy_c
            du_offs = bi * stride_du_b + t64[:, None] * stride_du_n + hi * p + p0 + offs_p[None, :]
            tl.store(du_ptr + du_offs, du.to(du_ptr.dtype.element_ty),
                     mask=valid_c[:, None] & (p0 + offs_p[None, :] < p))
            dx_u += tl.sum(dx * u_c, axis=1)
            # Per token first: summing the [Q, p] tile down to one number spilled more registers.
            dy_u += tl.sum(dy_c.to(tl.float32) * u_c.to(tl.float32), axis=1)
        dG_cc = dG_cc * L_cc
        dG_cc_sum += dG_cc
        # The gradient of a_i = dt_i·A is Σ dE[t, j] over the pairs (t, j) that decay across i,
        # j < i <= t; for i in this block those pairs sit in the three tiles (dE = dG ∘ G).
        # Both in this block: Σ_{t >= i} Σ_{j < i} dE[t, j].
        d_a = _spanned_sum(dG_cc * G_cc, BLOCK_Q)
        if not ALIGNED:
            dG_cp = dG_cp * L_cp
            dG_nc = dG_nc * L_nc
            dG_cp_sum += dG_cp
            dG_nc_sum += dG_nc
            # Keys in the previous block: every i <= t of this block.
            d_a += tl.cumsum(tl.sum(dG_cp * G_cp, axis=1), axis=0, reverse=True)
            # Queries in the next block: every t there is after i, so every key j < i counts.
            d_a += _sum_before(tl.sum(dG_nc * G_nc, axis=0), BLOCK_Q)
        tl.store(ddt_ptr + (bi * n + t64) * h + hi, dx_u + d_a * A_h, mask=valid_c)
        # Tokens outside the sequence load as zeros (dt, u and dy), so they add nothing here.
        part = (bi * tl.num_programs(1) + blk) * h + hi
        tl.store(dA_part_ptr + part, tl.sum(d_a * dt_c, axis=0))
        tl.store(dD_part_ptr + part, tl.sum(dy_u, axis=0))

    offs_s = tl.arange(0, TILE)
    dG_cc_t = tl.trans(dG_cc_sum)
    dG_nc_t = tl.trans(dG_nc_sum)
    for s0 in range(0, BLOCK_S, TILE):
        B_c = _load_tile(B_ptr, bi, t_c, bc_col + s0, stride_bc_b, stride_bc_n, valid_c, s - s0, TILE, PRECISION)
        C_c = _load_tile(C_ptr, bi, t_c, bc_col + s0, stride_bc_b, stride_bc_n, valid_c, s - s0, TILE, PRECISION)
        dC = _dot(dG_cc_sum, B_c, None, PRECISION)
        dB = _dot(dG_cc_t, C_c, None, PRECISION)
        if not ALIGNED:
            B_p = _load_tile(B_ptr, bi, t_p, bc_col + s0, stride_bc_b, stride_bc_n, valid_p, s - s0, TILE, PRECISION)
            C_n = _load_tile(C_ptr, bi, t_n, bc_col + s0, stride_bc_b, stride_bc_n, valid_n, s - s0, TILE, PRECISION)
            dC = _dot(dG_cp_sum, B_p, dC, PRECISION)
            dB = _dot(dG_nc_t, C_n, dB, PRECISION)
        offs_out = bi * stride_dbc_b + t64[:, None] * stride_dbc_n + gi * s + s0 + offs_s[None, :]
        out_mask = valid_c[:, None] & (s0 + offs_s[None, :] < s)
        tl.store(dB_ptr + offs_out, dB.to(dB_ptr.dtype.element_ty), mask=out_mask)
        tl.store(dC_ptr + offs_out, dC.to(dC_ptr.dtype.element_ty), mask=out_mask)


def _launch_meta(block_q: int, block_shift: int, p: int, s: int, dtype: torch.dtype, backward: bool) -> dict:
    return dict(
        BLOCK_Q=block_q, BLOCK_P=_padded(p), BLOCK_S=_padded(s), TILE=min(TILE_S, _padded(s)),
        TILE_P=min(BACKWARD_TILE_P if backward else FORWARD_TILE_P, _padded(p)), PRECISION=_precision(dtype),
        ALIGNED=block_shift >= 0, num_warps=_warps(block_q, backward), num_stages=NUM_STAGES,
    )


def _grid(groups: int, n: int, b: int, block_q: int, block_shift: int) -> tuple[int, int, int]:
    return groups, triton.cdiv(n + max(block_shift, 0), block_q), b


def _strides(u, dt, B):
    return (u.stride(0), u.stride(1), u.stride(2), dt.stride(0), dt.stride(1), B.stride(0), B.stride(1), B.stride(2))


# The ops take u, B and C side by side in one tensor x [b, n, h·p + 2·g·s], as a KV-SSM's conv
# writes them, and the backward returns their gradients the same way: the model's conv output goes
# in as it is, and its gradient reaches the conv's backward without a concatenation.
@torch.library.custom_op("attamba::ssd_window_fwd", mutates_args=())
def _window_forward(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, D: torch.Tensor, starts: torch.Tensor,
    groups: int, state_dim: int, block_q: int, block_shift: int,
) -> torch.Tensor:
    """-> y [b, n, h, p] of the scan over (u, B, C) = x; blocks as :func:`block_layout` says."""
    x = _last_dim_contiguous(x)
    u, B, C = split_scan_inputs(x, A.shape[0], groups, state_dim)
    b, n, h, p = u.shape
    dt = dt.contiguous()
    y = torch.empty((b, n, h, p), device=x.device, dtype=x.dtype)
    _window_fwd_kernel[_grid(groups, n, b, block_q, block_shift)](
        u, dt, A, B, C, D, starts, y, n, h, p, state_dim, h // groups, *_strides(u, dt, B), max(block_shift, 0),
        **_launch_meta(block_q, block_shift, p, state_dim, x.dtype, backward=False),
    )
    return y


@_window_forward.register_fake
def _window_forward_fake(x, dt, A, D, starts, groups, state_dim, block_q, block_shift):
    b, n, _ = x.shape
    return x.new_empty((b, n, A.shape[0], (x.shape[-1] - 2 * groups * state_dim) // A.shape[0]))


@torch.library.custom_op("attamba::ssd_window_bwd", mutates_args=())
def _window_backward(
    dy: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, D: torch.Tensor, starts: torch.Tensor,
    groups: int, state_dim: int, block_q: int, block_shift: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx (like x: du, dB, dC side by side), ddt, and dA's and dD's partial sums as one float32
    [2, b, blocks, h], which the autograd formula sums (compiled, with the split and casts that
    follow, in one fused reduction)."""
    x = _last_dim_contiguous(x)
    u, B, C = split_scan_inputs(x, A.shape[0], groups, state_dim)
    b, n, h, p = u.shape
    dt = dt.contiguous()
    dy = _last_dim_contiguous(dy)
    dx = torch.empty((b, n, x.shape[-1]), device=x.device, dtype=x.dtype)
    du, dB, dC = split_scan_inputs(dx, h, groups, state_dim)
    ddt = torch.empty((b, n, h), device=x.device, dtype=torch.float32)
    grid = _grid(groups, n, b, block_q, block_shift)
    blocks = grid[1]
    # Summing dy·u over the whole [b, n, h, p] outside the kernel read both tensors again, in
    # float32; the kernel, which has them loaded, leaves sums per block instead, dA's and dD's side
    # by side: one reduction over both.
    parts = torch.empty((2, b, blocks, h), device=x.device, dtype=torch.float32)
    _window_bwd_kernel[grid](
        u, dt, A, B, C, D, starts, dy, du, ddt, parts[0], parts[1], dB, dC,
        n, h, p, state_dim, groups, h // groups, *_strides(u, dt, B), dy.stride(0), dy.stride(1), dy.stride(2),
        dx.stride(0), dx.stride(1), dx.stride(0), dx.stride(1), max(block_shift, 0),
        **_launch_meta(block_q, block_shift, p, state_dim, x.dtype, backward=True),
    )
    return dx, ddt.to(dt.dtype), parts


@_window_backward.register_fake
def _window_backward_fake(dy, x, dt, A, D, starts, groups, state_dim, block_q, block_shift):
    b, n = x.shape[:2]
    blocks = _grid(groups, n, b, block_q, block_shift)[1]
    return x.new_empty(x.shape), dt.new_empty(dt.shape), A.new_empty((2, b, blocks, A.shape[0]), dtype=torch.float32)


def _window_setup_context(ctx, inputs, output) -> None:
    x, dt, A, D, starts, groups, state_dim, block_q, block_shift = inputs
    ctx.save_for_backward(x, dt, A, D, starts)
    ctx.sizes = (groups, state_dim, block_q, block_shift)


def _window_autograd(ctx, dy):
    x, dt, A, D, starts = ctx.saved_tensors
    dx, ddt, parts = _window_backward(dy, x, dt, A, D, starts, *ctx.sizes)
    dA_dD = parts.sum((1, 2))
    return dx, ddt, dA_dD[0].to(A.dtype), dA_dD[1].to(D.dtype), None, None, None, None, None


torch.library.register_autograd("attamba::ssd_window_fwd", _window_autograd, setup_context=_window_setup_context)


def ssd_segmented_window(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    segment_start: torch.Tensor,
    return_final_state: bool = False,
    max_segment_len: Optional[int] = None,
    segment_period: Optional[SegmentPeriod] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The segmented SSD scan (signature of ``ssd_reference``) through the windowed kernels when
    ``max_segment_len`` (the caller's bound on every segment's length) allows, else through the
    chunked kernels of :func:`apps.attamba.ssd_triton.ssd_segmented_triton`. ``segment_period``
    (:data:`SegmentPeriod`, a bound of its own) lets the kernels start their blocks on segment
    starts (:func:`block_layout`).

    The bound and the period are trusted, not checked (checking costs a device-to-host sync): a
    longer segment, or one crossing a promised start, silently loses the contributions from
    before the block it reaches into. The kernels read u, B and C from one tensor: this copies
    them side by side for :func:`ssd_segmented_window_packed`, which takes them so.
    """
    if not supports(_segment_bound(max_segment_len, segment_period), return_final_state):
        return ssd_segmented_triton(u, dt, A, B, C, D, segment_start, return_final_state)
    _check_inputs(u, dt, A, B, C, D, segment_start)
    if not u.dtype == B.dtype == C.dtype:
        raise ValueError(f"u, B and C must share a dtype; got {u.dtype}, {B.dtype}, {C.dtype}")
    return ssd_segmented_window_packed(join_scan_inputs(u, B, C), dt, A, D, segment_start, B.shape[2], B.shape[3],
                                       max_segment_len, segment_period)


def ssd_segmented_window_packed(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    segment_start: torch.Tensor,
    groups: int,
    state_dim: int,
    max_segment_len: Optional[int] = None,
    segment_period: Optional[SegmentPeriod] = None,
) -> torch.Tensor:
    """:func:`ssd_segmented_window` with u, B and C side by side in x [b, n, h·p + 2·g·s] (h =
    A's length), as a KV-SSM's conv writes them -> y [b, n, h, p]. The gradient of x is one
    tensor too. Without a usable bound (:func:`supports`), the chunked kernels run on views of x."""
    heads = A.shape[0]
    bc = groups * state_dim
    if x.dim() != 3 or x.shape[-1] <= 2 * bc or (x.shape[-1] - 2 * bc) % heads:
        raise ValueError(
            f"x must be [b, n, h·p + 2·g·s] with h={heads}, g={groups}, s={state_dim}; got {tuple(x.shape)}"
        )
    u, B, C = split_scan_inputs(x, heads, groups, state_dim)
    bound = _segment_bound(max_segment_len, segment_period)
    if not supports(bound, return_final_state=False):
        return ssd_segmented_triton(u, dt, A, B, C, D, segment_start)
    _check_inputs(u, dt, A, B, C, D, segment_start)
    return _window_forward(x, dt, A, D, _as_bytes(segment_start), groups, state_dim, *block_layout(bound, segment_period))
