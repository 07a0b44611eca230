"""Shared test fixtures: tiny jsonl corpora written to a temporary directory.

Without CUDA the Triton kernels run under Triton's interpreter: ``TRITON_INTERPRET`` is read when a
kernel is decorated, so it is set here, before any test imports a kernel module.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Union

import pytest

# Plain `pytest` puts the repository root on sys.path only through tests/__init__.py in its
# default import mode; make `import lingua` and `import setup` work in every mode.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

try:
    import torch
except ImportError:  # only the tests that need torch fail then
    torch = None
if torch is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

Record = Union[str, dict, bytes]


def write_jsonl_file(path: Path, records: Iterable[Record]) -> Path:
    """Write one line per record: a str becomes ``{"text": ...}``, a dict is dumped as is and
    bytes are written raw (for malformed lines). ``.gz`` paths are gzip-compressed."""
    lines = []
    for record in records:
        if isinstance(record, bytes):
            lines.append(record.rstrip(b"\n") + b"\n")
        else:
            record = {"text": record} if isinstance(record, str) else record
            lines.append(json.dumps(record).encode() + b"\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as file:
        file.writelines(lines)
    return path


@pytest.fixture
def write_jsonl() -> Callable[[Path, Iterable[Record]], Path]:
    """``write_jsonl(path, records) -> path``; see :func:`write_jsonl_file`."""
    return write_jsonl_file


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A directory with ``train/`` (two shards, 120 documents) and ``valid/`` (one shard, 20
    documents) of short English-like text, for end-to-end tests of data, training and eval."""
    words = "the cat sat on a mat and then it ran to the red door of an old house".split()

    def document(index: int) -> str:
        return " ".join(words[(index * 7 + k) % len(words)] for k in range(5 + index % 11)) + "."

    root = tmp_path / "tiny_corpus"
    write_jsonl_file(root / "train" / "shard_0.jsonl", [document(i) for i in range(0, 60)])
    write_jsonl_file(root / "train" / "shard_1.jsonl", [document(i) for i in range(60, 120)])
    write_jsonl_file(root / "valid" / "shard_0.jsonl", [document(i) for i in range(1000, 1020)])
    return root
