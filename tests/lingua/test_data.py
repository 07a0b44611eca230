"""The data pipeline: packing, mixing, sharding, malformed lines, errors, exact resume and
parallel tokenization."""

from __future__ import annotations

import dataclasses
import json
import pickle
import threading

import pytest
import torch

from lingua.data import DataArgs, ReadAheadTokenizer, build_data_stream, iter_eval_batches
from lingua.tokenizer import ByteTokenizer, TokenizerArgs, build_tokenizer, encode_batch


def numbered_documents(prefix: str, count: int) -> list[str]:
    """Documents whose text says where they came from, of varied lengths."""
    return [f"{prefix}{i}:" + "x" * (i % 13) for i in range(count)]


def decoded_documents(batch) -> list[str]:
    """The texts of the complete documents (BOS ... EOS) inside a batch's rows."""
    tokenizer = ByteTokenizer()
    texts = []
    for row in batch.tokens.tolist():
        start = None
        for position, token in enumerate(row):
            if token == tokenizer.bos_id:
                start = position
            elif token == tokenizer.eos_id and start is not None:
                texts.append(tokenizer.decode(row[start + 1 : position]))
                start = None
    return texts


def take(stream, count: int):
    return [next(stream) for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.doc_ids, b.doc_ids)


def test_packing_shapes_labels_and_doc_ids(tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "a.jsonl", ["abc", "defgh", "ij", "klmnopqrstu"])
    args = DataArgs(sources={str(source): 1.0}, batch_size=2, seq_len=8, shuffle_buffer=0, prefetch=0)
    with build_data_stream(args, 0, 1) as stream:
        first, second = take(stream, 2)
    assert first.tokens.shape == first.labels.shape == first.doc_ids.shape == (2, 8)
    assert first.tokens.dtype == first.labels.dtype == first.doc_ids.dtype == torch.int64
    # The packed stream: every document is BOS text EOS, end to end, looping over the file.
    flat = []
    for text in ["abc", "defgh", "ij", "klmnopqrstu"] * 3:
        flat += [256, *text.encode(), 257]
    rows = [b.tokens[r].tolist() + [b.labels[r, -1].item()] for b in (first, second) for r in range(2)]
    for index, row in enumerate(rows):
        # Consecutive rows share one token, so row i starts at i * seq_len of the stream.
        assert row == flat[index * 8 : index * 8 + 9]
    for batch in (first, second):
        assert torch.equal(batch.labels[:, :-1], batch.tokens[:, 1:])
    # Row 0 = [BOS a b c EOS BOS d e]: documents 0 then 1 from the second BOS on.
    assert first.doc_ids[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    # Row 1 = [f g h EOS BOS i j EOS]: the end of "defgh" is document 0 of the row.
    assert rows[1][:8] == [102, 103, 104, 257, 256, 105, 106, 257]
    assert first.doc_ids[1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # A row that starts exactly at a BOS numbers that document 0.
    for batch in (first, second):
        for row_tokens, row_ids in zip(batch.tokens.tolist(), batch.doc_ids.tolist()):
            assert row_ids[0] == 0
            for position in range(1, 8):
                step = row_ids[position] - row_ids[position - 1]
                assert step == (1 if row_tokens[position] == 256 else 0)


def test_bos_eos_switches(tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "a.jsonl", ["abc", "de"])
    args = DataArgs(sources={str(source): 1.0}, batch_size=1, seq_len=9, shuffle_buffer=0, prefetch=0, add_bos=False)
    with build_data_stream(args, 0, 1) as stream:
        batch = next(stream)
    assert batch.tokens[0].tolist() == [97, 98, 99, 257, 100, 101, 257, 97, 98]
    # Document starts are tracked without a BOS token.
    assert batch.doc_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]


def test_sources_are_mixed_by_weight(tmp_path, write_jsonl):
    often = write_jsonl(tmp_path / "often.jsonl", numbered_documents("A", 50))
    rarely = write_jsonl(tmp_path / "rarely.jsonl", numbered_documents("B", 50))
    args = DataArgs(sources={str(often): 3.0, str(rarely): 1.0}, batch_size=8, seq_len=64, prefetch=0)
    with build_data_stream(args, 0, 1) as stream:
        texts = [text for batch in take(stream, 20) for text in decoded_documents(batch)]
    share = sum(text.startswith("A") for text in texts) / len(texts)
    assert len(texts) > 300
    assert 0.65 < share < 0.85  # 0.75 expected
    # The same seed mixes the same way; another seed differs.
    with build_data_stream(args, 0, 1) as again:
        assert_same_batches(take(again, 3), take(build_data_stream(args, 0, 1), 3))
    other = DataArgs(**{**args.__dict__, "seed": 7})
    with build_data_stream(other, 0, 1) as different:
        assert not torch.equal(next(different).tokens, next(build_data_stream(args, 0, 1)).tokens)


def test_gzip_shards_and_directories(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "corpus" / "part0.jsonl.gz", ["gz one", "gz two"])
    write_jsonl(tmp_path / "corpus" / "nested" / "part1.jsonl", ["plain three"])
    (tmp_path / "corpus" / "README.md").write_text("not a shard")
    args = DataArgs(sources={str(tmp_path / "corpus"): 1.0}, batch_size=4, seq_len=32, shuffle_buffer=0, prefetch=0)
    with build_data_stream(args, 0, 1) as stream:
        texts = {text for batch in take(stream, 2) for text in decoded_documents(batch)}
    assert texts == {"gz one", "gz two", "plain three"}


def test_malformed_lines_are_skipped_and_counted(tmp_path, write_jsonl):
    source = write_jsonl(
        tmp_path / "a.jsonl",
        ["good one", b"{not json", {"text": 3}, {"content": "no text"}, b"[1, 2]", b"\xff\xfe", b"", "good two"],
    )
    args = DataArgs(sources={str(source): 1.0}, batch_size=2, seq_len=32, shuffle_buffer=0, prefetch=2)
    with build_data_stream(args, 0, 1) as stream:
        batch = next(stream)
        assert set(decoded_documents(batch)) == {"good one", "good two"}
        assert batch.skipped_lines >= 5
        assert stream.skipped_lines == batch.skipped_lines
        # Counted once per pass over the file: it grows as the file is read again.
        later = take(stream, 5)[-1]
        assert later.skipped_lines > batch.skipped_lines
        assert later.skipped_lines % 5 == 0


def test_missing_and_empty_sources_name_the_path(tmp_path, write_jsonl):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        build_data_stream(DataArgs(sources={str(missing): 1.0}), 0, 1)
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        build_data_stream(DataArgs(sources={str(empty_dir): 1.0}), 0, 1)
    empty_file = tmp_path / "empty.jsonl"
    empty_file.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl"):
        build_data_stream(DataArgs(sources={str(empty_file): 1.0}), 0, 1)
    only_bad = write_jsonl(tmp_path / "only_bad.jsonl", [b"nope", b"{}"])
    with pytest.raises(ValueError, match="only_bad.jsonl"):
        with build_data_stream(DataArgs(sources={str(only_bad): 1.0}, prefetch=1), 0, 1) as stream:
            next(stream)
    with pytest.raises(ValueError, match="data.sources is empty"):
        build_data_stream(DataArgs(), 0, 1)
    good = write_jsonl(tmp_path / "good.jsonl", ["x"])
    with pytest.raises(ValueError, match="weight for .*good.jsonl"):
        build_data_stream(DataArgs(sources={str(good): 0.0}), 0, 1)


@pytest.mark.parametrize("shards", [1, 4])
def test_ranks_see_disjoint_documents(tmp_path, write_jsonl, shards):
    documents = numbered_documents("D", 96)
    for shard in range(shards):
        write_jsonl(tmp_path / "corpus" / f"part{shard}.jsonl", documents[shard::shards])
    world_size = 3
    seen = []
    for rank in range(world_size):
        args = DataArgs(sources={str(tmp_path / "corpus"): 1.0}, batch_size=2, seq_len=64, shuffle_buffer=4, prefetch=0)
        with build_data_stream(args, rank, world_size) as stream:
            seen.append({text for batch in take(stream, 6) for text in decoded_documents(batch)})
    assert all(len(texts) > 5 for texts in seen)
    for rank in range(world_size):
        for other in range(rank + 1, world_size):
            assert not seen[rank] & seen[other]


def test_exact_resume_with_prefetch_and_shuffle(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "a" / "part0.jsonl", numbered_documents("A", 40))
    write_jsonl(tmp_path / "a" / "part1.jsonl.gz", numbered_documents("G", 40))
    b = write_jsonl(tmp_path / "b.jsonl", numbered_documents("B", 30) + [b"broken"])
    args = DataArgs(
        sources={str(tmp_path / "a"): 2.0, str(b): 1.0}, batch_size=3, seq_len=24, shuffle_buffer=5, prefetch=3
    )
    original = build_data_stream(args, 1, 2)
    take(original, 7)  # 21 rows: mid shuffle block (blocks of 5), past the first epochs of b
    state = original.state_dict()
    expected = take(original, 40)
    original.close()
    # A round trip through JSON and pickle, as a checkpoint would store it.
    restored_state = pickle.loads(pickle.dumps(json.loads(json.dumps(state))))
    resumed = build_data_stream(args, 1, 2)
    resumed.load_state_dict(restored_state)
    assert_same_batches(take(resumed, 40), expected)
    assert resumed.skipped_lines == expected[-1].skipped_lines
    # Restoring into a running stream rewinds it too.
    resumed.load_state_dict(restored_state)
    assert_same_batches(take(resumed, 5), expected[:5])
    resumed.close()


def test_state_before_any_batch_and_without_prefetch(tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "a.jsonl", numbered_documents("A", 20))
    args = DataArgs(sources={str(source): 1.0}, batch_size=2, seq_len=16, shuffle_buffer=3, prefetch=0)
    stream = build_data_stream(args, 0, 1)
    initial = stream.state_dict()
    expected = take(stream, 4)
    stream.load_state_dict(initial)
    assert_same_batches(take(stream, 4), expected)
    stream.close()


def test_resume_rejects_other_settings(tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "a.jsonl", ["abc"])
    stream = build_data_stream(DataArgs(sources={str(source): 1.0}, seq_len=8, prefetch=0), 0, 1)
    other = build_data_stream(DataArgs(sources={str(source): 1.0}, seq_len=16, prefetch=0), 0, 1)
    with pytest.raises(ValueError, match="seq_len: saved 8, now 16"):
        other.load_state_dict(stream.state_dict())


def test_eval_batches_are_deterministic(tmp_path, write_jsonl):
    documents = numbered_documents("V", 30)
    source = write_jsonl(tmp_path / "valid.jsonl", documents[:10] + [b"bad"] + documents[10:])
    tokenizer = ByteTokenizer()
    first = list(iter_eval_batches(str(source), tokenizer, seq_len=16, batch_size=4, max_batches=None))
    second = list(iter_eval_batches(str(source), tokenizer, seq_len=16, batch_size=4, max_batches=None))
    assert_same_batches(first, second)
    total_tokens = sum(len(tokenizer.encode(text)) for text in numbered_documents("V", 30))
    # One pass in file order: every full row of the packed stream, nothing repeated.
    assert sum(batch.tokens.shape[0] for batch in first) == (total_tokens - 1) // 16
    assert first[-1].tokens.shape[0] <= 4 and all(b.tokens.shape[0] == 4 for b in first[:-1])
    assert decoded_documents(first[0])[0] == "V0:"
    assert first[-1].skipped_lines == 1
    limited = list(iter_eval_batches(str(source), tokenizer, seq_len=16, batch_size=4, max_batches=2))
    assert_same_batches(limited, first[:2])


def test_tiny_corpus_split_between_two_ranks(tiny_corpus):
    args = DataArgs(sources={str(tiny_corpus / "train"): 1.0}, batch_size=2, seq_len=32, prefetch=1)
    documents = []
    for rank in range(2):
        with build_data_stream(args, rank, 2) as stream:
            batch = next(stream).to("cpu")
            assert batch.tokens.shape == (2, 32)
            documents.append({text for b in [batch, *take(stream, 20)] for text in decoded_documents(b)})
    # Two shards, two ranks: each rank reads its own shard, so no document is seen by both.
    assert documents[0] and documents[1] and not documents[0] & documents[1]


class CountingTexts:
    """A text source whose state is the number of texts drawn (text i is "doc i")."""

    def __init__(self, limit: int = 10**9):
        self.drawn, self.limit = 0, limit

    def next_text(self) -> str:
        if self.drawn == self.limit:
            raise StopIteration
        self.drawn += 1
        return f"doc {self.drawn - 1}"

    def state_dict(self) -> int:
        return self.drawn

    def load_state_dict(self, state: int) -> None:
        self.drawn = state


def test_read_ahead_state_is_that_of_the_last_document_handed_out():
    texts = CountingTexts()
    documents = ReadAheadTokenizer(texts, ByteTokenizer(), add_bos=False, add_eos=False, threads=3, batch=2)
    assert documents.state_dict() == 0
    for index in range(5):
        assert bytes(documents.next_document()) == f"doc {index}".encode()
        assert documents.state_dict() == index + 1
    assert texts.drawn > 5  # read ahead: more drawn than handed out
    documents.load_state_dict(2)
    assert [bytes(documents.next_document()) for _ in range(3)] == [b"doc 2", b"doc 3", b"doc 4"]
    documents.close()
    # A finite source ends with StopIteration after its last document, whatever the batching.
    finite = ReadAheadTokenizer(CountingTexts(limit=5), ByteTokenizer(), False, False, threads=2, batch=3)
    assert [bytes(finite.next_document()) for _ in range(5)][-1] == b"doc 4"
    with pytest.raises(StopIteration):
        finite.next_document()
    finite.close()


def test_encode_batch_matches_encode(tmp_path, write_jsonl):
    from setup.train_tokenizer import train_sentencepiece

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [" ".join(words[(i + k) % 6] for k in range(7)) for i in range(120)])
    model = train_sentencepiece([str(corpus)], vocab_size=60, out_prefix=str(tmp_path / "tok"), byte_fallback=False)
    texts = ["alpha beta", "", "zeta gamma delta ✓", "epsilon"] * 3

    class EncodeOnly:  # a tokenizer without encode_batch of its own
        vocab_size, bos_id, eos_id = 258, 256, 257
        encode = ByteTokenizer.encode

    for tokenizer in (ByteTokenizer(), build_tokenizer(TokenizerArgs(name="sp", path=str(model))), EncodeOnly()):
        for add_bos, add_eos in ((True, True), (False, True), (True, False)):
            expected = [tokenizer.encode(text, add_bos=add_bos, add_eos=add_eos) for text in texts]
            for threads in (1, 3):
                assert encode_batch(tokenizer, texts, add_bos, add_eos, num_threads=threads) == expected


