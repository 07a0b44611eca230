"""Attamba's compressed attention: queries over chunk-boundary keys plus a window of recent keys.

The mask (DESIGN.md): query t attends key j iff j <= t, j is in t's document, and either j is in
t's window (t-L < j, or the current partial chunk with ``leading_tokens='chunk'``) or j ends a
chunk. ``causal=True`` (pseudo-chunking) attends every j <= t.

Backends, all with the same result:

- ``reference``: that mask materialized [n, n], naive softmax. Obviously correct; for tests.
- ``sdpa_dense``: the same mask through ``F.scaled_dot_product_attention`` (the seed's way).
- ``flex``: the gathered layout. The boundary keys and values K_c = K[B_l] are gathered (with
  their RoPE at true positions) and queries attend [K_c ; K] under a FlexAttention block mask:
  compressed key at p iff p is before the window, full key j iff it is in the window. Work per
  head is ~n·|B|/2 + n·L instead of n²/2. Periodic boundaries without documents get one cached
  block mask per (P, offset, n, L). Forward only on CPU (FlexAttention has no CPU backward).
- ``sdpa_gathered``: the gathered layout with the same mask predicate evaluated densely, through
  SDPA: how CPU trains.
- ``triton``: with periodic boundaries (uniform, cyclic), the kernels of
  :mod:`apps.attamba.attention_triton`, which read the boundary keys straight from K (no gathered
  copy) and skip everything outside the two visible parts; other boundaries (random, fattn, fssm)
  and head sizes the kernels do not take go through ``flex``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from apps.attamba import attention_triton
from apps.attamba.chunking import LayerBoundaries, LeadingTokens, periodic_slots, window_starts
from apps.attamba.gathered_blocks import gathered_block_mask
from lingua import masks
from lingua.transformer import attend as causal_attention
from lingua.transformer import attention_mask

COMPRESSED_SLOT_MULTIPLE = 128
"""Compressed-slot counts of non-periodic boundaries are rounded up to this (FlexAttention's block)."""

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' is the Triton kernels on CUDA and the gathered SDPA path elsewhere."""
    if impl == "auto":
        return "triton" if device.type == "cuda" else "sdpa_gathered"
    return impl


def periodic_mask(boundaries: LayerBoundaries, leading_tokens: LeadingTokens) -> Optional[attention_triton.PeriodicMask]:
    """The Triton kernels' description of this layer's mask; None for non-periodic boundaries."""
    if boundaries.period is None:
        return None
    chunk_size, offset = boundaries.period
    if leading_tokens == "chunk":
        return attention_triton.PeriodicMask(chunk_size, offset, 0, chunk_window=True)
    return attention_triton.PeriodicMask(chunk_size, offset, int(leading_tokens))


def reference_mask(
    boundaries: LayerBoundaries,
    leading_tokens: LeadingTokens,
    doc_ids: Optional[torch.Tensor],
    n: int,
    causal: bool = False,
) -> torch.Tensor:
    """Bool [B or 1, 1, n, n]: True where query t (dim 2) attends key j (dim 3)."""
    device = boundaries.is_boundary.device
    position = torch.arange(n, device=device)
    allowed = (position[None, :] <= position[:, None])[None]  # [1, n, n]
    if not causal:
        in_window = position[None, None, :] >= window_starts(boundaries, leading_tokens, n)[:, :, None]
        allowed = allowed & (in_window | boundaries.is_boundary[:, None, :])  # [B or 1, n, n]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return allowed[:, None]


def _naive_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.float().masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1).to(v.dtype)) @ v


