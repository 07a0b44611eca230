"""Data preparation: the embedded corpus builder, jsonl chunk writing and the progress line."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import pytest

from lingua.data import iter_texts, list_shards
from setup import Progress
from setup.prepare_data import build_embedded_corpus, main, split_packages, write_jsonl_chunks


def read_split(directory: Path) -> list[dict]:
    return [json.loads(line) for shard in list_shards(directory) for line in shard.read_text().splitlines()]


@pytest.fixture
def fake_site_packages(tmp_path: Path) -> Path:
    """A stand-in for site-packages: 12 packages, a duplicate file, a binary, a huge file, a
    blank file, caches and metadata that must be ignored."""
    root = tmp_path / "site-packages"
    for index in range(12):
        package = root / f"pkg{index}"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(f'"""Package {index}."""\nVALUE = {index}\n')
        (package / "core.py").write_text(f"def f{index}(x):\n    '''Doc {index}.'''\n    return x * {index}\n")
    (root / "single_module.py").write_text("import os\nprint(os.sep)\n")
    (root / "pkg1" / "copy.py").write_text((root / "pkg0" / "core.py").read_text())  # duplicate
    (root / "pkg2" / "blob.py").write_bytes(b"x = 1\0\0\0")
    (root / "pkg3" / "latin.py").write_bytes("s = 'caf\u00e9'\n".encode("latin-1"))
    (root / "pkg4" / "huge.py").write_text("x = 1\n" * 40_000)
    (root / "pkg5" / "blank.py").write_text("\n\n")
    (root / "pkg6" / "__pycache__").mkdir()
    (root / "pkg6" / "__pycache__" / "cached.py").write_text("cached = True\n")
    (root / "pkg7-1.0.dist-info").mkdir()
    (root / "pkg7-1.0.dist-info" / "meta.py").write_text("meta = True\n")
    (root / "pkg8" / "notes.txt").write_text("not python")
    return root


def test_embedded_corpus_split_dedup_and_determinism(tmp_path, fake_site_packages):
    manifest = build_embedded_corpus(tmp_path / "out", roots=[fake_site_packages], max_mb=1.0, max_file_kb=64)
    train, valid = read_split(tmp_path / "out" / "train"), read_split(tmp_path / "out" / "valid")
    assert train and valid
    train_packages = {doc["source"] for doc in train}
    valid_packages = {doc["source"] for doc in valid}
    assert not train_packages & valid_packages
    assert train_packages | valid_packages == {f"pkg{i}" for i in range(12)} | {"single_module"}
    paths = sorted(doc["path"] for doc in train + valid)
    assert ("pkg1/copy.py" in paths) != ("pkg0/core.py" in paths)  # deduplicated by content
    for skipped in ("pkg2/blob.py", "pkg3/latin.py", "pkg4/huge.py", "pkg5/blank.py", "pkg6/__pycache__/cached.py"):
        assert skipped not in paths
    assert not any("dist-info" in path for path in paths)
    assert manifest["skipped"] == {"too_large": 1, "binary": 2, "unreadable": 0, "empty": 1, "duplicate": 1}
    assert manifest["train"]["documents"] == len(train) and manifest["valid"]["documents"] == len(valid)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    text = {doc["path"]: doc["text"] for doc in train + valid}
    assert text["pkg1/core.py"] == (fake_site_packages / "pkg1" / "core.py").read_text()
    # Built again (elsewhere): the very same files.
    build_embedded_corpus(tmp_path / "again", roots=[fake_site_packages], max_mb=1.0, max_file_kb=64)
    assert read_split(tmp_path / "again" / "train") == train
    assert read_split(tmp_path / "again" / "valid") == valid
    # The output is readable by the training data pipeline.
    assert len(list(iter_texts(tmp_path / "out" / "train"))) == len(train)


def test_embedded_corpus_respects_the_size_cap(tmp_path, fake_site_packages):
    manifest = build_embedded_corpus(tmp_path / "out", roots=[fake_site_packages], max_mb=0.0002)
    # The cap stops reading once 200 bytes are collected (a file is never cut).
    total = manifest["train"]["bytes"] + manifest["valid"]["bytes"]
    assert 200 <= total < 400
    assert manifest["train"]["documents"] >= 1 and manifest["valid"]["documents"] >= 1


def test_split_packages_keeps_both_sides():
    sizes = {f"p{i}": 100 for i in range(40)}
    valid = split_packages(sizes, 0.05)
    assert valid and len(valid) < 40
    assert 1 <= len(valid) <= 4  # about 5% of the bytes
    assert split_packages(sizes, 0.05) == valid
    assert len(split_packages({"a": 10, "b": 10}, 0.0)) == 1
    assert len(split_packages({"a": 10, "b": 10}, 1.0)) == 1
    with pytest.raises(ValueError, match="need at least 2"):
        split_packages({"only": 10}, 0.05)


def test_embedded_root_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_embedded_corpus(tmp_path / "out", roots=[tmp_path / "nowhere"])


def test_jsonl_chunks_from_an_in_memory_dataset(tmp_path):
    records = [{"text": f"document {i}", "id": i} for i in range(50)] + [{"text": None}, {"other": 1}, "plain string"]
    manifest = write_jsonl_chunks(iter(records), tmp_path / "chunks", chunks=3, max_docs=None, seed=1)
    assert manifest["documents"] == 51 and manifest["skipped"] == 2
    shards = list_shards(tmp_path / "chunks")
    assert [shard.name for shard in shards] == ["chunk_00000.jsonl", "chunk_00001.jsonl", "chunk_00002.jsonl"]
    texts = list(iter_texts(tmp_path / "chunks"))
    assert sorted(texts) == sorted([f"document {i}" for i in range(50)] + ["plain string"])
    assert texts[:10] != [f"document {i}" for i in range(10)]  # shuffled
    # Same seed, same chunks; max_docs stops early.
    write_jsonl_chunks(iter(records), tmp_path / "again", chunks=3, seed=1)
    assert list(iter_texts(tmp_path / "again")) == texts
    limited = write_jsonl_chunks(iter(records), tmp_path / "limited", chunks=2, max_docs=7)
    assert limited["documents"] == 7 and len(list(iter_texts(tmp_path / "limited"))) == 7


def test_cli_embedded(tmp_path, fake_site_packages, capsys):
    main(["embedded", "--out", str(tmp_path / "out"), "--root", str(fake_site_packages), "--train-shards", "2"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["documents"] > 0 and summary["valid"]["documents"] > 0
    assert len(list_shards(tmp_path / "out" / "train")) == 2


def test_progress_line():
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    progress = Progress("reading", total=10, unit=" MB", interval=0.0, stream=terminal)
    progress.update(5)
    progress.close()
    output = terminal.getvalue()
    assert "\rreading [##########          ]  50% 5 MB/10 MB" in output
    assert output.endswith("\n") and "100%" not in output
    log = io.StringIO()
    progress = Progress("reading", unit=" docs", log_interval=1e9, stream=log)
    for done in range(1, 100):
        progress.update(done)
    progress.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()  # the first update and the final line
    assert lines[-1].startswith("reading 99 docs")


def test_cli_hf_with_a_stand_in_datasets_module(tmp_path, monkeypatch, capsys):
    calls = []

    def load_dataset(name, subset, split, streaming):
        calls.append((name, subset, split, streaming))
        return [{"text": f"row {i}"} for i in range(30)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    main(["hf", "--dataset", "org/corpus", "--subset", "en", "--out", str(tmp_path / "hf"), "--chunks", "2", "--max-docs", "20"])
    assert calls == [("org/corpus", "en", "train", True)]
    assert json.loads(capsys.readouterr().out)["documents"] == 20
    assert len(list(iter_texts(tmp_path / "hf"))) == 20


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        main(["hf", "--dataset", "x", "--out", "unused"])