@pytest.mark.parametrize("worker", ["process", "thread"])
def test_parallel_tokenization_gives_the_same_stream_and_resumes(tmp_path, write_jsonl, worker):
    write_jsonl(tmp_path / "a" / "part0.jsonl", numbered_documents("A", 40))
    write_jsonl(tmp_path / "a" / "part1.jsonl", numbered_documents("G", 30) + [b"broken"])
    b = write_jsonl(tmp_path / "b.jsonl", numbered_documents("B", 30))
    serial = DataArgs(
        sources={str(tmp_path / "a"): 2.0, str(b): 1.0},
        batch_size=3,
        seq_len=20,
        shuffle_buffer=4,
        prefetch=2,
        tokenizer_threads=1,
        tokenize_batch=1,
    )
    serial = dataclasses.replace(serial, prefetch_worker=worker)
    parallel = dataclasses.replace(serial, tokenizer_threads=3, tokenize_batch=5)
    with build_data_stream(serial, 0, 1) as stream:
        expected = take(stream, 33)
    with build_data_stream(parallel, 0, 1) as stream:
        first = take(stream, 11)
        state = stream.state_dict()
        assert_same_batches(first + take(stream, 19), expected[:30])
    assert expected[29].skipped_lines > 0
    # The state does not depend on the thread count: a parallel stream's state resumes a serial
    # one and the other way round.
    with build_data_stream(serial, 0, 1) as stream:
        stream.load_state_dict(json.loads(json.dumps(state)))
        assert_same_batches(take(stream, 19), expected[11:30])
        assert stream.skipped_lines == expected[29].skipped_lines
        state = stream.state_dict()
    with build_data_stream(parallel, 0, 1) as stream:
        stream.load_state_dict(state)
        assert_same_batches(take(stream, 3), expected[30:])
    assert not [t for t in threading.enumerate() if t.name.startswith("data-tokenize")]


