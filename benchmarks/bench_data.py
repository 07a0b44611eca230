"""Data pipeline throughput alone: tokens/s of the DataStream (read, tokenize, pack, shuffle,
batch), to compare with what training consumes.

    python benchmarks/bench_data.py --source PATH --tokenizer sp --tokenizer-path sp.model \
        --seq-len 1024 --batch-size 16 --batches 200
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
        tokenizer=TokenizerArgs(name=args.tokenizer, path=args.tokenizer_path),
    )
    stream = build_data_stream(data_args, 0, 1)
    try:
        next(stream)  # open files, start the prefetch thread
        start = time.perf_counter()
        for _ in range(args.batches):
            next(stream)
        elapsed = time.perf_counter() - start
    finally:
        stream.close()
    tokens = args.batches * args.batch_size * args.seq_len
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--tokenizer", default="bytes")
    parser.add_argument("--tokenizer-path", default=None)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    result = measure(args)
    print(f"data pipeline: {result['tokens_per_s']:,.0f} tokens/s ({result['tokens']:,} tokens in {result['seconds']:.2f} s)")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({**vars(args), **result}, handle)


if __name__ == "__main__":
    main()
