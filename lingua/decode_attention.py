"""Attention of one new query per row over a slot cache, split over the keys (flash-decoding).

A decode step's attention reads the whole cache once and does little arithmetic, so its speed is
the memory bandwidth it reaches. Fused attention kernels built for prefill run one program per
(row, head): at batch 16 and 8 heads that is 128 programs for 132 SMs, each streaming its keys
alone (measured on an H200 for Attamba's 4k-slot caches at 32k tokens: cuDNN read them at ~2.5 TB/s
of the card's 4.8). Here each (row, head) splits its keys over several programs, which write a
partial softmax (running max, sum and weighted values), and a second kernel merges them.

Attamba's cache uses it on CUDA (``cache.decode_attention``, from
:func:`lingua.kv_cache.load_decode_attention`): on the H100, with 128 keys an iteration and its
loads decoupled, it read Attamba's 128k caches 1.3x (batch 1) and 1.5x (batch 16) faster than
cuDNN (docs/benchmarks.md, eighth session). The transformer's cache keeps SDPA (cuDNN): with the
kernel its compiled step was slower at 128k tokens and batch 1 (0.968 against 0.933 ms) and 2.6%
faster at batch 16 (11.69 against 12.00 ms). The benchmarks' ``+kernel`` / ``+sdpa`` modes switch
either cache.

Which slots a query sees comes from the positions the cache records, by the rule of
:func:`lingua.kv_cache.visible_slots` (compressed slots before the window start ``lowest[b]``,
window slots from it on); every cached position is at or before the query's own, so nothing else
is needed.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before import), which the CPU tests use.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Launch settings; benchmarks/bench_decode_attention.py sweeps them. Keys per loop iteration of a
# program, warps per program, and programs per SM (enough in flight to keep the loads streaming).
# 128 / 4 / 4 was the fastest of the sweep for Attamba's 128k caches at batch 1 and 16 (H100,
# eighth session, caches out of L2): 18.8 µs against 23.2 with 64 keys at batch 1, 184.7 against
# 234.9 at batch 16.
BLOCK_KEYS = 128
NUM_WARPS = 4
PROGRAMS_PER_SM = 4


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, lowest_ptr, acc_ptr, max_ptr, sum_ptr,
    slots, windowed_from, heads, queries_per_kv, keys_per_split, splits, scale_log2,
    stride_q_b, stride_q_h, stride_k_b, stride_k_h, stride_k_s, stride_v_b, stride_v_h, stride_v_s, stride_pos_b,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row_head = tl.program_id(0)
    split = tl.program_id(1)
    b = row_head // heads
    h = row_head % heads
    kv_h = h // queries_per_kv
    d = tl.arange(0, BLOCK_D)
    d_in = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + d, mask=d_in, other=0.0).to(tl.float32) * scale_log2
    lowest = tl.load(lowest_ptr + b)
    running_max = -float("inf")
    running_sum = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, slots)
    for first in range(start, end, BLOCK_N):
        n = first + tl.arange(0, BLOCK_N)
        n_in = n < end
        position = tl.load(positions_ptr + b * stride_pos_b + n, mask=n_in, other=-1)
        visible = n_in & (position >= 0) & tl.where(n < windowed_from, position < lowest, position >= lowest)
        # The key and value loads do not wait for the positions, nor the values for the scores:
        # masked by the slot range only, all three are in flight at once (the cache's slots are
        # nearly all visible anyway).
        tile_mask = n_in[:, None] & d_in[None, :]
        k = tl.load(k_ptr + b * stride_k_b + kv_h * stride_k_h + n[:, None] * stride_k_s + d[None, :], mask=tile_mask, other=0.0)
        v = tl.load(v_ptr + b * stride_v_b + kv_h * stride_v_h + n[:, None] * stride_v_s + d[None, :], mask=tile_mask, other=0.0)
        scores = tl.where(visible, tl.sum(k.to(tl.float32) * q[None, :], axis=1), -float("inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        # Until a visible key turns up the max is -inf; shift by 0 then, so no inf - inf.
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        weights = tl.exp2(scores - shift)
        rescale = tl.exp2(running_max - shift)
        # A hidden slot's value may be anything, inf or nan included: a zero weight would not cancel it.
        v = tl.where(visible[:, None], v.to(tl.float32), 0.0)
        acc = acc * rescale + tl.sum(weights[:, None] * v, axis=0)
        running_sum = running_sum * rescale + tl.sum(weights, axis=0)
        running_max = new_max
    slot = row_head * splits + split
    tl.store(acc_ptr + slot * BLOCK_D + d, acc)
    tl.store(max_ptr + slot, running_max)
    tl.store(sum_ptr + slot, running_sum)


@triton.jit
def _merge_kernel(acc_ptr, max_ptr, sum_ptr, out_ptr, splits, heads, stride_o_b, stride_o_h,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    row_head = tl.program_id(0)
    split = tl.arange(0, BLOCK_SPLITS)
    split_in = split < splits
    d = tl.arange(0, BLOCK_D)
    maxes = tl.load(max_ptr + row_head * splits + split, mask=split_in, other=-float("inf"))
    total_max = tl.max(maxes, axis=0)
    shift = tl.where(total_max == -float("inf"), 0.0, total_max)
    weight = tl.exp2(maxes - shift)  # 0 for splits that saw no visible key
    sums = tl.load(sum_ptr + row_head * splits + split, mask=split_in, other=0.0)
    acc = tl.load(acc_ptr + (row_head * splits + split)[:, None] * BLOCK_D + d[None, :], mask=split_in[:, None], other=0.0)
    numerator = tl.sum(acc * weight[:, None], axis=0)
    denominator = tl.sum(sums * weight, axis=0)
    out = tl.where(denominator > 0, numerator / tl.where(denominator > 0, denominator, 1.0), 0.0)
    b, h = row_head // heads, row_head % heads
    tl.store(out_ptr + b * stride_o_b + h * stride_o_h + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _splits(device: torch.device, row_heads: int, slots: int, block_keys: int, programs_per_sm: int) -> int:
    processors = 4 if device.type != "cuda" else _multiprocessors(device.index or 0)
    wanted = triton.cdiv(programs_per_sm * processors, row_heads)
    return max(1, min(wanted, triton.cdiv(slots, block_keys)))


# The kernels read q, k, v through their strides (only the head dim must be dense), so the op
# takes its inputs in whatever layout a compiled step has them instead of Inductor copying
# them to eager's strides (see apps.attamba.ssm_step_triton).
@torch.library.custom_op("lingua::decode_attention", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, lowest: torch.Tensor, windowed_from: int,
    block_keys: int, num_warps: int, programs_per_sm: int,
) -> torch.Tensor:
    batch, heads, _, head_dim = q.shape
    slots = k.shape[2]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    positions = positions if positions.stride(-1) == 1 else positions.contiguous()
    lowest = lowest.contiguous()
    block_d = triton.next_power_of_2(head_dim)
    splits = _splits(q.device, batch * heads, slots, block_keys, programs_per_sm)
    keys_per_split = triton.cdiv(triton.cdiv(slots, splits), block_keys) * block_keys
    partial_acc = torch.empty(batch * heads * splits, block_d, device=q.device, dtype=torch.float32)
    partial_max = torch.empty(batch * heads * splits, device=q.device, dtype=torch.float32)
    partial_sum = torch.empty_like(partial_max)
    _partial_kernel[(batch * heads, splits)](
        q, k, v, positions, lowest, partial_acc, partial_max, partial_sum,
        slots, windowed_from, heads, heads // k.shape[1], keys_per_split, splits, math.log2(math.e) / math.sqrt(head_dim),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        positions.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_keys, num_warps=num_warps,
    )
    out = torch.empty(batch, heads, 1, head_dim, device=q.device, dtype=q.dtype)
    _merge_kernel[(batch * heads,)](
        partial_acc, partial_max, partial_sum, out, splits, heads, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SPLITS=triton.next_power_of_2(splits),
    )
    return out


@_decode_attention.register_fake
def _(q, k, v, positions, lowest, windowed_from, block_keys, num_warps, programs_per_sm):
    return torch.empty_like(q)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, lowest: torch.Tensor,
    windowed_from: int = 0, *, block_keys: int = BLOCK_KEYS, num_warps: int = NUM_WARPS,
    programs_per_sm: int = PROGRAMS_PER_SM,
) -> torch.Tensor:
    """Attention of q [B, H, 1, d] over k, v [B, Hkv, S, d] (H a multiple of Hkv) -> [B, H, 1, d].

    Slots are visible as :func:`lingua.kv_cache.visible_slots` says (positions [B, S], window
    start ``lowest`` [B]); a row that sees no slot gets zeros. The keyword arguments
    are launch settings (``block_keys`` a power of two, at least 16).
    """
    batch, heads, queries, head_dim = q.shape
    if queries != 1:
        raise ValueError(f"decode_attention takes one query per row, got {queries}")
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim or heads % k.shape[1]:
        raise ValueError(f"k and v must be [{batch}, Hkv dividing {heads}, S, {head_dim}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if positions.shape != (batch, k.shape[2]) or lowest.shape != (batch,):
        raise ValueError(f"positions must be [{batch}, {k.shape[2]}] and lowest [{batch}]")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError("decode_attention needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    if block_keys < 16 or block_keys & (block_keys - 1):
        raise ValueError(f"block_keys must be a power of two >= 16, got {block_keys}")
    return _decode_attention(
        q, k, v, positions, lowest.to(positions.dtype), windowed_from,
        block_keys, num_warps, programs_per_sm,
    )