def test_eval_batches_do_not_depend_on_tokenizer_threads(tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "valid.jsonl", numbered_documents("V", 25) + [b"bad"] + numbered_documents("W", 5))
    serial = list(iter_eval_batches(str(source), ByteTokenizer(), seq_len=16, batch_size=3, tokenizer_threads=1))
    parallel = list(iter_eval_batches(str(source), ByteTokenizer(), seq_len=16, batch_size=3, tokenizer_threads=3))
    assert len(serial) > 5
    assert_same_batches(parallel, serial)
    assert [batch.skipped_lines for batch in parallel] == [batch.skipped_lines for batch in serial]


def test_bad_worker_settings_name_the_key(tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "a.jsonl", ["abc"])
    with pytest.raises(ValueError, match="data.tokenizer_threads must be >= 0.*got -1"):
        build_data_stream(DataArgs(sources={str(source): 1.0}, tokenizer_threads=-1), 0, 1)
    with pytest.raises(ValueError, match="data.tokenize_batch >= 1.*got 0 and 0"):
        build_data_stream(DataArgs(sources={str(source): 1.0}, tokenize_batch=0), 0, 1)
    with pytest.raises(ValueError, match="data.prefetch_worker is 'gpu'; expected 'process' or 'thread'"):
        build_data_stream(DataArgs(sources={str(source): 1.0}, prefetch_worker="gpu"), 0, 1)


