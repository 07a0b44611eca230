"""The split-key decode attention kernel against SDPA over the materialized mask, and decoding
with it against the full forward pass. Without CUDA the kernel runs under Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import allow_one_element_index_in_interpreter

triton = pytest.importorskip("triton", reason="the decode attention kernel needs the triton package")

from lingua import decode_attention as kernel_module  # noqa: E402
from lingua.decode_attention import decode_attention  # noqa: E402
from lingua.kv_cache import EMPTY, attend_slots, visible_slots  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not kernel_module._INTERPRETED:
    pytest.skip("lingua.decode_attention was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it without CUDA)",
                allow_module_level=True)
if kernel_module._INTERPRETED:
    allow_one_element_index_in_interpreter()


def reference(q, k, v, positions, lowest, windowed_from):
    slot = torch.arange(positions.shape[1], device=positions.device)
    allowed = (positions >= 0) & torch.where(slot < windowed_from, positions < lowest[:, None], positions >= lowest[:, None])
    out = attend_slots(q, k, v, allowed[:, None])
    return torch.where(allowed.any(-1)[:, None, None, None], out, 0.0)


@pytest.mark.parametrize("slots, heads, kv_heads, head_dim, windowed_from, launch", [
    (37, 2, 2, 16, 0, {}),     # fewer keys than a block: one split
    (300, 2, 1, 24, 130, {}),  # several splits, grouped queries, a head dim that is not a power of two
    (1000, 1, 1, 8, 990, {}),  # one (row, head): many splits, most of them over compressed slots
    (300, 2, 2, 16, 100, dict(block_keys=16, num_warps=2, programs_per_sm=1)),
])
def test_decode_attention_matches_sdpa_over_the_mask(slots, heads, kv_heads, head_dim, windowed_from, launch):
    generator = torch.Generator().manual_seed(slots)
    batch = 3
    q = torch.randn(batch, heads, 1, head_dim, generator=generator).to(DEVICE)
    k, v = (torch.randn(batch, kv_heads, slots, head_dim, generator=generator).to(DEVICE) for _ in range(2))
    positions = torch.randint(0, 2000, (batch, slots), generator=generator)
    positions[torch.rand(batch, slots, generator=generator) < 0.3] = EMPTY
    positions[2] = EMPTY  # a row that sees nothing gets zeros
    positions, lowest = positions.to(DEVICE), torch.tensor([0, 1500, 0], device=DEVICE)
    expected = reference(q, k, v, positions, lowest, windowed_from)
    # Whatever a hidden slot holds, nan and inf included, must not reach the output.
    hidden = ~visible_slots(positions, lowest[:, None], windowed_from)[:, None, :, None].expand_as(k)
    k, v = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("inf"))
    got = decode_attention(q, k, v, positions, lowest, windowed_from, **launch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[2], torch.zeros_like(got[2]))


def test_decode_attention_reads_strided_views_and_keeps_the_dtype():
    generator = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 2, 80, 16, generator=generator).to(DEVICE) for _ in range(2))
    q = torch.randn(2, 2, 1, 16, generator=generator).to(DEVICE)
    positions = torch.arange(80, device=DEVICE).expand(2, 80).contiguous()
    lowest = torch.zeros(2, dtype=torch.long, device=DEVICE)
    got = decode_attention(q.half(), k[:, :, :50].half(), v[:, :, :50].half(), positions[:, :50], lowest)
    assert got.dtype == torch.float16
    expected = reference(q, k[:, :, :50], v[:, :, :50], positions[:, :50], lowest, 0)
    torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=2e-3)


def test_decode_attention_refuses_bad_shapes():
    q, k = torch.zeros(1, 2, 2, 8, device=DEVICE), torch.zeros(1, 2, 5, 8, device=DEVICE)
    positions, lowest = torch.zeros(1, 5, dtype=torch.long, device=DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="one query per row"):
        decode_attention(q, k, k, positions, lowest)
    with pytest.raises(ValueError, match="positions must be"):
        decode_attention(q[:, :, :1], k, k, positions[:, :4], lowest)
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(q[:, :, :1], k, k, positions, lowest, block_keys=48)


def test_decode_attention_op_passes_opcheck():
    q, k, v = torch.randn(1, 2, 1, 8, device=DEVICE), torch.randn(1, 2, 70, 8, device=DEVICE), torch.randn(1, 2, 70, 8, device=DEVICE)
    positions, lowest = torch.arange(70, device=DEVICE)[None], torch.tensor([3], device=DEVICE)
    torch.library.opcheck(torch.ops.lingua.decode_attention.default, (q, k, v, positions, lowest, 0, 64, 4, 4),
                          test_utils=("test_schema", "test_faketensor"))


def _attending_with_the_kernel(init):
    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.decode_attention = decode_attention

    return patched


@pytest.mark.parametrize("family", ["attamba", "transformer", "sliding_window"])
def test_decoding_with_the_kernel_equals_the_full_forward(family, monkeypatch):
    from apps.main.model import TransformerArgs, TransformerLM
    from lingua.generate import prefill_decode_logits
    from tests.apps.attamba.test_cache import VOCAB, tiny_attamba

    from apps.attamba.cache import AttambaCache
    from apps.main.cache import TransformerCache

    for cache_class in (AttambaCache, TransformerCache):  # the transformer's caches default to SDPA
        monkeypatch.setattr(cache_class, "__init__", _attending_with_the_kernel(cache_class.__init__))
    if family == "attamba":
        # Head dim 16: the full forward's compiled FlexAttention on CUDA needs at least 16.
        model = tiny_attamba(chunk_strategy="cyclic", token_chunk=4, leading_tokens=3, n_layers=2, dim=64)
    else:
        torch.manual_seed(0)
        window = 5 if family == "sliding_window" else None
        model = TransformerLM(TransformerArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                                              multiple_of=16, max_seqlen=64, sliding_window=window))
        model.init_weights()
        model.eval()
    model = model.to(DEVICE)
    tokens = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        full = model(tokens)
    cached = prefill_decode_logits(model, tokens, torch.tensor([1, 6, 13], device=DEVICE))
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
