"""Tiny training configs and corpora for the training-loop tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lingua.train import load_train_args

WORDS = "the a model state token chunk window key value query attention layer train step loss".split()


def write_corpus(directory: Path, documents: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "train.jsonl"
    with open(path, "w") as handle:
        for _ in range(documents):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def tiny_args(run_dir: Path, corpus: Path, *overrides: str, model_type: str = "transformer"):
    argv = [
        f"dump_dir={run_dir}",
        f"model_type={model_type}",
        "model.dim=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.vocab_size=258",
        "model.max_seqlen=32",
        f"data.sources={{{corpus}: 1.0}}",
        "data.seq_len=32",
        "data.batch_size=2",
        "optim.lr=1e-2",
        "optim.warmup=2",
        "logging.freq=1",
        "eval_at_end=false",
        "export_at_end=false",
        "device=cpu",
        *overrides,
    ]
    return load_train_args(argv, model_type)


def read_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.jsonl") as handle:
        return {r["global_step"]: r["loss/out"] for r in map(json.loads, handle)}
