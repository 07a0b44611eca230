"""Tokenizers: text to token ids and back, with a begin- and an end-of-document id.

Three kinds, chosen by :class:`TokenizerArgs`:

- ``bytes``: the UTF-8 bytes of the text are the ids 0..255; BOS is 256 and EOS is 257, so
  ``vocab_size`` is 258 (a model needs ``vocab_size >= 258``). Needs no file.
- ``sp`` (or ``sentencepiece``): a SentencePiece ``.model`` file (train one with
  ``python -m setup.train_tokenizer``); BOS and EOS are the model's own ids.
- ``tiktoken``: a local BPE ranks file in tiktoken's format (one ``base64-token rank`` per line,
  e.g. a copy of ``cl100k_base.tiktoken``); read offline. BOS and EOS are appended after the
  ranks, so ``vocab_size`` is the number of ranks + 2.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence, runtime_checkable


@dataclass
class TokenizerArgs:
    """Which tokenizer to build."""

    name: str = "bytes"
    """``bytes``, ``sp`` (alias ``sentencepiece``) or ``tiktoken``."""
    path: Optional[str] = None
    """The tokenizer's file: a SentencePiece ``.model`` for ``sp``, a BPE ranks file for
    ``tiktoken``; unused by ``bytes``."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, evaluation and generation need from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def _wrap(ids: list[int], bos_id: int, eos_id: int, add_bos: bool, add_eos: bool) -> list[int]:
    return ([bos_id] if add_bos else []) + ids + ([eos_id] if add_eos else [])


def encode_batch(
    tokenizer: Tokenizer, texts: Sequence[str], add_bos: bool = True, add_eos: bool = True, num_threads: int = 1
) -> list[list[int]]:
    """``[tokenizer.encode(text) for text in texts]``, through the tokenizer's own
    ``encode_batch`` when it has one (the built-in ones do; they may use ``num_threads``
    threads and release the GIL), else one text at a time."""
    native = getattr(tokenizer, "encode_batch", None)
    if native is not None:
        return native(texts, add_bos=add_bos, add_eos=add_eos, num_threads=num_threads)
    return [tokenizer.encode(text, add_bos=add_bos, add_eos=add_eos) for text in texts]


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, BOS = 256, EOS = 257."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        return _wrap(list(text.encode("utf-8")), self.bos_id, self.eos_id, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = True, num_threads: int = 1) -> list[list[int]]:
        # Already as fast as copying the bytes: threads would only contend for the GIL.
        return [self.encode(text, add_bos, add_eos) for text in texts]

    def decode(self, ids: list[int]) -> str:
        # Special ids carry no text; a cut multi-byte character decodes as U+FFFD, not an error.
        return bytes(i for i in map(int, ids) if 0 <= i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model read from a ``.model`` file."""

    def __init__(self, path: str):
        import sentencepiece

        self.path = path
        self._processor = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._processor.vocab_size()
        self.bos_id = self._processor.bos_id()
        self.eos_id = self._processor.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"sentencepiece model {path} has no BOS or EOS piece (bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}); train it with bos_id and eos_id >= 0 "
                "(python -m setup.train_tokenizer does)"
            )

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        return _wrap(self._processor.encode(text), self.bos_id, self.eos_id, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = True, num_threads: int = 1) -> list[list[int]]:
        # SentencePiece encodes a list in C++ threads of its own, without the GIL.
        return self._processor.encode(list(texts), add_bos=add_bos, add_eos=add_eos, num_threads=max(1, num_threads))

    def decode(self, ids: list[int]) -> str:
        return self._processor.decode([int(i) for i in ids])


# The pre-tokenization pattern of cl100k_base: contractions, words, numbers of up to three
# digits, punctuation runs, and whitespace.
_TIKTOKEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Read a tiktoken BPE ranks file (``base64-token rank`` per line) without network access."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{line_number}: expected 'base64-token rank', got {line[:80]!r}")
            ranks[base64.b64decode(parts[0])] = int(parts[1])
    if not ranks:
        raise ValueError(f"tiktoken ranks file {path} holds no tokens")
    return ranks


class TiktokenTokenizer:
    """A tiktoken BPE built from a local ranks file; BOS and EOS follow the ranks."""

    BOS = "<|begin_of_text|>"
    EOS = "<|end_of_text|>"

    def __init__(self, path: str):
        try:
            import tiktoken
        except ImportError as error:
            raise ImportError(
                "tokenizer.name=tiktoken needs the tiktoken package: pip install tiktoken "
                "(or pip install -e '.[tiktoken]')"
            ) from error
        self.path = path
        ranks = read_tiktoken_ranks(path)
        first_free = max(ranks.values()) + 1
        self.bos_id, self.eos_id = first_free, first_free + 1
        self._encoding = tiktoken.Encoding(
            name=Path(path).stem,
            pat_str=_TIKTOKEN_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={self.BOS: self.bos_id, self.EOS: self.eos_id},
        )
        self.vocab_size = first_free + 2

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        # Special-token text inside a document is ordinary text, never a control id.
        ids = self._encoding.encode(text, disallowed_special=())
        return _wrap(ids, self.bos_id, self.eos_id, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = True, num_threads: int = 1) -> list[list[int]]:
        if num_threads <= 1:  # tiktoken's batch call would start a thread pool for nothing
            return [self.encode(text, add_bos, add_eos) for text in texts]
        batch = self._encoding.encode_batch(list(texts), num_threads=num_threads, disallowed_special=())
        return [_wrap(ids, self.bos_id, self.eos_id, add_bos, add_eos) for ids in batch]

    def decode(self, ids: list[int]) -> str:
        ordinary = [int(i) for i in ids if int(i) not in (self.bos_id, self.eos_id)]
        return self._encoding.decode(ordinary, errors="replace")


_NAMES = ("bytes", "sp", "sentencepiece", "tiktoken")


def build_tokenizer(args: TokenizerArgs) -> Tokenizer:
    """Build the tokenizer ``args`` names; errors name the config key that is wrong."""
    if args.name == "bytes":
        return ByteTokenizer()
    if args.name not in _NAMES:
        raise ValueError(f"unknown tokenizer.name '{args.name}'; expected one of {', '.join(_NAMES)}")
    if not args.path:
        raise ValueError(f"tokenizer.name={args.name} needs tokenizer.path (the tokenizer's file)")
    if not Path(args.path).is_file():
        raise FileNotFoundError(f"tokenizer.path {args.path} is not a file")
    if args.name == "tiktoken":
        return TiktokenTokenizer(args.path)
    return SentencePieceTokenizer(args.path)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raise ``ValueError`` if a model with ``model_vocab_size`` logits cannot take every id."""
    if model_vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size {model_vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ids ({type(tokenizer).__name__}, bos_id={tokenizer.bos_id}, "
            f"eos_id={tokenizer.eos_id}); set model.vocab_size >= {tokenizer.vocab_size}"
        )
