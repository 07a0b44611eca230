"""Chunk boundaries: which positions END a chunk in each layer, for every chunking strategy.

A boundary is a position whose key/value (the K and V SSM states at that token) stays visible to
all later queries of its document; the SSMs reset at the first token after it. Boundaries are
boolean tensors ``is_boundary [B, n]`` where B is 1 when every row shares them.

Strategies (``chunk_size`` is P, ``n_layers`` is N):

- ``uniform``: t is a boundary iff (t + 1) mod P == 0.
- ``cyclic``: layer l shifts the grouping by o_l = floor(l·P / N) mod P; t is a boundary iff
  (t + 1 + o_l) mod P == 0. The seed's code used min(P - 1, l·floor(P / N)), which gives every
  layer offset 0 whenever P < N (floor(P / N) = 0); this formula spreads offsets for every P.
- ``random``: chunk lengths i.i.d. uniform on {1, .., 2P - 1} (mean P). Training draws fresh
  boundaries per row and batch from the model's generator; evaluation draws them once from
  ``(seed, layer)``, shared by every row, so they are reproducible and a prefix's boundaries do
  not depend on the sequence length (token-by-token decoding sees the same ones).
- ``fattn`` / ``fssm``: boundaries chosen from layer 0's attention over the whole sequence (see
  :func:`top_key_boundaries` and :func:`split_top_chunks`); training-time ablations only, since
  they look at future tokens and cannot be decoded causally.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

STRATEGIES = ("uniform", "cyclic", "random", "fattn", "fssm")
STATIC_STRATEGIES = ("uniform", "cyclic")
"""Strategies whose boundaries are a fixed function of the position (periodic)."""
WHOLE_SEQUENCE_STRATEGIES = ("fattn", "fssm")
"""Strategies that choose boundaries from attention over the whole sequence (no decoding)."""

LeadingTokens = Union[int, str]
"""A window of L >= 1 most recent tokens, or 'chunk': the current partial chunk."""


@dataclass(frozen=True)
class Chunking:
    """One complete chunking setting (the model keeps one for training and one for evaluation)."""

    strategy: str
    token_chunk: int
    """Chunk size P, used when ``chunk_count`` is None."""
    chunk_count: Optional[int]
    """Number of chunks C per sequence (Attamba-Linear): P = ceil(n / C)."""
    leading_tokens: LeadingTokens

    def chunk_size(self, n: int) -> int:
        """P for a sequence of n tokens."""
        if self.chunk_count is not None:
            return max(1, math.ceil(n / self.chunk_count))
        return self.token_chunk


@dataclass
class LayerBoundaries:
    """The chunk boundaries of one layer over one batch."""

    is_boundary: torch.Tensor
    """Bool [B or 1, n]: True where a chunk ends."""
    period: Optional[tuple[int, int]] = None
    """(P, offset) when ``is_boundary`` is the periodic pattern (t + 1 + offset) mod P == 0; lets
    attention build (and cache) its masks arithmetically instead of from the tensor."""

    def segment_starts(self, doc_starts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:func:`segment_starts` of these boundaries, with ``doc_starts`` (:func:`document_starts`
        of the packed documents, Bool [B, n]) or None; periodic boundaries read theirs from the
        table cached with ``is_boundary``. Bool [B or 1, n]."""
        if self.period is None:
            starts = segment_starts(self.is_boundary)
        else:
            starts = _periodic_table(self.is_boundary.shape[1], *self.period, self.is_boundary.device)[1]
        return starts if doc_starts is None else starts | doc_starts


