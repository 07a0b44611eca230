"""Training data: jsonl shards to packed, shuffled, per-rank batches with an exactly resumable state.

A *source* is a ``.jsonl`` / ``.jsonl.gz`` file or a directory of them (searched recursively),
one ``{"text": ...}`` document per line. The pipeline, per rank:

1. **read** each source in epochs, its shard order reshuffled every epoch from the seed. With at
   least as many shards as ranks, rank r reads the shards r, r + world_size, ... of the sorted
   list; otherwise it reads the lines r, r + world_size, ... of every shard. Either way the ranks'
   documents are disjoint for the whole run. A malformed line (bad JSON, no ``"text"`` string) is skipped and counted.
2. **mix** the sources: each next document comes from a source drawn by weight from a seeded RNG.
3. **tokenize** it (BOS/EOS as configured; ``tokenizer_threads`` threads tokenize the next
   documents ahead of use, in batches, and hand them out in drawing order, so the stream does not
   depend on the thread count) and **pack** the documents end to end into rows of
   ``seq_len + 1`` tokens; a row starts at the last token of the row before, so each token is a
   target exactly once. ``tokens = row[:-1]``, ``labels = row[1:]``, and ``doc_ids`` numbers the
   documents in a row 0, 1, 2, ..., increasing at each document start. The label of a document's
   last token is the first token (BOS) of the next one, as in any packed stream; attention
   never crosses documents, so the model sees no context for that prediction.
4. **shuffle** rows block-wise: ``shuffle_buffer`` rows are packed, permuted by a seeded RNG and
   handed out in that order.
5. **batch** ``batch_size`` rows, in a background worker (``prefetch`` batches ahead): by default a
   forked process, whose GIL the training loop does not share.

The state (:meth:`DataStream.state_dict`) is small: where the current shuffle block began (the
reader and RNG positions), which block it is and how many of its rows were used. Restoring it
re-packs that block and skips the used rows, so the batches after a resume are the very ones
the original stream would have given. It assumes the shard files have not changed.
"""

from __future__ import annotations

import copy
import gzip
import json
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import numpy as np
import torch

from lingua.recall import RecallArgs
from lingua.tokenizer import Tokenizer, TokenizerArgs, build_tokenizer, encode_batch

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz")
_STATE_VERSION = 1


@dataclass
class DataArgs:
    """Where the training text comes from and how it is cut into batches."""

    sources: dict[str, float] = field(default_factory=dict)
    """Source path (a jsonl file or a directory of shards) -> mixing weight (> 0; need not sum
    to 1)."""
    batch_size: int = 4
    """Rows per batch on each rank."""
    seq_len: int = 256
    """Tokens per row (each row packs seq_len + 1 tokens: inputs and shifted labels)."""
    seed: int = 42
    """Seeds shard order, source mixing and shuffling; the same seed gives the same stream."""
    shuffle_buffer: int = 64
    """Rows shuffled together (block-wise); 0 or 1 turns shuffling off."""
    prefetch: int = 2
    """Batches prepared ahead in a background worker; 0 prepares them on demand, no worker."""
    prefetch_worker: str = "process"
    """Where batches are prepared ahead: ``process`` (a forked process with a GIL of its own, so
    the training loop's Python does not slow reading and tokenizing) or ``thread`` (a thread of
    this process; also used where ``fork`` is not available)."""
    add_bos: bool = True
    """Begin every document with the tokenizer's BOS id."""
    add_eos: bool = True
    """End every document with the tokenizer's EOS id."""
    tokenizer_threads: int = 0
    """Threads tokenizing documents ahead of the packer; 0 = auto (this rank's share of the
    CPUs, at most 8: ~3.6M tokens/s with a 32k SentencePiece model on an H100 host's Xeon);
    1 tokenizes in the thread that packs. The batches do not depend on it,
    and a state saved with one count resumes with another."""
    tokenize_batch: int = 16
    """Documents per tokenizer call (one task of a tokenizer thread). Larger amortizes the
    per-call cost; smaller reads less ahead (the read-ahead is redone after a resume)."""
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)
    recall: Optional[RecallArgs] = None
    """Train on synthetic multi-query associative recall (lingua.recall) instead of ``sources``."""


