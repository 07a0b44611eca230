"""Tile sizes of Attamba's Triton attention kernels: forward and forward+backward time per config.

One layer at the attention benchmark's shape (default n=16384, batch 4, H=8, d=64, P=8, L=16,
bf16). Each variant changes one kernel's tiles from ``CUDA_CONFIG``; causal flash attention
(SDPA) at the same shape is timed alongside for scale.

    python benchmarks/tune_attention_triton.py [--seq-len 16384] [--tokens 65536] [--out tune.json]
        [--variants default "forward_queries=128,forward_warps=8" ...] [--kernels]

``--kernels`` also profiles each variant's forward+backward and prints every launch's mean time
(forward, dQ, dK/dV), so that a change is seen where it acts.

Needs CUDA; on a CPU it says so and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.attamba import attention_triton  # noqa: E402
from apps.attamba.attention_triton import PeriodicMask, periodic_attention  # noqa: E402
from benchmarks.bench_attention import time_ms  # noqa: E402
from benchmarks.kernel_knobs import parse_variant  # noqa: E402

VARIANTS = (
    "default", "forward_queries=128", "forward_keys=128", "forward_keys=32", "forward_queries=32",
    "forward_stages=3", "forward_registers=0,forward_stages=3", "dq_queries=128", "dq_keys=64", "dq_queries=32",
    "dq_warps=8", "dq_registers=96", "dkv_queries=64", "dkv_queries=16", "dkv_keys=32",
    "dkv_keys=128,dkv_queries=32,dkv_warps=8", "dkv_registers=128", "backward_stages=2", "backward_stages=4",
    "dkv_reverse=0", "forward_window_tiles=0", "dq_window_tiles=0", "dkv_window_tiles=1",
    "default",  # the two default rows' spread is the noise
)
"""Changes to ``CUDA_CONFIG`` (KernelConfig fields), mostly one kernel's tiles at a time."""


LAUNCHES = ("forward", "dQ", "dK/dV")
"""The kernel launches of one forward+backward, in launch order."""


def launch_times_us(step, iters: int) -> list[float]:
    """Mean GPU time of each of the attention's launches (LAUNCHES) over ``iters`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernels = sorted(
        (event for event in profiler.events() if event.name in ("_query_kernel", "_dkv_kernel")),
        key=lambda event: event.time_range.start,
    )
    if len(kernels) != iters * len(LAUNCHES):
        raise RuntimeError(f"expected {iters * len(LAUNCHES)} attention launches, the profile holds {len(kernels)}")
    return [
        sum(event.time_range.elapsed_us() for event in kernels[role :: len(LAUNCHES)]) / iters
        for role in range(len(LAUNCHES))
    ]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--leading", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help='e.g. "forward_queries=128,forward_warps=8"')
    parser.add_argument("--kernels", action="store_true", help="also time each kernel launch (torch.profiler)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_attention_triton needs a CUDA device; none found, nothing measured.")
        return 0
    batch = max(1, args.tokens // args.seq_len)
    shape = (batch, args.heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    mask = PeriodicMask(args.chunk, 0, args.leading)

    def timings(attend) -> tuple[float, float]:
        def forward() -> None:
            with torch.no_grad():
                attend(q, k, v)

        def forward_backward() -> None:
            attend(q, k, v).backward(grad)
            q.grad = k.grad = v.grad = None

        return time_ms(forward, 3, args.iters), time_ms(forward_backward, 3, args.iters)

    def periodic_step() -> None:
        periodic_attention(q, k, v, mask).backward(grad)
        q.grad = k.grad = v.grad = None

    results = [("causal flash (SDPA)", *timings(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)))]
    launches = {}
    baseline = attention_triton.CUDA_CONFIG
    for name in args.variants:
        attention_triton.CUDA_CONFIG = dataclasses.replace(baseline, **parse_variant(name))
        try:
            results.append((name, *timings(lambda q, k, v: periodic_attention(q, k, v, mask))))
            if args.kernels:
                launches[name] = launch_times_us(periodic_step, args.iters)
        except Exception as error:  # a tile that does not fit the device's shared memory
            print(f"{name}: {type(error).__name__}: {str(error)[:200]}", file=sys.stderr)
        finally:
            attention_triton.CUDA_CONFIG = baseline
    print(f"\nn={args.seq_len} batch={batch} H={args.heads} d={args.head_dim} P={args.chunk} L={args.leading} bf16; default {baseline}")
    print(f"{'variant':<42}{'fwd ms':>9}{'fwd+bwd ms':>12}{'bwd ms':>9}")
    for name, forward, total in results:
        print(f"{name:<42}{forward:>9.3f}{total:>12.3f}{total - forward:>9.3f}")
    if launches:
        print(f"\nmean µs per launch (profiled)\n{'variant':<42}" + "".join(f"{role:>14}" for role in LAUNCHES))
        for name, times in launches.items():
            print(f"{name:<42}" + "".join(f"{time:>14.1f}" for time in times))
    if args.out:
        args.out.write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "results": results, "launches_us": launches}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
