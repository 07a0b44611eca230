"""The Llama-style transformer baseline: RMSNorm, RoPE, SwiGLU, optional GQA, an attention width
separate from the model width (iso-KV / iso-FLOP baselines), and sliding-window attention."""

from __future__ import annotations

from dataclasses import dataclass

from lingua.transformer import Attention, BaseTransformerArgs, TransformerBlock, TransformerLMBase


@dataclass
class TransformerArgs(BaseTransformerArgs):
    """The baseline adds nothing to the shared sizes; see BaseTransformerArgs."""


class TransformerLM(TransformerLMBase):
    def __init__(self, args: TransformerArgs):
        layers = [TransformerBlock(args, Attention(args)) for _ in range(args.n_layers)]
        super().__init__(args, layers)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight plus causal attention's score and value matmuls."""
        args = self.args
        weights = self.num_params(exclude_embeddings=True)
        window = min(seq_len, args.sliding_window or seq_len)
        # q·k and p·v: 2 matmuls × 2 FLOPs, over ~window/2 keys on average (causal), ×3 for backward.
        attention = 3 * 4 * args.n_layers * args.attention_dim * (window / 2 if window == seq_len else window)
        return 6 * weights + attention
