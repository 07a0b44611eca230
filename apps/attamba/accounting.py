"""Attamba's costs: attended keys, KV-cache entries, training FLOPs and parameter counts.

Counts are exact for periodic (uniform/cyclic) boundaries; random, fattn and fssm chunks are
counted as uniform ones of the same mean size P (fssm's split chunks are not counted).
Query t attends the boundaries before its window plus its window (DESIGN.md, attention mask):
a window of min(L, t+1) tokens, or with ``leading_tokens='chunk'`` the current partial chunk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apps.attamba.chunking import STATIC_STRATEGIES, LeadingTokens, layer_offset

if TYPE_CHECKING:
    from apps.attamba.args import AttambaArgs


def boundaries_before(position: int, chunk_size: int, offset: int = 0) -> int:
    """How many periodic boundaries b (with (b + 1 + offset) mod P == 0) satisfy b < position."""
    return (position + offset) // chunk_size if position > 0 else 0


def attended_keys(t: int, chunk_size: int, leading_tokens: LeadingTokens, offset: int = 0) -> int:
    """Keys query t attends in one layer: boundaries before its window plus the window."""
    if leading_tokens == "chunk":
        window_start = max(0, t - (t + offset) % chunk_size)
    else:
        window_start = max(0, t - int(leading_tokens) + 1)
    return boundaries_before(window_start, chunk_size, offset) + (t - window_start + 1)


def kv_cache_entries(seq_len: int, chunk_size: int, leading_tokens: LeadingTokens, offset: int = 0) -> int:
    """Key/value pairs one layer's cache holds after ``seq_len`` tokens, i.e. what the last query
    attends: the boundaries that left the window, plus the window. About seq_len / P + L,
    against seq_len for a transformer."""
    if seq_len < 1:
        return 0
    return attended_keys(seq_len - 1, chunk_size, leading_tokens, offset)


def mean_attended_keys(seq_len: int, chunk_size: int, leading_tokens: LeadingTokens, offset: int = 0) -> float:
    """Keys attended per query, averaged over a sequence: ≈ n / (2P) + L."""
    return sum(attended_keys(t, chunk_size, leading_tokens, offset) for t in range(seq_len)) / seq_len


def _layer_settings(args: "AttambaArgs", seq_len: int, training: bool) -> list[tuple[int, int]]:
    """(P, offset) of every layer under the training or evaluation chunking."""
    chunking = args.chunking(training)
    size = chunking.chunk_size(seq_len)
    if chunking.strategy in STATIC_STRATEGIES:
        return [(size, layer_offset(chunking.strategy, layer, args.n_layers, size)) for layer in range(args.n_layers)]
    return [(size, 0)] * args.n_layers


def model_kv_cache_entries(args: "AttambaArgs", seq_len: int) -> int:
    """KV-cache entries over all layers after ``seq_len`` tokens, under the evaluation chunking."""
    leading = args.chunking(training=False).leading_tokens
    return sum(kv_cache_entries(seq_len, size, leading, offset) for size, offset in _layer_settings(args, seq_len, False))


def attention_flops_per_token(args: "AttambaArgs", seq_len: int) -> float:
    """Training FLOPs per token of q·k and p·v (2 matmuls × 2 FLOPs per key and channel, ×3 for
    the backward), over the keys the (training) mask lets each query see."""
    if args.pseudo_chunk:
        keys_per_layer = [(seq_len + 1) / 2] * args.n_layers
    else:
        leading = args.chunking(training=True).leading_tokens
        keys_per_layer = [mean_attended_keys(seq_len, size, leading, offset) for size, offset in _layer_settings(args, seq_len, True)]
        if args.chunk_strategy == "fattn":  # layer 0 attends in full
            keys_per_layer[0] = (seq_len + 1) / 2
    return 3 * 4 * args.dim * sum(keys_per_layer)


def ssm_scan_flops_per_token(args: "AttambaArgs") -> float:
    """Training FLOPs per token of the SSM recurrences (the projections and conv are weights):
    per state entry a decay multiply, the input outer product (2) and the readout (2), ×3 for
    the backward; two SSMs (K and V) per layer."""
    hidden = args.ssm_hidden_dim or args.dim
    return 3 * 5 * hidden * args.state_dim * 2 * args.n_layers


def flops_per_token(args: "AttambaArgs", non_embedding_params: int, seq_len: int) -> float:
    """6 FLOPs per weight (forward + backward) plus attention and SSM scans."""
    return 6 * non_embedding_params + attention_flops_per_token(args, seq_len) + ssm_scan_flops_per_token(args)


def param_counts(model) -> dict[str, int]:
    """Parameters by part of an AttambaLM: embedding, attention (W_q, W_k, W_v, W_o), ssm, ffn,
    norms, output, total. A tied output head is counted once, under embedding."""
    counts = dict.fromkeys(("embedding", "attention", "ssm", "ffn", "norm", "output"), 0)
    for name, parameter in model.named_parameters():  # shared (tied) tensors are listed once
        if name.startswith("tok_embeddings"):
            part = "embedding"
        elif name.startswith("output"):
            part = "output"
        elif ".ssm_" in name:
            part = "ssm"
        elif ".attention." in name:
            part = "attention"
        elif ".feed_forward." in name:
            part = "ffn"
        else:
            part = "norm"
        counts[part] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts
