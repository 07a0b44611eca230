"""The README's main job: build the embedded corpus (this machine's own Python sources) if it is
not there yet, train a small Attamba on it on CPU, and print its validation perplexity.

    python -m setup.quickstart [key=value ...]      # overrides go to the training config

It is ``python -m setup.prepare_data embedded`` followed by
``python -m apps.attamba.train config=apps/attamba/configs/quickstart.yaml``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "python_corpus"
CONFIG = ROOT / "apps" / "attamba" / "configs" / "quickstart.yaml"


def main(argv: list[str]) -> None:
    if not (CORPUS / "train").is_dir() or not (CORPUS / "valid").is_dir():
        print(f"building the embedded corpus in {CORPUS} ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "setup.prepare_data", "embedded", "--out", str(CORPUS), "--max-mb", "8"],
            cwd=ROOT,
            check=True,
        )
    from lingua.train import load_train_args, train

    args = load_train_args([f"config={CONFIG}", *argv], "attamba")
    summary = train(args)
    if summary["first_step"] == summary["step"]:
        print(f"{args.dump_dir} already holds a run of {summary['step']} steps, so none ran now "
              "(delete that folder, or pass dump_dir=<another>, to train again)")
    else:
        print(f"trained {summary['step']} steps; final training loss {summary['loss']:.4f}")
    eval_log = Path(args.dump_dir) / "metrics.eval.jsonl"
    if eval_log.exists():
        last = json.loads(eval_log.read_text().splitlines()[-1])
        for key, value in last.items():
            if key.startswith("val/"):
                print(f"{key}: {value:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