@dataclass
class Batch:
    """A batch of packed rows; every tensor is ``[B, seq_len]``."""

    tokens: torch.Tensor
    """Input ids (int64)."""
    labels: torch.Tensor
    """Next-token targets: the row shifted left by one (a document's last token has the next
    document's first token as its label, as in any packed stream)."""
    doc_ids: torch.Tensor
    """Document number of each token within its row: 0, 1, 2, ... (increases at each start)."""
    skipped_lines: int = 0
    """Malformed lines skipped so far by this rank (cumulative)."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        tokens, labels, doc_ids = (
            tensor.to(device, non_blocking=non_blocking) for tensor in (self.tokens, self.labels, self.doc_ids)
        )
        return Batch(tokens, labels, doc_ids, self.skipped_lines)


# ---------------------------------------------------------------------------------------------
# Reading jsonl shards


def list_shards(path: str | Path) -> list[Path]:
    """The shard files of a source, sorted; errors name the path when there are none."""
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"data source {path} does not exist")
    if source.is_file():
        shards = [source]
    else:
        shards = sorted(p for p in source.rglob("*") if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
        if not shards:
            raise ValueError(f"data source {path} holds no {' or '.join(SHARD_SUFFIXES)} files")
    if all(p.stat().st_size == 0 for p in shards):
        raise ValueError(f"data source {path} is empty (every shard file has 0 bytes)")
    return shards


def _open_shard(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def parse_line(line: bytes) -> Optional[str]:
    """The text of a jsonl line, or None when the line is malformed."""
    try:
        record = json.loads(line)
    except ValueError:  # bad JSON or bad UTF-8
        return None
    text = record.get("text") if isinstance(record, dict) else None
    return text if isinstance(text, str) else None


def iter_texts(path: str | Path, counts: Optional[dict[str, int]] = None) -> Iterator[str]:
    """Every document's text of a source, in shard order, once; blank lines are ignored and
    malformed lines skipped (counted in ``counts["skipped"]`` when ``counts`` is given)."""
    for shard in list_shards(path):
        with _open_shard(shard) as file:
            for line in file:
                if not line.strip():
                    continue
                text = parse_line(line)
                if text is None:
                    if counts is not None:
                        counts["skipped"] = counts.get("skipped", 0) + 1
                    continue
                yield text


def _seeded_rng(*keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(list(keys)))


class ShardReader:
    """One source's documents for one rank, looping over epochs, with a resumable position."""

    def __init__(self, path: str, source_index: int, seed: int, rank: int, world_size: int):
        self.path = path
        self.shards = list_shards(path)
        self.source_index, self.seed = source_index, seed
        self.rank, self.world_size = rank, world_size
        # Enough shards: each rank keeps its own for the whole run; too few: ranks split every
        # shard's lines.
        self.split_shards = len(self.shards) >= world_size
        self.rank_shards = self.shards[rank::world_size] if self.split_shards else self.shards
        self.epoch = 0
        self.shard_position = 0  # index into this epoch's shards for this rank
        self.offset = 0  # bytes (uncompressed) read from the current shard
        self.line = 0  # lines read from the current shard
        self.documents_this_epoch = 0
        self.skipped = 0
        self._file = None
        self._epoch_shards = self._shards_for_epoch(0)

    def _shards_for_epoch(self, epoch: int) -> list[Path]:
        order = _seeded_rng(self.seed, self.source_index, self.rank, epoch).permutation(len(self.rank_shards))
        return [self.rank_shards[i] for i in order]

    def _owns_line(self, line_index: int) -> bool:
        return self.split_shards or line_index % self.world_size == self.rank

    def _next_shard(self) -> None:
        self.close()
        self.shard_position += 1
        self.offset = self.line = 0
        if self.shard_position >= len(self._epoch_shards):
            if self.documents_this_epoch == 0:
                raise ValueError(
                    f"data source {self.path} gave rank {self.rank} of {self.world_size} no "
                    f"document in a whole epoch ({self.skipped} malformed lines skipped); it "
                    "needs lines like {\"text\": \"...\"}"
                )
            self.epoch += 1
            self.shard_position = 0
            self.documents_this_epoch = 0
            self._epoch_shards = self._shards_for_epoch(self.epoch)

    def next_text(self) -> str:
        while True:
            if self._file is None:
                self._file = _open_shard(self._epoch_shards[self.shard_position])
                self._file.seek(self.offset)
            raw = self._file.readline()
            if not raw:
                self._next_shard()
                continue
            line_index = self.line
            self.line += 1
            self.offset += len(raw)
            if not self._owns_line(line_index) or not raw.strip():
                continue
            text = parse_line(raw)
            if text is None:
                self.skipped += 1
                continue
            self.documents_this_epoch += 1
            return text

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "shard_position": self.shard_position,
            "offset": self.offset,
            "line": self.line,
            "documents_this_epoch": self.documents_this_epoch,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        for key in ("epoch", "shard_position", "offset", "line", "documents_this_epoch", "skipped"):
            setattr(self, key, int(state[key]))
        self._epoch_shards = self._shards_for_epoch(self.epoch)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------------------------------
