"""Attamba's inference cache: compressed boundary keys, a window of recent keys, and SSM states.

Per layer (DESIGN.md, "Inference cache"):

- the compressed (k, v) of chunk boundaries, seen once they have left the window, at their true
  positions' RoPE;
- a ring of the most recent (k, v): the last L positions, or with ``leading_tokens: chunk`` the
  current partial chunk (the ring holds the longest chunk; older entries are masked);
- the K- and V-SSM states (conv tail and state per head), which reset after every boundary; they
  are kept side by side in one state, which one recurrence steps (``ssm.paired_step``).

A decode step at position t computes k_t, v_t by one SSM step, writes them into the ring and,
iff t is a boundary, into t's compressed slot too, and attends q_t over [compressed ; window]. A
compressed entry is seen only by queries whose window starts after it, so a boundary written
early stays hidden until it leaves the window: DESIGN's move of the evicted position into the
compressed list, without reading it back from the ring (one write of two slots per buffer instead
of a read and two writes). The compressed list and the ring share one buffer
``[compressed C | trash 1 | ring S]`` per layer, so attention needs no concatenation and every
shape is fixed: a step can be captured in a CUDA graph. (A token that is no boundary writes its
second copy into the trash slot, which is always masked.) Every layer's buffer has the same
length, a multiple of SLOT_ALIGNMENT: layers with fewer boundaries (cyclic offsets), and every
layer up to that multiple, pad theirs with trash slots that stay empty, so the slots' positions
of all layers form one tensor, which a decode step writes once, before the layers run (what a
step writes there depends only on the position, not on the layers' outputs).

Boundaries are absolute positions shared by every row (uniform, cyclic, and evaluation's seeded
random chunks, whose prefix does not depend on the sequence length), tabulated once for
``max_len`` positions. With ``chunk_count`` (Attamba-Linear) P = ceil(max_len / C): decoding
matches a full forward pass over max_len tokens. fattn/fssm look ahead and cannot decode.

Prompts are RIGHT-padded with ``lengths`` as for the transformer. Prefill runs one forward pass
(the model's own attention over the prompt); the SSMs see each row shifted to end at the last
column, with a segment start at its first token, so their final states are every row's own.
A prefill that continues a filled cache runs token by token (``KVSSM.forward_with_state`` takes
no initial state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from apps.attamba.attention import attamba_attention
from apps.attamba.chunking import LayerBoundaries, segment_starts, window_starts
from apps.attamba.model import AttambaLM
from apps.attamba.ssm import KVSSM, PairedStepWeights, SSMState, init_paired_state, paired_state, paired_step
from lingua.decode_weights import DecodeLinear, PairedLinear, StackedLinear, StackedSwiGLU
from lingua.kv_cache import (
    EMPTY, KVSlots, PositionedCache, attend_one_query, check_prefill, load_decode_attention, right_aligned_columns,
    visible_slots, write_kv_slots,
)
from lingua.generate import register_cache_support
from lingua.transformer import apply_rotary


@dataclass
class LayerTables:
    """One layer's chunk structure over positions 0..max_len-1 (shared by every row)."""

    boundaries: LayerBoundaries
    """is_boundary [1, max_len] (and the period of static strategies)."""
    is_boundary: torch.Tensor
    """Bool [max_len]."""
    boundary_positions: torch.Tensor
    """Long [C]: the layer's boundaries in order; compressed slot i holds boundary i."""
    compressed_slot: torch.Tensor
    """Long [max_len]: the compressed slot of each boundary position; C (the trash slot) elsewhere."""
    window_start: torch.Tensor
    """Long [max_len]: first position of query t's window (t - L + 1, the chunk start, or 0)."""
    ring_slots: int