def cyclic_offset(layer: int, n_layers: int, chunk_size: int) -> int:
    """o_l = floor(l·P / N) mod P: the layers' groupings are spread over the P possible shifts."""
    return (layer * chunk_size // n_layers) % chunk_size


def layer_offset(strategy: str, layer: int, n_layers: int, chunk_size: int) -> int:
    """The periodic shift of a static strategy's boundaries in ``layer`` (0 for uniform)."""
    if strategy == "cyclic":
        return cyclic_offset(layer, n_layers, chunk_size)
    if strategy == "uniform":
        return 0
    raise ValueError(f"chunk strategy '{strategy}' has no fixed offset; expected one of {STATIC_STRATEGIES}")


def is_periodic_boundary(t, chunk_size: int, offset: int):
    """Whether position(s) ``t`` (int or tensor) end a chunk of the periodic pattern."""
    return (t + 1 + offset) % chunk_size == 0


def periodic_slots(n: int, chunk_size: int, offset: int) -> tuple[int, int]:
    """(first boundary, number of boundaries) of the periodic pattern over n positions: the
    boundaries are first, first + P, first + 2P, ..."""
    first = chunk_size - 1 - offset
    return first, max(0, (n - 1 - first) // chunk_size + 1)


def periodic_boundaries(n: int, chunk_size: int, offset: int, device=None) -> LayerBoundaries:
    """Static boundaries, shared by every row: Bool [1, n]. The tensor is cached (the same for
    every call with these arguments): callers must not write into it."""
    return LayerBoundaries(_periodic_table(n, chunk_size, offset, torch.device(device or "cpu"))[0], period=(chunk_size, offset))


def _periodic_table(n: int, chunk_size: int, offset: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Traced whole (distributed.compile_scope=model), the tables become a few fused ops of the
    # graph; dynamo would trace through the cache anyway, with a warning.
    if torch.compiler.is_compiling():
        return _periodic_tables.__wrapped__(n, chunk_size, offset, device)
    return _periodic_tables(n, chunk_size, offset, device)


@functools.lru_cache(maxsize=256)
def _periodic_tables(n: int, chunk_size: int, offset: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per (n, P, offset, device) instead of by a handful of small kernels per layer and
    # step: on the GPU the training step's host time is the limit, and these were eager launches.
    # Outside inference mode, so that a table first built during evaluation can be saved for a
    # later training step's backward.
    with torch.inference_mode(False):
        is_boundary = is_periodic_boundary(torch.arange(n, device=device), chunk_size, offset)[None]
        return is_boundary, segment_starts(is_boundary)


def _lengths_to_boundaries(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """Chunk lengths [B, m] (each >= 1, m >= n so they cover n) -> Bool [B, n] boundaries."""
    ends = lengths.cumsum(dim=1) - 1  # [B, m] the last position of each chunk
    is_boundary = torch.zeros(lengths.shape[0], n + 1, dtype=torch.bool, device=lengths.device)
    # Ends past the sequence all land in the spare column n, which is dropped.
    is_boundary.scatter_(1, ends.clamp(max=n), True)
    return is_boundary[:, :n]


def longest_random_chunk(chunk_size: int) -> int:
    """The longest chunk :func:`random_boundaries` draws for mean size P: 2P - 1."""
    return 2 * chunk_size - 1


def random_boundaries(
    batch: int, n: int, chunk_size: int, generator: torch.Generator, device=None
) -> LayerBoundaries:
    """Chunk lengths i.i.d. uniform on {1..2P-1}, drawn per row from ``generator`` (on its device).

    Drawing n lengths per row always covers n positions, and because the generator yields values
    in order, a row's first m boundaries do not depend on n.
    """
    lengths = torch.randint(1, longest_random_chunk(chunk_size) + 1, (batch, n), generator=generator, device=generator.device)
    return LayerBoundaries(_lengths_to_boundaries(lengths, n).to(device))


def seeded_generator(seed: int, layer: int) -> torch.Generator:
    """A CPU generator determined by (seed, layer) alone, for reproducible evaluation boundaries."""
    digest = hashlib.sha256(f"attamba-random-chunks:{seed}:{layer}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def seeded_random_boundaries(n: int, chunk_size: int, seed: int, layer: int, device=None) -> LayerBoundaries:
    """Evaluation-time random boundaries: shared by every row, fixed by (seed, layer): Bool [1, n]."""
    return random_boundaries(1, n, chunk_size, seeded_generator(seed, layer), device)


def top_key_boundaries(key_mass: torch.Tensor, count: int) -> LayerBoundaries:
    """``fattn``: the ``count`` key positions with the largest attention mass [B, n] per row."""
    count = min(count, key_mass.shape[1])
    top = key_mass.topk(count, dim=1).indices  # [B, count]
    is_boundary = torch.zeros_like(key_mass, dtype=torch.bool).scatter_(1, top, True)
    return LayerBoundaries(is_boundary)


def split_top_chunks(uniform: LayerBoundaries, key_mass: torch.Tensor, split_count: int) -> LayerBoundaries:
    """``fssm``: split in two the ``split_count`` chunks whose boundary keys get the most attention.

    ``uniform`` are offset-0 periodic boundaries of size P, so the chunk ending at b spans
    b-P+1..b, and the split adds a boundary at b - P//2 (first half ceil(P/2) tokens long).
    Chunks of one token cannot be split; then the boundaries are returned unchanged.
    """
    chunk_size, offset = uniform.period or (0, 0)
    if chunk_size < 1 or offset != 0:
        raise ValueError("split_top_chunks needs offset-0 periodic (uniform) boundaries")
    batch = key_mass.shape[0]
    is_boundary = uniform.is_boundary.expand(batch, -1).clone()
    if chunk_size == 1 or split_count < 1:
        return LayerBoundaries(is_boundary)
    boundary_mass = key_mass.masked_fill(~is_boundary, float("-inf"))
    count = min(split_count, int(is_boundary[0].sum()))
    top = boundary_mass.topk(count, dim=1).indices  # [B, count] boundaries whose chunks split
    is_boundary.scatter_(1, top - chunk_size // 2, True)
    return LayerBoundaries(is_boundary)


def segment_starts(is_boundary: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Where the SSMs reset: position 0, the token after each boundary, each document start.

    is_boundary: Bool [B or 1, n]; doc_ids: [B, n] or None -> Bool [B or 1, n].
    """
    starts = torch.zeros_like(is_boundary)
    starts[:, 0] = True
    starts[:, 1:] = is_boundary[:, :-1]
    if doc_ids is not None:
        starts = starts | document_starts(doc_ids)
    return starts


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, n]: True where a packed document begins (position 0 included), from the
    documents' numbers [B, n]."""
    return torch.cat([torch.ones_like(doc_ids[:, :1], dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], dim=1)


def window_starts(boundaries: LayerBoundaries, leading_tokens: LeadingTokens, n: int) -> torch.Tensor:
    """First position of each query's window of full keys: Long [B or 1, n].

    With L leading tokens the window is t-L+1..t; with 'chunk' it is the current partial chunk,
    from the token after the last boundary before t up to t.
    """
    positions = torch.arange(n, device=boundaries.is_boundary.device)
    if leading_tokens != "chunk":
        return (positions - int(leading_tokens) + 1)[None]
    # Position after the latest boundary strictly before t: a running max over the boundaries.
    after_boundary = torch.where(boundaries.is_boundary, positions + 1, 0)  # [B, n]
    starts = torch.zeros_like(after_boundary)
    starts[:, 1:] = after_boundary[:, :-1].cummax(dim=1).values
    return starts
