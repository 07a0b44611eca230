"""Evaluation: the lm-eval adapter's log-likelihoods against direct computation, the local
WikiText task's metrics against their definitions, run_evaluation's log line and the CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer  # noqa: E402

from lingua.eval import EvalArgs, GenerationUnderFSDPError, LinguaLM, check_ready, is_sharded, main, rolling_windows, run_evaluation, task_manager  # noqa: E402
from lingua.lm_eval_tasks.wikitext_local import utils as wikitext_utils  # noqa: E402
from lingua.registry import get_model_spec  # noqa: E402
from lingua.tokenizer import ByteTokenizer  # noqa: E402

ARTICLES = [
    " = Alpha = \n \n Alpha is a letter . It comes first , before the others . \n \n"
    " = = History = = \n \n It was used in Greek @-@ speaking lands in 800 BC . \n",
    " = Beta Test = \n \n Beta is the second letter ; it is \" old \" . \n",
    " = Gamma = \n \n Gamma has 3 @,@ 000 uses , in ( physics ) too . \n",
]


def tiny_model(sliding_window=None, max_seqlen=512, seed=0):
    spec = get_model_spec("transformer")
    args = spec.args_cls(
        dim=32, n_layers=2, n_heads=2, vocab_size=258, max_seqlen=max_seqlen, multiple_of=16, sliding_window=sliding_window
    )
    torch.manual_seed(seed)
    model = spec.build(args)
    model.init_weights()
    return model.eval()


@torch.no_grad()
def direct_logprobs(model, token_ids, prefix_id=256):
    """log p(token_i | prefix, tokens before i) from ONE forward pass over the whole text."""
    inputs = torch.tensor([[prefix_id, *token_ids[:-1]]])
    log_probs = F.log_softmax(model(inputs)[0].float(), dim=-1)
    return log_probs.gather(-1, torch.tensor(token_ids)[:, None])[:, 0]


def rolling_request(text):
    return Instance("loglikelihood_rolling", {}, (text,), 0)


def write_wikitext(path: Path, articles=ARTICLES) -> Path:
    path.write_text(" \n" + "".join(articles), encoding="utf-8")
    return path


@pytest.mark.parametrize("length,max_context,stride", [(5, 8, 8), (8, 8, 8), (9, 8, 8), (40, 8, 3), (41, 8, 1), (33, 16, 5)])
def test_rolling_windows_score_every_token_once_with_left_context(length, max_context, stride):
    tokens = list(range(100, 100 + length))
    windows = rolling_windows(tokens, prefix_id=7, max_context=max_context, stride=stride)
    assert [t for w in windows for t in w.targets] == tokens
    stream = [7, *tokens]
    for window in windows:
        k, start = len(window.targets), tokens.index(window.targets[0])
        assert len(window.inputs) <= max_context
        # The inputs end right before the last target: the model predicts the targets in order.
        assert window.inputs == stream[start + k - len(window.inputs) : start + k]
        if length > max_context:
            assert len(window.inputs) == max_context  # full windows once the text is long enough
            assert len(window.inputs) - k + 1 >= min(start + 1, max_context - stride + 1)


def test_rolling_loglikelihood_of_a_short_document_is_the_direct_sum():
    model, tokenizer = tiny_model(), ByteTokenizer()
    text = "Hello world, a short document."
    lm = LinguaLM(model, tokenizer, batch_size=2, max_context=64)
    (got,) = lm.loglikelihood_rolling([rolling_request(text)])
    expected = direct_logprobs(model, tokenizer.encode(text, add_bos=False, add_eos=False)).sum().item()
    assert got == pytest.approx(expected, abs=1e-4)


def test_rolling_loglikelihood_of_long_documents_with_stride_is_the_direct_sum():
    # Two layers of a 3-token sliding window see 5 tokens back; every window of 8 with stride 3
    # gives each token at least 6, so the windowed sum equals one pass over the whole text.
    model, tokenizer = tiny_model(sliding_window=3), ByteTokenizer()
    texts = ["A longer document that spans several windows of the model.", "Short one.", "x" * 23]
    lm = LinguaLM(model, tokenizer, batch_size=3, max_context=8, rolling_stride=3)
    got = lm.loglikelihood_rolling([rolling_request(t) for t in texts])
    for text, value in zip(texts, got):
        expected = direct_logprobs(model, tokenizer.encode(text, add_bos=False, add_eos=False)).sum().item()
        assert value == pytest.approx(expected, abs=1e-4)
    # Full attention does see the missing context: windows then differ from one long pass.
    full = tiny_model()
    (windowed,) = LinguaLM(full, tokenizer, max_context=8, rolling_stride=3).loglikelihood_rolling([rolling_request(texts[0])])
    assert windowed != pytest.approx(direct_logprobs(full, list(texts[0].encode())).sum().item(), abs=1e-3)


def test_loglikelihood_scores_the_continuation_and_flags_greedy():
    model, tokenizer = tiny_model(), ByteTokenizer()
    requests = [Instance("loglikelihood", {}, ("The cat", " sat"), 0), Instance("loglikelihood", {}, ("", "abc"), 1)]
    results = LinguaLM(model, tokenizer, batch_size=1, max_context=64).loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip([r.args for r in requests], results):
        full = list((context + continuation).encode())
        per_token = direct_logprobs(model, full)[len(context.encode()) :]
        assert logprob == pytest.approx(per_token.sum().item(), abs=1e-4)
        with torch.no_grad():
            logits = model(torch.tensor([[256, *full[:-1]]]))[0, len(context.encode()) :]
        assert greedy == bool((logits.argmax(-1) == torch.tensor(full[len(context.encode()) :])).all())


def test_split_articles_at_titles_not_sections():
    articles = wikitext_utils.split_articles(" \n" + "".join(ARTICLES))
    assert len(articles) == 3
    assert articles[0].startswith(" = Alpha = ") and " = = History = = " in articles[0]
    assert articles[1].startswith(" = Beta Test = ")


def test_missing_wikitext_path_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTAMBA_WIKITEXT_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match="ATTAMBA_WIKITEXT_PATH"):
        wikitext_utils.load_wikitext()
    missing = tmp_path / "nope" / "wiki.test.tokens"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        wikitext_utils.load_wikitext(str(missing))
    monkeypatch.setenv("ATTAMBA_WIKITEXT_PATH", str(missing))
    with pytest.raises(FileNotFoundError, match=r"ATTAMBA_WIKITEXT_PATH"):
        wikitext_utils.load_wikitext()


def test_check_ready_fails_fast_on_missing_inputs(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTAMBA_WIKITEXT_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match="ATTAMBA_WIKITEXT_PATH"):
        check_ready(EvalArgs(tasks=["wikitext_local"]))
    wiki = write_wikitext(tmp_path / "wiki.test.tokens")
    check_ready(EvalArgs(tasks=["wikitext_local"], wikitext_path=str(tmp_path)))  # a folder works too
    with pytest.raises(FileNotFoundError, match="eval.val_sources.held_out"):
        check_ready(EvalArgs(tasks=[], wikitext_path=str(wiki), val_sources={"held_out": str(tmp_path / "none.jsonl")}))


def test_wikitext_local_through_lm_eval_matches_metric_definitions(tmp_path):
    model, tokenizer = tiny_model(), ByteTokenizer()
    path = write_wikitext(tmp_path / "wiki.test.tokens")
    lm = LinguaLM(model, tokenizer, batch_size=2, max_context=512)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["wikitext_local"],
        limit=2,
        task_manager=task_manager(str(path), include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
    )
    metrics = results["results"]["wikitext_local"]

    # limit=2: the first two articles, each without the newline that ends its last line.
    pages = [article[:-1] for article in ARTICLES[:2]]
    assert pages == wikitext_utils.split_articles(path.read_text())[:2]
    total_ll = sum(direct_logprobs(model, list(wikitext_detokenizer({"page": p}).encode())).sum().item() for p in pages)
    words = sum(len(re.split(r"\s+", p)) for p in pages)
    n_bytes = sum(len(p.encode("utf-8")) for p in pages)
    assert metrics["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / words), rel=1e-4)
    assert metrics["byte_perplexity,none"] == pytest.approx(math.exp(-total_ll / n_bytes), rel=1e-4)
    assert metrics["bits_per_byte,none"] == pytest.approx(-total_ll / n_bytes / math.log(2), rel=1e-4)
    assert metrics["word_perplexity,none"] != pytest.approx(metrics["byte_perplexity,none"], rel=1e-2)


def test_run_evaluation_appends_one_line_in_the_log_layout(tmp_path, write_jsonl):
    model, tokenizer = tiny_model(max_seqlen=64), ByteTokenizer()
    path = write_wikitext(tmp_path / "wiki.test.tokens")
    val = write_jsonl(tmp_path / "val.jsonl", ["some held-out text for validation " * 3] * 4)
    args = EvalArgs(tasks=["wikitext_local"], limit=1, batch_size=4, wikitext_path=str(path), val_sources={"tiny": str(val)})
    model.train()
    torch.manual_seed(7)
    for step in (10, 20):
        record = run_evaluation(model, tokenizer, args, step=step, dump_dir=str(tmp_path / "run"))
    assert model.training, "run_evaluation must restore the training mode"
    after_eval = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(after_eval, torch.rand(4)), "lm-eval's reseeding must not leak into training"
    lines = (tmp_path / "run" / "metrics.eval.jsonl").read_text().splitlines()
    assert [json.loads(line)["global_step"] for line in lines] == [10, 20]
    logged = json.loads(lines[-1])
    assert set(logged) == {"global_step", "created_at", "wikitext_local", "val/tiny/ppl"}
    assert set(logged["wikitext_local"]) == {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"}
    # An untrained byte model is close to uniform over 258 ids.
    assert 100 < logged["val/tiny/ppl"] < 1000
    assert logged == json.loads(json.dumps(record))


def test_cli_applies_model_overrides_and_logs(tmp_path):
    from lingua.checkpoint import export_consolidated
    from lingua.train import train_args_schema
    from lingua.args import build_config

    model = tiny_model(max_seqlen=64)
    train_args = build_config(train_args_schema("transformer"), {"model": {
        "dim": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 258, "max_seqlen": 64, "multiple_of": 16}})
    export = export_consolidated(model, train_args, tmp_path / "export")
    wiki = write_wikitext(tmp_path / "wiki.test.tokens")
    common = [f"ckpt={export}", "eval.tasks=[wikitext_local]", f"eval.wikitext_path={wiki}", "eval.limit=1", "device=cpu"]
    plain = main([*common, f"dump_dir={tmp_path / 'plain'}", "step=5"])
    windowed = main([*common, f"dump_dir={tmp_path / 'windowed'}", "model.sliding_window=2"])
    assert plain["global_step"] == 5
    # The override reached the model: a 2-token window scores the article differently.
    assert plain["wikitext_local"]["bits_per_byte,none"] != pytest.approx(windowed["wikitext_local"]["bits_per_byte,none"])
    assert (tmp_path / "windowed" / "metrics.eval.jsonl").exists()
    with pytest.raises(SystemExit, match="no_such_field"):
        main([*common, "model.no_such_field=3"])

    # lm-eval's own API builds the adapter from the registry name and a model_args string.
    results = lm_eval.simple_evaluate(
        model="attamba-lm",
        model_args=f"ckpt={export},device=cpu,model.sliding_window=2",
        tasks=["wikitext_local"],
        limit=1,
        task_manager=task_manager(str(wiki), include_defaults=False),
        bootstrap_iters=0,
    )
    assert results["results"]["wikitext_local"]["bits_per_byte,none"] == pytest.approx(
        windowed["wikitext_local"]["bits_per_byte,none"], rel=1e-6
    )


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string():
    model, tokenizer = tiny_model(max_seqlen=64), ByteTokenizer()
    context = "Once upon"
    ids = [tokenizer.bos_id, *context.encode()]
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    new_ids = ids[len(ids) - 6 :]
    assert tokenizer.eos_id not in new_ids[:3], "this seed's greedy text must run for 3 tokens"
    stop = bytes([new_ids[2]]).decode("utf-8", errors="replace")
    requests = [
        Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 6}), 0),
        Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 6}), 1),
    ]
    full, cut = LinguaLM(model, tokenizer, batch_size=2).generate_until(requests)
    expected = tokenizer.decode(new_ids[: new_ids.index(tokenizer.eos_id)] if tokenizer.eos_id in new_ids else new_ids)
    assert full == expected
    assert cut == expected[: expected.index(stop)]


def test_generation_on_an_fsdp_sharded_model_is_a_clear_error(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, tokenizer = tiny_model(max_seqlen=64), ByteTokenizer()
        assert not is_sharded(model)
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert is_sharded(model)
        request = Instance("generate_until", {}, ("Once upon", {"until": [], "max_gen_toks": 2}), 0)
        with pytest.raises(GenerationUnderFSDPError, match="apps.<app>.eval"):
            LinguaLM(model, tokenizer).generate_until([request])
    finally:
        dist.destroy_process_group()


def test_rounds_share_batches_out_one_per_rank():
    from lingua.eval import rounds

    assert list(rounds(range(5), 2)) == [[0, 1], [2, 3], [4]]
    assert list(rounds(range(4), 2)) == [[0, 1], [2, 3]]
    assert list(rounds([], 3)) == []
    assert list(rounds(range(3), 1)) == [[0], [1], [2]]


def test_a_rank_past_the_last_round_repeats_its_first_item_and_drops_it():
    from lingua.eval import my_share

    assert my_share([7, 8], 1) == (8, True)
    assert my_share([7], 1) == (7, False)


@pytest.mark.parametrize("max_context", [100, 1024, 4096, 16384])
def test_windows_are_padded_to_few_widths(max_context):
    # Each padded width is a FlexAttention compile on CUDA, and dynamo stops compiling after 64.
    from lingua.eval import WINDOW_WIDTHS, Window, _batch_tokens

    lm = LinguaLM(tiny_model(), ByteTokenizer(), max_context=max_context)
    lengths = range(1, max_context + 1)
    if max_context > 4096:
        # Every length would take half a minute here (each batch a tensor of its length): the
        # lengths on either side of each multiple of the padding, where the width can change.
        multiples = range(lm.pad_multiple, max_context + 1, lm.pad_multiple)
        lengths = sorted({1, max_context} | {m + step for m in multiples for step in (0, 1)} - {max_context + 1})
    widths = {
        _batch_tokens([Window([0] * length, [0])], max_context, 0, lm.pad_multiple).shape[1] for length in lengths
    }
    assert len(widths) <= WINDOW_WIDTHS + 1 and max(widths) == max_context


def test_summed_cross_entropy_in_chunks_equals_the_whole_sum():
    """Validation sums the loss a chunk of tokens at a time; chunk edges that cut rows and ignored
    labels change nothing (bf16 logits, as a model under autocast returns them)."""
    from lingua.eval import summed_cross_entropy
    from lingua.recall import IGNORE_INDEX

    torch.manual_seed(0)
    logits = (torch.randn(37, 50) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 50, (37,))
    labels[[0, 5, 36]] = IGNORE_INDEX
    whole = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    for chunk in (1, 8, 36, 37, 1000):
        got = summed_cross_entropy(logits, labels, chunk_tokens=chunk)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-4)
    assert summed_cross_entropy(logits[:0], labels[:0]) == 0
