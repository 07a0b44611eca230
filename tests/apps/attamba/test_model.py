"""The Attamba language model: backends agree, gradients reach every parameter, chunking switches
between training and evaluation, fattn/fssm run, and the FLOP / KV-cache accounting."""

import warnings

import pytest
import torch

from apps.attamba import accounting
from apps.attamba.args import AttambaArgs
from apps.attamba.attention import reference_mask
from apps.attamba.attention_triton import document_bounds
from apps.attamba.chunking import periodic_boundaries, segment_starts
from apps.attamba.model import AttambaLM, _Documents
from lingua.args import build_config
from lingua.registry import get_model_spec

TINY = dict(dim=32, n_layers=2, n_heads=2, state_dim=8, ssm_heads=2, vocab_size=40, max_seqlen=64, token_chunk=4, leading_tokens=3, ssm_impl="reference")


def tiny_model(seed: int = 0, **overrides) -> AttambaLM:
    torch.manual_seed(seed)
    model = AttambaLM(build_config(AttambaArgs, {**TINY, **overrides}))
    model.init_weights()
    return model


def batch(n: int = 20, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 40, (2, n), generator=generator)
    doc_ids = torch.tensor([[0] * 10 + [1] * (n - 10), [0] * n])
    return tokens, doc_ids


def set_attention_impl(model: AttambaLM, impl: str) -> None:
    model.args.attn_impl = impl


def test_registered_under_attamba():
    spec = get_model_spec("attamba")
    assert spec.args_cls is AttambaArgs and spec.model_cls is AttambaLM


@pytest.mark.parametrize("overrides", [{}, {"chunk_strategy": "random", "leading_tokens": "chunk", "residual_ssm": False}])
def test_attention_backends_give_the_same_logits(overrides):
    model = tiny_model(**overrides)
    tokens, doc_ids = batch()
    logits = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        for impl in ("reference", "sdpa_dense", "sdpa_gathered", "flex"):
            set_attention_impl(model, impl)
            torch.manual_seed(0)  # the same random chunks for every backend
            logits[impl] = model(tokens, doc_ids)
    for impl in ("sdpa_dense", "sdpa_gathered", "flex"):
        torch.testing.assert_close(logits[impl], logits["reference"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"kv_proj": True}, {"chunk_strategy": "fssm"}])
def test_gradients_reach_every_parameter(overrides):
    model = tiny_model(attn_impl="sdpa_gathered", **overrides)
    tokens, doc_ids = batch()
    model(tokens, doc_ids).logsumexp(-1).mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_single_token_chunks_with_one_leading_token_attend_every_earlier_token():
    # P = 1, L = 1: every key is a boundary, so the mask is plain causal over the SSM keys,
    # exactly what pseudo-chunking computes with the same SSM resets.
    tokens, doc_ids = batch()
    chunked = tiny_model(token_chunk=1, leading_tokens=1)
    pseudo = tiny_model(token_chunk=1, leading_tokens=1, pseudo_chunk=True)
    with torch.no_grad():
        torch.testing.assert_close(chunked(tokens, doc_ids), pseudo(tokens, doc_ids), atol=1e-5, rtol=1e-5)


def test_pseudo_chunking_attends_beyond_the_window():
    tokens, doc_ids = batch()
    with torch.no_grad():
        chunked = tiny_model()(tokens, doc_ids)
        pseudo = tiny_model(pseudo_chunk=True)(tokens, doc_ids)
    # The first L tokens see the same keys either way; later ones do not.
    torch.testing.assert_close(chunked[:, :3], pseudo[:, :3])
    assert not torch.allclose(chunked[:, 8:], pseudo[:, 8:])


def test_documents_do_not_see_each_other():
    # Row 0 packs two documents, the second from position 10. Alone, that document starts at 0:
    # RoPE is relative, and with P = 2 its chunks line up with the packed ones.
    model = tiny_model(attn_impl="sdpa_gathered", token_chunk=2, chunk_strategy="uniform")
    tokens, doc_ids = batch()
    with torch.no_grad():
        packed = model(tokens, doc_ids)
        second_alone = model(tokens[:1, 10:], None)
    torch.testing.assert_close(packed[:1, 10:], second_alone, atol=1e-4, rtol=1e-4)


