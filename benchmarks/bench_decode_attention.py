"""Decode attention alone: the split-key Triton kernel against SDPA (cuDNN) over a mask.

One query per row over the cache of one layer of the 60M models (8 heads of 64, bf16): Attamba's
(n/8 compressed slots, a trash slot and a ring of 16, as P=8, L=16 leave them) and the
transformer's (n slots), at n = 32k and 128k tokens, batch 1 and 16. Every call is timed from a
CUDA graph of many calls (``triton.testing.do_bench_cudagraph``: no launch cost in the figure).
Successive calls read different copies of the cache, at least 256 MB of them, as a decode step's
layers each read their own: one small cache read over and over stays in the GPU's L2 (50 MB on
the H100) and is timed faster than any step reads it (Attamba's 128k cache at batch 1 is 34 MB).
Reports microseconds per call and the bandwidth reached reading K and V, for SDPA and for each
launch setting of ``lingua.decode_attention`` (keys per iteration, warps, programs per SM); the
fastest setting per shape is printed last.

    python benchmarks/bench_decode_attention.py [--contexts 32768 131072] [--batches 1 16] [--out results.json]

Needs CUDA; on CPU it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lingua.kv_cache import attend_slots  # noqa: E402

HEADS, HEAD_DIM = 8, 64
TOKEN_CHUNK, LEADING_TOKENS = 8, 16
COLD_BYTES = 256 * 2**20  # K and V read between two reads of the same copy: several times the L2
LAUNCHES = [
    dict(block_keys=block_keys, num_warps=num_warps, programs_per_sm=programs)
    for block_keys, num_warps, programs in itertools.product((32, 64, 128), (4, 8), (2, 4, 8))
]


def cache_slots(model: str, context: int) -> tuple[int, int]:
    """(slots, windowed_from) of one layer's cache after ``context`` tokens."""
    if model == "attamba":
        compressed = context // TOKEN_CHUNK
        return compressed + 1 + LEADING_TOKENS, compressed + 1
    return context, 0


def time_per_call(fn: Callable[[], torch.Tensor]) -> float:
    """Median microseconds per call, from a replayed CUDA graph of many calls (no launch cost)."""
    from triton.testing import do_bench_cudagraph

    return 1000 * do_bench_cudagraph(fn, return_mode="median")


def measure_shape(
    model: str, context: int, batch: int, launches: list[dict],
    timer: Callable[[Callable[[], torch.Tensor]], float] = time_per_call, device: str = "cuda",
) -> list[dict]:
    """Rows for SDPA and every launch in ``launches``; each launch's output is checked against SDPA's."""
    from lingua.decode_attention import decode_attention

    slots, windowed_from = cache_slots(model, context)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16)
    kv_bytes = 2 * batch * HEADS * slots * HEAD_DIM * 2
    copies = [
        tuple(torch.randn(batch, HEADS, slots, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(2))
        for _ in range(-(-COLD_BYTES // kv_bytes) if device == "cuda" else 1)
    ]
    k, v = copies[0]
    positions = torch.arange(slots, device=device).expand(batch, slots).contiguous()
    if windowed_from:
        positions[:, windowed_from - 1] = -1  # Attamba's trash slot holds nothing
    # The window starts after the compressed positions: every filled slot is visible.
    lowest = torch.full((batch,), windowed_from, dtype=torch.long, device=device)
    allowed = (positions >= 0)[:, None, :]  # [B, 1 query, S]
    reference = attend_slots(q, k, v, allowed, static_shapes=True)

    def row(impl: str, microseconds: float, launch: Optional[dict] = None) -> dict:
        return dict(model=model, context=context, batch=batch, slots=slots, impl=impl, launch=launch,
                    microseconds=microseconds, tb_per_s=kv_bytes / microseconds / 1e6)

    rows = [row("sdpa", timer(rotating(copies, lambda k, v: attend_slots(q, k, v, allowed, static_shapes=True))))]
    for launch in launches:
        out = decode_attention(q, k, v, positions, lowest, windowed_from, **launch)
        error = (out.float() - reference.float()).abs().max().item()
        if error > 2e-2:
            raise AssertionError(f"{model} {context} x {batch} {launch}: max error {error:.3g} against SDPA")
        fn = lambda k, v, launch=launch: decode_attention(q, k, v, positions, lowest, windowed_from, **launch)  # noqa: E731
        rows.append(row("kernel", timer(rotating(copies, fn)), launch))
    return rows


def rotating(copies: list[tuple[torch.Tensor, torch.Tensor]], attend: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A call of ``attend(k, v)`` on the next of ``copies`` each time (while a graph is captured too)."""
    cycle = itertools.cycle(copies)
    return lambda: attend(*next(cycle))


def format_row(r: dict) -> str:
    launch = " ".join(f"{key}={value}" for key, value in (r["launch"] or {}).items())
    return (f"{r['model']:<12}{r['context']:>8}{r['batch']:>6}{r['slots']:>8}  {r['impl']:<7}"
            f"{r['microseconds']:>10.1f}{r['tb_per_s']:>8.2f}  {launch}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--models", nargs="+", default=["attamba", "transformer"], choices=["attamba", "transformer"])
    parser.add_argument("--defaults-only", action="store_true", help="time only the kernel's default launch")
    parser.add_argument("--out", type=Path, help="also write the measurements as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode_attention: needs CUDA; skipping.")
        return 0
    launches = [{}] if args.defaults_only else LAUNCHES
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, {HEADS} heads of {HEAD_DIM}")
    print(f"{'model':<12}{'context':>8}{'batch':>6}{'slots':>8}  {'impl':<7}{'us/call':>10}{'TB/s':>8}  launch", flush=True)
    rows = []
    for model, context, batch in itertools.product(args.models, args.contexts, args.batches):
        shape_rows = measure_shape(model, context, batch, launches)
        rows += shape_rows
        for r in shape_rows:
            print(format_row(r), flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
    print("\nfastest kernel launch per shape, against SDPA:")
    for model, context, batch in itertools.product(args.models, args.contexts, args.batches):
        shape = [r for r in rows if (r["model"], r["context"], r["batch"]) == (model, context, batch)]
        sdpa = next(r for r in shape if r["impl"] == "sdpa")
        best = min((r for r in shape if r["impl"] == "kernel"), key=lambda r: r["microseconds"])
        print(f"{format_row(best)}  ({sdpa['microseconds'] / best['microseconds']:.2f}x SDPA's {sdpa['microseconds']:.1f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
