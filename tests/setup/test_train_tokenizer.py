"""Tokenizer training: document splitting and the command line."""

from __future__ import annotations

import pytest

from lingua.tokenizer import TokenizerArgs, build_tokenizer
from setup.train_tokenizer import main, split_document, train_sentencepiece


def test_split_document_keeps_text_and_bounds_pieces():
    text = "".join(f"line {i} " + "é" * (i % 40) + "\n" for i in range(200)) + "z" * 5000
    pieces = list(split_document(text, max_bytes=256))
    assert "".join(pieces) == text
    assert all(len(piece.encode("utf-8")) <= 256 for piece in pieces)
    first_long = next(index for index, piece in enumerate(pieces) if "z" in piece)
    assert all(piece.endswith("\n") for piece in pieces[:first_long])  # whole lines
    assert len(pieces) - first_long == 20  # 5000 bytes in pieces of 256


def test_cli_trains_a_model_from_a_directory(tmp_path, write_jsonl, capsys):
    documents = [f"for item in range({i}):\n\tprint(item, 'value')\n" for i in range(150)]
    write_jsonl(tmp_path / "corpus" / "a.jsonl", documents[:75])
    write_jsonl(tmp_path / "corpus" / "b.jsonl.gz", documents[75:])
    main(["--input", str(tmp_path / "corpus"), "--vocab-size", "64", "--out", str(tmp_path / "tok" / "m"), "--no-byte-fallback"])
    model_path = capsys.readouterr().out.strip()
    assert model_path.endswith("m.model")
    tokenizer = build_tokenizer(TokenizerArgs(name="sp", path=model_path))
    text = "for item in range(3):\n\tprint(item)"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    # Newline and tab are pieces of their own (never unknown).
    assert tokenizer.encode("\n\t", add_bos=False, add_eos=False) == [3, 4]


def test_byte_fallback_needs_room():
    with pytest.raises(ValueError, match="--no-byte-fallback"):
        train_sentencepiece(["unused.jsonl"], vocab_size=100, out_prefix="unused")
