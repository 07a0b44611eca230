"""Attamba's cache: prefill + step-by-step decode equals the full forward pass, and holds exactly
the compressed boundaries plus the window (DESIGN.md, "Inference cache")."""

from __future__ import annotations

import shutil

import pytest
import torch

from apps.attamba.args import AttambaArgs
from apps.attamba.cache import SLOT_ALIGNMENT, forward_cached, new_cache
from apps.attamba.model import AttambaLM
from apps.main.cache import new_cache as new_transformer_cache
from apps.main.model import TransformerArgs, TransformerLM
from lingua.generate import GenerateArgs, cache_support, generate_tokens, prefill_decode_logits

VOCAB = 40
SIZES = dict(dim=32, n_heads=4, vocab_size=VOCAB, multiple_of=16, max_seqlen=64)


def tiny_attamba(seed: int = 0, **overrides) -> AttambaLM:
    torch.manual_seed(seed)
    settings = dict(n_layers=3, state_dim=8, ssm_heads=2, ssm_impl="torch", **SIZES)
    settings.update(overrides)
    model = AttambaLM(AttambaArgs(**settings))
    model.init_weights()
    return model.eval()


def assert_decode_matches_forward(model, n: int, lengths: list[int], device: str = "cpu") -> None:
    tokens = torch.randint(0, VOCAB, (len(lengths), n)).to(device)
    with torch.no_grad():
        full = model(tokens)
    cached = prefill_decode_logits(model, tokens, torch.tensor(lengths, device=device))
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)


# Prompts of 1, 6 and 19 tokens: shorter and longer than every P, and than L except L=16 for 6.
MIXED_LENGTHS = [1, 6, 19]


@pytest.mark.parametrize(
    "strategy,chunk,leading",
    [
        ("uniform", 4, 3),
        ("uniform", 8, "chunk"),
        ("cyclic", 1, 1),
        ("cyclic", 4, 3),
        ("cyclic", 4, 16),
        ("cyclic", 8, 16),
        ("cyclic", 8, "chunk"),
        ("random", 1, 3),
        ("random", 4, 1),
        ("random", 4, "chunk"),
        ("random", 8, 16),
    ],
)
def test_prefill_then_decode_equals_full_forward(strategy, chunk, leading):
    model = tiny_attamba(chunk_strategy=strategy, token_chunk=chunk, leading_tokens=leading)
    assert_decode_matches_forward(model, n=22, lengths=MIXED_LENGTHS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy,chunk,leading", [("cyclic", 4, 3), ("random", 8, "chunk")])
def test_decode_on_cuda_equals_full_forward(strategy, chunk, leading):
    """On CUDA the decode step runs the Triton recurrence (apps.attamba.ssm_step_triton)."""
    # Head dim 16: compiled FlexAttention (the forward's attention on CUDA) needs at least 16.
    model = tiny_attamba(chunk_strategy=strategy, token_chunk=chunk, leading_tokens=leading, dim=64, ssm_impl="triton").cuda()
    assert model.layers[0].attention.ssm_k.impl == "triton"
    assert_decode_matches_forward(model, n=22, lengths=MIXED_LENGTHS, device="cuda")


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pseudo_chunk=True, token_chunk=4, leading_tokens=3),
        dict(kv_proj=True, residual_ssm=False, token_chunk=4, leading_tokens=3),
        dict(chunk_count=3, leading_tokens=2),  # Attamba-Linear: P = ceil(max_len / 3)
        dict(token_chunk=8, eval_token_chunk=4, eval_leading_tokens="chunk", eval_chunk_strategy="random"),
        dict(token_chunk=4, leading_tokens=3, n_layers=2, ssm_n_groups=2, conv_size=2),
        dict(token_chunk=4, leading_tokens=3, n_layers=2, ssm_hidden_dim=48, dt_bias=False),
    ],
    ids=["pseudo_chunk", "kv_proj_no_residual", "chunk_count", "eval_chunking", "groups_conv2", "wide_ssm_no_dt_bias"],
)
def test_variants_decode_like_the_full_forward(overrides):
    model = tiny_attamba(**overrides)
    if overrides.get("chunk_count"):
        # P depends on the length: decoding matches a forward pass over the cache's max_len
        # tokens, which is n only when every row's prompt has the same length.
        assert_decode_matches_forward(model, n=18, lengths=[9, 9])
    else:
        assert_decode_matches_forward(model, n=18, lengths=MIXED_LENGTHS[:2] + [12])