def test_layers_share_one_computation_of_the_document_bounds():
    """With the Triton attention every layer's plan carries the forward's one ``document_bounds``
    (a cummax pair a layer before), and the attention reads them from there."""
    model = tiny_model(attn_impl="triton")
    doc_ids = torch.tensor([[0] * 5 + [1] * 12 + [2] * 7, [0] * 20 + [1] * 4])
    documents = _Documents.of(doc_ids)
    plans = [model._plan(model.layer_boundaries(layer, 24, batch=2), documents, 2) for layer in range(model.args.n_layers)]
    assert all(plan.attention.periodic is not None and plan.attention.doc_bounds is documents.bounds() for plan in plans)
    for got, expected in zip(documents.bounds(), document_bounds(doc_ids)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("settings", [{"attn_impl": "flex"}, {"attn_impl": "triton", "pseudo_chunk": True}])
def test_document_bounds_are_not_computed_for_masks_the_kernels_do_not_take(settings):
    """Only the Triton kernels read the bounds: FlexAttention, and what the kernels hand to it
    (pseudo-chunking's causal mask here), leave them uncomputed."""
    model = tiny_model(**settings)
    doc_ids = torch.tensor([[0] * 5 + [1] * 12 + [2] * 7])
    documents = _Documents.of(doc_ids)
    plan = model._plan(model.layer_boundaries(0, 24), documents, 1)
    assert plan.attention.impl == "flex" and plan.attention.doc_bounds is None
    assert documents._bounds is None


@pytest.mark.parametrize("strategy", ["cyclic", "random"])
def test_layer_plans_reset_the_ssms_where_segment_starts_says(strategy):
    """The plans' cached periodic starts (and document starts shared by the layers) change nothing,
    and the boundaries' period (which the layer passes to the windowed scan to align its blocks) is a
    promise the plan's segment starts keep: a start wherever (t + offset) mod P == 0."""
    model = tiny_model(chunk_strategy=strategy)
    n = 24
    doc_ids = torch.tensor([[0] * 5 + [1] * 12 + [2] * 7, [0] * 20 + [1] * 4])
    offsets = set()
    for layer in range(model.args.n_layers):
        boundaries = model.layer_boundaries(layer, n, batch=2)
        for docs in (None, doc_ids):
            plan = model._plan(boundaries, _Documents.of(docs), 2)
            expected = segment_starts(boundaries.is_boundary, docs).expand(2, -1)
            assert torch.equal(plan.segment_start, expected)
            if strategy == "random":
                assert plan.boundaries.period is None
                continue
            period, offset = plan.boundaries.period
            assert period == model.args.token_chunk
            promised = (torch.arange(n) + offset) % period == 0
            assert plan.segment_start[:, promised].all()
            offsets.add(offset)
    assert strategy == "random" or len(offsets) == model.args.n_layers  # cyclic: one shift per layer


def test_eval_chunking_switches_with_eval_mode():
    model = tiny_model(eval_token_chunk=8, eval_chunk_strategy="uniform", eval_leading_tokens="chunk")
    assert model.chunking.token_chunk == 4 and model.chunking.strategy == "cyclic"
    model.eval()
    assert (model.chunking.token_chunk, model.chunking.strategy, model.chunking.leading_tokens) == (8, "uniform", "chunk")
    assert model.layer_boundary_offsets(64) == [0, 0]
    model.train()
    assert model.layer_boundary_offsets(64) == [0, 2]


def test_eval_random_chunks_are_reproducible_and_training_ones_fresh():
    model = tiny_model(chunk_strategy="random")
    tokens, _ = batch()
    with torch.no_grad():
        assert not torch.equal(model(tokens), model(tokens))
        model.eval()
        torch.testing.assert_close(model(tokens), model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["cyclic", "random"])
def test_boundary_position_agrees_with_layer_boundaries(strategy):
    model = tiny_model(chunk_strategy=strategy).eval()
    for layer in range(2):
        expected = model.layer_boundaries(layer, 40).is_boundary[0].tolist()
        assert [model.is_boundary_position(t, layer, 40) for t in range(40)] == expected


@pytest.mark.parametrize("strategy", ["fattn", "fssm"])
def test_attention_chosen_strategies_run_and_refuse_to_decode(strategy):
    model = tiny_model(chunk_strategy=strategy)
    tokens, doc_ids = batch()
    with torch.no_grad():
        logits = model(tokens, doc_ids)
    assert logits.shape == (2, 20, 40) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="cannot decode token by token"):
        model.check_decodable()
    with pytest.raises(ValueError, match="eval_chunk_strategy"):
        model.eval().layer_boundaries(1, 20)
    decodable = tiny_model(chunk_strategy=strategy, eval_chunk_strategy="uniform").eval()
    decodable.check_decodable()