# Mixing, packing and shuffling


class TextSource(Protocol):
    """Gives document texts one by one and can rewind to a saved position. A finite source
    raises ``StopIteration`` at its end."""

    def next_text(self) -> str: ...

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class DocumentSource(Protocol):
    """Gives tokenized documents one by one and can rewind to a saved position."""

    def next_document(self) -> list[int]: ...

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class SourceMixer:
    """Document texts drawn from several readers by weight."""

    def __init__(self, readers: list[ShardReader], weights: list[float], seed: int, rank: int):
        self.readers = readers
        self.probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.rng = _seeded_rng(seed, rank, 0x5EED)

    def next_text(self) -> str:
        index = int(self.rng.choice(len(self.readers), p=self.probabilities)) if len(self.readers) > 1 else 0
        return self.readers[index].next_text()

    @staticmethod
    def skipped_lines(state: dict) -> int:
        """Malformed lines skipped by the readers up to the position ``state``."""
        return sum(int(reader["skipped"]) for reader in state["readers"])

    def state_dict(self) -> dict:
        return {
            "rng": copy.deepcopy(self.rng.bit_generator.state),
            "readers": [reader.state_dict() for reader in self.readers],
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])
        for reader, reader_state in zip(self.readers, state["readers"], strict=True):
            reader.load_state_dict(reader_state)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


