"""The table and variant handling of the attention benchmarks (their timing needs CUDA)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_attention import Measurement, print_table  # noqa: E402
from tune_attention_triton import VARIANTS, parse_variant  # noqa: E402

from apps.attamba import attention_triton  # noqa: E402


def test_the_table_gives_both_timings_ratios_against_causal_and_dense(capsys):
    args = argparse.Namespace(tokens=65536, heads=8, head_dim=64, chunk=8, leading=16, mean_doc=0)
    results = [
        Measurement("triton", 16384, 4, 2.0, 292, 1.6),
        Measurement("sdpa_dense", 16384, 4, 32.0, 1024, 32.0),
        Measurement("causal", 16384, 4, 9.0, 388, 8.0),
        Measurement("flex", 16384, 4, None, None, None, "out of memory"),
    ]
    print_table(results, args)
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["triton"], ["flex"])}
    assert "4.50/5.00x" in rows["triton"]  # causal 9.0 / 2.0 alone, 8.0 / 1.6 back to back
    assert "16.00/20.00x" in rows["triton"]  # sdpa_dense 32 / 2.0 and 32 / 1.6
    # A backend that failed: no times, no ratios, and why.
    assert rows["flex"].split()[3:8] == ["-"] * 5 and rows["flex"].endswith("out of memory")


def test_every_tune_variant_names_kernel_config_fields():
    for variant in VARIANTS:
        changed = dataclasses.replace(attention_triton.CUDA_CONFIG, **parse_variant(variant))
        assert isinstance(changed, attention_triton.KernelConfig), variant
    assert parse_variant("default") == {}
    assert parse_variant("forward_registers=0,forward_stages=3") == {"forward_registers": 0, "forward_stages": 3}
