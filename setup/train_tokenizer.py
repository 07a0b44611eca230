"""Train a SentencePiece tokenizer on jsonl text, offline.

    python -m setup.train_tokenizer --input data/train [more.jsonl ...] --vocab-size 8000 --out tokenizers/code8k

writes ``tokenizers/code8k.model`` (and ``.vocab``); use it with ``data.tokenizer.name=sp
data.tokenizer.path=tokenizers/code8k.model``. Inputs are jsonl files or directories of shards
(``{"text": ...}`` per line). Ids: 0 = unknown, 1 = BOS, 2 = EOS.

Text is kept as written (no Unicode normalization, whitespace runs preserved) so code and
prose decode back exactly; newline and tab are pieces of their own, and with byte fallback
(the default) any other character the pieces miss is spelled as UTF-8 bytes instead of
becoming "unknown". Byte fallback needs ``vocab_size`` above 256 + the pieces' characters.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Iterator, Optional

from lingua.data import iter_texts
from setup import Progress

# SentencePiece drops "sentences" longer than its max_sentence_length, so documents are cut
# at line ends into pieces below this many bytes.
MAX_SENTENCE_BYTES = 4096


def split_document(text: str, max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Consecutive runs of whole lines of ``text``, each under ``max_bytes`` bytes when encoded
    (a single longer line is cut)."""
    current, size = [], 0
    for line in text.splitlines(keepends=True):
        line_bytes = len(line.encode("utf-8"))
        if current and size + line_bytes > max_bytes:
            yield "".join(current)
            current, size = [], 0
        while line_bytes > max_bytes:  # a very long line: cut it, never inside a character
            head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
            yield head
            line = line[len(head) :]
            line_bytes = len(line.encode("utf-8"))
        current.append(line)
        size += line_bytes
    if current:
        yield "".join(current)


def _sentences(inputs: Iterable[str], progress: Optional[Progress]) -> Iterator[str]:
    documents = 0
    for path in inputs:
        for text in iter_texts(path):
            documents += 1
            if progress is not None:
                progress.update(documents, note=Path(path).name)
            for sentence in split_document(text):
                if sentence.strip():
                    yield sentence


def train_sentencepiece(
    inputs: list[str],
    vocab_size: int,
    out_prefix: str,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    max_sentences: int = 2_000_000,
    character_coverage: float = 0.9995,
    seed: int = 0,
    show_progress: bool = False,
) -> Path:
    """Train and write ``<out_prefix>.model``; returns its path."""
    import sentencepiece

    if vocab_size < 8:
        raise ValueError(f"--vocab-size {vocab_size} is too small; expected at least 8")
    if byte_fallback and vocab_size < 300:
        raise ValueError(
            f"--vocab-size {vocab_size} leaves no room for byte fallback's 256 byte pieces; "
            "use a larger vocabulary or --no-byte-fallback"
        )
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    progress = Progress("reading documents", unit=" docs") if show_progress else None
    # SentencePiece samples input sentences at random; fix its seed for repeatable models.
    sentencepiece.set_random_generator_seed(seed)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=_sentences(inputs, progress),
        model_prefix=out_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        add_dummy_prefix=False,
        user_defined_symbols=["\n", "\t"],
        max_sentence_length=MAX_SENTENCE_BYTES,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=0 if show_progress else 2,
    )
    if progress is not None:
        progress.close()
    return Path(f"{out_prefix}.model")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="jsonl files or directories of shards")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="output prefix: writes <out>.model and <out>.vocab")
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false")
    parser.add_argument("--max-sentences", type=int, default=2_000_000, help="sample at most this many text pieces")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    args = parser.parse_args(argv)
    model = train_sentencepiece(
        args.input,
        args.vocab_size,
        args.out,
        model_type=args.model_type,
        byte_fallback=args.byte_fallback,
        max_sentences=args.max_sentences,
        character_coverage=args.character_coverage,
        show_progress=True,
    )
    print(model)


if __name__ == "__main__":
    main()
