"""Two trees' Attamba attention kernels timed against each other in one process.

Loads ``apps/attamba/attention_triton.py`` of this tree and of another checkout (``--base DIR``,
e.g. made by ``git worktree add /tmp/base <rev>``) side by side, the other under a custom-op
namespace of its own, and times forward+backward of each in turn, round after round (every other
round in the opposite order; use an even number of rounds): a machine's drift then shows as spread
within a row, not as a difference between rows, which separate runs of
``tune_attention_triton.py`` cannot promise (on one H100 their rows moved 5–8% between runs). Per row: each
launch's mean GPU time (profiled; forward, dQ, dK/dV), their sum, and the time per call back to
back, as medians over the rounds. Inputs are head-major ([B, H, n, d] contiguous) or token-major
([B, n, H, d] viewed as [B, H, n, d], as the model passes q, k, v and dO), or one row each.

    python benchmarks/compare_attention_kernels.py --base /tmp/base [--seq-len 1024] [--batch 16]
        [--mean-doc 512] [--chunk 8] [--leading 16] [--offset 0] [--layouts head token] [--rounds 4]

The other tree's module runs with this tree's helpers (``apps.attamba.chunking``, ``ssd_triton``),
so it must not need names they lack. Needs CUDA; on a CPU it says so and exits.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import types
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_attention import time_back_to_back_ms  # noqa: E402
from benchmarks.profile_step import random_doc_ids  # noqa: E402
from benchmarks.tune_attention_triton import LAUNCHES, launch_times_us  # noqa: E402

MODULE = Path("apps/attamba/attention_triton.py")
OP_NAMESPACE = '"attamba::'
_loads = itertools.count()


def load_attention_module(tree: Path) -> types.ModuleType:
    """``tree``'s attention kernels as a module of their own, their custom ops renamed so that they
    can be registered next to this tree's (each load gets a fresh namespace)."""
    path = tree / MODULE
    text = path.read_text()
    if OP_NAMESPACE not in text:
        raise ValueError(f"{path} registers no attamba:: custom ops; is it an Attamba attention module?")
    name = f"attention_compared_{next(_loads)}"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    exec(compile(text.replace(OP_NAMESPACE, f'"{name}::'), str(path), "exec"), module.__dict__)
    return module


def attention_inputs(batch: int, n: int, heads: int, head_dim: int, token_major: bool, device, dtype,
                     seed: int = 0) -> list[torch.Tensor]:
    """q, k, v (requiring gradients) and the output's gradient, [B, H, n, d]: contiguous, or views
    of [B, n, H, d] tensors with ``token_major``. The same values either way for one seed."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = [torch.randn(batch, n, heads, head_dim, device=device, dtype=dtype, generator=generator) for _ in range(4)]
    laid_out = [t.transpose(1, 2) if token_major else t.transpose(1, 2).contiguous() for t in tensors]
    return [t.requires_grad_(index < 3) for index, t in enumerate(laid_out)]


def attention_step(module: types.ModuleType, inputs: list[torch.Tensor], chunk: int, leading: int, offset: int,
                   doc_ids: Optional[torch.Tensor]) -> Callable[[], None]:
    """One forward+backward through ``module``'s kernels (its document bounds made once, as a
    model's forward shares them between layers)."""
    q, k, v, grad = inputs
    mask = module.PeriodicMask(chunk, offset, leading)
    bounds = module.document_bounds(doc_ids) if doc_ids is not None else None

    def step() -> None:
        # Without documents, call as trees from before ``doc_bounds`` existed also take it.
        if bounds is None:
            out = module.periodic_attention(q, k, v, mask)
        else:
            out = module.periodic_attention(q, k, v, mask, doc_bounds=bounds)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    return step


def round_order(rows: list, round_index: int) -> list:
    """The rows in the order round ``round_index`` times them: every other round reversed, so
    whatever running second gains or loses shows as spread within a row, not as a difference
    between rows. (Not all of it is order: on an H200 two copies of one kernel differed by ~2% at
    n=16k in either order, by a different sign on another machine; docs/benchmarks.md, nineteenth
    session. Differences that small are not resolved here.)"""
    return rows[::-1] if round_index % 2 else rows


def print_rows(rows: dict[str, list[tuple[float, ...]]]) -> None:
    """Medians over rounds of each row's launches (µs), their sum and the back-to-back ms."""
    print(f"{'row':<18}" + "".join(f"{name:>10}" for name in LAUNCHES) + f"{'sum':>10}{'b2b ms':>10}")
    for label, rounds in rows.items():
        medians = [statistics.median(values) for values in zip(*rounds)]
        launches, back_to_back = medians[:-1], medians[-1]
        print(f"{label:<18}" + "".join(f"{us:>10.1f}" for us in launches) + f"{sum(launches):>10.1f}{back_to_back:>10.3f}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="the other checkout's root")
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8, help="chunk size P")
    parser.add_argument("--leading", type=int, default=16, help="leading tokens L")
    parser.add_argument("--offset", type=int, default=0, help="the chunks' offset (a cyclic layer's)")
    parser.add_argument("--mean-doc", type=int, default=0, help="pack documents of this mean length (0: none)")
    parser.add_argument("--layouts", nargs="+", choices=("head", "token"), default=["head"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10, help="profiled calls a round")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("compare_attention_kernels needs a CUDA device (bf16 kernels); none found, nothing measured.")
        return 0
    from apps.attamba import attention_triton as this_tree

    trees = {"this": this_tree, "base": load_attention_module(args.base)}
    torch.manual_seed(0)
    doc_ids = random_doc_ids(args.batch, args.seq_len, args.mean_doc, "cuda")
    steps = {}
    for layout in args.layouts:
        inputs = attention_inputs(args.batch, args.seq_len, args.heads, args.head_dim, layout == "token", "cuda", torch.bfloat16)
        for tree, module in trees.items():
            steps[f"{tree} {layout}-major"] = attention_step(module, inputs, args.chunk, args.leading, args.offset, doc_ids)
    rows: dict[str, list[tuple[float, ...]]] = {label: [] for label in steps}
    for round_index in range(args.rounds):
        for label, step in round_order(list(steps.items()), round_index):
            launches = launch_times_us(step, args.iters)
            rows[label].append((*launches, time_back_to_back_ms(step, 3, 3 * args.iters)))
        print(f"round {round_index + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    print(f"\nn={args.seq_len} batch={args.batch} H={args.heads} d={args.head_dim} P={args.chunk} L={args.leading} "
          f"offset={args.offset} mean_doc={args.mean_doc}, bf16; base: {args.base}; medians of {args.rounds} rounds")
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
