"""Plot and summarise training runs: loss curves, evaluation metrics, and a Markdown table.

Reads run directories in the layout of DESIGN.md "Logs" (``metrics.jsonl``, ``metrics.eval.jsonl``,
``config.yaml``), given directly or found below the given paths (``ablation_backup/``, ``runs/``):

    python scripts/plot_runs.py runs/ --out plots/ \
        [--train-keys loss/out] [--eval-keys wikitext/word_perplexity,none val/english/ppl] \
        [--label-keys model.token_chunk model.leading_tokens] [--log-y] [--smooth 10]

Writes one PNG per key to ``--out`` (``train_<key>.png``, ``eval_<key>.png``) and prints a table
of each run's last logged values. Without ``--eval-keys`` every numeric evaluation key of the
runs is plotted. Needs matplotlib (``pip install -e .[plot]``) unless ``--no-plots``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lingua.run_logs import Run, find_runs, load_run  # noqa: E402


def labels_for(runs: Sequence[Run], label_keys: Sequence[str]) -> list[str]:
    """One legend label per run: the chosen config values, else the run's name (made unique)."""
    if label_keys:
        labels = [" ".join(f"{key.split('.')[-1]}={run.config_value(key)}" for key in label_keys) for run in runs]
    else:
        labels = [run.name for run in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({run.path.name})" for label, run in zip(labels, runs)]
    return labels


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (1: unchanged)."""
    if window <= 1:
        return values
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def file_name(prefix: str, key: str) -> str:
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', key).strip('_')}.png"


def plot_key(runs, labels, key: str, path: Path, log_y: bool, smooth: int) -> bool:
    """One figure of ``key`` against the step for every run that logged it; False if none did."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training machine
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for run, label in zip(runs, labels):
        steps, values = run.series(key)
        if not steps:
            continue
        marker = "o" if len(steps) < 30 else None
        axes.plot(steps, smoothed(values, smooth), label=label, marker=marker, markersize=3)
        drawn += 1
    if drawn:
        axes.set_xlabel("step")
        axes.set_ylabel(key)
        if log_y:
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    plt.close(figure)
    return bool(drawn)


def summary_table(runs, labels, keys: Sequence[str]) -> str:
    """Markdown: each run's last step and the last value of each key."""
    header = "| run | last step | " + " | ".join(keys) + " |"
    lines = [header, "| --- | ---: | " + " | ".join("---:" for _ in keys) + " |"]
    for run, label in zip(runs, labels):
        cells, last_step = [], 0
        for key in keys:
            steps, values = run.series(key)
            cells.append(f"{values[-1]:.4g}" if values else "-")
            last_step = max([last_step, *steps])
        lines.append(f"| {label} | {last_step:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run directories, or directories holding runs")
    parser.add_argument("--out", type=Path, default=Path("plots"))
    parser.add_argument("--train-keys", nargs="+", default=["loss/out"])
    parser.add_argument("--eval-keys", nargs="+", help="default: every numeric evaluation key")
    parser.add_argument("--label-keys", nargs="+", default=[], help="config entries naming each run, e.g. model.token_chunk")
    parser.add_argument("--log-y", action="store_true")
    parser.add_argument("--smooth", type=int, default=1, help="trailing mean over this many logged points (train keys)")
    parser.add_argument("--no-plots", action="store_true", help="only print the summary table")
    args = parser.parse_args(argv)

    try:
        runs = [load_run(path) for path in find_runs(args.paths)]
    except (FileNotFoundError, ValueError) as error:
        print(f"plot_runs: {error}", file=sys.stderr)
        return 2
    labels = labels_for(runs, args.label_keys)
    eval_keys = args.eval_keys or sorted({key for run in runs for key in run.eval_keys()})

    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("plot_runs: matplotlib is missing (pip install -e .[plot]); use --no-plots for the table", file=sys.stderr)
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        written = []
        for prefix, keys, smooth in (("train", args.train_keys, args.smooth), ("eval", eval_keys, 1)):
            for key in keys:
                path = args.out / file_name(prefix, key)
                if plot_key(runs, labels, key, path, args.log_y, smooth):
                    written.append(path)
        print(f"{len(runs)} runs; wrote {len(written)} plots to {args.out}")
    print(summary_table(runs, labels, [*args.train_keys, *eval_keys]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
