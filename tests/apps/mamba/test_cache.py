"""The Mamba2 recurrent cache: prefill + step-by-step decode gives the full forward pass's logits."""

from __future__ import annotations

import pytest
import torch

from apps.mamba.cache import forward_cached, new_cache
from apps.mamba.model import MambaLM
from lingua.generate import GenerateArgs, cache_support, generate_tokens, prefill_decode_logits
from tests.apps.mamba.test_model import VOCAB, tiny_mamba


def eval_mamba(**overrides) -> MambaLM:
    return tiny_mamba(**overrides).eval()


@pytest.mark.parametrize("mlp", [False, True])
@pytest.mark.parametrize("prefix", [1, 5, 12])
def test_prefill_then_decode_equals_full_forward(mlp, prefix):
    model = eval_mamba(mlp=mlp)
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cached = prefill_decode_logits(model, tokens, torch.tensor([prefix, prefix]))
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("conv_size", [1, 4])
def test_batch_of_prompts_of_different_lengths(conv_size):
    model = eval_mamba(conv_size=conv_size)
    tokens = torch.randint(0, VOCAB, (4, 14))
    lengths = torch.tensor([2, 9, 6, 14])
    with torch.no_grad():
        full = model(tokens)
        cached = prefill_decode_logits(model, tokens, lengths)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)


def test_prefill_continues_a_filled_cache_row_by_row():
    """A second prefill with different lengths per row advances each row by its own length."""
    model = eval_mamba()
    tokens = torch.randint(0, VOCAB, (2, 11))
    cache = new_cache(model, 2, 11, "cpu", torch.float32)
    with torch.no_grad():
        full = model(tokens)
        first = forward_cached(model, tokens[:, :4], cache, torch.tensor([4, 2]))
        # Row 1 continues at position 2: its next tokens are columns 2.. of the original row.
        second_tokens = torch.stack([tokens[0, 4:9], tokens[1, 2:7]])
        second = forward_cached(model, second_tokens, cache, torch.tensor([5, 3]))
        last = forward_cached(model, torch.stack([tokens[0, 9:10], tokens[1, 5:6]]), cache)
    assert cache.positions.tolist() == [10, 6]
    torch.testing.assert_close(first[0], full[0, :4], atol=1e-4, rtol=0)
    torch.testing.assert_close(first[1, :2], full[1, :2], atol=1e-4, rtol=0)
    torch.testing.assert_close(second[0], full[0, 4:9], atol=1e-4, rtol=0)
    torch.testing.assert_close(second[1, :3], full[1, 2:5], atol=1e-4, rtol=0)
    torch.testing.assert_close(last[:, 0], torch.stack([full[0, 9], full[1, 5]]), atol=1e-4, rtol=0)


def test_empty_prompt_rows_keep_a_zero_state():
    model = eval_mamba()
    cache = new_cache(model, 2, 8, "cpu", torch.float32)
    with torch.no_grad():
        forward_cached(model, torch.randint(0, VOCAB, (2, 5)), cache, torch.tensor([5, 0]))
    assert cache.positions.tolist() == [5, 0]
    for layer in cache.layers:
        assert layer.state.ssm[0].abs().sum() > 0
        assert not layer.state.ssm[1].any() and not layer.state.conv[1].any()


def test_cache_size_does_not_grow_with_context():
    model = eval_mamba()
    cache = new_cache(model, 2, 10, "cpu", torch.float32)
    before = cache.nbytes()
    with torch.no_grad():
        forward_cached(model, torch.randint(0, VOCAB, (2, 10)), cache)
    # Per layer: conv tail [B, 64 + 2·8 channels, 3] and state [B, 4 heads, 16, 8], fp32.
    assert cache.nbytes() == before == 2 * 4 * (2 * 80 * 3 + 2 * 4 * 16 * 8)
    assert cache.live_nbytes() == cache.nbytes()
    assert cache.entries_per_layer().tolist() == [[0, 0], [0, 0]]


def test_registered_cache_generates_like_the_full_forward_pass():
    model = eval_mamba()
    support = cache_support(model)
    assert support is not None and support.forward_cached is forward_cached
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    args = GenerateArgs(max_new_tokens=6, device="cpu")
    cached = generate_tokens(model, prompts, args)
    uncached = generate_tokens(model, prompts, GenerateArgs(max_new_tokens=6, device="cpu", use_cache=False))
    assert cached == uncached and all(len(row) == 6 for row in cached)


def test_pretend_filled_sets_positions():
    model = eval_mamba()
    cache = new_cache(model, 3, 16, "cpu", torch.float32)
    cache.pretend_filled(7)
    assert cache.positions.tolist() == [7, 7, 7] and cache.horizon == 7
    with torch.no_grad():
        logits = forward_cached(model, torch.zeros(3, 1, dtype=torch.long), cache)
    assert logits.shape == (3, 1, VOCAB) and cache.positions.tolist() == [8, 8, 8]
