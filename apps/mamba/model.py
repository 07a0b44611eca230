"""The Mamba2 baseline: pre-norm residual blocks of a Mamba2 mixer, optionally with a SwiGLU MLP.

    x = x + Mamba2(RMSNorm(x))          # apps.attamba.ssm.KVSSM: conv, selective SSM, gated norm
    x = x + SwiGLU(RMSNorm(x))          # only with model.mlp

The mixer's state (and its conv taps) reset at every packed document's first token, so documents
never see each other; there are no chunk resets. A block runs whole sequences (``forward``),
prompts that also return the state after their last token (``prefill``) and one token from a
state (``step``); apps/mamba/cache.py builds generation on the last two.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from apps.attamba.chunking import segment_starts
from apps.attamba.ssm import KVSSM, SSMState
from apps.mamba.args import MambaArgs
from lingua.transformer import LanguageModelBase, RMSNorm, SwiGLU


class MambaBlock(nn.Module):
    """x + Mamba2(norm(x)), then x + SwiGLU(norm(x)) when the config asks for an MLP."""

    def __init__(self, args: MambaArgs):
        super().__init__()
        self.n_layers = args.n_layers
        self.mixer_norm = RMSNorm(args.dim, args.norm_eps)
        self.mixer = KVSSM(args.dim, args.dim, args.ssm_args())
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps) if args.mlp else None
        self.feed_forward = SwiGLU(args.dim, args.ffn_hidden_dim) if args.mlp else None

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.feed_forward is None:
            return x
        return x + self.feed_forward(self.ffn_norm(x))

    def forward(self, x: torch.Tensor, segment_start: Optional[torch.Tensor]) -> torch.Tensor:
        """x [B, n, E], segment_start [B, n] bool (None: one segment per row) -> [B, n, E]."""
        return self._mlp(x + self.mixer(self.mixer_norm(x), segment_start))

    def prefill(self, x: torch.Tensor, segment_start: Optional[torch.Tensor]) -> tuple[torch.Tensor, SSMState]:
        """:meth:`forward`, plus the mixer's state after the last token."""
        mixed, state = self.mixer.forward_with_state(self.mixer_norm(x), segment_start)
        return self._mlp(x + mixed), state

    def step(
        self, x: torch.Tensor, state: SSMState, segment_start: Optional[torch.Tensor] = None,
        fused_step: Optional[Callable[..., torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, SSMState]:
        """One token per row: x [B, E] and the state before it -> (output [B, E], state after it).
        ``fused_step``: see :meth:`apps.attamba.ssm.KVSSM.step` (it updates ``state`` in place)."""
        mixed, state = self.mixer.step(self.mixer_norm(x), state, segment_start, fused_step)
        return self._mlp(x + mixed), state

    @torch.no_grad()
    def reset_parameters(self, init_std: float, out_std: float) -> None:
        self.mixer.reset_parameters()
        # As Mamba2 does (rescale_prenorm_residual): shrink the branch's output projection with the
        # number of residual branches, so the residual stream's variance does not grow with depth.
        branches = 2 if self.feed_forward is not None else 1
        self.mixer.out_proj.weight.div_(math.sqrt(branches * self.n_layers))
        self.mixer_norm.reset_parameters()
        if self.feed_forward is not None:
            self.feed_forward.reset_parameters(init_std, out_std)
            self.ffn_norm.reset_parameters()


def document_starts(doc_ids: Optional[torch.Tensor], batch: int, n: int, device) -> torch.Tensor:
    """[B, n] bool: position 0 and the first token of every packed document (doc_ids [B, n])."""
    no_boundaries = torch.zeros(1, n, dtype=torch.bool, device=device)
    return segment_starts(no_boundaries, doc_ids).expand(batch, -1)


class MambaLM(LanguageModelBase):
    """Mamba2 language model; the registry's contract (see lingua.registry)."""

    def __init__(self, args: MambaArgs):
        super().__init__(args, [MambaBlock(args) for _ in range(args.n_layers)])

    def hidden_states(self, tokens: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, n] (doc_ids [B, n] numbers packed documents) -> final normed states [B, n, E]."""
        batch, n = tokens.shape
        segment_start = document_starts(doc_ids, batch, n, tokens.device)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, segment_start)
        return self.norm(x)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight, plus the scan: per state entry (hidden × D_S
        per layer) a decay multiply, the input outer product (2) and the readout (2), ×3 for the
        backward. Independent of ``seq_len``: the recurrence costs the same at every position."""
        args = self.args
        scan = 3 * 5 * args.hidden_dim * args.state_dim * args.n_layers
        return float(6 * self.num_params(exclude_embeddings=True) + scan)
