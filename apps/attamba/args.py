"""Attamba's config: the shared transformer sizes plus chunking, attention and KV-SSM settings.

Every value is checked when the config is built, so a bad setting stops the run before any work
with a message naming the key. Evaluation may use other chunking than training (``eval_*``);
the model switches between the two with ``model.train()`` / ``model.eval()``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from apps.attamba.chunking import STRATEGIES, Chunking, LeadingTokens
from apps.attamba.ssm import SSMArgs
from lingua.transformer import BaseTransformerArgs

ATTN_IMPLS = ("auto", "triton", "flex", "sdpa_gathered", "sdpa_dense", "reference")


def parse_leading_tokens(value: Any, key: str) -> LeadingTokens:
    """16, "16" -> 16; "chunk" -> "chunk"; anything else is an error naming ``key``."""
    if isinstance(value, str) and value.strip().lower() == "chunk":
        return "chunk"
    if isinstance(value, bool):  # bool is an int subclass; True is not a window size
        raise ValueError(f"model.{key} must be an integer >= 1 or 'chunk', got {value!r}")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"model.{key} must be an integer >= 1 or 'chunk', got {value!r}")
    tokens = value
    if tokens < 1:
        raise ValueError(f"model.{key} must be >= 1 (or 'chunk'), got {tokens}")
    return tokens


@dataclass
class SSMFields:
    """A Mamba2 mixer's settings (apps.attamba.ssm.SSMArgs) as flat ``model.*`` keys, with
    SSMArgs' defaults; shared by every model args class that builds KV-SSMs."""

    state_dim: int = SSMArgs.state_dim
    """SSM state size D_S per head."""
    ssm_heads: int = SSMArgs.ssm_heads
    ssm_hidden_dim: Optional[int] = SSMArgs.ssm_hidden_dim
    """Inner width of the SSM; None lets the SSM choose (see SSMArgs)."""
    ssm_n_groups: int = SSMArgs.n_groups
    """Groups sharing B and C across SSM heads."""
    conv_size: int = SSMArgs.conv_size
    dt_bias: bool = SSMArgs.dt_bias
    A_init_min: float = SSMArgs.A_init_min
    A_init_max: float = SSMArgs.A_init_max
    dt_min: float = SSMArgs.dt_min
    dt_max: float = SSMArgs.dt_max
    dt_init_floor: float = SSMArgs.dt_init_floor
    ssm_impl: str = SSMArgs.impl
    """The SSM kernel, see SSMArgs.impl."""

    ssm_renamed: ClassVar[dict[str, str]] = {"n_groups": "ssm_n_groups", "impl": "ssm_impl"}
    """SSMArgs fields whose flat twin has an ``ssm_`` prefix (the bare name would be ambiguous)."""

    def ssm_args(self) -> SSMArgs:
        """These settings as an ``apps.attamba.ssm.SSMArgs``."""
        return SSMArgs(**{field.name: getattr(self, self.ssm_renamed.get(field.name, field.name)) for field in dataclasses.fields(SSMArgs)})

    def check_ssm_fields(self) -> None:
        """Raise SSMArgs' error for a bad setting, naming the ``model.*`` key."""
        try:
            self.ssm_args()
        except ValueError as error:
            message = str(error)
            for name, flat in self.ssm_renamed.items():
                message = message.replace(f"ssm.{name}", f"model.{flat}")
            raise ValueError(message.replace("ssm.", "model.")) from None


