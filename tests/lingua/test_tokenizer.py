"""Tokenizers: round trips, BOS/EOS, the vocabulary check, SentencePiece and tiktoken files."""

from __future__ import annotations

import base64

import pytest

from lingua.tokenizer import (
    ByteTokenizer,
    Tokenizer,
    TokenizerArgs,
    build_tokenizer,
    check_vocab,
)


def test_bytes_round_trip_and_special_ids():
    tokenizer = build_tokenizer(TokenizerArgs(name="bytes"))
    assert isinstance(tokenizer, Tokenizer)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (258, 256, 257)
    text = "héllo, wörld ✓\n\tend"
    ids = tokenizer.encode(text)
    assert ids[0] == 256 and ids[-1] == 257
    assert ids[1:-1] == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("ab", add_bos=False, add_eos=False) == [97, 98]
    assert tokenizer.encode("ab", add_bos=True, add_eos=False) == [256, 97, 98]
    assert tokenizer.encode("", add_bos=False, add_eos=True) == [257]


def test_bytes_decode_tolerates_cut_characters():
    ids = ByteTokenizer().encode("✓", add_bos=False, add_eos=False)[:2]
    assert ByteTokenizer().decode(ids) == "\ufffd"


def test_check_vocab_names_both_sizes():
    tokenizer = ByteTokenizer()
    check_vocab(tokenizer, 258)
    check_vocab(tokenizer, 512)
    with pytest.raises(ValueError, match=r"256 is smaller.*258.*vocab_size >= 258"):
        check_vocab(tokenizer, 256)


def test_build_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer.name 'gpt'"):
        build_tokenizer(TokenizerArgs(name="gpt"))
    with pytest.raises(ValueError, match="needs tokenizer.path"):
        build_tokenizer(TokenizerArgs(name="sp"))
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_tokenizer(TokenizerArgs(name="sp", path=str(missing)))


def test_sentencepiece_train_encode_decode(tmp_path, write_jsonl):
    from setup.train_tokenizer import train_sentencepiece

    words = ["def", "return", "self", "import", "class", "value", "index", "print"]
    documents = [
        " ".join(words[(i + k) % len(words)] for k in range(8)) + "\n    " + words[i % len(words)]
        for i in range(200)
    ]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", documents)
    model_path = train_sentencepiece([str(corpus)], vocab_size=100, out_prefix=str(tmp_path / "tok"), byte_fallback=False)
    tokenizer = build_tokenizer(TokenizerArgs(name="sp", path=str(model_path)))
    assert tokenizer.vocab_size == 100
    text = "def value\n    return self"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.bos_id != tokenizer.eos_id
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    # The learned pieces merge frequent words: fewer ids than characters.
    assert len(ids) - 2 < len(text) // 2
    assert tokenizer.decode(ids) == text


def test_tiktoken_from_local_ranks_file(tmp_path):
    pytest.importorskip("tiktoken")
    # Every single byte, then two merges: enough for a working BPE without network access.
    tokens = [bytes([b]) for b in range(256)] + [b"ab", b"abc"]
    ranks_file = tmp_path / "tiny.tiktoken"
    ranks_file.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    tokenizer = build_tokenizer(TokenizerArgs(name="tiktoken", path=str(ranks_file)))
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (260, 258, 259)
    ids = tokenizer.encode("abc ab")
    assert ids[0] == 258 and ids[-1] == 259
    assert 257 in ids and 256 in ids  # the merges were applied
    assert tokenizer.decode(ids) == "abc ab"
