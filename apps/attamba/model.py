"""The Attamba language model: a Llama-style transformer whose keys and values come from SSMs.

Per layer: queries q = x·W_q; keys k = u_k + SSM_K(u_k) and values v = u_v + SSM_V(u_v), where
the SSM input u is x (or x·W_k, x·W_v with ``kv_proj``) and the residual is dropped with
``residual_ssm: false``. The SSMs reset after every chunk boundary and at document starts, so
the key at a boundary summarises its chunk; queries attend those boundary keys plus the L most
recent keys (see :mod:`apps.attamba.attention`). RoPE rotates q and k at their true positions.

The forward pass decides each layer's boundaries once, before the layers run, so activation
checkpointing recomputes a layer with the same (possibly random) chunks. The pieces a decoder
needs (q projection, SSM inputs and residual, boundary decisions) are methods of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from apps.attamba import accounting
from apps.attamba.args import AttambaArgs
from apps.attamba.attention import (
    PreparedAttention,
    attend_prepared,
    attention_key_mass,
    prepare_attention,
    reference_mask,
)
from apps.attamba.attention_triton import document_bounds
from apps.attamba.chunking import (
    STATIC_STRATEGIES,
    WHOLE_SEQUENCE_STRATEGIES,
    Chunking,
    LayerBoundaries,
    LeadingTokens,
    document_starts,
    is_periodic_boundary,
    layer_offset,
    longest_random_chunk,
    periodic_boundaries,
    random_boundaries,
    seeded_random_boundaries,
    segment_starts,
    split_top_chunks,
    top_key_boundaries,
)
from apps.attamba.ssm import KVSSM, load_backend, paired_forward
from lingua.transformer import TransformerBlock, TransformerLMBase, apply_rotary_token_major


@dataclass
class LayerPlan:
    """What one layer needs to know about its chunks for one batch."""

    boundaries: LayerBoundaries
    segment_start: torch.Tensor
    """Bool [B, n]: where the K and V SSMs reset."""
    leading_tokens: LeadingTokens
    attention: PreparedAttention
    """The layer's attention masks, built before the (possibly compiled) layer runs; its
    ``causal`` says whether the layer attends every earlier key (pseudo-chunking, fattn's layer 0)."""
    max_segment_len: Optional[int] = None
    """A bound on the SSM segments' lengths when the chunking gives one (for the SSM backend)."""


@dataclass
class _Documents:
    """A batch's packed documents as every layer's plan reads them, worked out once a forward."""

    ids: Optional[torch.Tensor]
    starts: Optional[torch.Tensor]
    """``document_starts(ids)``: where the SSMs reset for documents."""
    _bounds: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @staticmethod
    def of(doc_ids: Optional[torch.Tensor]) -> "_Documents":
        if doc_ids is None:
            return _Documents(None, None)
        return _Documents(doc_ids, document_starts(doc_ids))

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``document_bounds(ids)`` for the Triton attention kernels, computed when a layer's
        kernels first ask (masks they hand to FlexAttention never do) and shared by the layers."""
        if self._bounds is None:
            self._bounds = document_bounds(self.ids)
        return self._bounds


class AttambaAttention(nn.Module):
    """Queries x·W_q over KV-SSM keys and values, then W_o."""

    def __init__(self, args: AttambaArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.residual_ssm = args.residual_ssm
        self.wq = nn.Linear(args.dim, args.dim, bias=False)
        self.wk = nn.Linear(args.dim, args.dim, bias=False) if args.kv_proj else None
        self.wv = nn.Linear(args.dim, args.dim, bias=False) if args.kv_proj else None
        ssm_args = args.ssm_args()
        self.ssm_k = KVSSM(args.dim, args.dim, ssm_args)
        self.ssm_v = KVSSM(args.dim, args.dim, ssm_args)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n, E] -> [B, H, n, d]."""
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)

    def rotated_heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, n, E] -> rotated [B, H, n, d], laid out token-major (a view of [B, n, H, d]): the
        rotation then writes rows as the projection wrote them, not transposed, and the attention
        kernels read the view in place; their gradients come back in the same layout."""
        return apply_rotary_token_major(x.unflatten(-1, (self.n_heads, self.head_dim)), cos, sin).transpose(1, 2)

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, n, E] -> rotated queries [B, H, n, d] (token-major, see ``rotated_heads``)."""
        return self.rotated_heads(self.wq(x), cos, sin)

    def ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the K and V SSMs read: x, or x·W_k and x·W_v with kv_proj. Any leading shape."""
        if self.wk is None:
            return x, x
        return self.wk(x), self.wv(x)

    def combine(self, ssm_input: torch.Tensor, ssm_output: torch.Tensor) -> torch.Tensor:
        """A key or value from its SSM's input and output (the residual around the SSM)."""
        return ssm_input + ssm_output if self.residual_ssm else ssm_output

    def keys_values(self, x: torch.Tensor, segment_start: torch.Tensor, max_segment_len: Optional[int] = None,
                    segment_period: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, n, E] -> unrotated keys and values [B, n, E]."""
        k_in, v_in = self.ssm_inputs(x)
        k_out, v_out = paired_forward(self.ssm_k, self.ssm_v, k_in, v_in, segment_start, max_segment_len, segment_period)
        return self.combine(k_in, k_out), self.combine(v_in, v_out)

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """Attention output [B, H, n, d] -> [B, n, E]."""
        return self.wo(attended.transpose(1, 2).flatten(2))

    def queries_keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, n, E] -> rotated queries, rotated keys, values [B, H, n, d] (token-major), with
        the SSM backend's fused rotation where it has one and the SSMs read x itself."""
        # Periodic boundaries' (P, offset): the SSMs reset at every chunk start, so the windowed
        # scan can start its blocks there.
        segments = (plan.segment_start, plan.max_segment_len, plan.boundaries.period)
        rotate_qkv = load_backend(self.ssm_k.impl, x.device).rotate_qkv
        # The kernels take one input for both SSMs (no kv_proj) and fp32 at most.
        if rotate_qkv is None or self.wk is not None or x.dtype == torch.float64:
            k, v = self.keys_values(x, *segments)
            return self.queries(x, cos, sin), self.rotated_heads(k, cos, sin), self.split_heads(v)
        kv_out = paired_forward(self.ssm_k, self.ssm_v, x, x, *segments, stacked=True)
        q, k, v = rotate_qkv(self.wq(x), kv_out, x if self.residual_ssm else None, cos, sin)
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)

    def forward(self, x, cos, sin, doc_ids, plan: LayerPlan, need_key_mass: bool = False):
        """-> (output [B, n, E], key mass [B, n] from layer-wide attention, or None)."""
        q, k, v = self.queries_keys_values(x, cos, sin, plan)
        attended = attend_prepared(q, k, v, plan.attention)
        key_mass = None
        if need_key_mass:
            mask = reference_mask(plan.boundaries, plan.leading_tokens, doc_ids, x.shape[1], plan.attention.causal)
            key_mass = attention_key_mass(q, k, mask)
        return self.output(attended), key_mass

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            if linear is not None:
                nn.init.trunc_normal_(linear.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
        self.ssm_k.reset_parameters()
        self.ssm_v.reset_parameters()


class AttambaBlock(TransformerBlock):
    """Pre-norm block with Attamba attention; layer 0 of fattn/fssm also reports its key mass."""

    def forward(self, x, cos, sin, doc_ids, plan: LayerPlan, need_key_mass: bool = False):
        attended, key_mass = self.attention(self.attention_norm(x), cos, sin, doc_ids, plan, need_key_mass)
        x = x + attended
        x = x + self.feed_forward(self.ffn_norm(x))
        return (x, key_mass) if need_key_mass else x


class AttambaLM(TransformerLMBase):
    """Attamba language model; the registry's contract (see lingua.registry)."""

    def __init__(self, args: AttambaArgs):
        layers = [AttambaBlock(args, AttambaAttention(args, layer_id)) for layer_id in range(args.n_layers)]
        super().__init__(args, layers)

    @property
    def chunking(self) -> Chunking:
        """The chunking in force: the training setting in train mode, the eval setting otherwise."""
        return self.args.chunking(self.training)

    # -- chunk boundaries -------------------------------------------------------------------------

    def check_decodable(self) -> None:
        """Raise if the current chunking cannot run token by token (fattn/fssm look ahead)."""
        strategy = self.chunking.strategy
        if strategy in WHOLE_SEQUENCE_STRATEGIES:
            raise ValueError(
                f"chunk strategy '{strategy}' chooses boundaries from attention over the whole sequence, "
                "so it cannot decode token by token; set model.eval_chunk_strategy to uniform, cyclic or random"
            )

    def layer_boundary_offsets(self, n: int) -> list[int]:
        """Per-layer offsets o_l of a static (uniform/cyclic) chunking for sequences of n tokens."""
        chunking = self.chunking
        if chunking.strategy not in STATIC_STRATEGIES:
            raise ValueError(f"chunk strategy '{chunking.strategy}' has no fixed offsets; expected one of {STATIC_STRATEGIES}")
        size = chunking.chunk_size(n)
        return [layer_offset(chunking.strategy, layer, self.args.n_layers, size) for layer in range(self.args.n_layers)]

    def layer_boundaries(self, layer: int, n: int, batch: int = 1, device=None) -> LayerBoundaries:
        """Boundaries of ``layer`` for n tokens under a causal strategy (uniform, cyclic, random).

        ``n`` also sets P with chunk_count (P = ceil(n / C)): a decoder should pass the full
        length it will reach. Training's random boundaries come from torch's global generator, which
        the training loop seeds per rank and saves in checkpoints, so a resumed run draws the same.
        """
        self.check_decodable()
        chunking = self.chunking
        size = chunking.chunk_size(n)
        if chunking.strategy in STATIC_STRATEGIES:
            return periodic_boundaries(n, size, layer_offset(chunking.strategy, layer, self.args.n_layers, size), device)
        if self.training:
            return random_boundaries(batch, n, size, torch.default_generator, device)
        return seeded_random_boundaries(n, size, self.args.random_seed, layer, device)

    def is_boundary_position(self, t: int, layer: int, n: int) -> bool:
        """Whether absolute position t ends a chunk in ``layer`` (sequence length n sets P with
        chunk_count). Random chunks are evaluation's seeded ones, which do not depend on n otherwise."""
        chunking = self.chunking
        if chunking.strategy in STATIC_STRATEGIES:
            size = chunking.chunk_size(n)
            return bool(is_periodic_boundary(t, size, layer_offset(chunking.strategy, layer, self.args.n_layers, size)))
        self.check_decodable()
        # Decoding uses evaluation's seeded random chunks (training draws fresh ones per batch).
        size = chunking.chunk_size(n)
        return bool(seeded_random_boundaries(max(n, t + 1), size, self.args.random_seed, layer).is_boundary[0, t])

    def _plan(self, boundaries: LayerBoundaries, documents: "_Documents", batch: int, causal: bool = False) -> LayerPlan:
        """A layer's segment starts and attention masks, from its boundaries and the documents."""
        starts = boundaries.segment_starts(documents.starts).expand(batch, -1)
        leading_tokens = self.chunking.leading_tokens
        causal = causal or self.args.pseudo_chunk
        n = boundaries.is_boundary.shape[1]
        attention = prepare_attention(
            boundaries, leading_tokens, documents.ids, n, batch, self.args.attn_impl, causal, self.args.head_dim,
            documents.bounds,
        )
        return LayerPlan(boundaries, starts, leading_tokens, attention, self._segment_bound(boundaries, n))

    def _segment_bound(self, boundaries: LayerBoundaries, n: int) -> Optional[int]:
        """The longest SSM segment the chunking can make (documents only cut segments shorter)."""
        if boundaries.period is not None:
            return boundaries.period[0]
        if self.chunking.strategy == "random":
            return longest_random_chunk(self.chunking.chunk_size(n))
        return None

    # -- forward ----------------------------------------------------------------------------------

    def hidden_states(self, tokens: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, n] (doc_ids [B, n] numbers packed documents) -> final normed states [B, n, E]."""
        batch, n = tokens.shape
        x = self.tok_embeddings(tokens)
        cos, sin = self.rotary(n, tokens.device)
        documents = _Documents.of(doc_ids)
        if self.chunking.strategy in WHOLE_SEQUENCE_STRATEGIES:
            x = self._forward_attention_chosen(x, cos, sin, documents)
        else:
            for layer_id, layer in enumerate(self.layers):
                boundaries = self.layer_boundaries(layer_id, n, batch, tokens.device)
                x = layer(x, cos, sin, doc_ids, self._plan(boundaries, documents, batch))
        return self.norm(x)

    def _forward_attention_chosen(self, x, cos, sin, documents: "_Documents") -> torch.Tensor:
        """fattn / fssm: layer 0 picks the boundaries of every later layer from its attention."""
        batch, n, _ = x.shape
        chunking = self.chunking
        size = chunking.chunk_size(n)
        uniform = periodic_boundaries(n, size, 0, x.device)
        fattn = chunking.strategy == "fattn"
        # fattn's layer 0 attends in full; fssm's attends like any Attamba layer with uniform chunks.
        doc_ids = documents.ids
        x, key_mass = self.layers[0](x, cos, sin, doc_ids, self._plan(uniform, documents, batch, causal=fattn), need_key_mass=True)
        if fattn:
            chosen = top_key_boundaries(key_mass, math.ceil(n / size))
        else:
            split_count = self.args.fssm_split_count or max(1, (n // size) // 2)
            chosen = split_top_chunks(uniform, key_mass, split_count)
        plan = self._plan(chosen, documents, batch)
        for layer in self.layers[1:]:
            x = layer(x, cos, sin, doc_ids, plan)
        return x

    # -- accounting -------------------------------------------------------------------------------

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): weights, compressed attention, SSM scans."""
        return accounting.flops_per_token(self.args, self.num_params(exclude_embeddings=True), seq_len)