@dataclass
class GatheredLayout:
    """Where the compressed keys come from and what each query may see of [K_c ; K]."""

    n: int
    compressed_count: int
    """nc: slots of compressed keys in front of the n full keys (padding included)."""
    mask_mod: MaskMod
    """FlexAttention-style predicate (b, h, q_idx, kv_idx) -> allowed, over nc + n keys."""
    positions: Optional[torch.Tensor] = None
    """Long [B or 1, nc]: source position of each compressed slot (n for padding); None for
    periodic boundaries, whose slots are first, first+P, ..."""
    first_position: int = 0
    """Periodic boundaries: the first boundary, P - 1 - offset."""
    chunk_size: int = 1
    """Periodic boundaries: P, the stride between compressed slots."""
    mask_rows: int = 1
    """Batch rows the mask depends on (1 when every row shares it)."""
    cache_key: Optional[tuple] = None
    """Set when the block mask may be cached (it depends on nothing but this key)."""

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, n, d] -> [K_c ; K] of shape [B, H, nc + n, d]."""
        if self.positions is None:
            compressed = x[:, :, self.first_position :: self.chunk_size]
        elif self.positions.shape[0] == 1:
            compressed = x.index_select(2, self.positions[0].clamp(max=self.n - 1))
        else:
            index = self.positions.clamp(max=self.n - 1)[:, None, :, None]  # [B, 1, nc, 1]
            compressed = x.gather(2, index.expand(-1, x.shape[1], -1, x.shape[3]))
        return torch.cat([compressed, x], dim=2)

    def key_positions(self, device: torch.device) -> torch.Tensor:
        """True position of each key of [K_c ; K]: Long [B or 1, nc + n] (n marks padding)."""
        full = torch.arange(self.n, device=device)[None]
        if self.positions is None:
            compressed = torch.arange(self.compressed_count, device=device)[None] * self.chunk_size + self.first_position
        else:
            compressed = self.positions
        return torch.cat([compressed, full.expand(compressed.shape[0], -1)], dim=1)

    def dense_mask(self, device: torch.device) -> torch.Tensor:
        """The predicate evaluated on every (query, key): Bool [mask_rows, 1, n, nc + n]."""
        b = torch.arange(self.mask_rows, device=device)[:, None, None]
        q_idx = torch.arange(self.n, device=device)[None, :, None]
        kv_idx = torch.arange(self.compressed_count + self.n, device=device)[None, None, :]
        allowed = self.mask_mod(b, torch.zeros((), dtype=torch.long, device=device), q_idx, kv_idx)
        return allowed.expand(self.mask_rows, self.n, -1)[:, None]


def gathered_layout(
    boundaries: LayerBoundaries, leading_tokens: LeadingTokens, doc_ids: Optional[torch.Tensor], n: int
) -> GatheredLayout:
    """The gathered layout of one layer: compressed slots, and the mask over [K_c ; K].

    Periodic boundaries give an arithmetic predicate (cheap inside the kernel, and cacheable);
    any others look positions and window starts up in tensors, one row per batch row.
    """
    device = boundaries.is_boundary.device
    if boundaries.period is not None:
        chunk_size, offset = boundaries.period
        first, count = periodic_slots(n, chunk_size, offset)
        # Plain ints, specialised into the compiled kernel: a layer offset costs one compile per
        # sequence length, while tensor-held offsets cost every call ~0.5 ms of loads (H100).

        def compressed_position(b, slot):
            return first + slot * chunk_size

        if leading_tokens == "chunk":

            def window_start(b, q_idx):
                return q_idx - (q_idx + offset) % chunk_size

        else:

            def window_start(b, q_idx):
                return q_idx - int(leading_tokens) + 1

        positions, rows = None, 1
        cache_key = (chunk_size, offset, n, leading_tokens) if doc_ids is None else None
    else:
        is_boundary = boundaries.is_boundary
        rows = is_boundary.shape[0]
        # Round the slot count up so that batches with a few more or fewer boundaries share a
        # shape (and a compiled kernel): at least one slot, padding is masked.
        most = int(is_boundary.sum(dim=1).max())
        count = COMPRESSED_SLOT_MULTIPLE * max(1, -(-most // COMPRESSED_SLOT_MULTIPLE))
        # Each row's boundary positions, ascending, padded with n: sort puts True first, stably.
        slot_source = torch.where(is_boundary, torch.arange(n, device=device), n)
        positions = slot_source.sort(dim=1).values[:, :count]  # [rows, min(n, nc)]
        positions = F.pad(positions, (0, count - positions.shape[1]), value=n)  # [rows, nc]
        starts = window_starts(boundaries, leading_tokens, n)  # [1 or rows, n]
        pick = (lambda b: b) if rows > 1 else (lambda b: 0)
        start_pick = (lambda b: b) if starts.shape[0] > 1 else (lambda b: 0)

        def compressed_position(b, slot):
            return positions[pick(b), slot.clamp(max=count - 1)]

        def window_start(b, q_idx):
            return starts[start_pick(b), q_idx]

        first, chunk_size, cache_key = 0, 1, None

    def mask_mod(b, h, q_idx, kv_idx):
        compressed = kv_idx < count
        key_position = torch.where(compressed, compressed_position(b, kv_idx), kv_idx - count)
        start = window_start(b, q_idx)
        # A compressed key only before the window, so no key is counted twice.
        allowed = torch.where(compressed, key_position < start, (key_position >= start) & (key_position <= q_idx))
        if doc_ids is not None:
            allowed = allowed & (doc_ids[b, q_idx] == doc_ids[b, key_position.clamp(0, n - 1)])
        return allowed

    mask_rows = doc_ids.shape[0] if doc_ids is not None else rows
    return GatheredLayout(n, count, mask_mod, positions, first, chunk_size, mask_rows, cache_key)


@functools.lru_cache(maxsize=64)
def _cached_block_mask(chunk_size: int, offset: int, n: int, leading_tokens: LeadingTokens, device: str) -> BlockMask:
    layout = gathered_layout(
        LayerBoundaries(torch.empty(1, 0, dtype=torch.bool, device=device), period=(chunk_size, offset)),
        leading_tokens,
        None,
        n,
    )
    return masks.build_block_mask(layout.mask_mod, None, n, layout.compressed_count + n, device)


def block_mask_for(
    layout: GatheredLayout,
    boundaries: LayerBoundaries,
    leading_tokens: LeadingTokens,
    doc_ids: Optional[torch.Tensor],
    device: torch.device,
) -> BlockMask:
    """The FlexAttention block mask of ``layout`` (made from these arguments): from the cache when
    it is static; else, since it changes every step (documents, random chunks), from block bounds
    rather than by evaluating the mask on every (query, key) pair (apps.attamba.gathered_blocks)."""
    if layout.cache_key is not None:
        return _cached_block_mask(*layout.cache_key, str(device))
    starts = window_starts(boundaries, leading_tokens, layout.n)
    return gathered_block_mask(layout.mask_mod, layout.key_positions(device), layout.compressed_count, starts, doc_ids)


@dataclass
class PreparedAttention:
    """Everything one layer's attention needs besides q, k and v, built outside compiled code.

    Masks are made once per layer and step, eagerly: inside a compiled block they would be
    traced (and rebuilt) on every call, and the layer's plain-int offsets would turn symbolic.
    """

    impl: str
    """Resolved backend: reference, sdpa_dense, flex, sdpa_gathered or triton."""
    causal: bool = False
    mask: object = None
    """Dense bool mask (reference, sdpa_dense, sdpa_gathered), a BlockMask (flex), or the causal
    mask of lingua.transformer.attention_mask when ``causal``."""
    layout: Optional[GatheredLayout] = None
    """Gathered layout (flex, sdpa_gathered)."""
    periodic: Optional[attention_triton.PeriodicMask] = None
    """The mask as the Triton kernels take it (triton)."""
    doc_bounds: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    """Where each position's packed document starts and ends, ``attention_triton.document_bounds``
    (triton, which masks documents itself)."""


def prepare_attention(
    boundaries: LayerBoundaries,
    leading_tokens: LeadingTokens,
    doc_ids: Optional[torch.Tensor],
    n: int,
    batch: int,
    impl: str = "auto",
    causal: bool = False,
    head_dim: Optional[int] = None,
    doc_bounds: Optional[Callable[[], tuple[torch.Tensor, torch.Tensor]]] = None,
) -> PreparedAttention:
    """The masks (and gathered layout) of one layer's attention over n tokens of ``batch`` rows.

    ``head_dim`` lets ``triton`` fall back to ``flex`` for heads its kernels do not take.
    ``doc_bounds``: returns ``attention_triton.document_bounds(doc_ids)``, called only when the
    Triton kernels take the mask (a model passes one that computes the bounds once for all its
    layers); without it ``triton`` computes them itself."""
    device = boundaries.is_boundary.device
    impl = resolve_impl(impl, device)
    if impl not in ("reference", "sdpa_dense", "flex", "sdpa_gathered", "triton"):
        raise ValueError(f"unknown Attamba attention impl '{impl}'")
    if impl == "triton":
        periodic = None if causal else periodic_mask(boundaries, leading_tokens)
        if periodic is not None and (head_dim is None or attention_triton.supports(head_dim)):
            bounds = None
            if doc_ids is not None:
                bounds = doc_bounds() if doc_bounds is not None else attention_triton.document_bounds(doc_ids)
            return PreparedAttention(impl, False, periodic=periodic, doc_bounds=bounds)
        impl = "flex"  # what the kernels do not take
    if impl in ("reference", "sdpa_dense"):
        return PreparedAttention(impl, causal, reference_mask(boundaries, leading_tokens, doc_ids, n, causal))
    if causal:
        causal_impl = "flex" if impl == "flex" else "sdpa"
        return PreparedAttention(impl, True, attention_mask(doc_ids, batch, n, None, causal_impl, device))
    layout = gathered_layout(boundaries, leading_tokens, doc_ids, n)
    if impl == "flex":
        mask = block_mask_for(layout, boundaries, leading_tokens, doc_ids, device)
    else:
        mask = layout.dense_mask(device)
    return PreparedAttention(impl, False, mask, layout)


def attend_prepared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: PreparedAttention) -> torch.Tensor:
    """Attamba attention of q [B, H, n, d] over k, v [B, H, n, d] under ``prepared`` -> [B, H, n, d]."""
    if prepared.impl == "reference":
        return _naive_attention(q, k, v, prepared.mask)
    if prepared.impl == "sdpa_dense":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=prepared.mask)
    if prepared.causal:
        return causal_attention(q, k, v, prepared.mask)
    if prepared.impl == "triton":
        return attention_triton.periodic_attention(q, k, v, prepared.periodic, doc_bounds=prepared.doc_bounds)
    keys, values = prepared.layout.gather(k), prepared.layout.gather(v)  # [B, H, nc + n, d]
    if prepared.impl == "flex":
        return masks.flex_attention(q, keys, values, block_mask=prepared.mask)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=prepared.mask)


def attamba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    boundaries: LayerBoundaries,
    leading_tokens: LeadingTokens,
    doc_ids: Optional[torch.Tensor] = None,
    impl: str = "auto",
    causal: bool = False,
) -> torch.Tensor:
    """Attamba attention of q [B, H, n, d] over SSM keys/values k, v [B, H, n, d] -> [B, H, n, d].

    ``boundaries`` are this layer's chunk ends; ``causal`` (pseudo-chunking) attends all j <= t.
    """
    prepared = prepare_attention(boundaries, leading_tokens, doc_ids, q.shape[2], q.shape[0], impl, causal, q.shape[-1])
    return attend_prepared(q, k, v, prepared)


@torch.no_grad()
def attention_key_mass(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention each key position receives, averaged over heads and queries: [B, n].

    mask: Bool [B or 1, 1, n, n]. Heads go one at a time to bound memory at [B, n, n].
    """
    batch, heads, n, head_dim = q.shape
    mass = torch.zeros(batch, n, device=q.device, dtype=torch.float32)
    for head in range(heads):
        scores = (q[:, head] @ k[:, head].transpose(-1, -2)).float() * head_dim**-0.5  # [B, n, n]
        scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        mass += scores.softmax(dim=-1).sum(dim=1)
    return mass / (heads * n)
