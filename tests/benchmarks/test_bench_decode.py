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
