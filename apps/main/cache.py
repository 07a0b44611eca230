"""The transformer's inference cache: a KV-cache per layer, full or a sliding-window ring.

Every layer keeps its rotated keys and values in a :class:`KVSlots` buffer of fixed size: the
whole context (``max_len`` slots) for full attention, or ``sliding_window`` slots used as a ring
when the model attends a window. Position p lives in slot ``p mod slots`` and every slot records
the position it holds (-1 when empty), so attention masks come from positions alone and the
buffers never change shape: a decode step can be captured in a CUDA graph.

Batches of prompts of different lengths are RIGHT-padded: ``forward_cached(model, tokens, cache,
lengths)`` takes ``lengths[b]`` real tokens from row b (the rest is padding whose outputs are
junk and which never enters the cache), and every row then continues at its own position.

:class:`KVSlots` and :func:`attend_slots` are shared with the Attamba cache, whose window is a
ring of the same kind.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from apps.main.model import TransformerLM
from lingua.generate import register_cache_support

EMPTY = -1
"""Position recorded in a slot that holds nothing."""


class KVSlots:
    """Keys and values of up to ``slots`` positions per row; position p lives in slot p mod slots.

    With ``slots`` >= every position it is a plain KV-cache; with fewer it is a ring that keeps
    the most recent ``slots`` positions. ``k``, ``v`` ([B, Hkv, slots, d]) and ``positions``
    ([B, slots]) may be views into larger buffers (the Attamba cache keeps its compressed keys
    and its window in one tensor so attention needs no concatenation).
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        self.k, self.v, self.positions = k, v, positions
        self.slots = k.shape[2]

    @classmethod
    def empty(cls, batch: int, kv_heads: int, slots: int, head_dim: int, device, dtype) -> "KVSlots":
        k = torch.zeros(batch, kv_heads, slots, head_dim, device=device, dtype=dtype)
        positions = torch.full((batch, slots), EMPTY, dtype=torch.long, device=device)
        return cls(k, torch.zeros_like(k), positions)

    def write_one(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> None:
        """Store k, v [B, Hkv, 1, d] of one token per row at ``position`` [B]."""
        slot = position % self.slots  # [B]
        index = slot.view(-1, 1, 1, 1).expand_as(k)
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
        self.positions.scatter_(1, slot[:, None], position[:, None])

    def write_many(self, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor) -> None:
        """Store k, v [B, Hkv, m, d] of positions start[b] + i for i < lengths[b].

        Built as a gather over slots (each slot takes the newest position that maps to it, if that
        one is new) rather than a scatter, because with m > slots several positions share a slot.
        """
        m = k.shape[2]
        newest = self.newest_positions(start + lengths)  # [B, slots]
        fresh = newest >= start[:, None]  # [B, slots]
        index = (newest - start[:, None]).clamp(0, m - 1)
        index = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # [B, Hkv, slots, d]
        keep_old = ~fresh[:, None, :, None]
        self.k.copy_(torch.where(keep_old, self.k, k.gather(2, index)))
        self.v.copy_(torch.where(keep_old, self.v, v.gather(2, index)))
        self.positions.copy_(torch.where(fresh, newest, self.positions))

    def newest_positions(self, end: torch.Tensor) -> torch.Tensor:
        """[B, slots]: the newest position below ``end`` [B] that maps to each slot (< 0: none)."""
        slot = torch.arange(self.slots, device=end.device)
        return end[:, None] - 1 - (end[:, None] - 1 - slot) % self.slots

    def pretend_filled(self, end: torch.Tensor) -> None:
        """Hold positions 0..end[b]-1 with random keys and values (benchmarks skip the prefill)."""
        self.k.normal_()
        self.v.normal_()
        newest = self.newest_positions(end)
        self.positions.copy_(torch.where(newest >= 0, newest, EMPTY))

    def live(self, lowest: torch.Tensor) -> torch.Tensor:
        """[B, slots] bool: filled slots holding a position >= ``lowest`` [B]."""
        return (self.positions >= 0) & (self.positions >= lowest[:, None])

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


# cuDNN attention builds a plan per new shape (~7 ms of CPU each on an H100), and eager decoding
# changes the key length every step; the memory-efficient kernel takes masks without that cost.
# With static shapes the plan is built once, and cuDNN was then ~2x faster per step (H100, bf16).
_CHANGING_SHAPE_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_STATIC_SHAPE_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attend_slots(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, static_shapes: bool = False
) -> torch.Tensor:
    """Attention of q [B, H, m, d] over cached k, v [B, Hkv, S, d] where ``allowed`` [B, m, S]."""
    with sdpa_kernel(_STATIC_SHAPE_BACKENDS if static_shapes else _CHANGING_SHAPE_BACKENDS):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[:, None], enable_gqa=q.shape[1] != k.shape[1]
        )


def causal_allowed(
    key_positions: torch.Tensor, query_positions: torch.Tensor, window: Optional[int]
) -> torch.Tensor:
    """[B, m, S] bool: key (position, -1 if empty) visible to query: causal, within ``window``."""
    keys, queries = key_positions[:, None, :], query_positions[:, :, None]
    allowed = (keys >= 0) & (keys <= queries)
    if window is not None:
        allowed = allowed & (keys > queries - window)
    return allowed


