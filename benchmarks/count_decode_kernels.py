"""How many kernels Inductor generates for one compiled decode step: a CPU-side proxy for launches.

At batch 1 a GPU decode step is a few hundred kernels of 1–4 µs each (docs/benchmarks.md), so the
kernel count is much of its cost, and it can be counted without a GPU: this compiles one decode
step of the 60M models of benchmarks/bench_decode.py (caches filled as a prefill leaves them) with
torch.compile on the chosen device and reports Inductor's count of generated kernels. The CPU
backend fuses differently from Triton and runs PyTorch fallbacks where CUDA runs this project's
Triton kernels (which it does not count), so compare counts on one device only. Matmuls and other
library calls are not generated kernels either.

    python benchmarks/count_decode_kernels.py [--models attamba transformer] [--context 256] [--batch 1]
        [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import MODELS, build_model  # noqa: E402
from lingua.generate import cache_support  # noqa: E402


@torch.no_grad()
def count_kernels(model: torch.nn.Module, context: int, batch: int, device: str = "cpu") -> int:
    """Kernels Inductor generates for one decode step of ``model`` after ``context`` tokens."""
    from torch._inductor import metrics

    support = cache_support(model)
    cache = support.new_cache(model, batch, context + 1, torch.device(device), next(model.parameters()).dtype)
    cache.pretend_filled(context)
    cache.static_shapes = True
    cache.advance_horizon(cache.horizon + 1)
    torch._dynamo.reset()
    step = torch.compile(lambda tokens: support.forward_cached(model, tokens, cache, None), dynamic=False, fullgraph=True)
    metrics.reset()
    step(torch.zeros(batch, 1, dtype=torch.long, device=device))
    return metrics.generated_kernel_count


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["attamba", "transformer"], choices=MODELS)
    parser.add_argument("--context", type=int, default=256, help="tokens in the cache (the count hardly depends on it)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name, args.context + 1).to(args.device).eval()
        print(f"{name:<12} {count_kernels(model, args.context, args.batch, args.device):>5} generated kernels "
              f"(one decode step, {args.device}, context {args.context}, batch {args.batch})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