@dataclass
class AttambaArgs(SSMFields, BaseTransformerArgs):
    """Attamba: attention over chunk-boundary KV-SSM states plus a window of recent tokens.

    The KV-SSM (a Mamba2 mixer per K and per V in every layer) takes its settings from SSMFields.
    """

    attn_impls: ClassVar[tuple[str, ...]] = ATTN_IMPLS

    # Chunking (training).
    token_chunk: int = 8
    """Chunk size P: tokens compressed into one boundary key/value."""
    chunk_count: Optional[int] = None
    """Chunks per sequence C (Attamba-Linear): P = ceil(n / C) for a sequence of n tokens.
    Overrides token_chunk when set."""
    leading_tokens: Any = 16
    """Window L of most recent tokens attended in full (the query included): an integer >= 1, or
    'chunk' for the current partial chunk. (The seed's window was L+1 tokens, t-L..t.)"""
    chunk_strategy: str = "cyclic"
    """'uniform', 'cyclic' (layers shift their chunks), 'random' (i.i.d. lengths in 1..2P-1),
    'fattn' or 'fssm' (boundaries from layer 0's attention; training-time ablations)."""

    # Chunking at evaluation: None keeps the training value.
    eval_token_chunk: Optional[int] = None
    """Chunk size P at evaluation; setting it drops a training chunk_count."""
    eval_chunk_count: Optional[int] = None
    """Chunk count C at evaluation; takes precedence over eval_token_chunk."""
    eval_chunk_strategy: Optional[str] = None
    eval_leading_tokens: Any = None
    random_seed: int = 0
    """Fixes evaluation's random chunks (training draws them from the run's seeded global RNG)."""

    # Attention and KV-SSM structure.
    pseudo_chunk: bool = False
    """Attend every earlier token (plain causal) while the SSMs still reset at chunk boundaries."""
    kv_proj: bool = False
    """Feed x·W_k and x·W_v to the K and V SSMs instead of x."""
    residual_ssm: bool = True
    """k = input + SSM_K(input) (and so for v); off: k = SSM_K(input)."""
    fssm_split_count: Optional[int] = None
    """'fssm': how many chunks to split in two; None splits half of them."""
    attn_impl: str = "auto"
    """'auto' (triton on CUDA, sdpa_gathered on CPU), 'triton' (Triton kernels for periodic
    boundaries, flex for the others), 'flex' (gathered keys, FlexAttention),
    'sdpa_gathered' (gathered keys, materialized mask; trains on CPU), 'sdpa_dense' (full-length
    boolean mask, the seed's way) or 'reference' (naive softmax; for tests)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention_dim != self.dim:
            raise ValueError(
                f"model.attn_dim={self.attn_dim}: Attamba's keys are x + SSM(x), of width model.dim={self.dim}, "
                "so the attention width must equal dim (leave attn_dim null)"
            )
        if self.kv_heads != self.n_heads:
            raise ValueError(f"model.n_kv_heads={self.n_kv_heads}: Attamba has no grouped-query attention; leave it null")
        if self.sliding_window is not None:
            raise ValueError("model.sliding_window is a transformer setting; Attamba's window is model.leading_tokens")
        self.leading_tokens = parse_leading_tokens(self.leading_tokens, "leading_tokens")
        if self.eval_leading_tokens is not None:
            self.eval_leading_tokens = parse_leading_tokens(self.eval_leading_tokens, "eval_leading_tokens")
        self._check_chunk_size("token_chunk", self.token_chunk)
        self._check_chunk_size("chunk_count", self.chunk_count)
        self._check_chunk_size("eval_token_chunk", self.eval_token_chunk)
        self._check_chunk_size("eval_chunk_count", self.eval_chunk_count)
        self._check_strategy("chunk_strategy", self.chunk_strategy)
        if self.eval_chunk_strategy is not None:
            self._check_strategy("eval_chunk_strategy", self.eval_chunk_strategy)
        if self.fssm_split_count is not None and self.fssm_split_count < 1:
            raise ValueError(f"model.fssm_split_count must be >= 1 or null, got {self.fssm_split_count}")
        self.check_ssm_fields()

    def _check_chunk_size(self, name: str, value: Optional[int]) -> None:
        if value is None:
            return
        if value < 1:
            raise ValueError(f"model.{name} must be >= 1, got {value}")
        if value > self.max_seqlen:
            raise ValueError(f"model.{name}={value} is larger than model.max_seqlen={self.max_seqlen}")

    @staticmethod
    def _check_strategy(name: str, value: str) -> None:
        if value not in STRATEGIES:
            raise ValueError(f"model.{name} must be one of {STRATEGIES}, got '{value}'")

    def chunking(self, training: bool) -> Chunking:
        """The chunking setting in force when training (``training=True``) or evaluating."""
        train = Chunking(self.chunk_strategy, self.token_chunk, self.chunk_count, self.leading_tokens)
        if training:
            return train
        if self.eval_chunk_count is not None:
            token_chunk, chunk_count = train.token_chunk, self.eval_chunk_count
        elif self.eval_token_chunk is not None:
            token_chunk, chunk_count = self.eval_token_chunk, None
        else:
            token_chunk, chunk_count = train.token_chunk, train.chunk_count
        return Chunking(
            strategy=self.eval_chunk_strategy or train.strategy,
            token_chunk=token_chunk,
            chunk_count=chunk_count,
            leading_tokens=self.eval_leading_tokens if self.eval_leading_tokens is not None else train.leading_tokens,
        )