@pytest.mark.parametrize("worker", ["process", "thread"])
def test_stream_goes_on_after_close(tmp_path, write_jsonl, worker):
    source = write_jsonl(tmp_path / "a.jsonl", numbered_documents("A", 30))
    args = DataArgs(sources={str(source): 1.0}, batch_size=2, seq_len=16, shuffle_buffer=3, prefetch=3, prefetch_worker=worker)
    with build_data_stream(dataclasses.replace(args, prefetch=0), 0, 1) as stream:
        expected = take(stream, 8)
    stream = build_data_stream(args, 0, 1)
    first = take(stream, 3)
    stream.close()  # the worker had prepared batches beyond these: they are made again
    assert_same_batches(first + take(stream, 5), expected)
    stream.close()


def test_worker_process_death_is_an_error(tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "a.jsonl", numbered_documents("A", 10))
    stream = build_data_stream(DataArgs(sources={str(source): 1.0}, seq_len=8, prefetch=1, prefetch_worker="process"), 0, 1)
    next(stream)
    stream._prefetcher._process.kill()
    with pytest.raises(RuntimeError, match="data worker process ended"):
        take(stream, 5)  # one batch may already be waiting
    stream.close()


def test_worker_process_ends_with_its_killed_parent(tmp_path, write_jsonl):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    source = write_jsonl(tmp_path / "a.jsonl", numbered_documents("A", 10))
    script = (
        "import os, signal\n"
        "from lingua.data import DataArgs, build_data_stream\n"
        f"stream = build_data_stream(DataArgs(sources={{{str(source)!r}: 1.0}}, seq_len=8, prefetch=2), 0, 1)\n"
        "next(stream)\n"
        "print(stream._prefetcher._process.pid, flush=True)\n"
        "signal.signal(signal.SIGTERM, lambda *_: None)  # as a trainer's preemption handler would\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    # Were the worker left behind, it would hold the output pipe open and this would hang.
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    worker = int(result.stdout.split()[0])

    def running() -> bool:  # a zombie has ended, waiting for a reaper that may never come
        try:
            return Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running()
