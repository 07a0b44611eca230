"""Triton kernels for Attamba attention over periodic chunk boundaries, forward and backward.

Query t attends key j iff j <= t, j is in t's document, and either j is in t's window
(ws(t) <= j, with ws(t) = t - L + 1, or the start of t's chunk with ``leading_tokens='chunk'``) or
j ends a chunk (DESIGN.md). With periodic boundaries the chunk ends are positions
first, first + P, first + 2P, ... (first = P - 1 - offset), so a block of queries sees:

- the *compressed* keys: every boundary before its window, i.e. slots s with
  first + s·P < ws(t), read straight from K with a row stride of P (no gathered copy);
- the *window*: the positions [ws(t), t]: the block's own positions, and before them at most
  L - 1 keys, which the forward reads as one 16-key tile for L = 16 (a full key block would be
  mostly masked; ``KernelConfig.forward_window_tiles``).

Work per head is ~n²/(2P) + n·(L + block) instead of the n²/2 of causal attention. FlexAttention
runs the same mask over the gathered layout [K_c ; K] (``attn_impl: flex``) but spends about three
times the flash kernel's time per computed block on this pattern (DESIGN.md); these kernels do
the two parts as plain loops, unmasked except for the block that crosses the window's edge.

Backward: dQ is the forward's kernel with ``BACKWARD`` on (same loops; it also computes
rowsum(dO ∘ O) on the way); dK/dV run in one launch whose first programs take blocks of compressed
slots (every query after the slot's window edge; the longest loops first) and whose last programs
take blocks of window keys (a query range of one block plus the window), short enough to fill the
launch's tail. A slot is also a window key of the queries just after it: its share as a slot goes to
a float32 buffer that is added to its rows afterwards.

The log-sum-exp is kept in base 2 (scores are scaled by log2(e) / sqrt(d)) as flash kernels do.
Inputs may be strided (the head dim contiguous); the output and each gradient are laid out as their
input, so token-major views of [B, n, H, d] tensors (the model's) need no transposing copy either way.
Runs on CUDA tensors, or under the Triton interpreter (``TRITON_INTERPRET=1``) for the CPU tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from apps.attamba.chunking import document_starts, periodic_slots
from apps.attamba.ssd_torch import positions_in_segment
from apps.attamba.ssd_triton import _INTERPRETED, _dot_precision, _last_dim_contiguous

LOG2_E = 1.4426950408889634
_NEG_BIG = tl.constexpr(-1.0e30)
"""Start of the running row maximum: finite, so a row with nothing visible yet gives exp2(-inf) = 0,
never exp2(-inf - -inf) = nan."""


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings of the forward, dQ and dK/dV launches (powers of two, >= 16).

    The CUDA defaults are the fastest of ``benchmarks/tune_attention_triton.py``'s variants at
    n=16384, d=64, P=8, L=16 in bf16 (docs/benchmarks.md)."""

    forward_queries: int = 64
    forward_keys: int = 64
    forward_warps: int = 4
    forward_stages: int = 2
    dq_queries: int = 64
    dq_keys: int = 32
    dq_warps: int = 4
    dkv_keys: int = 64
    dkv_queries: int = 32
    dkv_warps: int = 4
    backward_stages: int = 3
    forward_registers: int = 128
    """Registers per thread the forward may use with heads of size <= 64 (Triton's ``maxnreg``; 0:
    the compiler's choice; larger heads are never capped, they would spill). These kernels wait on
    latency more than on any one unit (Nsight Compute, n=16k on an H100: at most ~55% of compute or
    memory throughput, 3 blocks of 4 warps per multiprocessor), so a cap that fits a fourth block
    helps the forward: 168 -> 128 registers with 2 stages, 488 -> 459 µs. dK/dV capped at 128
    (741 -> 724 µs) spills with documents or chunk windows; dQ (109) gained nothing from 96."""
    dq_registers: int = 128
    """dQ with documents needs 131-136 registers uncapped since its outputs are strided, which
    fits 3 blocks a multiprocessor instead of 4 (n=1024 with documents on an H100: 57.9 against
    51.6 µs before the strides); capped at 128 it does not spill and takes 52.4-52.7 against the
    unstrided kernel's 51.0-51.5 in the same runs."""
    dkv_registers: int = 0
    dkv_reverse: bool = True
    """The slot blocks' dK/dV visit their queries from the last: the programs of a head then start
    on the same query rows and read them while in L2, instead of each streaming its own range
    (n=16k on an H100: 737 µs against 777 for the dK/dV launch)."""
    forward_window_tiles: bool = True
    """The window keys before a block of queries in tiles of ~L (16 for L = 16) rather than BLOCK_N
    (H100, n=16k: forward 446.6-471.4 against 471.4-510.1 µs; n=1024 with documents: 44.8 against
    47.2-49.3)."""
    dq_window_tiles: bool = True
    """The same for dQ (with its register cap): n=1024 with documents 46.7 against 49.0-49.1 µs
    (H200), 52.0 against 52.8 (H100); at n=16k no more apart than two copies of one kernel in a
    process (H200: 487.6 on against 475.8 off; two identical copies 478.8 and 489.3)."""
    dkv_window_tiles: bool = False
    """The queries after a block of window keys in tiles of ~L: at n=16k 735.2-768.8 against
    740.0-797.8 µs, at n=1024 with documents 70.8 against 66.9."""


