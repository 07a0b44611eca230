"""The Mamba2 baseline's config: model sizes, the Mamba2 mixer's settings, an optional MLP.

The mixer is Attamba's KV-SSM (``apps.attamba.ssm.KVSSM``) used as a whole sequence mixer, so its
settings are Attamba's flat SSM keys (``apps.attamba.args.SSMFields``: state_dim, ssm_heads,
ssm_hidden_dim, ssm_n_groups, conv_size, dt_bias, A_init_min/max, dt_min/max, dt_init_floor,
ssm_impl) with SSMArgs' defaults, except the width and heads: Mamba2 expands the inner width to
2·dim and uses heads of 64 channels. Every value is checked when the config is built, with
messages that name the ``model.*`` key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from apps.attamba.args import SSMFields
from apps.attamba.ssm import SSMArgs
from lingua.transformer import swiglu_hidden_dim

EXPAND = 2
"""Mamba2's inner width is EXPAND × dim unless ssm_hidden_dim says otherwise."""


@dataclass
class MambaArgs(SSMFields):
    """Mamba2 language model: embedding, n_layers pre-norm Mamba2 blocks, final norm, head."""

    dim: int = 512
    """Model (residual stream) width E."""
    n_layers: int = 16
    """Mamba2 blocks. With no MLP a block has about half a transformer block's parameters, so
    Mamba2 models stack twice as many."""
    vocab_size: int = 258
    """Output classes; the default fits the bytes tokenizer (256 bytes + BOS + EOS)."""
    max_seqlen: int = 1024
    """Longest sequence evaluated at once (the recurrence itself has no limit)."""
    norm_eps: float = 1e-5
    init_std: float = 0.02
    """Std of the embedding and MLP weights; the mixer has its own Mamba2-style initialisation."""
    tie_embeddings: bool = False
    """Share the output head's weight with the input embedding."""

    # The mixer: SSMFields' keys, two with Mamba2's own defaults.
    ssm_heads: int = 16
    """SSM heads, each with its own decay A and step dt; 16 gives Mamba2's head width 64 at
    dim 512."""
    ssm_hidden_dim: Optional[int] = None
    """Inner width of u, z and y; None means 2 × dim (Mamba2's expand=2)."""

    # Optional MLP (Mamba2 proper has none).
    mlp: bool = False
    """Add a SwiGLU MLP after the mixer in every block (a second pre-norm residual branch)."""
    ffn_dim_multiplier: float = 1.0
    """With mlp: the SwiGLU width is 8/3 · dim times this, rounded up to multiple_of."""
    multiple_of: int = 256

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "vocab_size", "max_seqlen", "multiple_of", "ssm_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_dim < 1 or self.hidden_dim % self.ssm_heads:
            raise ValueError(
                f"the mixer's inner width {self.hidden_dim} (model.ssm_hidden_dim, or 2 × model.dim when it "
                f"is null) must be a positive multiple of model.ssm_heads={self.ssm_heads}"
            )
        for name in ("norm_eps", "init_std", "ffn_dim_multiplier"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
        self.check_ssm_fields()

    @property
    def hidden_dim(self) -> int:
        """The mixer's inner width: ssm_hidden_dim, or 2 × dim."""
        return self.ssm_hidden_dim if self.ssm_hidden_dim is not None else EXPAND * self.dim

    @property
    def ffn_hidden_dim(self) -> int:
        return swiglu_hidden_dim(self.dim, self.ffn_dim_multiplier, self.multiple_of)

    def ssm_args(self) -> SSMArgs:
        """The mixer's settings as an ``apps.attamba.ssm.SSMArgs``, the inner width resolved."""
        return dataclasses.replace(super().ssm_args(), ssm_hidden_dim=self.hidden_dim)
