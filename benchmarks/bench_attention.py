"""Speed and memory of one Attamba attention layer against full causal attention.

Times forward+backward two ways, after warm-up and compile: each call alone (median ms over
CUDA-event-timed calls; a call whose host work takes longer than its GPU work counts the host's
time), and calls back to back (one pair of events around all iterations, divided by their count:
the host queues the next call while the GPU runs this one, as in training, so this is the GPU's
time per call when the host keeps up). It also measures peak extra memory of the attention alone, given rotated q and SSM keys/values, at
a fixed token budget (batch = tokens / n). Backends:

- ``triton``: the Triton kernels for periodic boundaries (``apps/attamba/attention_triton.py``);
- ``flex``: the gathered layout [K_c ; K] under a cached FlexAttention block mask (compiled
  FlexAttention; the gather itself runs eagerly here, fused into the compiled block in training);
- ``sdpa_gathered``: the same layout with a materialized mask through SDPA;
- ``sdpa_dense``: a full-length boolean mask through SDPA (the seed's way);
- ``causal``: full causal attention, ``F.scaled_dot_product_attention(is_causal=True)`` (flash);
  with ``--mean-doc``, FlexAttention under a causal document block mask (flash has no documents).

``--mean-doc M`` packs documents of random (geometric) length with mean M tokens into every row,
as training does; the Attamba backends mask them too.

    python benchmarks/bench_attention.py [--seq-lens 1024 4096 16384 32768] [--tokens 65536]
        [--chunk 8] [--leading 16] [--impls triton flex sdpa_dense causal] [--mean-doc 0] [--out results.json]

Needs CUDA (bf16); on a CPU it says so and exits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.attamba import accounting  # noqa: E402
from apps.attamba.attention import attamba_attention  # noqa: E402
from apps.attamba.chunking import periodic_boundaries  # noqa: E402
from benchmarks.profile_step import random_doc_ids  # noqa: E402
from lingua import masks  # noqa: E402

IMPLS = ("triton", "flex", "sdpa_gathered", "sdpa_dense", "causal")


@dataclass
class Measurement:
    impl: str
    seq_len: int
    batch: int
    forward_backward_ms: Optional[float]
    peak_extra_mib: Optional[float]
    back_to_back_ms: Optional[float] = None
    note: str = ""


def attention_fn(impl: str, seq_len: int, chunk_size: int, leading_tokens, doc_ids: Optional[torch.Tensor]) -> Callable:
    if impl == "causal" and doc_ids is None:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if impl == "causal":
        block_mask = masks.causal_block_mask(doc_ids, doc_ids.shape[0], seq_len, None, "cuda")
        return lambda q, k, v: masks.flex_attention(q, k, v, block_mask=block_mask)
    boundaries = periodic_boundaries(seq_len, chunk_size, 0, "cuda")
    return lambda q, k, v: attamba_attention(q, k, v, boundaries, leading_tokens, doc_ids, impl)


def time_ms(step: Callable[[], None], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_back_to_back_ms(step: Callable[[], None], warmup: int, iters: int) -> float:
    """Mean ms per call over ``iters`` calls queued back to back (the host does not wait between them)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def measure(impl: str, seq_len: int, args: argparse.Namespace) -> Measurement:
    batch = max(1, args.tokens // seq_len)
    shape = (batch, args.heads, seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(seq_len)  # the same documents for every backend at this length
    doc_ids = random_doc_ids(batch, seq_len, args.mean_doc, "cuda")
    attend = attention_fn(impl, seq_len, args.chunk, args.leading, doc_ids)

    def step() -> None:
        attend(q, k, v).backward(grad)
        q.grad = k.grad = v.grad = None

    try:
        step()  # compile and build the cached block mask outside the measurements
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        alone = time_ms(step, args.warmup, args.iters)
        return Measurement(impl, seq_len, batch, alone, peak, time_back_to_back_ms(step, args.warmup, args.iters))
    except torch.OutOfMemoryError:
        return Measurement(impl, seq_len, batch, None, None, "out of memory")
    finally:
        del q, k, v, grad
        torch.cuda.empty_cache()


def print_table(results: list[Measurement], args: argparse.Namespace) -> None:
    documents = f", documents of mean length {args.mean_doc}" if args.mean_doc else ""
    print(f"\nAttention fwd+bwd, {args.tokens} tokens per step, H={args.heads}, d={args.head_dim}, P={args.chunk}, L={args.leading}, bf16{documents}")
    print("ms: each call timed alone; b2b: calls back to back. Ratios: the other's time over this one's, alone / b2b.")
    print(f"{'impl':<14}{'n':>7}{'batch':>7}{'ms':>9}{'b2b ms':>9}{'peak MiB':>10}{'vs causal':>16}{'vs sdpa_dense':>16}{'work ratio':>12}  note")
    by_impl = {(r.impl, r.seq_len): r for r in results}

    def ratio(other: Optional[Measurement], r: Measurement) -> str:
        if other is None or not other.forward_backward_ms or not r.forward_backward_ms:
            return "-"
        return f"{other.forward_backward_ms / r.forward_backward_ms:.2f}/{other.back_to_back_ms / r.back_to_back_ms:.2f}x"

    for r in results:
        # Keys per query under full causal attention over those under Attamba's mask.
        work = (r.seq_len + 1) / 2 / accounting.mean_attended_keys(r.seq_len, args.chunk, args.leading)
        ms = f"{r.forward_backward_ms:.2f}" if r.forward_backward_ms else "-"
        b2b = f"{r.back_to_back_ms:.2f}" if r.back_to_back_ms else "-"
        peak = f"{r.peak_extra_mib:.0f}" if r.peak_extra_mib is not None else "-"
        versus_causal = ratio(by_impl.get(("causal", r.seq_len)), r) if r.impl != "causal" else ""
        versus_dense = ratio(by_impl.get(("sdpa_dense", r.seq_len)), r) if r.impl != "sdpa_dense" else ""
        work_text = f"{work:.1f}x" if r.impl != "causal" and not args.mean_doc else ""  # ratio without documents
        print(f"{r.impl:<14}{r.seq_len:>7}{r.batch:>7}{ms:>9}{b2b:>9}{peak:>10}{versus_causal:>16}{versus_dense:>16}{work_text:>12}  {r.note}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--tokens", type=int, default=65536, help="batch × sequence length per step")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8, help="chunk size P")
    parser.add_argument("--leading", type=int, default=16, help="leading tokens L")
    parser.add_argument("--impls", nargs="+", default=["triton", "flex", "sdpa_dense", "causal"], choices=IMPLS)
    parser.add_argument("--mean-doc", type=int, default=0, help="pack documents of this mean length (0: none)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, help="also write the measurements as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA device (bf16 kernels); none found, nothing measured.")
        return 0
    results = []
    for seq_len in args.seq_lens:
        for impl in args.impls:
            results.append(measure(impl, seq_len, args))
            print(f"measured {impl} at n={seq_len}", file=sys.stderr, flush=True)
    print_table(results, args)
    if args.out:
        device = torch.cuda.get_device_name()
        args.out.write_text(json.dumps({"device": device, "torch": torch.__version__, "results": [asdict(r) for r in results]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