class ReadAheadTokenizer:
    """The documents of a text source, tokenized ahead of use and handed out in the source's
    order: ``threads`` threads each tokenize ``batch`` documents at a time (the built-in
    tokenizers release the GIL), keeping two batches per thread in flight.

    Every document carries the source's state as of right after it was drawn, and
    :meth:`state_dict` is that of the last document handed out, i.e. the position before the
    next one, however far the reading has run ahead. Restoring a state drops the read-ahead and
    redoes it, so the documents never depend on ``threads`` or ``batch``."""

    def __init__(self, texts: TextSource, tokenizer: Tokenizer, add_bos: bool, add_eos: bool, threads: int = 1, batch: int = 16):
        if threads < 1 or batch < 1:
            raise ValueError(f"tokenizer threads and batch must be >= 1, got {threads} and {batch}")
        self.texts, self.tokenizer = texts, tokenizer
        self.add_bos, self.add_eos = add_bos, add_eos
        self.threads, self.batch = threads, batch
        self._state = texts.state_dict()
        self._ready: deque[tuple[list[int], Any]] = deque()  # (ids, source state after the document)
        self._pending: deque[tuple[Future, list]] = deque()  # batches being tokenized, oldest first
        self._exhausted = False
        self._pool: Optional[ThreadPoolExecutor] = None  # started on first use
        self._pool_pid = os.getpid()

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return encode_batch(self.tokenizer, texts, self.add_bos, self.add_eos, num_threads=1)

    def _draw(self) -> tuple[list[str], list[Any]]:
        """The next ``batch`` texts (fewer at the end of a finite source) and the state after each."""
        texts, states = [], []
        while len(texts) < self.batch and not self._exhausted:
            try:
                texts.append(self.texts.next_text())
            except StopIteration:
                self._exhausted = True
                break
            states.append(self.texts.state_dict())
        return texts, states

    def _refill(self) -> None:
        if self.threads == 1:
            texts, states = self._draw()
            self._ready.extend(zip(self._encode(texts), states, strict=True))
            return
        if self._pool is None or self._pool_pid != os.getpid():  # a forked process has no threads
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="data-tokenize")
            self._pool_pid = os.getpid()
        while len(self._pending) < 2 * self.threads and not self._exhausted:
            texts, states = self._draw()
            if texts:
                self._pending.append((self._pool.submit(self._encode, texts), states))
        if self._pending:
            future, states = self._pending.popleft()
            self._ready.extend(zip(future.result(), states, strict=True))

    def next_document(self) -> list[int]:
        if not self._ready:
            self._refill()
            if not self._ready:
                raise StopIteration  # a finite source has ended
        ids, self._state = self._ready.popleft()
        return ids

    def state_dict(self) -> Any:
        return self._state

    def load_state_dict(self, state: Any) -> None:
        for future, _ in self._pending:
            future.cancel()  # one already running finishes and is dropped
        self._pending.clear()
        self._ready.clear()
        self._exhausted = False
        self.texts.load_state_dict(state)
        self._state = copy.deepcopy(state)

    def close(self) -> None:
        """Stop the tokenizer threads once the batches in flight are done (those stay usable)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


@dataclass
class Row:
    """One packed row of ``seq_len + 1`` tokens and the positions where documents start."""

    tokens: np.ndarray  # [n + 1] int64
    doc_starts: np.ndarray  # [n + 1] bool


class Packer:
    """Packs documents end to end into rows of ``seq_len + 1`` tokens, consecutive rows sharing
    one token. Its state is the document source's position before the document holding the
    next row's first token, and that token's offset in it."""

    def __init__(self, documents: DocumentSource, seq_len: int):
        self.documents, self.seq_len = documents, seq_len
        self._before_document = documents.state_dict()
        self._document: Optional[list[int]] = None  # drawn lazily (also after a restore)
        self._position = 0

    def next_row(self) -> Row:
        if self._document is None:
            self._document = self.documents.next_document()
        document, position, before = self._document, self._position, self._before_document
        pieces, starts = [], []
        needed = self.seq_len + 1
        while True:
            take = min(needed, len(document) - position)
            if take > 0:
                piece_starts = np.zeros(take, dtype=bool)
                piece_starts[0] = position == 0
                pieces.append(document[position : position + take])
                starts.append(piece_starts)
                needed -= take
                position += take
            if needed == 0:
                break
            before = self.documents.state_dict()
            document, position = self.documents.next_document(), 0
        # The next row starts at this row's last token.
        self._document, self._position, self._before_document = document, position - 1, before
        return Row(np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces]), np.concatenate(starts))

    def state_dict(self) -> dict:
        return {"before_document": copy.deepcopy(self._before_document), "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        self.documents.load_state_dict(state["before_document"])
        self._before_document = copy.deepcopy(state["before_document"])
        self._document, self._position = None, int(state["position"])


class BlockShuffler:
    """Rows from a packer, shuffled within consecutive blocks of ``block_size`` rows."""

    def __init__(self, packer: Packer, block_size: int, seed: int, rank: int):
        self.packer, self.block_size = packer, max(1, block_size)
        self.seed, self.rank = seed, rank
        self._block_start = packer.state_dict()
        self._block = 0
        self._used = 0
        self._rows: Optional[list[Row]] = None

    def next_row(self) -> Row:
        if self._rows is None:  # the packer is at the block's start
            rows = [self.packer.next_row() for _ in range(self.block_size)]
            order = _seeded_rng(self.seed, self.rank, self._block).permutation(len(rows))
            self._rows = [rows[i] for i in order]
        row = self._rows[self._used]
        self._used += 1
        if self._used == self.block_size:
            self._block += 1
            self._block_start, self._used, self._rows = self.packer.state_dict(), 0, None
        return row

    def state_dict(self) -> dict:
        return {"block_start": copy.deepcopy(self._block_start), "block": self._block, "used": self._used}

    def load_state_dict(self, state: dict) -> None:
        self.packer.load_state_dict(state["block_start"])
        self._block_start = copy.deepcopy(state["block_start"])
        self._block, self._used, self._rows = int(state["block"]), int(state["used"]), None


def rows_to_batch(rows: list[Row], skipped_lines: int = 0) -> Batch:
    """Stack packed rows into a batch: inputs, shifted labels and per-row document numbers."""
    packed = torch.from_numpy(np.stack([row.tokens for row in rows]))  # [B, n + 1]
    starts = np.stack([row.doc_starts[:-1] for row in rows])  # [B, n]
    doc_ids = np.cumsum(starts, axis=1, dtype=np.int64)
    doc_ids -= doc_ids[:, :1]  # the row's first token is document 0, started or continued
    return Batch(packed[:, :-1].contiguous(), packed[:, 1:].contiguous(), torch.from_numpy(doc_ids), skipped_lines)


# ---------------------------------------------------------------------------------------------
# Background prefetch


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _produce_until_stopped(produce: Callable[[], Any], out: Any, stopped: Callable[[], bool], in_worker_process: bool) -> None:
    """Put ``produce()`` results into ``out`` (a :mod:`queue` or :mod:`multiprocessing` queue)
    until ``stopped()`` or ``produce`` raises (the error is put too, for the consumer to
    re-raise)."""
    while not stopped():
        try:
            item = produce()
        except BaseException as error:
            if in_worker_process:  # the traceback does not survive pickling; its text does
                error.add_note("raised in the data worker process:\n" + traceback.format_exc())
                try:
                    pickle.dumps(error)
                except Exception:
                    error = RuntimeError(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
            item = _Failure(error)
        while not stopped():
            try:
                out.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if isinstance(item, _Failure):
            break


class Prefetcher:
    """Calls ``produce`` in a daemon thread, keeping up to ``depth`` results ready."""

    def __init__(self, produce: Callable[[], Any], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._failure: Optional[_Failure] = None
        self._thread = threading.Thread(
            target=_produce_until_stopped, args=(produce, self._queue, self._stop.is_set, False), name="data-prefetch", daemon=True
        )
        self._thread.start()

    def _take(self) -> Any:
        return self._queue.get()

    def get(self) -> Any:
        if self._failure is None:
            item = self._take()
            if not isinstance(item, _Failure):
                return item
            self._failure = item  # the producer has ended: keep raising the same error
        raise self._failure.error

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class ProcessPrefetcher(Prefetcher):
    """Calls ``produce`` in a forked daemon process, keeping up to ``depth`` (picklable) results
    ready. The process has a GIL of its own, so Python work in this process (the training loop)
    does not starve its reading and tokenizer threads."""

    def __init__(self, produce: Callable[[], Any], depth: int):
        context = multiprocessing.get_context("fork")  # inherits the pipeline: nothing to pickle
        self._queue = context.Queue(maxsize=depth)
        self._stop = context.Event()
        self._failure = None
        self._process = context.Process(target=self._work, args=(produce, os.getpid()), name="data-prefetch", daemon=True)
        self._process.start()

    def _work(self, produce: Callable[[], Any], parent_pid: int) -> None:
        # The parent's handlers (e.g. the trainer's preemption flag) mean nothing here: a signal
        # ends the worker, and so does the parent's death (it may be SIGKILLed and never stop us).
        for number in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if number is not None:
                signal.signal(number, signal.SIG_DFL)

        def stopped() -> bool:
            return self._stop.is_set() or os.getppid() != parent_pid

        _produce_until_stopped(produce, self._queue, stopped, in_worker_process=True)
        if stopped():
            self._queue.cancel_join_thread()  # exit now, even with results nobody will read
        # else it failed: exiting waits until the error is in the pipe

    def _take(self) -> Any:
        while True:
            alive = self._process.is_alive()  # before the wait: whatever it sent is in the pipe
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if not alive:
                    return _Failure(
                        RuntimeError(f"the data worker process ended without a word (exit code {self._process.exitcode}); out of memory?")
                    )

    def close(self) -> None:
        self._stop.set()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._queue.close()


# ---------------------------------------------------------------------------------------------
# The training stream


class DataStream:
    """An endless, per-rank stream of :class:`Batch` es; see the module docstring."""

    def __init__(self, args: DataArgs, rank: int = 0, world_size: int = 1, tokenizer: Optional[Tokenizer] = None):
        if not args.sources:
            raise ValueError("data.sources is empty: give at least one 'path: weight' entry")
        for path, weight in args.sources.items():
            if not weight > 0:
                raise ValueError(f"data.sources weight for {path} is {weight}; expected a number > 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        if args.seq_len < 1 or args.batch_size < 1:
            raise ValueError(f"data.seq_len and data.batch_size must be >= 1, got {args.seq_len} and {args.batch_size}")
        if args.tokenizer_threads < 0 or args.tokenize_batch < 1:
            raise ValueError(
                f"data.tokenizer_threads must be >= 0 (0 = auto) and data.tokenize_batch >= 1, got "
                f"{args.tokenizer_threads} and {args.tokenize_batch}"
            )
        if args.prefetch_worker not in ("process", "thread"):
            raise ValueError(f"data.prefetch_worker is '{args.prefetch_worker}'; expected 'process' or 'thread'")
        self.args, self.rank, self.world_size = args, rank, world_size
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(args.tokenizer)
        paths = list(args.sources)
        readers = [ShardReader(path, index, args.seed, rank, world_size) for index, path in enumerate(paths)]
        self._mixer = SourceMixer(readers, [args.sources[p] for p in paths], args.seed, rank)
        self.tokenizer_threads = args.tokenizer_threads or auto_tokenizer_threads()
        self._documents = ReadAheadTokenizer(
            self._mixer, self.tokenizer, args.add_bos, args.add_eos, self.tokenizer_threads, args.tokenize_batch
        )
        self._shuffler = BlockShuffler(Packer(self._documents, args.seq_len), args.shuffle_buffer, args.seed, rank)
        self._prefetcher: Optional[Prefetcher] = None
        self._state = self._make_state()
        self._skipped_lines = self._consumed_skipped_lines()

    def _fingerprint(self) -> dict:
        args = self.args
        return {
            # Names rather than full paths, so a dataset moved to another directory still resumes.
            "sources": [[Path(path).name, float(weight), len(reader.shards)] for (path, weight), reader in zip(args.sources.items(), self._mixer.readers)],
            "seq_len": args.seq_len,
            "seed": args.seed,
            "shuffle_buffer": max(1, args.shuffle_buffer),
            "add_bos": args.add_bos,
            "add_eos": args.add_eos,
            "tokenizer": {"name": args.tokenizer.name, "path": args.tokenizer.path},
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def _consumed_skipped_lines(self) -> int:
        # Counted up to the last document packed, not the read-ahead, so it matches the batches.
        return SourceMixer.skipped_lines(self._documents.state_dict())

    def _make_state(self) -> dict:
        return {"version": _STATE_VERSION, "config": self._fingerprint(), "pipeline": self._shuffler.state_dict()}

    def _produce(self) -> tuple[list[Row], int, dict]:
        """The next batch's rows, the skipped-line count and the state right after them (runs
        in the prefetch worker if any; numpy only, so it pickles cheaply out of a process)."""
        rows = [self._shuffler.next_row() for _ in range(self.args.batch_size)]
        return rows, self._consumed_skipped_lines(), self._make_state()

    def _start_prefetch(self) -> Prefetcher:
        # The worker starts from this process's pipeline, which is at the consumer's position.
        if self.args.prefetch_worker == "process" and "fork" in multiprocessing.get_all_start_methods():
            return ProcessPrefetcher(self._produce, self.args.prefetch)
        return Prefetcher(self._produce, self.args.prefetch)

    def __iter__(self) -> "DataStream":
        return self

    def __next__(self) -> Batch:
        if self.args.prefetch <= 0:
            rows, skipped, state = self._produce()
        else:
            if self._prefetcher is None:
                self._prefetcher = self._start_prefetch()
            rows, skipped, state = self._prefetcher.get()
        # The state that matches what the consumer has received, not what the producer is at.
        self._state, self._skipped_lines = state, skipped
        return rows_to_batch(rows, skipped)

    @property
    def skipped_lines(self) -> int:
        """Malformed lines skipped by this rank up to the last batch returned."""
        return self._skipped_lines

    def state_dict(self) -> dict:
        """The stream's position after the last batch returned (small, JSON- and pickle-able)."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the stream that saved ``state`` was."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} is not {_STATE_VERSION}")
        expected = self._fingerprint()
        saved = json.loads(json.dumps(state["config"]))  # tuples and numbers as JSON would give
        mismatched = [key for key in expected if saved.get(key) != json.loads(json.dumps(expected[key]))]
        if mismatched:
            details = ", ".join(f"{key}: saved {saved.get(key)!r}, now {expected[key]!r}" for key in mismatched)
            raise ValueError(f"data state was saved with other data settings ({details})")
        self._stop_prefetch()
        self._shuffler.load_state_dict(state["pipeline"])
        self._state = copy.deepcopy(state)
        self._skipped_lines = self._consumed_skipped_lines()

    def _stop_prefetch(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
            # Back from where the worker got to (or, for a process, from where it was forked)
            # to what the consumer has received.
            self._shuffler.load_state_dict(self._state["pipeline"])

    def close(self) -> None:
        """Stop the prefetch worker and tokenizer threads and close open shards; the stream can
        go on afterwards from the last batch returned."""
        self._stop_prefetch()
        self._documents.close()
        self._mixer.close()

    def __enter__(self) -> "DataStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def auto_tokenizer_threads() -> int:
    """Tokenizer threads for ``tokenizer_threads=0``: the CPUs this process may use, shared
    among the ranks of the node (``LOCAL_WORLD_SIZE``, set by torchrun), at most 8: enough to
    feed a GPU at twice its rate for small models, leaving cores to the training process."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cpus // local_ranks))


def build_data_stream(args: DataArgs, rank: int = 0, world_size: int = 1) -> DataStream:
    """Build the tokenizer and the stream; a missing or empty source raises naming its path."""
    if args.recall is not None:
        from lingua.recall import RecallStream

        return RecallStream(args.recall, args.batch_size, args.seq_len, args.seed, rank, world_size)
    return DataStream(args, rank, world_size)


# ---------------------------------------------------------------------------------------------
# Evaluation


class _SequentialTexts:
    """Texts of one source in file order, once (for evaluation; no rewinding)."""

    def __init__(self, path: str):
        self.counts: dict[str, int] = {}
        self._texts = iter_texts(path, self.counts)

    def next_text(self) -> str:
        return next(self._texts)  # StopIteration ends the evaluation pass

    def state_dict(self) -> int:
        return self.counts.get("skipped", 0)  # the malformed lines skipped so far

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError("evaluation documents are read once and cannot rewind")


def iter_eval_batches(
    path: str,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    max_batches: Optional[int] = None,
    add_bos: bool = True,
    add_eos: bool = True,
    tokenizer_threads: int = 1,
) -> Iterator[Batch]:
    """Held-out batches of a source, packed like training data, in file order, no shuffling.

    One pass: the tokens that do not fill a last row are dropped, and the last batch may have
    fewer than ``batch_size`` rows. The same arguments always give the same batches, whatever
    ``tokenizer_threads`` (0 = auto, as in :class:`DataArgs`).
    """
    threads = tokenizer_threads or auto_tokenizer_threads()
    documents = ReadAheadTokenizer(_SequentialTexts(path), tokenizer, add_bos, add_eos, threads)
    packer = Packer(documents, seq_len)
    produced = 0
    try:
        while max_batches is None or produced < max_batches:
            rows: list[Row] = []
            try:
                while len(rows) < batch_size:
                    rows.append(packer.next_row())
            except StopIteration:
                pass
            if rows:
                yield rows_to_batch(rows, documents.state_dict())
                produced += 1
            if len(rows) < batch_size:
                return
    finally:
        documents.close()

