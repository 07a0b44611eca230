"""Reading run directories back: ``config.yaml``, ``metrics.jsonl`` and ``metrics.eval.jsonl``
(DESIGN.md "Logs"), for plots and summaries.

Logs written by other tools in the same layout are read as well: unknown keys are kept, nested
evaluation results (``{"wikitext": {"word_perplexity,none": ...}}``) become flat keys
(``wikitext/word_perplexity,none``), and a last line cut short by a crash is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

logger = logging.getLogger(__name__)

TRAIN_LOG = "metrics.jsonl"
EVAL_LOG = "metrics.eval.jsonl"
CONFIG = "config.yaml"
STEP = "global_step"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per line; a broken last line (a crash mid-write) is skipped."""
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if index == len(lines) - 1:
                logger.warning("%s:%d: skipping a last line that is not complete JSON (%s)", path, number, error)
                continue
            raise ValueError(f"{path}:{number}: not a JSON object ({error})") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level, keys joined with '/'."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


@dataclass
class Run:
    """One run directory's logs."""

    path: Path
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    """config.yaml as nested dicts (empty when the run has none)."""
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Evaluation records, flattened (see :func:`flatten`)."""

    def config_value(self, dotted: str) -> Any:
        """A config entry by dotted path (``model.token_chunk``), or None when absent."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def series(self, key: str, records: Optional[list[dict[str, Any]]] = None) -> tuple[list[float], list[float]]:
        """(steps, values) of ``key`` over the records that hold a finite number for it.

        Looks in the training log, or in the evaluations when the key is not a training key.
        A resumed run can log a step twice; the later record wins.
        """
        if records is None:
            records = self.train if any(key in r for r in self.train) else self.evals
        by_step: dict[float, float] = {}
        for record in records:
            step, value = record.get(STEP), record.get(key)
            if _is_number(step) and _is_number(value) and math.isfinite(value):
                by_step[step] = value
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    def eval_keys(self) -> list[str]:
        """Every numeric evaluation key of the run, sorted."""
        return sorted({k for r in self.evals for k, v in r.items() if k not in (STEP,) and _is_number(v)})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_run_dir(path: Path) -> bool:
    return (path / TRAIN_LOG).is_file() or (path / EVAL_LOG).is_file()


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """Run directories among ``paths`` and below them (a directory with either log), in order."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such run directory: {path}")
        if is_run_dir(path):
            found.append(path)
            continue
        below = sorted({log.parent for pattern in (TRAIN_LOG, EVAL_LOG) for log in path.rglob(pattern)})
        if not below:
            raise FileNotFoundError(f"{path} holds no run ({TRAIN_LOG} or {EVAL_LOG}) at any depth")
        found.extend(below)
    return list(dict.fromkeys(found))


def load_run(path: Path) -> Run:
    """Read one run directory; its name is config.yaml's ``name``, else the directory's name."""
    path = Path(path)
    config: dict[str, Any] = {}
    if (path / CONFIG).is_file():
        from omegaconf import OmegaConf

        loaded = OmegaConf.to_container(OmegaConf.load(path / CONFIG), resolve=False)
        config = loaded if isinstance(loaded, dict) else {}
    train = read_jsonl(path / TRAIN_LOG) if (path / TRAIN_LOG).is_file() else []
    evals = [flatten(r) for r in read_jsonl(path / EVAL_LOG)] if (path / EVAL_LOG).is_file() else []
    name = config.get("name") or path.name
    return Run(path, str(name), config, train, evals)
