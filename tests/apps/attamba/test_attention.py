"""Every attention backend against the materialized-mask reference, and the reference against the
definition: query t attends key j iff j <= t, same document, and (t - L < j or j ends a chunk)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from apps.attamba.attention import (
    attamba_attention,
    attention_key_mass,
    block_mask_for,
    gathered_layout,
    reference_mask,
)
from apps.attamba.chunking import periodic_boundaries, random_boundaries

N = 29
DOCS = torch.tensor([[0] * 9 + [1] * 20, [0] * 17 + [1] * 3 + [2] * 9])


def boundaries_of(kind: str, chunk_size: int, batch: int = 2):
    if kind == "uniform":
        return periodic_boundaries(N, chunk_size, 0)
    if kind == "cyclic":
        return periodic_boundaries(N, chunk_size, chunk_size // 2)
    return random_boundaries(batch, N, chunk_size, torch.Generator().manual_seed(chunk_size))


def pairs_by_definition(is_boundary, leading_tokens, doc_ids, causal: bool) -> set:
    """(row, t, j) allowed, written straight from DESIGN.md with Python loops."""
    allowed = set()
    for row in range(2):
        ends = is_boundary[min(row, is_boundary.shape[0] - 1)].tolist()
        docs = doc_ids[row].tolist() if doc_ids is not None else [0] * N
        for t in range(N):
            if leading_tokens == "chunk":
                window_start = max([j + 1 for j in range(t) if ends[j]], default=0)
            else:
                window_start = t - leading_tokens + 1
            for j in range(t + 1):
                in_window = j >= window_start
                if docs[j] == docs[t] and (causal or in_window or ends[j]):
                    allowed.add((row, t, j))
    return allowed


def mask_pairs(mask: torch.Tensor) -> set:
    mask = mask[:, 0].expand(2, -1, -1)
    return {tuple(index) for index in mask.nonzero().tolist()}


def gathered_pairs(layout) -> list:
    """(row, t, key position) of every allowed slot of [K_c ; K], duplicates kept."""
    mask = layout.dense_mask(torch.device("cpu"))[:, 0].expand(2, -1, -1)
    positions = layout.key_positions(torch.device("cpu")).expand(2, -1)
    return [(row, t, positions[row, slot].item()) for row, t, slot in mask.nonzero().tolist()]


CASES = [
    ("uniform", 4, 3, None, False),
    ("uniform", 4, 1, DOCS, False),
    ("cyclic", 8, 5, DOCS, False),
    ("cyclic", 3, "chunk", None, False),
    ("random", 4, 2, DOCS, False),
    ("random", 3, "chunk", DOCS, False),
    ("uniform", 1, 1, None, False),
    ("cyclic", 8, 16, DOCS, True),  # pseudo-chunking
    ("uniform", 4, 64, None, False),  # window longer than the sequence
]


@pytest.mark.parametrize("kind,chunk_size,leading_tokens,doc_ids,causal", CASES)
def test_reference_mask_matches_the_definition(kind, chunk_size, leading_tokens, doc_ids, causal):
    boundaries = boundaries_of(kind, chunk_size)
    mask = reference_mask(boundaries, leading_tokens, doc_ids, N, causal)
    expected = pairs_by_definition(boundaries.is_boundary, leading_tokens, doc_ids, causal)
    assert mask_pairs(mask) == expected


@pytest.mark.parametrize("kind,chunk_size,leading_tokens,doc_ids,causal", [c for c in CASES if not c[4]])
def test_gathered_layout_attends_exactly_the_reference_pairs_once(kind, chunk_size, leading_tokens, doc_ids, causal):
    boundaries = boundaries_of(kind, chunk_size)
    layout = gathered_layout(boundaries, leading_tokens, doc_ids, N)
    pairs = gathered_pairs(layout)
    assert len(pairs) == len(set(pairs)), "a key position is attended twice (compressed and in the window)"
    assert set(pairs) == mask_pairs(reference_mask(boundaries, leading_tokens, doc_ids, N))


@pytest.mark.parametrize("impl", ["sdpa_dense", "sdpa_gathered", "flex"])
@pytest.mark.parametrize("kind,chunk_size,leading_tokens,doc_ids,causal", CASES)
def test_backends_equal_the_reference(impl, kind, chunk_size, leading_tokens, doc_ids, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, N, 8) for _ in range(3))
    boundaries = boundaries_of(kind, chunk_size)
    expected = attamba_attention(q, k, v, boundaries, leading_tokens, doc_ids, "reference", causal)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        out = attamba_attention(q, k, v, boundaries, leading_tokens, doc_ids, impl, causal)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "sdpa_dense", "sdpa_gathered"])
def test_one_token_chunks_with_one_leading_token_is_causal_attention(impl):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, N, 8) for _ in range(3))
    out = attamba_attention(q, k, v, periodic_boundaries(N, 1, 0), 1, None, impl)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "sdpa_dense", "sdpa_gathered"])
def test_pseudo_chunking_is_plain_causal_attention(impl):
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, N, 8) for _ in range(3))
    boundaries = periodic_boundaries(N, 8, 3)
    out = attamba_attention(q, k, v, boundaries, 2, None, impl, causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_gathered_sdpa_backpropagates_like_the_reference():
    torch.manual_seed(3)
    inputs = [torch.randn(2, 2, N, 8, requires_grad=True) for _ in range(3)]
    boundaries = boundaries_of("random", 4)
    grads = []
    for impl in ("reference", "sdpa_gathered"):
        out = attamba_attention(*inputs, boundaries, 3, DOCS, impl)
        grads.append(torch.autograd.grad(out.square().sum(), inputs))
    for reference, gathered in zip(*grads):
        torch.testing.assert_close(gathered, reference, atol=1e-5, rtol=1e-5)


def test_variable_boundary_counts_pad_the_compressed_keys():
    boundaries = boundaries_of("random", 4)
    counts = boundaries.is_boundary.sum(dim=1)
    assert counts[0] != counts[1]
    layout = gathered_layout(boundaries, 2, None, N)
    # Rounded up to a multiple of 128 slots, so batches share shapes (and compiled kernels).
    assert layout.compressed_count == 128
    assert (layout.positions == N).sum(dim=1).tolist() == (128 - counts).tolist()
    assert layout.gather(torch.randn(2, 1, N, 4)).shape == (2, 1, 128 + N, 4)


def test_static_block_masks_are_built_once():
    boundaries = periodic_boundaries(N, 4, 1)
    layout = gathered_layout(boundaries, 3, None, N)
    cpu = torch.device("cpu")
    assert block_mask_for(layout, boundaries, 3, None, cpu) is block_mask_for(layout, boundaries, 3, None, cpu)
    with_docs = gathered_layout(periodic_boundaries(N, 4, 1), 3, DOCS, N)
    assert with_docs.cache_key is None


def test_key_mass_is_a_distribution_over_keys():
    torch.manual_seed(4)
    q, k = torch.randn(2, 2, N, 8), torch.randn(2, 2, N, 8)
    mass = attention_key_mass(q, k, reference_mask(boundaries_of("uniform", 4), 3, DOCS, N))
    assert mass.shape == (2, N)
    torch.testing.assert_close(mass.sum(dim=1), torch.ones(2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled FlexAttention)")
@pytest.mark.parametrize("kind,leading_tokens", [("cyclic", 16), ("cyclic", "chunk"), ("random", 8)])
def test_compiled_flex_forward_and_backward_match_the_dense_mask_on_cuda(kind, leading_tokens):
    torch.manual_seed(5)
    n = 512
    inputs = [torch.randn(2, 4, n, 64, device="cuda", requires_grad=True) for _ in range(3)]
    doc_ids = torch.cumsum(torch.rand(2, n, device="cuda") < 0.01, dim=1)
    if kind == "random":
        boundaries = random_boundaries(2, n, 8, torch.Generator().manual_seed(0), "cuda")
    else:
        boundaries = periodic_boundaries(n, 8, 3, "cuda")
    results = []
    for impl in ("sdpa_dense", "flex"):
        out = attamba_attention(*inputs, boundaries, leading_tokens, doc_ids, impl)
        results.append((out, *torch.autograd.grad(out.square().sum(), inputs)))
    for dense, flex in zip(*results):
        torch.testing.assert_close(flex, dense, atol=2e-3, rtol=2e-3)