CUDA_CONFIG = KernelConfig()
INTERPRETER_CONFIG = KernelConfig(
    forward_queries=16, forward_keys=16, forward_warps=1, forward_stages=1, dq_queries=16, dq_keys=16, dq_warps=1,
    dkv_keys=16, dkv_queries=16, dkv_warps=1, backward_stages=1, forward_registers=0,
)
"""Small tiles so that the CPU tests' short sequences cross several blocks."""


def supports(head_dim: int) -> bool:
    """Whether these kernels take heads of this size (tl.dot wants powers of two >= 16)."""
    return 16 <= head_dim <= 128 and head_dim & (head_dim - 1) == 0


@triton.jit
def _window_start(t, leading, chunk_size, offset, CHUNK_WINDOW: tl.constexpr):
    if CHUNK_WINDOW:
        return t - (t + offset) % chunk_size
    else:
        return t - leading + 1


@triton.jit
def _slot_count_before(position, first, chunk_size):
    """Slots s with first + s·P < position (position may be negative)."""
    return (tl.maximum(position - first, 0) + chunk_size - 1) // chunk_size


@triton.jit
def _row_ptrs(base, rows, stride_row, dims):
    return base + rows[:, None] * stride_row + dims[None, :]


@triton.jit
def _forward_block(
    acc, m_i, l_i, q, k, v, allowed, qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr
):
    # Scaled in the exponent's argument (one fused multiply-add per score); the scale is positive,
    # so the row maximum of the raw scores times it is the scaled scores' maximum.
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED:
        scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
    p = tl.math.exp2(scores * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _dq_block(dq, q, do, k, v, lse, delta, allowed, qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.math.exp2(scores - lse[:, None])
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _dkv_block(dk, dv, k, v, q, do, lse, delta, allowed_t, qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Keys on rows, queries on columns: allowed_t is [keys, queries]."""
    scores_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    p_t = tl.math.exp2(scores_t - lse[None, :])
    if MASKED:
        p_t = tl.where(allowed_t, p_t, 0.0)
    dv = dv + tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = dk + tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _program_head(heads):
    """(b·H + h, b, h) of this program: grid axis 0 runs over batch × heads."""
    bh = tl.program_id(0).to(tl.int64)
    return bh, bh // heads, bh % heads


@triton.jit
def _load_rows(base, rows, valid, stride_row, dims, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(_row_ptrs(base, rows, stride_row, dims), mask=valid[:, None], other=0.0)
    else:
        return tl.load(_row_ptrs(base, rows, stride_row, dims))


@triton.jit
def _query_step(
    acc, m_i, l_i, q, do, lse, delta, K, V, rows, rows_valid, allowed, stride_kn, stride_vn, dims, qk_scale,
    MASKED: tl.constexpr, BACKWARD: tl.constexpr, PRECISION: tl.constexpr,
):
    """One block of keys (rows of K and V) for a block of queries: the forward's online softmax,
    or the dQ sum with BACKWARD. Unmasked blocks hold valid rows only."""
    k = _load_rows(K, rows, rows_valid, stride_kn, dims, MASKED)
    v = _load_rows(V, rows, rows_valid, stride_vn, dims, MASKED)
    if BACKWARD:
        acc = _dq_block(acc, q, do, k, v, lse, delta, allowed, qk_scale, MASKED, PRECISION)
    else:
        acc, m_i, l_i = _forward_block(acc, m_i, l_i, q, k, v, allowed, qk_scale, MASKED, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _query_kernel(
    Q, K, V, DO, O, LSE, DELTA, OUT, DOC_START,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_ob, stride_oh, stride_on, stride_outb, stride_outh, stride_outn, stride_doc,
    n, heads, slots, first, chunk_size, leading, offset, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW_KEYS: tl.constexpr,
    CHUNK_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr, BACKWARD: tl.constexpr,
):
    """One block of queries over every key block it sees. Forward: OUT = attention output, LSE
    written. BACKWARD: OUT = dQ, and rowsum(dO ∘ O) written to DELTA for the dK/dV kernel that runs
    next. LSE and DELTA are contiguous [B·H, n] (allocated here); O and OUT are strided like Q.
    DOC_START [B or 1, n]: where each position's document begins (HAS_DOCS). WINDOW_KEYS: the tile
    of the window keys before the block (:func:`_window_tile`; 0: the window in BLOCK_N tiles)."""
    # Heads vary fastest and the last query blocks (the most keys) go first: fewer stragglers.
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    bh, b, h = _program_head(heads)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    dims = tl.arange(0, HEAD_DIM)
    t = m0 + tl.arange(0, BLOCK_M)
    t_valid = t < n
    q = _load_rows(Q + b * stride_qb + h * stride_qh, t, t_valid, stride_qn, dims, True)
    if BACKWARD:
        do = _load_rows(DO + b * stride_dob + h * stride_doh, t, t_valid, stride_don, dims, True)
        lse = tl.load(LSE + bh * n + t, mask=t_valid, other=0.0)
        out = _load_rows(O + b * stride_ob + h * stride_oh, t, t_valid, stride_on, dims, True)
        delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
        tl.store(DELTA + bh * n + t, delta, mask=t_valid)
    else:
        do, lse, delta = q, t_valid.to(tl.float32), t_valid.to(tl.float32)  # unused
    ws = _window_start(t, leading, chunk_size, offset, CHUNK_WINDOW)
    t_last = tl.minimum(m0 + BLOCK_M, n) - 1
    ws_lo = _window_start(m0, leading, chunk_size, offset, CHUNK_WINDOW)
    ws_hi = _window_start(t_last, leading, chunk_size, offset, CHUNK_WINDOW)
    if HAS_DOCS:
        # Keys before the block's first document are seen by no row; from the last row's
        # document start on, every key a row sees anyway is in its document.
        DOC_START += b * stride_doc
        doc_start = tl.load(DOC_START + t, mask=t_valid, other=0)
        doc_lo = tl.load(DOC_START + m0)
        doc_hi = tl.load(DOC_START + t_last)
    else:
        doc_start, doc_lo, doc_hi = t, 0, 0  # doc_start unused
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # Compressed slots, in blocks from the first one any row sees: masked while they reach
    # before the last row's document, unmasked while before every row's window, masked to the end.
    slot_begin = _slot_count_before(doc_lo, first, chunk_size)
    any_doc = _slot_count_before(doc_hi, first, chunk_size)
    all_windows = tl.minimum(_slot_count_before(ws_lo, first, chunk_size), slots)
    slot_end = tl.minimum(_slot_count_before(ws_hi, first, chunk_size), slots)
    unmasked_begin = slot_begin + tl.cdiv(tl.maximum(any_doc - slot_begin, 0), BLOCK_N) * BLOCK_N
    unmasked_end = unmasked_begin + tl.maximum(all_windows - unmasked_begin, 0) // BLOCK_N * BLOCK_N
    for s0 in range(slot_begin, tl.minimum(unmasked_begin, slot_end), BLOCK_N):
        acc, m_i, l_i = _query_slots(
            acc, m_i, l_i, q, do, lse, delta, K, V, s0 + offs_n, ws, doc_start, slots, first, chunk_size,
            stride_kn, stride_vn, dims, qk_scale, True, HAS_DOCS, BACKWARD, PRECISION,
        )
    for s0 in range(unmasked_begin, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _query_slots(
            acc, m_i, l_i, q, do, lse, delta, K, V, s0 + offs_n, ws, doc_start, slots, first, chunk_size,
            stride_kn, stride_vn, dims, qk_scale, False, HAS_DOCS, BACKWARD, PRECISION,
        )
    for s0 in range(tl.maximum(unmasked_begin, unmasked_end), slot_end, BLOCK_N):
        acc, m_i, l_i = _query_slots(
            acc, m_i, l_i, q, do, lse, delta, K, V, s0 + offs_n, ws, doc_start, slots, first, chunk_size,
            stride_kn, stride_vn, dims, qk_scale, True, HAS_DOCS, BACKWARD, PRECISION,
        )
    # The window, positions [ws(t), t] from the block's first document on. With WINDOW_KEYS: the
    # keys before the block (at most L - 1) in tiles of WINDOW_KEYS that end at m0, then the
    # block's own positions, so a 16-token window costs a 16-key tile, not a mostly masked BLOCK_N
    # one. Without: BLOCK_N tiles from the window's start (one loop; fewer, longer iterations).
    window_lo = tl.maximum(ws_lo, doc_lo)
    if WINDOW_KEYS > 0:
        for i in range(0, tl.cdiv(tl.maximum(m0 - window_lo, 0), WINDOW_KEYS)):
            acc, m_i, l_i = _query_window(
                acc, m_i, l_i, q, do, lse, delta, K, V, m0 - (i + 1) * WINDOW_KEYS + tl.arange(0, WINDOW_KEYS), t,
                ws, doc_start, n, stride_kn, stride_vn, dims, qk_scale, HAS_DOCS, BACKWARD, PRECISION,
            )
        window_lo = m0
    for j0 in range(window_lo, t_last + 1, BLOCK_N):
        acc, m_i, l_i = _query_window(
            acc, m_i, l_i, q, do, lse, delta, K, V, j0 + offs_n, t, ws, doc_start, n, stride_kn, stride_vn, dims,
            qk_scale, HAS_DOCS, BACKWARD, PRECISION,
        )

    out_ptrs = _row_ptrs(OUT + b * stride_outb + h * stride_outh, t, stride_outn, dims)
    if BACKWARD:
        tl.store(out_ptrs, (acc * sm_scale).to(OUT.dtype.element_ty), mask=t_valid[:, None])
    else:
        l_i = tl.where(t_valid, l_i, 1.0)  # rows past n see nothing; they are not stored
        tl.store(out_ptrs, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=t_valid[:, None])
        tl.store(LSE + bh * n + t, m_i + tl.math.log2(l_i), mask=t_valid)


@triton.jit
def _query_slots(
    acc, m_i, l_i, q, do, lse, delta, K, V, s, ws, doc_start, slots, first, chunk_size,
    stride_kn, stride_vn, dims, qk_scale,
    MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, BACKWARD: tl.constexpr, PRECISION: tl.constexpr,
):
    """A block of compressed slots s for a block of queries; unmasked blocks lie before every
    row's window, in every row's document."""
    pos = first + s * chunk_size
    s_valid = s < slots
    allowed = (pos[None, :] < ws[:, None]) & s_valid[None, :]
    if MASKED:
        allowed = _in_document(allowed, pos[None, :], doc_start[:, None], HAS_DOCS)
    return _query_step(
        acc, m_i, l_i, q, do, lse, delta, K, V, pos, s_valid, allowed, stride_kn, stride_vn, dims, qk_scale,
        MASKED, BACKWARD, PRECISION,
    )


@triton.jit
def _query_window(
    acc, m_i, l_i, q, do, lse, delta, K, V, j, t, ws, doc_start, n, stride_kn, stride_vn, dims, qk_scale,
    HAS_DOCS: tl.constexpr, BACKWARD: tl.constexpr, PRECISION: tl.constexpr,
):
    """A tile of window keys j (any positions, even negative ones: those are masked) for a block of
    queries t."""
    j_valid = (j >= 0) & (j < n)
    allowed = (j[None, :] >= ws[:, None]) & (j[None, :] <= t[:, None]) & j_valid[None, :]
    allowed = _in_document(allowed, j[None, :], doc_start[:, None], HAS_DOCS)
    return _query_step(
        acc, m_i, l_i, q, do, lse, delta, K, V, j, j_valid, allowed, stride_kn, stride_vn, dims, qk_scale,
        True, BACKWARD, PRECISION,
    )


@triton.jit
def _in_document(allowed, keys, doc_start, HAS_DOCS: tl.constexpr):
    """``allowed`` and "the key is in the query's document": a visible key is never after its
    query, so it is in the query's document iff not before that document's start."""
    if HAS_DOCS:
        allowed = allowed & (keys >= doc_start)
    return allowed


@triton.jit
def _key_step(
    dk, dv, k, v, Q, DO, LSE, DELTA, DOC_START, m0, bh, n, keys, keys_valid, stride_qn, stride_don, dims,
    leading, chunk_size, offset, qk_scale, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, SLOTS: tl.constexpr, CHUNK_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK, dV of one block of keys from one block of queries at m0. Unmasked: every query of the
    block is < n and sees every key."""
    t = m0 + tl.arange(0, BLOCK_M)
    t_valid = t < n
    q = _load_rows(Q, t, t_valid, stride_qn, dims, MASKED)
    do = _load_rows(DO, t, t_valid, stride_don, dims, MASKED)
    lse = tl.load(LSE + bh * n + t, mask=t_valid, other=0.0)
    delta = tl.load(DELTA + bh * n + t, mask=t_valid, other=0.0)
    allowed = keys_valid[:, None] & t_valid[None, :]
    if MASKED:
        ws = _window_start(t, leading, chunk_size, offset, CHUNK_WINDOW)
        if SLOTS:
            allowed = allowed & (keys[:, None] < ws[None, :])
        else:
            allowed = allowed & (keys[:, None] >= ws[None, :]) & (keys[:, None] <= t[None, :])
        if HAS_DOCS:
            doc_start = tl.load(DOC_START + t, mask=t_valid, other=0)
            allowed = _in_document(allowed, keys[:, None], doc_start[None, :], HAS_DOCS)
    return _dkv_block(dk, dv, k, v, q, do, lse, delta, allowed, qk_scale, MASKED, PRECISION)


@triton.jit
def _key_range(
    dk, dv, k, v, Q, DO, LSE, DELTA, DOC_START, bh, n, keys, keys_valid, stride_qn, stride_don, dims,
    leading, chunk_size, offset, qk_scale, lo, hi, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, SLOTS: tl.constexpr, CHUNK_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
    PRECISION: tl.constexpr, REVERSE: tl.constexpr,
):
    """dK, dV of one block of keys from the query blocks at lo, lo + BLOCK_M, ... below hi, the
    last first with REVERSE."""
    count = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
    for i in range(0, count):
        if REVERSE:
            m0 = lo + (count - 1 - i) * BLOCK_M
        else:
            m0 = lo + i * BLOCK_M
        dk, dv = _key_step(
            dk, dv, k, v, Q, DO, LSE, DELTA, DOC_START, m0, bh, n, keys, keys_valid, stride_qn, stride_don, dims,
            leading, chunk_size, offset, qk_scale, BLOCK_M, MASKED, SLOTS, CHUNK_WINDOW, HAS_DOCS, PRECISION,
        )
    return dk, dv


@triton.jit
def _dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, SLOT_GRADS, DOC_START, DOC_END,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_doc,
    n, heads, slots, first, chunk_size, leading, offset, window_reach, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW_QUERIES: tl.constexpr,
    CHUNK_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr, REVERSE: tl.constexpr,
):
    """dK, dV of one block of keys (heads vary fastest). The first programs take blocks of
    compressed slots (the long loops, the first slots first) and write their share to SLOT_GRADS
    [2, B·H, slots, d] (float32; the caller adds it to the slots' rows); the rest take blocks of
    window keys, short loops that fill the launch's tail, and write every row of DK and DV (strided
    like K and V). ``window_reach``: the most a query lies after a window key, plus one (L, or P
    with chunks); WINDOW_QUERIES: the tile of the queries after a block of window keys
    (:func:`_window_tile`; 0: those queries in BLOCK_M tiles). DOC_END [B or 1, n]: where each
    position's document ends (exclusive; HAS_DOCS)."""
    pid = tl.program_id(1)
    slot_blocks = tl.cdiv(slots, BLOCK_N)
    inputs = (
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_dob, stride_doh, stride_don,
    )
    settings = (stride_doc, n, heads, slots, first, chunk_size, leading, offset, window_reach, qk_scale, sm_scale)
    if pid < slot_blocks:
        share = slots * HEAD_DIM
        _key_block_grads(
            Q, K, V, DO, LSE, DELTA, SLOT_GRADS, SLOT_GRADS + tl.num_programs(0).to(tl.int64) * share, DOC_START, DOC_END,
            *inputs, heads * share, share, HEAD_DIM, heads * share, share, HEAD_DIM, *settings, pid,
            HEAD_DIM, BLOCK_M, BLOCK_N, WINDOW_QUERIES, CHUNK_WINDOW, HAS_DOCS, PRECISION, True, REVERSE,
        )
    else:
        _key_block_grads(
            Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, DOC_END,
            *inputs, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, *settings, pid - slot_blocks,
            HEAD_DIM, BLOCK_M, BLOCK_N, WINDOW_QUERIES, CHUNK_WINDOW, HAS_DOCS, PRECISION, False, False,
        )


@triton.jit
def _key_block_grads(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, DOC_END,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_doc,
    n, heads, slots, first, chunk_size, leading, offset, window_reach, qk_scale, sm_scale, block,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW_QUERIES: tl.constexpr,
    CHUNK_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr, SLOTS: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """dK, dV of key block ``block``: compressed slots (SLOTS) or window keys, written to the block's
    rows of DK and DV (rows indexed by slot or by position)."""
    bh, b, h = _program_head(heads)
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_dob + h * stride_doh
    dims = tl.arange(0, HEAD_DIM)
    index = block * BLOCK_N + tl.arange(0, BLOCK_N)
    if SLOTS:
        keys, keys_valid = first + index * chunk_size, index < slots
        first_key = first + block * BLOCK_N * chunk_size
        last_key = first + (tl.minimum((block + 1) * BLOCK_N, slots) - 1) * chunk_size
    else:
        keys, keys_valid = index, index < n
        first_key = block * BLOCK_N
        last_key = tl.minimum((block + 1) * BLOCK_N, n) - 1
    k = _load_rows(K + b * stride_kb + h * stride_kh, keys, keys_valid, stride_kn, dims, True)
    v = _load_rows(V + b * stride_vb + h * stride_vh, keys, keys_valid, stride_vn, dims, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if HAS_DOCS:
        # Queries from the end of the last key's document on see none of the block; before the
        # end of the first key's document every query that sees a key is in its document.
        DOC_START += b * stride_doc
        DOC_END += b * stride_doc
        t_stop = tl.load(DOC_END + last_key)
        doc_free_end = tl.load(DOC_END + first_key)
    else:
        t_stop, doc_free_end = n, n
    key_args = (k, v, Q, DO, LSE, DELTA, DOC_START, bh, n, keys, keys_valid, stride_qn, stride_don, dims,
                leading, chunk_size, offset, qk_scale)
    if SLOTS:
        # A slot at p is seen by t iff ws(t) > p: t >= p + L, or t >= p + 1 (the next chunk).
        if CHUNK_WINDOW:
            visible_after = 1
        else:
            visible_after = leading
        masked_begin = (first_key + visible_after) // BLOCK_M * BLOCK_M
        # From t_all on every slot of the block is visible to every query of a query block.
        t_all = last_key + visible_after
        masked_end = tl.minimum(tl.cdiv(t_all, BLOCK_M) * BLOCK_M, t_stop)
        if (block + 1) * BLOCK_N > slots:
            masked_end = t_stop  # the last block has padding slots
        unmasked_end = tl.maximum(tl.minimum(n, doc_free_end) // BLOCK_M * BLOCK_M, masked_end)
        # Masked, unmasked, masked again; with REVERSE each range and their order run backwards.
        if REVERSE:
            lead_lo, lead_hi, tail_lo, tail_hi = unmasked_end, t_stop, masked_begin, masked_end
        else:
            lead_lo, lead_hi, tail_lo, tail_hi = masked_begin, masked_end, unmasked_end, t_stop
        dk, dv = _key_range(dk, dv, *key_args, lead_lo, lead_hi, BLOCK_M, True, True, CHUNK_WINDOW, HAS_DOCS, PRECISION, REVERSE)
        dk, dv = _key_range(dk, dv, *key_args, masked_end, unmasked_end, BLOCK_M, False, True, CHUNK_WINDOW, HAS_DOCS, PRECISION, REVERSE)
        dk, dv = _key_range(dk, dv, *key_args, tail_lo, tail_hi, BLOCK_M, True, True, CHUNK_WINDOW, HAS_DOCS, PRECISION, REVERSE)
        rows = index
    else:
        # The block's own positions in BLOCK_M tiles, then (with WINDOW_QUERIES) the queries after
        # it that still see its last keys (at most window_reach - 1) in tiles of WINDOW_QUERIES.
        t_end = tl.minimum(last_key + window_reach, t_stop)
        own_lo = first_key // BLOCK_M * BLOCK_M
        if WINDOW_QUERIES > 0:
            own_hi = tl.minimum(last_key + 1, t_end)
            after = own_lo + tl.cdiv(tl.maximum(own_hi - own_lo, 0), BLOCK_M) * BLOCK_M
            dk, dv = _key_range(dk, dv, *key_args, own_lo, own_hi, BLOCK_M, True, False, CHUNK_WINDOW, HAS_DOCS, PRECISION, False)
            dk, dv = _key_range(dk, dv, *key_args, after, t_end, WINDOW_QUERIES, True, False, CHUNK_WINDOW, HAS_DOCS, PRECISION, False)
        else:
            dk, dv = _key_range(dk, dv, *key_args, own_lo, t_end, BLOCK_M, True, False, CHUNK_WINDOW, HAS_DOCS, PRECISION, False)
        rows = keys
    tl.store(_row_ptrs(DK + b * stride_dkb + h * stride_dkh, rows, stride_dkn, dims), (dk * sm_scale).to(DK.dtype.element_ty), mask=keys_valid[:, None])
    tl.store(_row_ptrs(DV + b * stride_dvb + h * stride_dvh, rows, stride_dvn, dims), dv.to(DV.dtype.element_ty), mask=keys_valid[:, None])


@triton.jit
def _add_slot_grads(
    DK, DV, SLOT_GRADS, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    heads, slots, first, chunk_size, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr
):
    """Rows first + s·P of DK and DV [B, H, n, d] (strided) += SLOT_GRADS [2, B·H, slots, d] (float32)."""
    bh, b, h = _program_head(heads)
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = s[:, None] < slots
    dims = tl.arange(0, HEAD_DIM)
    positions = first + s * chunk_size
    shares = SLOT_GRADS + _row_ptrs(bh * slots * HEAD_DIM, s, HEAD_DIM, dims)
    dk_rows = _row_ptrs(DK + b * stride_dkb + h * stride_dkh, positions, stride_dkn, dims)
    dk = tl.load(dk_rows, mask=valid).to(tl.float32) + tl.load(shares, mask=valid)
    tl.store(dk_rows, dk.to(DK.dtype.element_ty), mask=valid)
    dv_rows = _row_ptrs(DV + b * stride_dvb + h * stride_dvh, positions, stride_dvn, dims)
    dv = tl.load(dv_rows, mask=valid).to(tl.float32) + tl.load(shares + tl.num_programs(0).to(tl.int64) * slots * HEAD_DIM, mask=valid)
    tl.store(dv_rows, dv.to(DV.dtype.element_ty), mask=valid)


@dataclass(frozen=True)
class PeriodicMask:
    """What the kernels need of a layer's mask: periodic chunk ends and the window rule."""

    chunk_size: int
    offset: int
    leading: int
    """L; ignored when ``chunk_window``."""
    chunk_window: bool = False
    """The window is the current partial chunk (``leading_tokens: chunk``)."""

    @property
    def window_reach(self) -> int:
        """The most a query may lie after a key of its window, plus one."""
        return self.chunk_size if self.chunk_window else self.leading


def _config(device: torch.device) -> KernelConfig:
    return CUDA_CONFIG if device.type == "cuda" else INTERPRETER_CONFIG


def _register_limit(registers: int, head_dim: int) -> dict:
    """The launch option capping registers per thread, if one is set and the heads are small enough."""
    return {"maxnreg": registers} if registers and head_dim <= 64 else {}


def document_bounds(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each position's document starts and ends (exclusive): two Int32 [B, n] from the
    documents' numbers [B, n]. Plain tensor ops, so that a compiled block fuses them."""
    starts = document_starts(doc_ids)
    positions = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    # A document's last token is where the next one starts, read right to left.
    last = torch.cat([starts[:, 1:], torch.ones_like(starts[:, :1])], dim=1)
    to_last = positions_in_segment(last.flip(1)).flip(1)
    return (positions - positions_in_segment(starts)).to(torch.int32), (positions + 1 + to_last).to(torch.int32)


def _document_arguments(doc_start: Optional[torch.Tensor], doc_end: Optional[torch.Tensor], stand_in: torch.Tensor) -> tuple:
    """DOC_START, DOC_END and their row stride (0 when every row shares one row of documents).
    Without documents the kernels never read them: ``stand_in``, any tensor, takes their place."""
    if doc_start is None:
        return stand_in, stand_in, 0
    doc_start, doc_end = doc_start.contiguous(), doc_end.contiguous()
    return doc_start, doc_end, (doc_start.stride(0) if doc_start.shape[0] > 1 else 0)


def _mask_arguments(mask: PeriodicMask, n: int) -> tuple:
    """The kernels' slots, first, chunk_size, leading, offset arguments."""
    first, slots = periodic_slots(n, mask.chunk_size, mask.offset)
    return (slots, first, mask.chunk_size, mask.leading, mask.offset)


def _strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    return tuple(stride for tensor in tensors for stride in tensor.stride()[:3])


def _empty_like_rows(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor of x's [B, H, n, d] shape and dtype, laid out as x is (``empty_like`` keeps
    the order of x's dims), with d contiguous as the kernels write it. Outputs and gradients so
    follow their inputs' layout: given token-major views of [B, n, H, d] tensors (the model's), the
    projections around the attention read them without a transposing copy."""
    return torch.empty_like(x) if x.stride(-1) == 1 else x.new_empty(x.shape)


def _window_tile(mask: PeriodicMask, block: int, enabled: bool) -> int:
    """The tile of the window positions past a block's edge (the keys before a block of queries,
    the queries after a block of keys): at most ``window_reach - 1`` of them, so 16 for L = 16,
    never more than ``block`` nor fewer than tl.dot's 16; 0 where the kernel's config turns the
    tiles off."""
    return min(block, max(16, triton.next_power_of_2(mask.window_reach - 1))) if enabled else 0


def _forward_kernels(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: Optional[torch.Tensor],
    doc_end: Optional[torch.Tensor], chunk_size: int, offset: int, leading: int, chunk_window: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> output [B, H, n, d] and the base-2 log-sum-exp [B, H, n] (float32)."""
    batch, heads, n, head_dim = q.shape
    mask = PeriodicMask(chunk_size, offset, leading, chunk_window)
    config = _config(q.device)
    out = _empty_like_rows(q)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    lse = torch.empty((batch, heads, n), device=q.device, dtype=torch.float32)
    starts, _, doc_stride = _document_arguments(doc_start, doc_end, q)
    sm_scale = head_dim**-0.5
    # DO, O and DELTA are the backward's; the forward passes stand-ins it never reads.
    _query_kernel[(batch * heads, triton.cdiv(n, config.forward_queries))](
        q, k, v, q, out, lse, lse, out, starts, *_strides(q, k, v, q, out, out), doc_stride,
        n, heads, *_mask_arguments(mask, n), sm_scale * LOG2_E, sm_scale,
        HEAD_DIM=head_dim, BLOCK_M=config.forward_queries, BLOCK_N=config.forward_keys,
        WINDOW_KEYS=_window_tile(mask, config.forward_keys, config.forward_window_tiles),
        CHUNK_WINDOW=chunk_window, HAS_DOCS=doc_start is not None, PRECISION=_dot_precision(q.dtype), BACKWARD=False,
        num_warps=config.forward_warps, num_stages=config.forward_stages, **_register_limit(config.forward_registers, head_dim),
    )
    return out, lse


_periodic_forward = torch.library.custom_op("attamba::periodic_attention_fwd", _forward_kernels, mutates_args=())


@_periodic_forward.register_fake
def _periodic_forward_fake(q, k, v, doc_start, doc_end, chunk_size, offset, leading, chunk_window):
    return _empty_like_rows(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _backward_kernels(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, doc_start: Optional[torch.Tensor], doc_end: Optional[torch.Tensor], chunk_size: int,
    offset: int, leading: int, chunk_window: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv, each laid out as its input (:func:`_empty_like_rows`)."""
    batch, heads, n, head_dim = q.shape
    mask = PeriodicMask(chunk_size, offset, leading, chunk_window)
    config = _config(q.device)
    dq, dk, dv = (_empty_like_rows(x) for x in (q, k, v))
    q, k, v, grad_out, out = (_last_dim_contiguous(x) for x in (q, k, v, grad_out, out))
    delta = torch.empty((batch, heads, n), device=q.device, dtype=torch.float32)  # the dQ kernel fills it
    starts, ends, doc_stride = _document_arguments(doc_start, doc_end, q)
    sm_scale = head_dim**-0.5
    precision = _dot_precision(q.dtype)
    common = dict(HEAD_DIM=head_dim, CHUNK_WINDOW=chunk_window, HAS_DOCS=doc_start is not None, PRECISION=precision)
    inputs = _strides(q, k, v, grad_out)
    mask_arguments = _mask_arguments(mask, n)

    _query_kernel[(batch * heads, triton.cdiv(n, config.dq_queries))](
        q, k, v, grad_out, out, lse, delta, dq, starts, *inputs, *_strides(out, dq), doc_stride,
        n, heads, *mask_arguments, sm_scale * LOG2_E, sm_scale,
        BLOCK_M=config.dq_queries, BLOCK_N=config.dq_keys, WINDOW_KEYS=_window_tile(mask, config.dq_keys, config.dq_window_tiles), BACKWARD=True, **common,
        num_warps=config.dq_warps, num_stages=config.backward_stages, **_register_limit(config.dq_registers, head_dim),
    )
    first, slots = periodic_slots(n, chunk_size, offset)
    slot_grads = torch.empty((2, batch * heads, slots, head_dim), device=q.device, dtype=torch.float32)
    blocks = triton.cdiv(slots, config.dkv_keys) + triton.cdiv(n, config.dkv_keys)
    _dkv_kernel[(batch * heads, blocks)](
        q, k, v, grad_out, lse, delta, dk, dv, slot_grads, starts, ends, *inputs, *_strides(dk, dv), doc_stride,
        n, heads, *mask_arguments, mask.window_reach, sm_scale * LOG2_E, sm_scale,
        BLOCK_M=config.dkv_queries, BLOCK_N=config.dkv_keys, WINDOW_QUERIES=_window_tile(mask, config.dkv_queries, config.dkv_window_tiles),
        REVERSE=config.dkv_reverse, **common,
        num_warps=config.dkv_warps, num_stages=config.backward_stages, **_register_limit(config.dkv_registers, head_dim),
    )
    # A slot's row is also a window key: its share as a slot adds to what the window keys wrote.
    if slots:
        block = 64
        _add_slot_grads[(batch * heads, triton.cdiv(slots, block))](
            dk, dv, slot_grads, *_strides(dk, dv), heads, slots, first, chunk_size, HEAD_DIM=head_dim, BLOCK=block, num_warps=4
        )
    return dq, dk, dv


_periodic_backward = torch.library.custom_op("attamba::periodic_attention_bwd", _backward_kernels, mutates_args=())


@_periodic_backward.register_fake
def _periodic_backward_fake(grad_out, q, k, v, out, lse, doc_start, doc_end, chunk_size, offset, leading, chunk_window):
    return tuple(_empty_like_rows(x) for x in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, doc_start, doc_end, chunk_size, offset, leading, chunk_window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_start, doc_end)
    ctx.mask = (chunk_size, offset, leading, chunk_window)


def _input_gradients(ctx, grad_out, backward) -> tuple:
    """The forward's inputs' gradients from what ``_setup_context`` saved, through ``backward``
    (the custom op, or its kernels directly)."""
    q, k, v, out, lse, doc_start, doc_end = ctx.saved_tensors
    dq, dk, dv = backward(grad_out, q, k, v, out, lse, doc_start, doc_end, *ctx.mask)
    return dq, dk, dv, None, None, None, None, None, None


def _autograd(ctx, grad_out, grad_lse):
    return _input_gradients(ctx, grad_out, _periodic_backward)


torch.library.register_autograd("attamba::periodic_attention_fwd", _autograd, setup_context=_setup_context)


class _EagerPeriodicAttention(torch.autograd.Function):
    """The custom ops' eager twin: the same kernels and saved tensors without the custom-op
    dispatch and its checks of every call's inputs and outputs (host time of a forward+backward at
    n=16k, torch 2.11 on the H100 host: 0.44 ms against 0.65 through the ops; the kernels of a layer
    take 0.7 ms at n=1k). torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, q, k, v, doc_start, doc_end, chunk_size, offset, leading, chunk_window):
        out, lse = _forward_kernels(q, k, v, doc_start, doc_end, chunk_size, offset, leading, chunk_window)
        _setup_context(ctx, (q, k, v, doc_start, doc_end, chunk_size, offset, leading, chunk_window), (out, lse))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _input_gradients(ctx, grad_out, _backward_kernels)


def periodic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PeriodicMask,
    doc_ids: Optional[torch.Tensor] = None,
    doc_bounds: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Attamba attention of q [B, H, n, d] over k, v [B, H, n, d] under periodic boundaries.

    ``doc_ids`` [B or 1, n] numbers packed documents (each document one run of equal numbers);
    ``doc_bounds``, :func:`document_bounds` of them, takes their place where the caller has it
    (a model's layers share one).
    Needs CUDA tensors (or the Triton interpreter) and a head size that :func:`supports`.
    """
    if q.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError("periodic_attention needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    if not supports(q.shape[-1]):
        raise ValueError(f"periodic_attention takes head sizes 16, 32, 64 or 128, got {q.shape[-1]}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must share one shape [B, H, n, d], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if mask.chunk_size < 1 or not 0 <= mask.offset < mask.chunk_size or (not mask.chunk_window and mask.leading < 1):
        raise ValueError(f"bad periodic mask {mask}")
    # Under autocast q comes out of a bf16 matmul while the SSMs' k and v may stay float32; the
    # kernels multiply one dtype, q's, as autocast would have.
    k, v = k.to(q.dtype), v.to(q.dtype)
    if doc_bounds is None:
        doc_bounds = document_bounds(doc_ids) if doc_ids is not None else (None, None)
    starts, ends = doc_bounds
    arguments = (q, k, v, starts, ends, mask.chunk_size, mask.offset, mask.leading, mask.chunk_window)
    if torch.compiler.is_compiling():
        return _periodic_forward(*arguments)[0]
    return _EagerPeriodicAttention.apply(*arguments)