def check_prefill(tokens: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """Validate ``lengths`` for a prompt batch ``tokens`` [B, m]; return it (all m if None)."""
    batch, m = tokens.shape
    if lengths is None:
        return torch.full((batch,), m, dtype=torch.long, device=tokens.device)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape [{batch}] (one per row of tokens), got {tuple(lengths.shape)}")
    if bool((lengths < 0).any()) or bool((lengths > m).any()):
        raise ValueError(f"lengths must lie in 0..{m} (the padded prompt width), got {lengths.tolist()}")
    return lengths.to(device=tokens.device, dtype=torch.long)


class PositionedCache:
    """What every cache of this framework shares: each row's next position and a host-side bound.

    ``horizon`` bounds the positions written so far without a device sync, so a cache detects
    overflow, and eager decoding of a full KV-cache attends only over its filled part. With
    ``static_shapes`` (set by lingua.generate.DecodeStep before capturing a CUDA graph) every step
    has the same shapes and DecodeStep advances ``horizon``. Subclasses fill ``layers``.
    """

    def __init__(self, batch: int, max_len: int, device):
        self.max_len = max_len
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)  # next position per row
        self.horizon = 0
        self.static_shapes = False
        self.layers: list = []

    def nbytes(self) -> int:
        """Bytes of the allocated buffers of every layer."""
        return sum(layer.nbytes() for layer in self.layers)

    def advance_horizon(self, new_horizon: int) -> None:
        if new_horizon > self.max_len:
            raise ValueError(
                f"cache of max_len={self.max_len} is full: {self.horizon} positions used, "
                f"{new_horizon - self.horizon} more requested"
            )
        self.horizon = new_horizon


class TransformerCache(PositionedCache):
    """Per-layer KV slots (key and value buffers; positions bookkeeping is not counted in nbytes)."""

    def __init__(self, model: TransformerLM, batch: int, max_len: int, device, dtype):
        super().__init__(batch, max_len, device)
        args = model.args
        self.window: Optional[int] = args.sliding_window
        slots = min(max_len, self.window) if self.window is not None else max_len
        self.layers = [
            KVSlots.empty(batch, args.kv_heads, slots, args.head_dim, device, dtype) for _ in range(args.n_layers)
        ]

    def live_nbytes(self) -> int:
        """Bytes of the (k, v) entries a next query can see (equals nbytes() once full)."""
        layer = self.layers[0]
        per_entry = 2 * layer.k.shape[1] * layer.k.shape[3] * layer.k.element_size()
        return int(self.entries_per_layer().sum()) * per_entry

    def entries_per_layer(self) -> torch.Tensor:
        """[n_layers, B]: cached (k, v) pairs a next query can see: min(n, window) after n tokens."""
        lowest = self.positions - (self.window if self.window is not None else self.max_len)
        return torch.stack([layer.live(lowest).sum(-1) for layer in self.layers])

    def pretend_filled(self, n: int) -> None:
        """Every row holds n tokens of random keys and values: a benchmark's stand-in for a prefill."""
        self.advance_horizon(n)
        self.positions.fill_(n)
        for layer in self.layers:
            layer.pretend_filled(self.positions)


def new_cache(model: TransformerLM, batch_size: int, max_len: int, device, dtype) -> TransformerCache:
    return TransformerCache(model, batch_size, max_len, device, dtype)


def forward_cached(
    model: TransformerLM, tokens: torch.Tensor, cache: TransformerCache, lengths: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Logits [B, m, V] for ``tokens`` [B, m] continuing each row of ``cache``; updates the cache.

    m > 1 (prefill) attends over [cached ; new] keys in one pass; m == 1 without ``lengths``
    (decode) writes the token's key first and attends over the slots alone.
    """
    decode = tokens.shape[1] == 1 and lengths is None
    if decode:
        if not cache.static_shapes:  # a captured step cannot run Python: DecodeStep advances it
            cache.advance_horizon(cache.horizon + 1)
    else:
        lengths = check_prefill(tokens, lengths)
        cache.advance_horizon(int((cache.positions + lengths).max()))
    start = cache.positions
    query_positions = start[:, None] + torch.arange(tokens.shape[1], device=tokens.device)  # [B, m]
    cos, sin = model.rope(query_positions)
    span = cache.layers[0].slots if cache.static_shapes else min(cache.horizon, cache.layers[0].slots)
    x = model.tok_embeddings(tokens)
    for layer, slots in zip(model.layers, cache.layers):
        q, k, v = layer.attention.project(layer.attention_norm(x), cos, sin)
        if decode:
            slots.write_one(k, v, start)
            allowed = causal_allowed(slots.positions[:, :span], query_positions, cache.window)
            out = attend_slots(q, slots.k[:, :, :span], slots.v[:, :, :span], allowed, cache.static_shapes)
        else:
            key_positions = torch.cat([slots.positions, query_positions], dim=1)
            allowed = causal_allowed(key_positions, query_positions, cache.window)
            out = attend_slots(q, torch.cat([slots.k, k], dim=2), torch.cat([slots.v, v], dim=2), allowed)
            slots.write_many(k, v, start, lengths)
        x = x + layer.attention.wo(out.transpose(1, 2).flatten(2))
        x = x + layer.feed_forward(layer.ffn_norm(x))
    cache.positions.add_(1 if decode else lengths)
    return model.output(model.norm(x))


register_cache_support(TransformerLM, new_cache, forward_cached)