def test_equal_length_prompts_and_a_prefill_that_continues_the_cache():
    model = tiny_attamba(token_chunk=4, leading_tokens=3)
    tokens = torch.randint(0, VOCAB, (2, 15))
    with torch.no_grad():
        full = model(tokens)
        cache = new_cache(model, 2, 15, "cpu", torch.float32)
        parts = [forward_cached(model, tokens[:, :7], cache), forward_cached(model, tokens[:, 7:], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=0)


def design_count(model: AttambaLM, layer: int, n: int) -> int:
    """DESIGN's cache size after n tokens, from the chunking rule written out independently."""
    args, t = model.args, n - 1
    chunk = args.token_chunk
    offset = (layer * chunk // args.n_layers) % chunk if args.chunk_strategy == "cyclic" else 0
    boundaries = [p for p in range(n) if (p + 1 + offset) % chunk == 0]
    if args.leading_tokens == "chunk":
        chunk_start = max([p + 1 for p in boundaries if p < t], default=0)
        return sum(p < chunk_start for p in boundaries) + (t - chunk_start + 1)
    window = args.leading_tokens
    return sum(p <= t - window for p in boundaries) + min(window, n)


@pytest.mark.parametrize("strategy", ["uniform", "cyclic"])
@pytest.mark.parametrize("leading", [3, "chunk"])
def test_cache_holds_exactly_the_design_count(strategy, leading):
    model = tiny_attamba(chunk_strategy=strategy, token_chunk=4, leading_tokens=leading)
    lengths = torch.tensor([2, 7])
    tokens = torch.randint(0, VOCAB, (2, 30))
    cache = new_cache(model, 2, 30, "cpu", torch.float32)
    with torch.no_grad():
        forward_cached(model, tokens[:, :7], cache, lengths)
        for step in range(22):
            seen = (lengths + step).tolist()
            expected = [[design_count(model, layer, n) for n in seen] for layer in range(3)]
            assert cache.entries_per_layer().tolist() == expected
            forward_cached(model, tokens[:, step : step + 1], cache)


def test_pseudo_chunk_caches_every_token():
    model = tiny_attamba(pseudo_chunk=True, token_chunk=4, leading_tokens=3)
    cache = new_cache(model, 1, 12, "cpu", torch.float32)
    with torch.no_grad():
        forward_cached(model, torch.zeros(1, 9, dtype=torch.long), cache)
    assert cache.entries_per_layer().tolist() == [[9]] * 3


def test_cache_is_smaller_than_the_transformers():
    """At 256 tokens, P=8 and L=16 keep 32 + 16 entries per layer against the transformer's 256."""
    model = tiny_attamba(token_chunk=8, leading_tokens=16, chunk_strategy="uniform", max_seqlen=256)
    cache = new_cache(model, 1, 256, "cpu", torch.float32)
    transformer = TransformerLM(TransformerArgs(n_layers=3, **SIZES))
    baseline = new_transformer_cache(transformer, 1, 256, "cpu", torch.float32)
    entry_bytes = 2 * 32 * 4  # k and v of width 32 in fp32
    ssm = model.layers[0].attention.ssm_k
    # Per layer, K and V SSMs: conv taps [channels, conv_size - 1] and state [heads, head_dim, state_dim], fp32.
    per_ssm = ssm.conv_channels * (ssm.args.conv_size - 1) + ssm.heads * ssm.head_dim * ssm.args.state_dim
    states = 3 * 2 * per_ssm * 4
    # Allocated: 32 compressed slots, 1 trash slot and a ring of 16 per layer, padded with trash
    # slots to a multiple of SLOT_ALIGNMENT.
    slots = -(-(32 + 1 + 16) // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
    assert cache.nbytes() == 3 * slots * entry_bytes + states
    assert baseline.nbytes() == 3 * 256 * entry_bytes
    assert cache.nbytes() < baseline.nbytes() / 3


def test_whole_sequence_strategies_cannot_decode():
    for strategy in ("fattn", "fssm"):
        with pytest.raises(ValueError, match="cannot decode token by token"):
            new_cache(tiny_attamba(chunk_strategy=strategy), 1, 8, "cpu", torch.float32)


def test_training_mode_random_chunks_are_refused():
    model = tiny_attamba(chunk_strategy="random").train()
    with pytest.raises(ValueError, match="call model.eval"):
        new_cache(model, 1, 8, "cpu", torch.float32)


def test_greedy_generation_equals_recomputation():
    model = tiny_attamba(token_chunk=4, leading_tokens=3)
    assert cache_support(model).forward_cached is forward_cached
    prompts = [[1, 2, 3, 4, 5, 6], [7]]
    args = GenerateArgs(max_new_tokens=8)
    cached = generate_tokens(model, prompts, args)
    recomputed = generate_tokens(model, prompts, GenerateArgs(max_new_tokens=8, use_cache=False))
    assert cached == recomputed and all(len(row) == 8 for row in cached)


@pytest.mark.parametrize("leading", [3, "chunk"])
def test_pretend_filled_lays_out_the_cache_like_a_prefill(leading):
    model = tiny_attamba(token_chunk=4, leading_tokens=leading)
    prefilled, pretended = (new_cache(model, 2, 24, "cpu", torch.float32) for _ in range(2))
    with torch.no_grad():
        forward_cached(model, torch.randint(0, VOCAB, (2, 13)), prefilled)
    pretended.pretend_filled(13)
    for real, fake in zip(prefilled.layers, pretended.layers):
        assert torch.equal(real.positions, fake.positions)
    assert torch.equal(prefilled.positions, pretended.positions)


def _loop_bounds(generated: str) -> list[int]:
    """Trip counts of the loops in Inductor's generated C++ kernels."""
    import re

    return [int(n) for n in re.findall(r"x\d+<static_cast<int64_t>\((\d+)L\)", generated)]


@pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor's CPU backend needs a C++ compiler")
def test_compiled_cache_writes_touch_only_the_written_entries():
    """A compiled decode step updates the cache in place: no kernel runs over a whole buffer.

    scatter_ (or any write through a view) compiles to a copy of the whole KV buffer every step,
    which made a 128k-token decode step on the H100 several times slower (docs/benchmarks.md).
    """
    from torch._inductor.utils import run_and_get_code

    model = tiny_attamba(token_chunk=4, leading_tokens=3, max_seqlen=512)
    cache = new_cache(model, 2, 512, "cpu", torch.float32)
    cache.pretend_filled(300)
    layer = cache.layers[0]
    buffers = (layer.k, layer.v, cache.slot_positions)
    before = [buffer.clone() for buffer in buffers]
    t = torch.tensor([300, 303])
    assert layer.tables.is_boundary[t].tolist() == [False, True], "one row writes a boundary's compressed slot too"
    k = torch.randn(2, layer.k.shape[1], layer.k.shape[3])
    v = torch.randn_like(k)

    def step(positions: torch.Tensor) -> None:
        slots, slot_positions = cache.token_slots(positions)
        cache.write_positions(slots, slot_positions)
        layer.write_token(k, v, slots[0])

    step(t)  # eager: the expected result
    expected = [buffer.clone() for buffer in buffers]
    assert not torch.equal(expected[2], before[2])
    for buffer, old in zip(buffers, before):
        buffer.copy_(old)
    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(step, dynamic=False, fullgraph=True), t)
    for buffer, want in zip(buffers, expected):
        torch.testing.assert_close(buffer, want, atol=0, rtol=0)
    # One row of one layer's keys, or of one layer's positions: any kernel this long touches everything.
    whole_buffer = min(layer.k[0].numel(), cache.slot_positions[0].numel())
    assert max(_loop_bounds("\n".join(code))) < whole_buffer


@pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor's CPU backend needs a C++ compiler")
@pytest.mark.parametrize("name", ["attamba", "transformer"])
def test_compiled_decode_step_never_runs_over_a_whole_cache_buffer(name):
    """The whole compiled decode step (write, then attend) updates its caches in place.

    The transformer's step read its keys through a second view of the buffers it had just written
    (``KVSlots.k``, then a tensor of its own), and Inductor copied the K, V and position buffers
    every step: its
    ``compile`` decode mode was 4x slower than a CUDA graph of the eager step (docs/benchmarks.md).
    """
    from torch._inductor.utils import run_and_get_code

    max_len = 512
    if name == "attamba":
        model = tiny_attamba(token_chunk=4, leading_tokens=3, max_seqlen=max_len)
    else:
        model = TransformerLM(TransformerArgs(dim=32, n_layers=2, n_heads=2, vocab_size=VOCAB, max_seqlen=max_len)).eval()
    support = cache_support(model)
    cache = support.new_cache(model, 2, max_len, "cpu", torch.float32)
    cache.pretend_filled(300)
    cache.static_shapes = True
    cache.advance_horizon(cache.horizon + 1)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        return support.forward_cached(model, tokens, cache, None)

    torch._dynamo.reset()
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(step, dynamic=False, fullgraph=True), torch.zeros(2, 1, dtype=torch.long))
    whole_buffer = min(layer.k.numel() for layer in cache.layers)
    assert max(_loop_bounds("\n".join(code))) < whole_buffer
