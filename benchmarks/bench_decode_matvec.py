"""A decode step's matmuls at batch 1: cuBLAS against Inductor's reduction kernel.

At batch 1 each matmul of a 60M decode step is a matrix-vector product over 0.5–3 MB of weights,
and cuBLAS took 3.1–3.9 µs for each on the H100 (~0.8 TB/s; docs/benchmarks.md, seventh session):
five a layer, a third of Attamba's step. Written as a multiply and a sum, the same product
compiles to one of Inductor's Triton reduction kernels, which can also start early under
Programmatic Dependent Launch (Inductor leaves cuBLAS calls and its matmul templates out of it).
This measures whether that is faster, for the shapes of both 60M models' steps. It was, at one
row (eighth session, docs/benchmarks.md), and both models' caches now decode one row with it
(lingua.decode_weights.decode_linear); the timings repeat one matmul whose weights stay in L2,
so only a whole step (bench_decode.py) tells what it saves.

Every variant is timed as bench_decode_attention.py times its kernels: a CUDA graph of many
back-to-back calls (``triton.testing.do_bench_cudagraph``: no host launch cost, the GPU's gaps
between kernels included, as in a captured decode step). Reports microseconds per call and the
bandwidth reached reading the weights.

    python benchmarks/bench_decode_matvec.py [--batches 1 2] [--out results.json]

Needs CUDA; on CPU it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode_attention import time_per_call  # noqa: E402  (a sibling script)
from lingua.decode_weights import linear_by_reduction  # noqa: E402

# (name, in_features, out_features): the 60M models' decode matmuls (dim 512, SwiGLU hidden 1536).
SHAPES = [
    ("attamba W_q + both SSM in_proj", 512, 512 + 2 * 1288),
    ("transformer W_qkv", 512, 3 * 512),
    ("W_o (and one SSM out_proj)", 512, 512),
    ("SwiGLU w1 + w3", 512, 2 * 1536),
    ("SwiGLU w2", 1536, 512),
]


def measure(batches: list[int], dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    rows = []
    # Each shape and batch compiles anew (dynamic=False): past dynamo's default limit of 8 the
    # function would silently run uncompiled.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # One compiled wrapper per setting: the options are part of each one's backend.
    compiled = {
        "reduction" + ("+pdl" if pdl else ""): torch.compile(linear_by_reduction, dynamic=False, options={"triton.enable_pdl": pdl})
        for pdl in (False, True)
    }
    for name, in_features, out_features in SHAPES:
        weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype) / in_features**0.5
        for batch in batches:
            x = torch.randn(batch, in_features, device="cuda", dtype=dtype)
            expected = F.linear(x, weight)
            variants = {"cublas": lambda: F.linear(x, weight)}
            for variant, fn in compiled.items():
                torch.testing.assert_close(fn(x, weight), expected, rtol=2e-2, atol=2e-2)
                variants[variant] = lambda fn=fn: fn(x, weight)
            megabytes = weight.numel() * weight.element_size() / 1e6
            for variant, fn in variants.items():
                microseconds = time_per_call(fn)
                rows.append(dict(shape=name, batch=batch, variant=variant, us_per_call=microseconds,
                                 weight_mb=megabytes, tb_per_s=megabytes / microseconds))
                print(f"{name:<32}{batch:>6}{variant:>16}{microseconds:10.2f}{megabytes / microseconds:9.2f}", flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode_matvec: needs CUDA; skipping.")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print(f"{'matmul':<32}{'batch':>6}{'variant':>16}{'us/call':>10}{'TB/s':>9}")
    rows = measure(args.batches)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
