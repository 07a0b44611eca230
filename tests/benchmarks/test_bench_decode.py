"""The decode benchmark's summary: each model's fastest mode, and the ratio of the two."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_decode import Measurement, speedups  # noqa: E402


def row(model: str, mode: str, tokens_per_second, context: int = 4096, batch: int = 1) -> Measurement:
    return Measurement(model, context, batch, mode, tokens_per_second, None, None, None, None)


def test_speedups_compare_each_models_fastest_mode_and_skip_failed_rows():
    rows = [
        row("attamba", "cuda_graph", 100.0), row("attamba", "compile", 300.0),
        row("transformer", "cuda_graph", 200.0), row("transformer", "compile", None),  # e.g. OOM
        row("attamba", "compile", 50.0, batch=16),  # no transformer row at batch 16: no ratio
    ]
    assert speedups(rows) == [
        "context    4096 batch   1: Attamba 300.0 tok/s (compile) / transformer 200.0 (cuda_graph) = 1.50x"
    ]


def test_every_benchmarked_model_builds_and_decodes_a_pretended_context():
    """The bench's models at its 60M sizes, cut to a small max_len: a cache filled without a
    prefill takes one decode step (on CPU, eagerly)."""
    import torch

    from bench_decode import MODELS, build_model
    from lingua.generate import cache_support

    for name in MODELS:
        model = build_model(name, 64).eval()
        support = cache_support(model)
        cache = support.new_cache(model, 2, 64, "cpu", torch.float32)
        cache.pretend_filled(40)
        with torch.no_grad():
            logits = support.forward_cached(model, torch.zeros(2, 1, dtype=torch.long), cache)
        assert logits.shape == (2, 1, 32000) and torch.isfinite(logits).all(), name
        assert cache.live_nbytes() <= cache.nbytes()


def test_summarize_reads_earlier_runs_out_files(tmp_path, capsys):
    """scripts/device_decode.sh benchmarks each model in its own run and summarizes both files."""
    import json
    from dataclasses import asdict

    from bench_decode import main

    measured = {"a": Measurement("attamba", 4096, 1, "compile_pdl", 300.0, 3.33, 1, 1, 1),
                "t": Measurement("transformer", 4096, 1, "compile_pdl", 100.0, 10.0, 8, 8, 8)}
    for name, measurement in measured.items():
        (tmp_path / f"{name}.json").write_text(json.dumps([asdict(measurement)]))
    assert main(["--summarize", str(tmp_path / "a.json"), str(tmp_path / "t.json")]) == 0
    printed = capsys.readouterr().out
    assert "compile_pdl) / transformer 100.0 (compile_pdl) = 3.00x" in printed
