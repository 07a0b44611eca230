"""Run logs read back (lingua.run_logs) and plotted (scripts/plot_runs.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lingua.run_logs import find_runs, flatten, load_run, read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def plot_runs():
    spec = importlib.util.spec_from_file_location("plot_runs", ROOT / "scripts" / "plot_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(path: Path, name: str, chunk: int, losses: list[float], ppl: float, extra_line: str = "") -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"name: {name}\nmodel:\n  token_chunk: {chunk}\n")
    lines = [json.dumps({"global_step": 10 * (i + 1), "loss/out": loss, "tool/extra": "kept"}) for i, loss in enumerate(losses)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + extra_line)
    evals = [{"global_step": 10 * len(losses), "wikitext": {"word_perplexity,none": ppl}, "val/web/ppl": ppl / 2}]
    (path / "metrics.eval.jsonl").write_text("\n".join(json.dumps(e) for e in evals) + "\n")
    return path


def test_load_run_flattens_evaluations_and_reads_config(tmp_path):
    run = load_run(write_run(tmp_path / "a", "attamba_p8", 8, [3.0, 2.5], 40.0))
    assert run.name == "attamba_p8"
    assert run.config_value("model.token_chunk") == 8
    assert run.config_value("model.missing") is None
    assert run.series("loss/out") == ([10, 20], [3.0, 2.5])
    assert run.series("wikitext/word_perplexity,none") == ([20], [40.0])
    assert run.eval_keys() == ["val/web/ppl", "wikitext/word_perplexity,none"]
    assert run.train[0]["tool/extra"] == "kept"  # keys of other tools survive


def test_a_crash_cut_last_line_is_skipped_but_a_broken_middle_line_is_an_error(tmp_path):
    run = load_run(write_run(tmp_path / "a", "a", 8, [3.0, 2.5], 40.0, extra_line='{"global_step": 30, "loss/o'))
    assert run.series("loss/out")[0] == [10, 20]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"global_step": 1}\nnot json\n{"global_step": 2}\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        read_jsonl(broken)


def test_a_resumed_run_keeps_the_later_record_of_a_repeated_step(tmp_path):
    run = load_run(write_run(tmp_path / "a", "a", 8, [3.0, 2.5], 40.0))
    run.train.append({"global_step": 20, "loss/out": 2.0})
    assert run.series("loss/out") == ([10, 20], [3.0, 2.0])


def test_flatten_joins_nested_keys():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a/b": 1, "a/c/d": 2, "e": 3}


def test_find_runs_searches_below_and_reports_missing_paths(tmp_path):
    write_run(tmp_path / "grid" / "p4", "p4", 4, [3.0], 50.0)
    write_run(tmp_path / "grid" / "p8", "p8", 8, [3.0], 40.0)
    assert [p.name for p in find_runs([tmp_path / "grid"])] == ["p4", "p8"]
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        find_runs([tmp_path / "absent"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no run"):
        find_runs([tmp_path / "empty"])


def test_plot_runs_prints_a_table_of_last_values(tmp_path, capsys):
    write_run(tmp_path / "runs" / "p4", "same", 4, [3.0, 2.8], 50.0)
    write_run(tmp_path / "runs" / "p8", "same", 8, [3.0, 2.5], 40.0)
    assert plot_runs().main([str(tmp_path / "runs"), "--no-plots", "--label-keys", "model.token_chunk"]) == 0
    table = capsys.readouterr().out
    assert "| token_chunk=4 | 20 | 2.8 | 25 | 50 |" in table
    assert "| token_chunk=8 | 20 | 2.5 | 20 | 40 |" in table


def test_plot_runs_names_runs_uniquely_and_fails_clearly_on_a_bad_path(tmp_path, capsys):
    module = plot_runs()
    write_run(tmp_path / "runs" / "x", "same", 4, [3.0], 50.0)
    write_run(tmp_path / "runs" / "y", "same", 8, [3.0], 40.0)
    runs = [load_run(p) for p in find_runs([tmp_path / "runs"])]
    assert module.labels_for(runs, []) == ["same (x)", "same (y)"]
    assert module.main([str(tmp_path / "nowhere"), "--no-plots"]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_smoothing_is_a_trailing_mean():
    assert plot_runs().smoothed([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="plots need matplotlib (the 'plot' extra)")
def test_plot_runs_writes_one_png_per_key(tmp_path):
    write_run(tmp_path / "runs" / "p4", "p4", 4, [3.0, 2.8, 2.6], 50.0)
    write_run(tmp_path / "runs" / "p8", "p8", 8, [3.0, 2.5, 2.4], 40.0)
    out = tmp_path / "plots"
    assert plot_runs().main([str(tmp_path / "runs"), "--out", str(out), "--log-y"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["eval_val_web_ppl.png", "eval_wikitext_word_perplexity_none.png", "train_loss_out.png"]
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in written)
