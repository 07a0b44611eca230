"""Prepare jsonl training data (``{"text": ...}`` per line) for ``lingua.data``.

    python -m setup.prepare_data embedded --out data/embedded [--max-mb 8]
    python -m setup.prepare_data hf --dataset NAME [--subset S] --split train --out DIR --chunks 32 --max-docs 1000000

``embedded`` builds the default corpus with no network access: the Python sources installed on
this machine (the standard library and site-packages), one document per file with its
docstrings and comments, deduplicated by content, split into ``train/`` and ``valid/`` by
package so that no package is in both. ``hf`` streams a Hugging Face dataset (needs the
``datasets`` package and network access) into shuffled jsonl chunks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from setup import Progress

# ---------------------------------------------------------------------------------------------
# Hugging Face datasets to jsonl chunks


def write_jsonl_chunks(
    records: Iterable[Any],
    out_dir: str | Path,
    chunks: int,
    max_docs: Optional[int] = None,
    text_key: str = "text",
    seed: int = 0,
    show_progress: bool = False,
) -> dict:
    """Write the texts of ``records`` (dicts holding ``text_key``, or strings) to ``chunks``
    files ``chunk_00000.jsonl``...; each text goes to a random chunk, then each chunk's lines
    are shuffled (one chunk in memory at a time). Records without a string text are skipped.
    Returns the manifest it also writes to ``out_dir/manifest.json``."""
    if chunks < 1:
        raise ValueError(f"--chunks must be >= 1, got {chunks}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"chunk_{index:05d}.jsonl" for index in range(chunks)]
    rng = np.random.default_rng(seed)
    counts = {"documents": 0, "skipped": 0, "bytes": 0}
    progress = Progress("writing documents", total=max_docs, unit=" docs") if show_progress else None
    files = [open(path, "w", encoding="utf-8") for path in paths]
    try:
        for record in records:
            if max_docs is not None and counts["documents"] >= max_docs:
                break
            text = record.get(text_key) if isinstance(record, dict) else record
            if not isinstance(text, str) or not text.strip():
                counts["skipped"] += 1
                continue
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            files[int(rng.integers(chunks))].write(line)
            counts["documents"] += 1
            counts["bytes"] += len(line)
            if progress is not None:
                progress.update(counts["documents"])
    finally:
        for file in files:
            file.close()
    if progress is not None:
        progress.close()
    for path in paths:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(lines[i] for i in rng.permutation(len(lines))), encoding="utf-8")
    manifest = {"kind": "jsonl_chunks", "chunks": chunks, "seed": seed, **counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def stream_hf_dataset(name: str, subset: Optional[str], split: str) -> Iterator[dict]:
    """The records of a Hugging Face dataset, streamed (nothing is downloaded up front)."""
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise ImportError("the 'hf' subcommand needs the datasets package: pip install datasets") from error
    return iter(load_dataset(name, subset, split=split, streaming=True))


# ---------------------------------------------------------------------------------------------
# The embedded default corpus: installed Python sources

# Directories that never hold package sources worth reading.
_SKIPPED_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git", "node_modules"}
_SKIPPED_DIR_SUFFIXES = (".dist-info", ".egg-info", ".data")


def default_roots() -> list[Path]:
    """The standard library and site-packages directories of this interpreter."""
    paths = sysconfig.get_paths()
    roots: list[Path] = []
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        root = Path(paths[key]).resolve() if key in paths else None
        if root is not None and root.is_dir() and root not in roots:
            roots.append(root)
    return roots


@dataclass
class SourceFile:
    """A candidate document: a ``.py`` file and the top-level package it belongs to."""

    path: Path
    package: str
    name: str  # package-relative path, e.g. "json/decoder.py"


def find_python_files(roots: list[Path]) -> Iterator[SourceFile]:
    """Every ``.py`` file under ``roots``, skipping caches, metadata and nested site-packages
    (which are roots of their own)."""
    for root in roots:
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = sorted(
                d for d in subdirs
                if d not in _SKIPPED_DIRS and not d.startswith(".") and not d.endswith(_SKIPPED_DIR_SUFFIXES)
            )
            relative_dir = Path(directory).relative_to(root)
            for file_name in sorted(files):
                if not file_name.endswith(".py"):
                    continue
                relative = relative_dir / file_name
                package = relative.parts[0] if len(relative.parts) > 1 else relative.stem
                yield SourceFile(Path(directory) / file_name, package, relative.as_posix())


def _unit_hash(text: str) -> float:
    """A stable number in [0, 1) for ``text`` (Python's hash() changes between runs)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16**12


@dataclass
class CorpusStats:
    documents: int = 0
    bytes: int = 0
    packages: set[str] = field(default_factory=set)


def split_packages(package_bytes: dict[str, int], valid_fraction: float) -> set[str]:
    """The packages that go to validation: taken in the order of their name's hash until they
    hold ``valid_fraction`` of the bytes (a package that would overshoot twice over is passed
    by), always at least one package and never all of them."""
    ordered = sorted(package_bytes, key=lambda package: (_unit_hash(package), package))
    if len(ordered) < 2:
        raise ValueError(f"cannot split {len(ordered)} package(s) into train and validation; need at least 2")
    target = valid_fraction * sum(package_bytes.values())
    valid: set[str] = set()
    valid_bytes = 0
    for package in ordered[:-1]:
        if valid and valid_bytes >= target:
            break
        if valid and valid_bytes + package_bytes[package] > 2 * target:
            continue
        valid.add(package)
        valid_bytes += package_bytes[package]
    return valid


def build_embedded_corpus(
    out_dir: str | Path,
    roots: Optional[list[Path]] = None,
    max_mb: float = 8.0,
    valid_fraction: float = 0.05,
    train_shards: int = 4,
    max_file_kb: float = 256.0,
    show_progress: bool = False,
) -> dict:
    """Write ``out_dir/train/*.jsonl``, ``out_dir/valid/*.jsonl`` and ``out_dir/manifest.json``
    from the Python files under ``roots`` (default: :func:`default_roots`).

    Files are taken in a fixed pseudo-random order (by the hash of their package-relative path)
    until ``max_mb`` megabytes of text are collected, so a small corpus still spans many
    packages. Skipped: files over ``max_file_kb``, binary or non-UTF-8 files, unreadable files,
    blank files, and any file whose content was already taken. Each line is
    ``{"text": source, "source": package, "path": package-relative path}``.
    """
    roots = [Path(root) for root in (roots if roots is not None else default_roots())]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"source root {root} is not a directory")
    scanning = Progress("scanning for .py files", unit=" files") if show_progress else None
    candidates = []
    for candidate in find_python_files(roots):
        candidates.append(candidate)
        if scanning is not None:
            scanning.update(len(candidates))
    if scanning is not None:
        scanning.close()
    candidates.sort(key=lambda f: (_unit_hash(f.name), f.name))
    byte_budget = int(max_mb * 1_000_000)
    skipped = {"too_large": 0, "binary": 0, "unreadable": 0, "empty": 0, "duplicate": 0}
    seen_content: set[str] = set()
    documents: list[dict] = []
    total_bytes = 0
    progress = Progress("embedded corpus", total=round(max_mb, 1), unit=" MB") if show_progress else None
    for candidate in candidates:
        if total_bytes >= byte_budget:
            break
        try:
            if candidate.path.stat().st_size > max_file_kb * 1000:
                skipped["too_large"] += 1
                continue
            raw = candidate.path.read_bytes()
        except OSError:
            skipped["unreadable"] += 1
            continue
        if b"\0" in raw:
            skipped["binary"] += 1
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped["binary"] += 1
            continue
        if not text.strip():
            skipped["empty"] += 1
            continue
        digest = hashlib.sha256(raw).hexdigest()
        if digest in seen_content:
            skipped["duplicate"] += 1
            continue
        seen_content.add(digest)
        documents.append({"text": text, "source": candidate.package, "path": candidate.name})
        total_bytes += len(raw)
        if progress is not None:
            progress.update(round(total_bytes / 1e6, 1), note=f"{len(documents)} files")
    if progress is not None:
        progress.close()
    if not documents:
        raise ValueError(f"no readable Python files found under {', '.join(map(str, roots))}")

    package_bytes: dict[str, int] = {}
    for doc in documents:
        package_bytes[doc["source"]] = package_bytes.get(doc["source"], 0) + len(doc["text"])
    valid_packages = split_packages(package_bytes, valid_fraction)
    splits = {"train": [], "valid": []}
    for doc in documents:
        splits["valid" if doc["source"] in valid_packages else "train"].append(doc)
    out = Path(out_dir)
    stats = {}
    for split, split_documents in splits.items():
        shards = train_shards if split == "train" else 1
        stats[split] = _write_split(out / split, split_documents, shards)
    manifest = {
        "kind": "embedded",
        "python": sys.version.split()[0],
        "roots": [str(root) for root in roots],
        "max_mb": max_mb,
        "valid_fraction": valid_fraction,
        "candidates": len(candidates),
        "skipped": skipped,
        **{
            split: {"documents": s.documents, "bytes": s.bytes, "packages": sorted(s.packages)}
            for split, s in stats.items()
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_split(directory: Path, documents: list[dict], shards: int) -> CorpusStats:
    """Deal ``documents`` round-robin into ``shard_0000i.jsonl`` files, replacing old shards."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("shard_*.jsonl"):
        old.unlink()
    shards = max(1, min(shards, len(documents)))
    stats = CorpusStats()
    files = [open(directory / f"shard_{index:05d}.jsonl", "w", encoding="utf-8") for index in range(shards)]
    try:
        for index, doc in enumerate(documents):
            files[index % shards].write(json.dumps(doc, ensure_ascii=False) + "\n")
            stats.documents += 1
            stats.bytes += len(doc["text"].encode("utf-8"))
            stats.packages.add(doc["source"])
    finally:
        for file in files:
            file.close()
    return stats


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m setup.prepare_data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    embedded = commands.add_parser("embedded", help="the default corpus: installed Python sources (offline)")
    embedded.add_argument("--out", required=True, help="output directory (gets train/, valid/, manifest.json)")
    embedded.add_argument("--max-mb", type=float, default=8.0, help="stop after this many MB of text")
    embedded.add_argument("--valid-fraction", type=float, default=0.05, help="share of packages for validation")
    embedded.add_argument("--train-shards", type=int, default=4)
    embedded.add_argument("--max-file-kb", type=float, default=256.0, help="skip larger files")
    embedded.add_argument("--root", action="append", help="a directory to read instead of the defaults (repeatable)")

    hf = commands.add_parser("hf", help="stream a Hugging Face dataset to shuffled jsonl chunks (network)")
    hf.add_argument("--dataset", required=True)
    hf.add_argument("--subset", default=None)
    hf.add_argument("--split", default="train")
    hf.add_argument("--out", required=True)
    hf.add_argument("--chunks", type=int, default=8)
    hf.add_argument("--max-docs", type=int, default=None)
    hf.add_argument("--text-key", default="text")
    hf.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command == "embedded":
        roots = [Path(root) for root in args.root] if args.root else None
        manifest = build_embedded_corpus(
            args.out, roots, args.max_mb, args.valid_fraction, args.train_shards, args.max_file_kb, show_progress=True
        )
        summary = {split: {k: manifest[split][k] for k in ("documents", "bytes")} for split in ("train", "valid")}
    else:
        records = stream_hf_dataset(args.dataset, args.subset, args.split)
        summary = write_jsonl_chunks(
            records, args.out, args.chunks, args.max_docs, args.text_key, args.seed, show_progress=True
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
