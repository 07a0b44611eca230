"""Decode speed and cache size: the 60M Attamba (P=8, L=16) against the 60M transformer.

``--models mamba`` adds the 60M Mamba2 baseline (apps/mamba/configs/mamba_60m.yaml: 16 blocks, one
recurrent state per layer whatever the context; on CUDA its step's recurrence is the Triton kernel
of apps/attamba/ssm_step_triton.py, as Attamba's).

For each model, context length n and batch size B, the cache is filled with n tokens of RANDOM
keys, values (and SSM states) laid out exactly as a prefill of n tokens would leave them: a real
prefill of 128k tokens would take longer than the measurement and changes nothing in a decode
step's work. Then ``--steps`` decode steps (one token per row each) are timed through
``lingua.generate.DecodeStep`` in each of ``--modes``: a replayed CUDA graph of the eager step
(``cuda_graph``), of the step compiled by torch.compile (``compile``; ``compile_pdl`` with
Programmatic Dependent Launch; ``compile_max_autotune``), or ``eager``. Attention runs as each
cache chooses on CUDA (Attamba: the split-key Triton kernel of ``lingua.decode_attention``; the
transformer: SDPA, cuDNN on the H100); a mode ending in ``+kernel`` (say ``compile_pdl+kernel``)
runs the kernel, ``+sdpa`` SDPA over a mask built from the cached positions.

Reports decode tokens/s (B tokens per step), ms per step, the cache's allocated bytes and its
live bytes (the DESIGN count: n/P + L entries per layer plus SSM states for Attamba, n for the
transformer), and peak GPU memory. A configuration that runs out of memory is reported as OOM.

Each configuration runs in a process of its own (``--timeout`` seconds at most), and its row is
printed as soon as it is measured: a crash, a hang or a time limit costs that row only (a compile
mode run once died of heap corruption and took every result with it). ``--in-process`` runs all
in this process.

    python benchmarks/bench_decode.py [--contexts 4096 32768 131072] [--batches 1 16]
        [--steps 64] [--dtype bfloat16] [--modes cuda_graph compile] [--out results.json]
        [--timeout 240] [--in-process] [--profile DIR]

``--profile DIR`` also records the GPU kernels of 8 more steps of every configuration (replays,
when the step is a CUDA graph) into ``DIR/<model>_<context>_<batch>_<mode>.txt``: which kernels a
step spends its time in, and how many it launches.

Needs CUDA; on CPU it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.attamba.args import AttambaArgs  # noqa: E402
from apps.attamba.model import AttambaLM  # noqa: E402
from apps.main.model import TransformerArgs, TransformerLM  # noqa: E402
from lingua.generate import DTYPES, FAST_DECODE_MODES, DecodeStep, cache_support  # noqa: E402
from lingua.kv_cache import load_decode_attention  # noqa: E402
from profile_step import kernel_totals  # noqa: E402  (this folder is on the path: a sibling script)

# The paper's 60M models (apps/attamba/configs/attamba_60m.yaml, apps/main/configs/transformer_60m.yaml).
SHARED = dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000)
MODELS = ("attamba", "transformer", "mamba")


def build_model(name: str, max_len: int) -> torch.nn.Module:
    if name == "mamba":
        from apps.mamba.args import MambaArgs
        from apps.mamba.model import MambaLM

        return MambaLM(MambaArgs(dim=512, n_layers=16, vocab_size=32000, max_seqlen=max_len, state_dim=128, ssm_heads=16, conv_size=4))
    if name == "attamba":
        args = AttambaArgs(
            **SHARED, max_seqlen=max_len, token_chunk=8, leading_tokens=16, chunk_strategy="cyclic",
            state_dim=128, ssm_heads=8, conv_size=4,
        )
        return AttambaLM(args)
    return TransformerLM(TransformerArgs(**SHARED, max_seqlen=max_len))


@dataclass
class Measurement:
    model: str
    context: int
    batch: int
    mode: str
    tokens_per_second: Optional[float]
    ms_per_step: Optional[float]
    cache_bytes: Optional[int]
    live_cache_bytes: Optional[int]
    peak_memory_bytes: Optional[int]
    note: str = ""


@torch.inference_mode()
def measure(
    name: str, context: int, batch: int, steps: int, dtype: torch.dtype, mode: str, profile_dir: Optional[Path] = None
) -> Measurement:
    device = torch.device("cuda")
    warmup = 3
    max_len = context + warmup + steps + PROFILE_STEPS + 1
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model(name, max_len).to(device=device, dtype=dtype).eval()
    support = cache_support(model)
    cache = support.new_cache(model, batch, max_len, device, dtype)
    cache.pretend_filled(context)
    step_mode, _, attention = mode.partition("+")
    if attention:  # else the cache's own choice
        cache.decode_attention = load_decode_attention(device) if attention == "kernel" else None
    step = DecodeStep(support, model, cache, batch, device, step_mode)
    tokens = torch.randint(0, SHARED["vocab_size"], (batch,), device=device)
    # The warm-up runs what the timed loop runs: the first call captures the graph, and the first
    # argmax loads its kernel, which cost ~7 ms once inside the timed loop before (docs/benchmarks.md,
    # eighth session: 64 steps then measured every step ~0.05 ms slower than 128 steps did).
    for _ in range(warmup):
        tokens = step(tokens).argmax(-1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        logits = step(tokens)
        tokens = logits.argmax(-1)  # feeds back like generation, without a host sync
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = Measurement(
        name, context, batch, mode,
        tokens_per_second=batch * steps / seconds,
        ms_per_step=1000 * seconds / steps,
        cache_bytes=cache.nbytes(),
        live_cache_bytes=cache.live_nbytes(),
        peak_memory_bytes=torch.cuda.max_memory_allocated(),
    )
    if profile_dir is not None:
        print(RESULT_PREFIX + json.dumps(asdict(row)), flush=True)  # kept should the profile fail
        write_kernel_profile(step, tokens, profile_dir / f"{name}_{context}_{batch}_{mode}.txt")
    return row


PROFILE_STEPS = 8  # decode steps recorded by --profile (the cache is sized for them)


def write_kernel_profile(step: DecodeStep, tokens: torch.Tensor, path: Path, steps: int = PROFILE_STEPS) -> None:
    """The kernels of ``steps`` decode steps, by GPU time, and how many run per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tokens = step(tokens).argmax(-1)
        torch.cuda.synchronize()
    launches, gpu_us = kernel_totals(prof.key_averages(), steps)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"per step: {launches:.0f} kernels, {gpu_us:.1f} us of kernel time\n{table}\n")


