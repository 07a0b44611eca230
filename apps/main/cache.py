"""The transformer's inference cache: a KV-cache per layer, full or a sliding-window ring.

Every layer keeps its rotated keys and values in a :class:`KVSlots` buffer of fixed size: the
whole context (``max_len`` slots) for full attention, or ``sliding_window`` slots used as a ring
when the model attends a window. Position p lives in slot ``p mod slots`` and every slot records
the position it holds (-1 when empty), so attention masks come from positions alone and the
buffers never change shape: a decode step can be captured in a CUDA graph.

Batches of prompts of different lengths are RIGHT-padded: ``forward_cached(model, tokens, cache,
lengths)`` takes ``lengths[b]`` real tokens from row b (the rest is padding whose outputs are
junk and which never enters the cache), and every row then continues at its own position.

:class:`KVSlots` and :func:`attend_slots` live in ``lingua.kv_cache``, shared with the Attamba
cache, whose window is a ring of the same kind.
"""

from __future__ import annotations

from typing import Optional

import torch

from apps.main.model import TransformerLM
from lingua.generate import register_cache_support
from lingua.decode_weights import DecodeLinear, StackedLinear, StackedSwiGLU
from lingua.kv_cache import KVSlots, PositionedCache, attend_one_query, attend_slots, causal_allowed, check_prefill

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
        # Decode-time weights (lingua.decode_weights): q, k and v as one matmul, w1 and w3 as one, W_o.
        self.qkv = [StackedLinear(layer.attention.wq, layer.attention.wk, layer.attention.wv) for layer in model.layers]
        self.feed_forwards = [StackedSwiGLU(layer.feed_forward) for layer in model.layers]
        self.outputs = [DecodeLinear(layer.attention.wo) for layer in model.layers]

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
    # The oldest position a decode query sees (every cached position is at or before its own).
    lowest = start - cache.window + 1 if cache.window is not None else torch.zeros_like(start)
    x = model.tok_embeddings(tokens)
    for layer, slots, qkv, output, feed_forward in zip(model.layers, cache.layers, cache.qkv, cache.outputs, cache.feed_forwards):
        q, k, v = layer.attention.split_rotate(*qkv(layer.attention_norm(x)), cos, sin)
        if decode:
            slots.write_one(k, v, start)
            out = attend_one_query(q, slots.k[:, :, :span], slots.v[:, :, :span], slots.positions[:, :span], lowest, 0, cache)
        else:
            key_positions = torch.cat([slots.positions, query_positions], dim=1)
            allowed = causal_allowed(key_positions, query_positions, cache.window)
            out = attend_slots(q, torch.cat([slots.k, k], dim=2), torch.cat([slots.v, v], dim=2), allowed)
            slots.write_many(k, v, start, lengths)
        x = x + output(out.transpose(1, 2).flatten(2))
        x = x + feed_forward(layer.ffn_norm(x))
    cache.positions.add_(1 if decode else lengths)
    return model.output(model.norm(x))


register_cache_support(TransformerLM, new_cache, forward_cached)