def test_fattn_layers_get_ceil_n_over_p_boundaries(monkeypatch):
    model = tiny_model(chunk_strategy="fattn", token_chunk=5)
    seen = []
    original = type(model.layers[1].attention).forward

    def spy(self, x, cos, sin, doc_ids, plan, need_key_mass=False):
        seen.append((self.layer_id, plan.boundaries.is_boundary.sum(dim=1).tolist(), plan.attention.causal))
        return original(self, x, cos, sin, doc_ids, plan, need_key_mass)

    monkeypatch.setattr(type(model.layers[1].attention), "forward", spy)
    with torch.no_grad():
        model(*batch(n=24))
    assert seen[0][2] is True  # layer 0 attends in full
    assert [counts for layer, counts, _ in seen[1:]] == [[5, 5]]  # ceil(24 / 5)


def test_accounting_counts_what_the_mask_allows():
    n, chunk_size = 50, 4
    for leading_tokens in (3, "chunk"):
        for offset in (0, 2):
            mask = reference_mask(periodic_boundaries(n, chunk_size, offset), leading_tokens, None, n)[0, 0]
            counts = mask.sum(dim=1)
            assert [accounting.attended_keys(t, chunk_size, leading_tokens, offset) for t in range(n)] == counts.tolist()
            assert accounting.kv_cache_entries(n, chunk_size, leading_tokens, offset) == counts[-1]
            assert accounting.mean_attended_keys(n, chunk_size, leading_tokens, offset) == pytest.approx(counts.float().mean().item())


def test_flops_and_cache_shrink_against_the_transformer_budget():
    args = build_config(AttambaArgs, {"max_seqlen": 4096, "token_chunk": 8, "leading_tokens": 16})
    # ~n/P + L entries per layer instead of n.
    assert accounting.model_kv_cache_entries(args, 4096) == pytest.approx(8 * (4096 / 8 + 16), rel=0.01)
    dense = 3 * 4 * args.dim * args.n_layers * 4096 / 2
    assert accounting.attention_flops_per_token(args, 4096) < dense / 6
    model = tiny_model()
    assert model.flops_per_token(64) > 6 * model.num_params(exclude_embeddings=True)
    counts = accounting.param_counts(model)
    assert counts["total"] == model.num_params() and counts["ssm"] > 0 and counts["attention"] > 0


def test_blocks_compile_whole_with_flex_attention_and_cyclic_offsets():
    # Each layer has its own cyclic offset (a plain int) and flex block mask, built before the
    # compiled block runs; fullgraph turns a graph break into an error. Forward only: FlexAttention
    # has no CPU backward (the Triton-SSM variant in test_ssd_triton.py also checks gradients).
    model = tiny_model(n_layers=3, chunk_strategy="cyclic", attn_impl="flex", ssm_impl="torch")
    tokens, doc_ids = batch(24)
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = model(tokens, doc_ids)
        for index, block in enumerate(list(model.layers)):
            model.layers[index] = torch.compile(block, backend="aot_eager", dynamic=False, fullgraph=True)
        torch.testing.assert_close(model(tokens, doc_ids), expected, rtol=1e-5, atol=1e-5)
