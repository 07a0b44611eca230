"""Shared transformer blocks: RMSNorm, rotary embeddings, SwiGLU, and causal self-attention, and
the language-model shell (embedding, blocks, final norm, output head) every model family uses.

Attention supports document masking (``doc_ids``: tokens attend only within their document) and
an optional sliding window, with two backends: ``sdpa`` (PyTorch's scaled_dot_product_attention,
a materialized boolean mask when one is needed) and ``flex`` (FlexAttention with a block mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from lingua import masks


@dataclass
class BaseTransformerArgs:
    """Sizes shared by every transformer-like model of the framework."""

    dim: int = 512
    """Model (residual stream) width E."""
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; None means n_heads."""
    attn_dim: Optional[int] = None
    """Total width F of the attention (queries, keys, values); None means dim. iso-KV and
    iso-FLOP baselines set it below dim."""
    ffn_dim_multiplier: float = 1.0
    multiple_of: int = 256
    """The SwiGLU hidden width is rounded up to a multiple of this."""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    vocab_size: int = 258
    """Output classes; the default fits the bytes tokenizer (256 bytes + BOS + EOS)."""
    max_seqlen: int = 1024
    init_std: float = 0.02
    attn_impl: str = "sdpa"
    """'sdpa' or 'flex'."""
    sliding_window: Optional[int] = None
    """Attend only the last `sliding_window` tokens (the query included); None is full causal."""
    tie_embeddings: bool = False

    attn_impls: ClassVar[tuple[str, ...]] = ("sdpa", "flex")
    """Attention backends this model family accepts (subclasses extend it)."""

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seqlen"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_dim % self.n_heads:
            raise ValueError(f"attention width {self.attention_dim} must be divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.kv_heads}")
        if self.attn_impl not in self.attn_impls:
            raise ValueError(f"model.attn_impl must be one of {self.attn_impls}, got '{self.attn_impl}'")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"model.sliding_window must be >= 1 or null, got {self.sliding_window}")

    @property
    def attention_dim(self) -> int:
        return self.attn_dim or self.dim

    @property
    def head_dim(self) -> int:
        return self.attention_dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return swiglu_hidden_dim(self.dim, self.ffn_dim_multiplier, self.multiple_of)


def swiglu_hidden_dim(dim: int, multiplier: float, multiple_of: int) -> int:
    """Llama's SwiGLU width: 8/3 of ``dim`` (keeping a 4·dim MLP's parameters), scaled by
    ``multiplier`` and rounded up to a multiple of ``multiple_of``."""
    hidden = int(multiplier * int(8 * dim / 3))
    return multiple_of * math.ceil(hidden / multiple_of)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., dim] over its last dimension, times ``weight`` (broadcast to x), in x's dtype."""
    # Normalise in fp32: bf16 sums of squares lose too much.
    x32 = x.float()
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding; ``forward(positions)`` gives (cos, sin) to rotate q and k."""

    def __init__(self, head_dim: int, theta: float = 10000.0, table_positions: int = 0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        # cos and sin of positions 0..table_positions-1, for ``span``: in a model compiled whole
        # (distributed.compile_scope=model) Inductor would otherwise recompute them inside each
        # layer's rotation kernels (the 60M Attamba's kernels took 0.44 ms a step more on an H200). Not saved.
        cos, sin = self(torch.arange(table_positions))
        self.register_buffer("table_cos", cos, persistent=False)
        self.register_buffer("table_sin", sin, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [n] or [B, n] integer positions -> cos, sin of shape [..., n, head_dim/2]."""
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float32) / self.head_dim)
        )
        angles = positions.float().unsqueeze(-1) * inv_freq
        return angles.cos(), angles.sin()

    def span(self, start: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, head_dim/2] of positions start..start+n-1: views of the table where it
        reaches, computed otherwise."""
        if start + n <= self.table_cos.shape[0] and self.table_cos.device == torch.device(device):
            return self.table_cos[start:start + n], self.table_sin[start:start + n]
        return self(torch.arange(start, start + n, device=device))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, n, d] by angles cos/sin of shape [n, d/2] or [B, n, d/2]."""
    if cos.dim() == 3:  # per-row positions: broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return _rotate_pairs(x, cos, sin)