def run_one(
    name: str, context: int, batch: int, steps: int, dtype: torch.dtype, mode: str, profile_dir: Optional[Path] = None
) -> Measurement:
    try:
        return measure(name, context, batch, steps, dtype, mode, profile_dir)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return Measurement(name, context, batch, mode, None, None, None, None, None, note="OOM")


def run_isolated(
    name: str, context: int, batch: int, steps: int, dtype: str, mode: str, timeout: float,
    profile_dir: Optional[Path] = None,
) -> Measurement:
    """One configuration in a child process; a crash or a hang becomes the row's note."""
    command = [sys.executable, __file__, "--one", name, str(context), str(batch), mode, "--steps", str(steps), "--dtype", dtype]
    if profile_dir is not None:
        command += ["--profile", str(profile_dir)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Measurement(name, context, batch, mode, None, None, None, None, None, note=f"timed out after {timeout:.0f} s")
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return Measurement(**json.loads(line[len(RESULT_PREFIX):]))
    last = (done.stderr.strip().splitlines() or ["no output"])[-1][:120]
    return Measurement(name, context, batch, mode, None, None, None, None, None, note=f"exit {done.returncode}: {last}")


RESULT_PREFIX = "RESULT "
MODES = [f"{mode}{attention}" for mode in FAST_DECODE_MODES for attention in ("", "+sdpa", "+kernel")]


def gib(value: Optional[int]) -> str:
    return f"{value / 2**30:9.3f}" if value is not None else f"{'-':>9}"


HEADER = (f"{'model':<12}{'context':>9}{'batch':>6}{'mode':>22}{'tok/s':>12}{'ms/step':>9}"
          f"{'cache GiB':>10}{'live GiB':>10}{'peak GiB':>10}  note")


def format_row(r: Measurement) -> str:
    speed = f"{r.tokens_per_second:12.1f}{r.ms_per_step:9.3f}" if r.tokens_per_second else f"{'-':>12}{'-':>9}"
    return (f"{r.model:<12}{r.context:>9}{r.batch:>6}{r.mode:>22}{speed}"
            f"{gib(r.cache_bytes)} {gib(r.live_cache_bytes)} {gib(r.peak_memory_bytes)}  {r.note}")


def speedups(rows: list[Measurement]) -> list[str]:
    """Per (context, batch): each model's fastest mode, and Attamba's tokens/s over the transformer's."""
    best: dict[tuple[int, int, str], Measurement] = {}
    for row in rows:
        key = (row.context, row.batch, row.model)
        if row.tokens_per_second and (key not in best or row.tokens_per_second > best[key].tokens_per_second):
            best[key] = row
    lines = []
    for context, batch in sorted({(r.context, r.batch) for r in rows}):
        attamba, transformer = best.get((context, batch, "attamba")), best.get((context, batch, "transformer"))
        if attamba and transformer:
            lines.append(
                f"context {context:>7} batch {batch:>3}: Attamba {attamba.tokens_per_second:,.1f} tok/s ({attamba.mode}) / "
                f"transformer {transformer.tokens_per_second:,.1f} ({transformer.mode}) = "
                f"{attamba.tokens_per_second / transformer.tokens_per_second:.2f}x"
            )
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--models", nargs="+", default=["attamba", "transformer"], choices=MODELS)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--modes", nargs="+", default=["cuda_graph", "compile"], choices=MODES,
                        help="'+sdpa' / '+kernel': attention through SDPA (cuDNN) / lingua.decode_attention's kernel "
                             "instead of the cache's default (Attamba: the kernel; transformer: SDPA)")
    parser.add_argument("--out", type=Path, help="also write the measurements as JSON")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per configuration (isolated runs)")
    parser.add_argument("--in-process", action="store_true", help="run every configuration in this process")
    parser.add_argument("--profile", type=Path, help="write each configuration's kernel profile into this folder")
    parser.add_argument("--summarize", type=Path, nargs="+", metavar="JSON",
                        help="print the summary of earlier runs' --out files (no GPU needed) and exit")
    parser.add_argument("--one", nargs=4, metavar=("MODEL", "CONTEXT", "BATCH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.summarize:
        print_summary([Measurement(**row) for path in args.summarize for row in json.loads(path.read_text())])
        return 0
    if not torch.cuda.is_available():
        print("bench_decode: needs CUDA (decode speed on CPU is not what this measures); skipping.")
        return 0
    if args.one:  # a child of run_isolated
        name, context, batch, mode = args.one
        row = run_one(name, int(context), int(batch), args.steps, DTYPES[args.dtype], mode, args.profile)
        print(RESULT_PREFIX + json.dumps(asdict(row)), flush=True)
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype}")
    print("caches are filled with random entries laid out as an n-token prefill would leave them (no prefill run)")
    print(HEADER, flush=True)
    rows = []
    for mode in args.modes:
        for context in args.contexts:
            for batch in args.batches:
                for name in args.models:
                    if args.in_process:
                        row = run_one(name, context, batch, args.steps, DTYPES[args.dtype], mode, args.profile)
                    else:
                        row = run_isolated(
                            name, context, batch, args.steps, args.dtype, mode, args.timeout, args.profile
                        )
                    rows.append(row)
                    print(format_row(row), flush=True)
                    if args.out:  # rewritten after every row, so that a cut-short run keeps what it measured
                        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print_summary(rows)
    return 0


def print_summary(rows: list[Measurement]) -> None:
    """Every row, then each model's fastest mode and the speed-up per context and batch."""
    print("\n" + HEADER)
    for row in rows:
        print(format_row(row))
    ratios = speedups(rows)
    if ratios:
        print("\nfastest mode of each model:")
        print("\n".join(ratios))


if __name__ == "__main__":
    sys.exit(main())