def layer_tables(model: AttambaLM, layer: int, max_len: int, device) -> LayerTables:
    boundaries = model.layer_boundaries(layer, max_len, 1, device)
    is_boundary = boundaries.is_boundary[0]
    positions = torch.arange(max_len, device=device)
    # Pseudo-chunking attends every key in full: boundaries only reset the SSMs, none is compressed.
    boundary_positions = positions[is_boundary & (not model.args.pseudo_chunk)]
    count = boundary_positions.numel()
    compressed_slot = torch.full((max_len,), count, dtype=torch.long, device=device)
    compressed_slot[boundary_positions] = torch.arange(count, device=device)
    if model.args.pseudo_chunk:
        window_start = torch.zeros(max_len, dtype=torch.long, device=device)
    else:
        window_start = window_starts(boundaries, model.chunking.leading_tokens, max_len)[0]
    # The ring must hold the longest window: L, the longest chunk, or everything (pseudo-chunking).
    ring_slots = int((positions - window_start).max()) + 1
    return LayerTables(boundaries, is_boundary, boundary_positions, compressed_slot, window_start, ring_slots)


class LayerDecodeWeights:
    """One layer's weights as a decode step reads them (see lingua.decode_weights): the query
    projection stacked with what else reads the normed input (the SSMs' in_proj, or W_k and W_v
    with ``kv_proj``), the pair's step weights, SwiGLU's w1 and w3 as one matmul, and W_o."""

    def __init__(self, block, state_dtype: torch.dtype):
        attention = block.attention
        self.kv_proj = attention.wk is not None
        ssm_k, ssm_v = attention.ssm_k, attention.ssm_v
        beside_q = (attention.wk, attention.wv) if self.kv_proj else (ssm_k.in_proj, ssm_v.in_proj)
        self.reads_input = StackedLinear(attention.wq, *beside_q)
        self.ssm_in = PairedLinear(ssm_k.in_proj, ssm_v.in_proj) if self.kv_proj else None
        self.ssm = PairedStepWeights.of(ssm_k, ssm_v, state_dtype)
        self.feed_forward = StackedSwiGLU(block.feed_forward)
        self.wo = DecodeLinear(attention.wo)

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """The attention block's output projection (AttambaAttention.output) of attended [B, H, 1, d]."""
        return self.wo(attended.transpose(1, 2).flatten(2))

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normed input h [B, E] -> (queries [B, E], K-SSM input, V-SSM input, both in_proj outputs)."""
        q, first, second = self.reads_input(h)
        if self.ssm_in is None:  # both SSMs read h itself; first and second are their in_proj outputs
            return q, h, h, first, second
        return q, first, second, *self.ssm_in(first, second)


SLOT_ALIGNMENT = 16
"""Slots per row of every layer's buffers are a multiple of this (see AttambaCache)."""


