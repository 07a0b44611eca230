"""The gathered layout's block structure from block bounds, against the mask on every pair."""

import warnings

import pytest
import torch

from apps.attamba.attention import attamba_attention, gathered_layout
from apps.attamba.chunking import periodic_boundaries, random_boundaries, window_starts
from apps.attamba.gathered_blocks import gathered_block_mask, gathered_tiles
from tests.apps.attamba.test_attention_triton import random_documents


def boundaries_of(kind: str, n: int, chunk_size: int, batch: int):
    if kind == "random":
        return random_boundaries(batch, n, chunk_size, torch.Generator().manual_seed(5))
    return periodic_boundaries(n, chunk_size, 3 % chunk_size if kind == "cyclic" else 0)


def documents(batch: int, n: int, mean: int, seed: int) -> torch.Tensor:
    return random_documents(batch, n, 2 * mean - 1, seed, device="cpu")


def tiles_of(layout, boundaries, leading_tokens, doc_ids, block_size: int):
    cpu = torch.device("cpu")
    starts = window_starts(boundaries, leading_tokens, layout.n)
    return gathered_tiles(layout.key_positions(cpu), layout.compressed_count, starts, doc_ids, block_size)


def exact_tiles(allowed: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(some pair allowed, every pair allowed) per tile of a dense Bool [B, n, kv] mask; tiles
    that stick out of the mask count as not every pair allowed."""
    batch, n, kv = allowed.shape
    pad_q, pad_k = (-n) % block_size, (-kv) % block_size
    padded = torch.nn.functional.pad(allowed.int(), (0, pad_k, 0, pad_q), value=-1)
    tiles = padded.unflatten(2, (-1, block_size)).unflatten(1, (-1, block_size)).transpose(2, 3)
    tiles = tiles.flatten(-2)  # [B, n_qb, n_kb, block²]
    return (tiles == 1).any(-1), (tiles == 1).all(-1)


LAYOUTS = [  # kind, n, P, L, mean document length (0: none)
    ("uniform", 150, 4, 8, 0),
    ("cyclic", 200, 8, 16, 40),
    ("cyclic", 203, 4, "chunk", 25),
    ("random", 180, 4, 3, 30),
    ("random", 97, 3, "chunk", 0),
    ("uniform", 260, 16, 64, 60),
    ("cyclic", 130, 1, 1, 12),
]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("kind,n,chunk_size,leading_tokens,mean_doc", LAYOUTS)
def test_tiles_bound_the_mask(kind, n, chunk_size, leading_tokens, mean_doc, block_size):
    docs = documents(2, n, mean_doc, seed=n) if mean_doc else None
    boundaries = boundaries_of(kind, n, chunk_size, 2)
    layout = gathered_layout(boundaries, leading_tokens, docs, n)
    partial, full = tiles_of(layout, boundaries, leading_tokens, docs, block_size)
    some, every = exact_tiles(layout.dense_mask(torch.device("cpu"))[:, 0], block_size)
    some, every = some.expand_as(partial), every.expand_as(partial)
    assert not (partial & full).any()
    assert not (some & ~(partial | full)).any(), "a tile with allowed pairs was skipped"
    assert not (full & ~every).any(), "a tile marked full holds a masked pair"
    # Not trivially safe: most of what the exact structure skips or takes whole, the bounds do too.
    assert (partial | full).sum() <= 1.5 * some.sum()
    if every.any():
        assert full.any()


def test_block_mask_gives_the_reference_attention():
    """FlexAttention (eager on CPU) through the bounds-built mask, at its default 128-token tiles."""
    torch.manual_seed(0)
    n = 400
    docs = documents(2, n, 90, seed=1)
    q, k, v = (torch.randn(2, 2, n, 8) for _ in range(3))
    for boundaries in (periodic_boundaries(n, 8, 5), random_boundaries(2, n, 4, torch.Generator().manual_seed(2))):
        expected = attamba_attention(q, k, v, boundaries, 16, docs, "reference")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
            out = attamba_attention(q, k, v, boundaries, 16, docs, "flex")
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_block_mask_counts_match_the_tiles():
    n = 300
    docs = documents(2, n, 70, seed=4)
    boundaries = periodic_boundaries(n, 4, 1)
    layout = gathered_layout(boundaries, 8, docs, n)
    partial, full = tiles_of(layout, boundaries, 8, docs, 128)
    mask = gathered_block_mask(
        layout.mask_mod, layout.key_positions(torch.device("cpu")), layout.compressed_count,
        window_starts(boundaries, 8, n), docs,
    )
    assert mask.kv_num_blocks[:, 0].tolist() == partial.sum(-1).tolist()
    assert mask.full_kv_num_blocks[:, 0].tolist() == full.sum(-1).tolist()
    for row in range(2):
        for q_block in range(partial.shape[1]):
            count = int(mask.kv_num_blocks[row, 0, q_block])
            chosen = mask.kv_indices[row, 0, q_block, :count].tolist()
            assert chosen == partial[row, q_block].nonzero().flatten().tolist()
