"""Data pipeline throughput alone: tokens/s of the DataStream (read, tokenize, pack, shuffle,
batch), to compare with what training consumes.

    python benchmarks/bench_data.py --source PATH --tokenizer sp --tokenizer-path sp.model \
        --seq-len 1024 --batch-size 16 --batches 200 --threads 8

``--threads`` is ``data.tokenizer_threads`` (0 = auto); run it with 1, 2, 4, ... to see the
scaling of the parallel tokenization.
"""

from __future__ import annotations

import argparse
import json
import time

from lingua.data import DataArgs, build_data_stream
from lingua.tokenizer import TokenizerArgs


def measure(args: argparse.Namespace) -> dict:
    data_args = DataArgs(
        sources={args.source: 1.0},
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        prefetch=args.prefetch,
        prefetch_worker=args.worker,
        tokenizer_threads=args.threads,
        tokenize_batch=args.tokenize_batch,
        tokenizer=TokenizerArgs(name=args.tokenizer, path=args.tokenizer_path),
    )
    stream = build_data_stream(data_args, 0, 1)
    try:
        next(stream)  # open files, start the prefetch worker and tokenizer threads
        start = time.perf_counter()
        for _ in range(args.batches):
            next(stream)
        elapsed = time.perf_counter() - start
    finally:
        stream.close()
    tokens = args.batches * args.batch_size * args.seq_len
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed, "tokenizer_threads": stream.tokenizer_threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--tokenizer", default="bytes")
    parser.add_argument("--tokenizer-path", default=None)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="tokenizer threads (0 = auto)")
    parser.add_argument("--worker", default=DataArgs.prefetch_worker, choices=["process", "thread"], help="prefetch worker")
    parser.add_argument("--tokenize-batch", type=int, default=DataArgs.tokenize_batch)
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    result = measure(args)
    print(
        f"data pipeline: {result['tokens_per_s']:,.0f} tokens/s ({result['tokens']:,} tokens in "
        f"{result['seconds']:.2f} s, {result['tokenizer_threads']} tokenizer threads)"
    )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({**vars(args), **result}, handle)


if __name__ == "__main__":
    main()