class AttambaLayerCache:
    """Buffers of one layer: [compressed | trash | ring] keys and values, and the SSM states.

    ``positions`` [B, total] is this layer's view of the cache's slot positions (AttambaCache);
    the ring fills the slots from ``ring_first`` on, the same layout in every layer."""

    def __init__(self, tables: LayerTables, block, positions: torch.Tensor, ring_first: int, dtype):
        attention = block.attention
        self.tables = tables
        self.compressed_slots = tables.boundary_positions.numel()
        self.trash = self.compressed_slots  # slots after it, up to the ring, stay empty
        batch, total = positions.shape
        self.k = torch.zeros(batch, attention.n_heads, total, attention.head_dim, device=positions.device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.positions = positions
        self.ring = KVSlots(self.k, self.v, self.positions, first=ring_first)
        # The K and V SSM states side by side: one recurrence steps both (ssm.paired_step).
        self.ssm_kv = init_paired_state(attention.ssm_k, batch, positions.device, dtype)
        self.weights = LayerDecodeWeights(block, self.ssm_kv.ssm.dtype)

    def allowed(self, query_positions: torch.Tensor) -> torch.Tensor:
        """[B, m, total] bool: compressed entries before the query's window, ring entries in it."""
        window_start = self.tables.window_start[query_positions][:, :, None]  # [B, m, 1]
        return visible_slots(self.positions[:, None, :], window_start, self.ring.first)

    def write_token(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store a token's k, v [B, H, d] in its two ``slots`` [B, 2] (AttambaCache.token_slots):
        the ring and its compressed slot (the trash where it is no boundary). Its positions are
        the cache's to write."""
        write_kv_slots(self.k, self.v, slots, k[:, :, None].expand(-1, -1, 2, -1), v[:, :, None].expand(-1, -1, 2, -1))

    def fill_from_prompt(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> None:
        """Build the cache from a prompt's rotated k, v [B, H, m, d] (rows start at position 0)."""
        m = k.shape[2]
        zero = torch.zeros_like(lengths)
        self.ring.write_many(k, v, zero, lengths)
        # Compressed: every boundary of the prompt (those still in the window stay hidden).
        boundary = self.tables.boundary_positions  # [C]
        compressed = boundary[None, :] < lengths[:, None]  # [B, C]
        index = boundary.clamp(max=m - 1)[None, None, :, None].expand(k.shape[0], k.shape[1], -1, k.shape[3])
        self.k[:, :, : self.compressed_slots] = k.gather(2, index)
        self.v[:, :, : self.compressed_slots] = v.gather(2, index)
        self.positions[:, : self.compressed_slots] = torch.where(compressed, boundary[None, :], EMPTY)

    def pretend_filled(self, n: int) -> None:
        """Hold n tokens of random keys, values and SSM states per row (see AttambaCache.pretend_filled)."""
        self.k.normal_()
        self.v.normal_()
        batch = self.k.shape[0]
        self.ring.pretend_filled(torch.full((batch,), n, dtype=torch.long, device=self.k.device))
        boundary = self.tables.boundary_positions
        self.positions[:, : self.compressed_slots] = torch.where(boundary < n, boundary, EMPTY)
        self.positions[:, self.trash] = EMPTY
        self.ssm_kv.conv.normal_()
        self.ssm_kv.ssm.normal_()

    def live_entries(self, next_positions: torch.Tensor) -> torch.Tensor:
        """[B]: entries the cache holds after ``next_positions`` tokens (what the last query saw)."""
        last = (next_positions - 1).clamp(min=0)
        allowed = self.allowed(last[:, None])[:, 0]  # [B, total]
        return torch.where(next_positions > 0, allowed.sum(-1), 0)

    def state_nbytes(self) -> int:
        """Bytes of the K and V SSM states (conv taps and SSM state)."""
        return self.ssm_kv.nbytes()

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.state_nbytes()


class AttambaCache(PositionedCache):
    """Every layer's :class:`AttambaLayerCache` plus each row's next position."""

    def __init__(self, model: AttambaLM, batch: int, max_len: int, device, dtype):
        check_decodable(model)
        super().__init__(batch, max_len, device)
        # Attention runs the split-key kernel (lingua.decode_attention) on CUDA: with its loads
        # decoupled and 128 keys an iteration it read the 128k caches 1.3x (batch 1) and 1.5x
        # (batch 16) faster than cuDNN, and it needs no mask (docs/benchmarks.md, eighth session).
        # None selects SDPA; off CUDA it is None.
        self.decode_attention = load_decode_attention(device)
        self.leading_tokens = model.chunking.leading_tokens
        self.pseudo_chunk = model.args.pseudo_chunk
        tables = [layer_tables(model, index, max_len, device) for index in range(len(model.layers))]
        # One slot layout for every layer: the most boundaries any layer has, a trash slot, the
        # longest ring (a longer ring than a layer needs keeps entries its window masks anyway).
        # More trash slots round the length up to a multiple of SLOT_ALIGNMENT, so that every
        # row of positions and of an SDPA mask starts 16-byte aligned, as SDPA's fused kernels
        # want their mask (unaligned mask rows cost 12% at 128k x 16 on the H100).
        ring_slots = max(table.ring_slots for table in tables)
        compressed = max(table.boundary_positions.numel() for table in tables)
        total = -(-(compressed + 1 + ring_slots) // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
        self.ring_first = total - ring_slots
        self.slot_positions = torch.full((len(tables), batch, total), EMPTY, dtype=torch.long, device=device)
        """[n_layers, B, total]: the position each slot holds (EMPTY when none)."""
        self.layers = [
            AttambaLayerCache(table, layer, self.slot_positions[index], self.ring_first, dtype)
            for index, (table, layer) in enumerate(zip(tables, model.layers))
        ]
        # Per layer and position, what a decode step looks up: whether t starts a segment (t = 0
        # or t - 1 a boundary; the SSM kernels read it at t themselves, see paired_step), and, for
        # every layer at once (one kernel each, not one a layer), t's compressed slot (the layer's
        # trash slot where t is no boundary) and t's window start.
        self.segment_starts = torch.cat([segment_starts(table.is_boundary[None]) for table in tables])
        self.compressed_slots = torch.stack([table.compressed_slot for table in tables])
        self.trash_slots = torch.tensor([layer.trash for layer in self.layers], device=device)
        self.window_starts = torch.stack([table.window_start for table in tables])

    def token_slots(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a token at positions t [B] goes in every layer: slots [n_layers, B, 2] (its ring
        slot, then its compressed or trash slot) and the positions they then hold."""
        compressed = self.compressed_slots[:, t]  # [n_layers, B]
        ring = self.layers[0].ring.slot_of(t).expand_as(compressed)  # the same in every layer
        slots = torch.stack([ring, compressed], dim=2)
        positions = torch.stack([t.expand_as(compressed), torch.where(compressed != self.trash_slots[:, None], t, EMPTY)], dim=2)
        return slots, positions

    def write_positions(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Record ``positions`` [n_layers, B, m] in ``slots`` [n_layers, B, m] of every layer
        (one ``index_put_`` on the whole tensor, which Inductor updates in place)."""
        layers = torch.arange(slots.shape[0], device=slots.device)[:, None, None]
        rows = torch.arange(slots.shape[1], device=slots.device)[None, :, None]
        self.slot_positions[layers, rows, slots] = positions

    def live_nbytes(self) -> int:
        """Bytes of the live entries (DESIGN's count: n/P + L per layer) plus the SSM states."""
        total = 0
        for layer, entries in zip(self.layers, self.entries_per_layer()):
            per_entry = 2 * layer.k.shape[1] * layer.k.shape[3] * layer.k.element_size()
            states = layer.state_nbytes()
            total += int(entries.sum()) * per_entry + states
        return total

    def entries_per_layer(self) -> torch.Tensor:
        """[n_layers, B]: compressed boundaries before the last token's window, plus that window."""
        return torch.stack([layer.live_entries(self.positions) for layer in self.layers])

    def pretend_filled(self, n: int) -> None:
        """Every row holds n tokens of random keys, values and SSM states, laid out as a prefill
        of n tokens would leave them: a benchmark's stand-in for the prefill."""
        self.advance_horizon(n)
        self.positions.fill_(n)
        for layer in self.layers:
            layer.pretend_filled(n)


def check_decodable(model: AttambaLM) -> None:
    model.check_decodable()
    if model.training and model.chunking.strategy == "random":
        raise ValueError(
            "random chunks in training mode are drawn fresh per batch, so a cache cannot follow them; "
            "call model.eval() (evaluation's random chunks are seeded and causal)"
        )


def new_cache(model: AttambaLM, batch_size: int, max_len: int, device, dtype) -> AttambaCache:
    return AttambaCache(model, batch_size, max_len, device, dtype)


def _ssm_prefill(
    ssm: KVSSM, x: torch.Tensor, segment_start: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, SSMState]:
    """SSM outputs [B, m, E] and each row's state after its last real token.

    Rows are rotated to end at the last column, so forward_with_state's final state is that of
    each row's own last token. The padding moved in front cannot leak into the row: position 0
    always starts a segment, which clears the state and the conv taps.
    """
    batch, m, _ = x.shape
    if bool((lengths == m).all()):
        return ssm.forward_with_state(x, segment_start.expand(batch, -1))
    source, back = right_aligned_columns(lengths, m)  # [B, m]
    starts = segment_start.expand(batch, -1).gather(1, source)
    rotated = x.gather(1, source[..., None].expand(-1, -1, x.shape[2]))
    y, state = ssm.forward_with_state(rotated, starts)
    return y.gather(1, back[..., None].expand(-1, -1, y.shape[2])), state


def _prefill(model: AttambaLM, tokens: torch.Tensor, cache: AttambaCache, lengths: torch.Tensor) -> torch.Tensor:
    """One forward pass over prompts that start at position 0; fills every layer's cache."""
    m = tokens.shape[1]
    x = model.tok_embeddings(tokens)
    cos, sin = model.rotary(m, tokens.device)
    for layer, layer_cache in zip(model.layers, cache.layers):
        attention, tables = layer.attention, layer_cache.tables
        boundaries = LayerBoundaries(tables.is_boundary[None, :m], tables.boundaries.period)
        starts = segment_starts(boundaries.is_boundary)  # [1, m]
        h = layer.attention_norm(x)
        q = attention.queries(h, cos, sin)
        k_in, v_in = attention.ssm_inputs(h)
        k_out, k_state = _ssm_prefill(attention.ssm_k, k_in, starts, lengths)
        v_out, v_state = _ssm_prefill(attention.ssm_v, v_in, starts, lengths)
        k = attention.rotated_heads(attention.combine(k_in, k_out), cos, sin)
        v = attention.split_heads(attention.combine(v_in, v_out))
        attended = attamba_attention(
            q, k, v, boundaries, cache.leading_tokens, None, model.args.attn_impl, causal=cache.pseudo_chunk
        )
        x = x + attention.output(attended)
        x = x + layer.feed_forward(layer.ffn_norm(x))
        layer_cache.fill_from_prompt(k, v, lengths)
        layer_cache.ssm_kv.copy_(paired_state(attention.ssm_k, k_state, v_state))
    cache.positions.add_(lengths)
    return model.output(model.norm(x))


def _decode(model: AttambaLM, tokens: torch.Tensor, cache: AttambaCache) -> torch.Tensor:
    """One token per row (tokens [B, 1]) at each row's own position."""
    t = cache.positions  # [B]
    cos, sin = model.rope(t[:, None])
    x = model.tok_embeddings(tokens)  # [B, 1, E]
    window_starts = cache.window_starts[:, t]  # [n_layers, B]
    slots, positions = cache.token_slots(t)
    cache.write_positions(slots, positions)
    for index, (layer, layer_cache) in enumerate(zip(model.layers, cache.layers)):
        attention = layer.attention
        weights = layer_cache.weights
        q, k_in, v_in, k_projected, v_projected = weights.project(layer.attention_norm(x)[:, 0])  # [B, ...]
        q = apply_rotary(attention.split_heads(q[:, None]), cos, sin)
        k_out, v_out, _ = paired_step(
            weights.ssm, k_projected, v_projected, layer_cache.ssm_kv, cache.segment_starts[index], in_place=True, positions=t
        )
        k = apply_rotary(attention.split_heads(attention.combine(k_in, k_out)[:, None]), cos, sin)
        v = attention.split_heads(attention.combine(v_in, v_out)[:, None])
        layer_cache.write_token(k[:, :, 0], v[:, :, 0], slots[index])
        attended = attend_one_query(
            q, layer_cache.k, layer_cache.v, cache.slot_positions[index], window_starts[index], cache.ring_first, cache
        )
        x = x + weights.output(attended)
        x = x + weights.feed_forward(layer.ffn_norm(x))
    cache.positions.add_(1)
    return model.output(model.norm(x))


def forward_cached(
    model: AttambaLM, tokens: torch.Tensor, cache: AttambaCache, lengths: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Logits [B, m, V] for ``tokens`` [B, m] continuing each row of ``cache``; updates the cache.

    m == 1 without ``lengths`` is a decode step. Otherwise a prefill: one forward pass when the
    cache is empty (right-padded rows of ``lengths`` tokens), else token by token.
    """
    if tokens.shape[1] == 1 and lengths is None:
        if not cache.static_shapes:  # a captured step cannot run Python: DecodeStep advances it
            cache.advance_horizon(cache.horizon + 1)
        return _decode(model, tokens, cache)
    lengths = check_prefill(tokens, lengths)
    if cache.horizon == 0:
        cache.advance_horizon(int(lengths.max()))
        return _prefill(model, tokens, cache, lengths)
    if bool((lengths != tokens.shape[1]).any()):
        raise ValueError(
            "a prefill continuing a filled Attamba cache runs token by token and needs rows of equal "
            f"length (lengths=None); got lengths {lengths.tolist()}"
        )
    return torch.cat([forward_cached(model, tokens[:, i : i + 1], cache) for i in range(tokens.shape[1])], dim=1)


register_cache_support(AttambaLM, new_cache, forward_cached)
