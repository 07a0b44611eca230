"""The transformer KV-cache: prefill + step-by-step decode gives the full forward pass's logits."""

from __future__ import annotations

import pytest
import torch

from apps.main.cache import forward_cached, new_cache
from lingua.kv_cache import KVSlots
from apps.main.model import TransformerArgs, TransformerLM
from lingua.generate import cache_support, prefill_decode_logits

VOCAB = 40


def tiny_transformer(sliding_window=None, n_kv_heads=None, seed=0) -> TransformerLM:
    torch.manual_seed(seed)
    args = TransformerArgs(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=VOCAB, multiple_of=16,
        sliding_window=sliding_window, max_seqlen=64,
    )
    model = TransformerLM(args)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("sliding_window", [None, 3, 20])
@pytest.mark.parametrize("prefix", [1, 5, 12])
def test_prefill_then_decode_equals_full_forward(sliding_window, prefix):
    model = tiny_transformer(sliding_window, n_kv_heads=2)
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cached = prefill_decode_logits(model, tokens, torch.tensor([prefix, prefix]))
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_batch_of_prompts_of_different_lengths(sliding_window):
    model = tiny_transformer(sliding_window)
    tokens = torch.randint(0, VOCAB, (3, 14))
    lengths = torch.tensor([2, 9, 6])
    with torch.no_grad():
        full = model(tokens)
        cached = prefill_decode_logits(model, tokens, lengths)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)


def test_prefill_continues_a_filled_cache():
    """Two prefills in a row (a chunked prompt) equal one pass, also through the window's ring."""
    model = tiny_transformer(sliding_window=3)
    tokens = torch.randint(0, VOCAB, (2, 11))
    cache = new_cache(model, 2, 11, "cpu", torch.float32)
    with torch.no_grad():
        first = forward_cached(model, tokens[:, :4], cache)
        second = forward_cached(model, tokens[:, 4:], cache)
        full = model(tokens)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_entries_count_after_n_tokens(sliding_window):
    model = tiny_transformer(sliding_window)
    cache = new_cache(model, 2, 10, "cpu", torch.float32)
    tokens = torch.randint(0, VOCAB, (2, 10))
    lengths = torch.tensor([2, 5])
    with torch.no_grad():
        forward_cached(model, tokens[:, :5], cache, lengths)
        for n in range(6, 11):
            forward_cached(model, tokens[:, n - 1 : n], cache)
            seen = lengths + (n - 5)
            expected = seen.clamp(max=sliding_window) if sliding_window else seen
            assert cache.entries_per_layer().tolist() == [expected.tolist()] * 2
    slots = 3 if sliding_window else 10
    assert cache.nbytes() == 2 * 2 * (2 * 4 * slots * 8 * 4)  # layers × (k, v) × B·H·slots·d·fp32


def test_ring_write_keeps_the_newest_positions():
    slots = KVSlots.empty(batch=2, kv_heads=1, slots=3, head_dim=1, device="cpu", dtype=torch.float32)
    values = torch.arange(7, dtype=torch.float32).view(1, 1, 7, 1).expand(2, 1, 7, 1)
    slots.write_many(values, values, start=torch.tensor([0, 0]), lengths=torch.tensor([7, 2]))
    # Row 0 keeps positions 4, 5, 6 in slots 1, 2, 0; row 1 keeps 0 and 1 and an empty slot.
    assert slots.positions.tolist() == [[6, 4, 5], [0, 1, -1]]
    assert slots.k[0, 0, :, 0].tolist() == [6.0, 4.0, 5.0]
    slots.write_one(values[:, :, :1] + 10, values[:, :, :1] + 10, position=torch.tensor([7, 2]))
    assert slots.positions.tolist() == [[6, 7, 5], [0, 1, 2]]


def test_overflowing_the_cache_is_an_error():
    model = tiny_transformer()
    cache = new_cache(model, 1, 4, "cpu", torch.float32)
    with torch.no_grad():
        forward_cached(model, torch.zeros(1, 4, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="max_len=4 is full"):
            forward_cached(model, torch.zeros(1, 1, dtype=torch.long), cache)


def test_bad_lengths_are_rejected():
    model = tiny_transformer()
    cache = new_cache(model, 2, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="lengths must lie in 0..3"):
        forward_cached(model, torch.zeros(2, 3, dtype=torch.long), cache, torch.tensor([1, 4]))


def test_transformer_registers_its_cache():
    support = cache_support(tiny_transformer())
    assert support is not None and support.forward_cached is forward_cached


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_pretend_filled_lays_out_the_cache_like_a_prefill(sliding_window):
    model = tiny_transformer(sliding_window)
    prefilled, pretended = (new_cache(model, 2, 12, "cpu", torch.float32) for _ in range(2))
    with torch.no_grad():
        forward_cached(model, torch.randint(0, VOCAB, (2, 7)), prefilled)
    pretended.pretend_filled(7)
    for real, fake in zip(prefilled.layers, pretended.layers):
        assert torch.equal(real.positions, fake.positions)
    assert pretended.entries_per_layer().tolist() == prefilled.entries_per_layer().tolist()


def test_cuda_kernels_resolve_only_for_cuda_devices_that_import_them():
    from lingua.kv_cache import attend_slots, cuda_kernel

    assert cuda_kernel("cpu", "lingua.kv_cache", "attend_slots") is None
    assert cuda_kernel("cuda:0", "lingua.kv_cache", "attend_slots") is attend_slots
    assert cuda_kernel("cuda", "lingua.no_such_kernel_module", "run") is None  # e.g. no Triton