def apply_rotary_token_major(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, n, H, d] (heads after tokens, as a projection writes them) by angles of
    shape [n, d/2] or [B, n, d/2]; the result keeps that layout."""
    return _rotate_pairs(x, cos.unsqueeze(-2), sin.unsqueeze(-2))


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x's (even, odd) pairs along its last dim rotated by cos/sin, which broadcast to x[..., ::2]."""
    x32 = x.float().unflatten(-1, (-1, 2))
    real, imag = x32[..., 0], x32[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        nn.init.trunc_normal_(self.w3.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        nn.init.trunc_normal_(self.w2.weight, std=out_std, a=-3 * out_std, b=3 * out_std)


AttentionMask = Optional[Union[torch.Tensor, BlockMask]]
"""None (plain causal), a dense boolean mask [B or 1, 1, n, n], or a FlexAttention BlockMask."""


def attention_mask(
    doc_ids: Optional[torch.Tensor], batch: int, n: int, sliding_window: Optional[int], impl: str, device
) -> AttentionMask:
    """The causal, document and window mask in the form ``impl`` consumes; build it once per
    forward pass, every layer shares it."""
    if impl == "flex":
        return masks.causal_block_mask(doc_ids, batch, n, sliding_window, device)
    if doc_ids is None and sliding_window is None:
        return None  # SDPA's is_causal fast path
    return masks.causal_dense_mask(doc_ids, n, sliding_window, device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Attention of q [B, H, n, d] over k, v [B, Hkv, n, d] under a mask from :func:`attention_mask`."""
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if isinstance(mask, BlockMask):
        return masks.flex_attention(q, k, v, block_mask=mask)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, args: BaseTransformerArgs):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, n, E] -> rotated q [B, H, n, d], rotated k and v [B, Hkv, n, d]."""
        return self.split_rotate(self.wq(x), self.wk(x), self.wv(x), cos, sin)

    def split_rotate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projected q, k, v [B, n, ·] -> rotated q [B, H, n, d], rotated k and v [B, Hkv, n, d]."""
        q = q.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)
        k = k.unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, mask: AttentionMask = None):
        q, k, v = self.project(x, cos, sin)
        out = attend(q, k, v, mask)
        return self.wo(out.transpose(1, 2).flatten(2))

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then + SwiGLU(norm(x))."""

    def __init__(self, args: BaseTransformerArgs, attention: nn.Module):
        super().__init__()
        self.attention = attention
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = SwiGLU(args.dim, args.ffn_hidden_dim)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, *attention_args, **attention_kwargs):
        x = x + self.attention(self.attention_norm(x), cos, sin, *attention_args, **attention_kwargs)
        return x + self.feed_forward(self.ffn_norm(x))

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        self.attention.reset_parameters(init_std, out_std)
        self.feed_forward.reset_parameters(init_std, out_std)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()


class LanguageModelBase(nn.Module):
    """Embedding, a stack of blocks, final norm and output head (tied to the embedding or not):
    the shell every model family of the framework shares. Subclasses make the blocks and write
    ``hidden_states`` (everything before the output head); a block provides
    ``reset_parameters(init_std, out_std)``.

    ``args`` needs dim, n_layers, vocab_size, norm_eps, init_std and tie_embeddings.
    """

    def __init__(self, args, layers: list[nn.Module]):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, n] (doc_ids [B, n] numbers packed documents) -> logits [B, n, V]."""
        return self.output(self.hidden_states(tokens, doc_ids))

    def hidden_states(self, tokens: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, n] -> the final norm's output [B, n, E], what the output head reads. Apart from
        ``forward`` so that ``distributed.compile_scope=model`` can compile the model without its
        head: the logits' gradient, 1 GiB for 16k tokens over 32k ids, would otherwise be copied
        into a CUDA graph's input buffer every step."""
        raise NotImplementedError

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.args.init_std
        # Residual branches' output projections shrink with depth (two branches per block).
        out_std = std / math.sqrt(2 * self.args.n_layers)
        nn.init.trunc_normal_(self.tok_embeddings.weight, std=std, a=-3 * std, b=3 * std)
        for layer in self.layers:
            layer.reset_parameters(std, out_std)
        self.norm.reset_parameters()
        if not self.args.tie_embeddings:
            out = self.args.dim**-0.5
            nn.init.trunc_normal_(self.output.weight, std=out, a=-3 * out, b=3 * out)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters (a tied head counted once); ``exclude_embeddings`` drops the input embedding
        but keeps an untied output head."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.tok_embeddings.weight.numel()
        return total


class TransformerLMBase(LanguageModelBase):
    """The shared shell plus rotary embeddings and a forward pass over attention blocks."""

    def __init__(self, args: BaseTransformerArgs, layers: list[nn.Module]):
        super().__init__(args, layers)
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta, args.max_seqlen)

    def rotary(self, n: int, device: torch.device, offset: int = 0):
        return self.rope.span(offset, n, device)

    def hidden_states(self, tokens: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, n = tokens.shape
        x = self.tok_embeddings(tokens)
        cos, sin = self.rotary(n, tokens.device)
        args = self.args
        mask = attention_mask(doc_ids, batch, n, args.sliding_window, args.attn_impl, tokens.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)
