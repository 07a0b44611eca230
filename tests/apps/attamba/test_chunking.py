"""Chunk boundaries of every strategy, segment starts and window starts."""

import torch

from apps.attamba.chunking import (
    Chunking,
    LayerBoundaries,
    cyclic_offset,
    periodic_boundaries,
    random_boundaries,
    seeded_random_boundaries,
    segment_starts,
    split_top_chunks,
    top_key_boundaries,
    window_starts,
)


def boundary_positions(boundaries: LayerBoundaries, row: int = 0) -> list[int]:
    return boundaries.is_boundary[row].nonzero().flatten().tolist()


def test_uniform_boundaries_end_every_chunk_of_p():
    assert boundary_positions(periodic_boundaries(13, 4, 0)) == [3, 7, 11]
    assert boundary_positions(periodic_boundaries(5, 1, 0)) == [0, 1, 2, 3, 4]


def test_cyclic_offsets_spread_when_p_is_smaller_than_the_layer_count():
    # The seed's min(P-1, l*floor(P/N)) gives offset 0 to all 8 layers here.
    offsets = [cyclic_offset(layer, 8, 4) for layer in range(8)]
    assert offsets == [0, 0, 1, 1, 2, 2, 3, 3]


def test_cyclic_offsets_spread_when_p_is_at_least_the_layer_count():
    assert [cyclic_offset(layer, 4, 8) for layer in range(4)] == [0, 2, 4, 6]
    assert [cyclic_offset(layer, 4, 4) for layer in range(4)] == [0, 1, 2, 3]


def test_cyclic_boundaries_shift_with_the_offset():
    # Offset o moves every boundary o positions earlier: (t + 1 + o) mod P == 0.
    assert boundary_positions(periodic_boundaries(16, 8, 2)) == [5, 13]
    assert boundary_positions(periodic_boundaries(16, 8, 7)) == [0, 8]


def test_random_chunk_lengths_lie_in_one_to_two_p_minus_one():
    chunk_size, n = 6, 4000
    boundaries = random_boundaries(3, n, chunk_size, torch.Generator().manual_seed(0))
    for row in range(3):
        ends = torch.tensor(boundary_positions(boundaries, row))
        lengths = torch.diff(ends, prepend=torch.tensor([-1]))
        assert lengths.min() >= 1 and lengths.max() <= 2 * chunk_size - 1
        assert abs(lengths.float().mean().item() - chunk_size) < 0.5
        assert set(lengths.tolist()) == set(range(1, 2 * chunk_size))
    # Rows draw their own chunks.
    assert not torch.equal(boundaries.is_boundary[0], boundaries.is_boundary[1])


def test_training_random_chunks_are_fresh_each_draw():
    generator = torch.Generator().manual_seed(0)
    first = random_boundaries(2, 64, 4, generator).is_boundary
    second = random_boundaries(2, 64, 4, generator).is_boundary
    assert not torch.equal(first, second)


def test_eval_random_chunks_are_reproducible_and_prefix_stable():
    a = seeded_random_boundaries(200, 8, seed=3, layer=1).is_boundary
    assert torch.equal(a, seeded_random_boundaries(200, 8, seed=3, layer=1).is_boundary)
    assert torch.equal(a[:, :37], seeded_random_boundaries(37, 8, seed=3, layer=1).is_boundary)
    assert not torch.equal(a, seeded_random_boundaries(200, 8, seed=3, layer=2).is_boundary)
    assert not torch.equal(a, seeded_random_boundaries(200, 8, seed=4, layer=1).is_boundary)


def test_chunk_count_sets_p_from_the_sequence_length():
    chunking = Chunking("uniform", token_chunk=8, chunk_count=4, leading_tokens=16)
    assert chunking.chunk_size(100) == 25
    assert chunking.chunk_size(101) == 26
    assert len(boundary_positions(periodic_boundaries(100, chunking.chunk_size(100), 0))) == 4
    assert Chunking("uniform", 8, None, 16).chunk_size(100) == 8


def test_segment_starts_after_boundaries_and_at_document_starts():
    boundaries = periodic_boundaries(10, 4, 0).is_boundary  # ends at 3 and 7
    doc_ids = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    starts = segment_starts(boundaries, doc_ids)
    assert starts[0].nonzero().flatten().tolist() == [0, 4, 5, 8]
    assert segment_starts(boundaries)[0].nonzero().flatten().tolist() == [0, 4, 8]


def test_periodic_tables_are_built_once_and_usable_after_inference_mode():
    with torch.inference_mode():
        first = periodic_boundaries(30, 8, 3)
    again = periodic_boundaries(30, 8, 3)
    assert again.is_boundary is first.is_boundary and not first.is_boundary.is_inference()
    assert again.is_boundary[0].nonzero().flatten().tolist() == [4, 12, 20, 28]
    starts = first.segment_starts()
    assert starts is again.segment_starts() and not starts.is_inference()
    assert torch.equal(starts, segment_starts(first.is_boundary))
    assert periodic_boundaries(30, 8, 2).is_boundary[0].nonzero().flatten().tolist() == [5, 13, 21, 29]


def test_chunk_window_starts_after_the_last_earlier_boundary():
    boundaries = random_boundaries(2, 50, 4, torch.Generator().manual_seed(1))
    starts = window_starts(boundaries, "chunk", 50)
    for row in range(2):
        ends = boundary_positions(boundaries, row)
        for t in range(50):
            expected = max([b + 1 for b in ends if b < t], default=0)
            assert starts[row, t] == expected
    assert window_starts(boundaries, 3, 50)[0, :4].tolist() == [-2, -1, 0, 1]


def test_fattn_picks_the_heaviest_keys():
    key_mass = torch.tensor([[0.1, 0.5, 0.0, 0.3, 0.1], [0.9, 0.0, 0.0, 0.0, 0.1]])
    chosen = top_key_boundaries(key_mass, 2)
    assert chosen.is_boundary.sum(dim=1).tolist() == [2, 2]
    assert boundary_positions(chosen, 0) == [1, 3]
    assert boundary_positions(chosen, 1) == [0, 4]


def test_fssm_splits_the_chunks_whose_boundaries_get_most_attention():
    uniform = periodic_boundaries(24, 8, 0)  # ends 7, 15, 23
    key_mass = torch.zeros(2, 24)
    key_mass[0, 15], key_mass[1, 7], key_mass[1, 23] = 1.0, 1.0, 0.5
    split = split_top_chunks(uniform, key_mass, 1)
    assert boundary_positions(split, 0) == [7, 11, 15, 23]
    split = split_top_chunks(uniform, key_mass, 2)
    assert boundary_positions(split, 1) == [3, 7, 15, 19, 23]
    assert split.is_boundary.sum(dim=1).tolist() == [5, 5]
