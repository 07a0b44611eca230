"""The block structure of the gathered layout's FlexAttention mask, from per-block bounds.

``create_block_mask`` finds which (query block, key block) tiles a mask touches by evaluating the
mask function on every (query, key) pair: B·n·(nc + n) evaluations, each with document lookups,
rebuilt every step when the mask depends on the batch (packed documents, random chunks). At n=16k
that is about 10⁹ evaluations a layer. The gathered layout's predicate is simple enough to bound per
block instead (DESIGN.md, "Attamba semantics"): query t sees

- compressed key k (a boundary at position p_k) when p_k < w_t, its window's first position;
- full key j when w_t <= j <= t;

and, with packed documents, only keys of its own document. So a tile can hold an allowed pair only
if the bounds allow one (the least p_k of its compressed keys is below the largest w_t of its
queries, ...), and holds only allowed pairs if the opposite bounds say so. Both tests are
conservative: a tile they cannot decide is left partial, and FlexAttention evaluates the mask
function inside it, so the result is the same as with ``create_block_mask``; only the amount of
skipped work can differ. Cost: min/max reductions over [B, n] and element-wise work over
[B, n / 128, (nc + n) / 128] tiles.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn.attention.flex_attention import BlockMask

BLOCK_SIZE = 128
"""FlexAttention's default tile: queries and keys per block."""

_BIG = torch.iinfo(torch.int64).max // 4  # stands in for "no element" in min reductions


def gathered_tiles(
    key_positions: torch.Tensor,
    compressed_count: int,
    window_starts: torch.Tensor,
    doc_ids: Optional[torch.Tensor],
    block_size: int = BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full): Bool [B, n_q_blocks, n_kv_blocks] tiles of the gathered mask.

    key_positions: Long [R, nc + n], each key's true position (n marks a padded slot);
    window_starts: Long [R', n], each query's first window position; doc_ids: [B, n] or None.
    R and R' are 1 or B. ``partial`` tiles may hold allowed pairs (the mask function decides);
    ``full`` tiles hold nothing else. Tiles in neither hold no allowed pair.
    """
    n = window_starts.shape[1]
    kv_len = key_positions.shape[1]
    rows = max(key_positions.shape[0], window_starts.shape[0], 1 if doc_ids is None else doc_ids.shape[0])
    device = key_positions.device
    key_positions = key_positions.expand(rows, -1)
    window_starts = window_starts.expand(rows, -1)

    # Per query block: the range of window starts and documents, its first and last query.
    q_blocks = -(-n // block_size)
    ws_min = _block_reduce(window_starts, None, block_size, "min")
    ws_max = _block_reduce(window_starts, None, block_size, "max")
    q_first = torch.arange(q_blocks, device=device) * block_size  # [n_qb]
    q_last = torch.clamp(q_first + block_size - 1, max=n - 1)
    q_complete = (q_first + block_size) <= n

    # Per key block, separately for its compressed slots and its full keys: position bounds.
    kv_blocks = -(-kv_len // block_size)
    kv_index = torch.arange(kv_len, device=device)
    valid = key_positions < n  # [rows, kv]
    is_compressed = (kv_index < compressed_count)[None].expand(rows, -1)
    compressed = is_compressed & valid
    full_key = ~is_compressed
    c_min = _block_reduce(key_positions, compressed, block_size, "min")
    c_max = _block_reduce(key_positions, compressed, block_size, "max")
    f_min = _block_reduce(key_positions, full_key, block_size, "min")
    f_max = _block_reduce(key_positions, full_key, block_size, "max")
    c_any, f_any = c_min < _BIG, f_min < _BIG
    # A tile is full only if all its keys are of one kind and real (no padded slot).
    k_complete = (torch.arange(kv_blocks, device=device) + 1) * block_size <= kv_len
    all_compressed = _block_reduce(compressed.long(), None, block_size, "min") == 1
    all_full = _block_reduce(full_key.long(), None, block_size, "min") == 1

    def per_query(stat):  # [rows, n_qb] -> [rows, n_qb, 1]
        return stat[:, :, None]

    def per_key(stat):  # [rows, n_kb] -> [rows, 1, n_kb]
        return stat[:, None, :]

    first, last = q_first[None, :, None], q_last[None, :, None]
    # May a tile hold an allowed pair (necessary conditions), and is every pair allowed (sufficient)?
    may_compressed = per_key(c_any) & (per_key(c_min) < per_query(ws_max))
    may_full = per_key(f_any) & (per_key(f_max) >= per_query(ws_min)) & (per_key(f_min) <= last)
    only_compressed = per_key(all_compressed) & (per_key(c_max) < per_query(ws_min))
    only_full = per_key(all_full) & (per_key(f_min) >= per_query(ws_max)) & (per_key(f_max) <= first)
    may = may_compressed | may_full
    certain = (only_compressed | only_full) & q_complete[None, :, None] & per_key(k_complete[None])

    if doc_ids is not None:
        doc_ids = doc_ids.to(torch.long)
        key_docs = doc_ids.gather(1, key_positions.clamp(max=n - 1))
        dq_min = per_query(_block_reduce(doc_ids, None, block_size, "min"))
        dq_max = per_query(_block_reduce(doc_ids, None, block_size, "max"))
        dk_min = per_key(_block_reduce(key_docs, valid, block_size, "min"))
        dk_max = per_key(_block_reduce(key_docs, valid, block_size, "max"))
        may = may & (dq_min <= dk_max) & (dk_min <= dq_max)
        # One document on each side; ``may`` already requires the two to overlap, i.e. be equal.
        certain = certain & (dq_min == dq_max) & (dk_min == dk_max)
    full = may & certain
    return may & ~full, full


def gathered_block_mask(
    mask_mod,
    key_positions: torch.Tensor,
    compressed_count: int,
    window_starts: torch.Tensor,
    doc_ids: Optional[torch.Tensor],
    block_size: int = BLOCK_SIZE,
) -> BlockMask:
    """The FlexAttention BlockMask of a gathered layout (see :func:`gathered_tiles`); ``mask_mod``
    is evaluated inside partial tiles only."""
    n, kv_len = window_starts.shape[1], key_positions.shape[1]
    partial, full = gathered_tiles(key_positions, compressed_count, window_starts, doc_ids, block_size)
    return BlockMask.from_kv_blocks(
        *_kv_blocks(partial), *_kv_blocks(full), BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(n, kv_len)
    )


def _kv_blocks(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [B, n_qb, n_kb] -> (count [B, 1, n_qb], indices [B, 1, n_qb, n_kb]) as BlockMask
    wants them: each row's chosen key blocks first, in ascending order."""
    counts = tiles.sum(dim=-1, dtype=torch.int32)
    # Stable sort of "not chosen" puts the chosen blocks first, each group in index order.
    indices = (~tiles).to(torch.int8).argsort(dim=-1, stable=True).to(torch.int32)
    return counts[:, None], indices[:, None]


def _block_reduce(values: torch.Tensor, keep: Optional[torch.Tensor], block_size: int, how: str) -> torch.Tensor:
    """Min or max of ``values`` [R, m] over blocks of ``block_size`` columns, counting only
    ``keep`` (default: all); a block with nothing kept gives _BIG (min) or -_BIG (max)."""
    empty = _BIG if how == "min" else -_BIG
    values = values.to(torch.long)
    if keep is not None:
        values = torch.where(keep, values, empty)
    pad = (-values.shape[1]) % block_size
    values = torch.nn.functional.pad(values, (0, pad), value=empty).unflatten(1, (-1, block_size))
    return values.amin(dim=-1) if how == "min" else values.amax(dim=-1)
