"""Speed of one KV-SSM's sequence operations: the segmented SSD scan and the causal conv.

Times forward and forward+backward (median ms, ``triton.testing.do_bench``) of each backend on
the 60M Attamba model's shape: b=16, n=1024, 8 SSM heads of 32, state 128, one B/C group, uniform
chunks of P=8, conv width 4 over the 512 conv channels. Backends: ``torch`` (apps.attamba.ssd_torch
under torch.compile), ``triton`` (apps.attamba.ssd_triton at its defaults, plus a sweep of its
block size, warps and state tile), and ``mamba_ssm`` when that package is installed. Inputs follow the model:
u, B, C and the conv input in the run dtype; dt, A and D in fp32.

    python benchmarks/bench_ssm.py [--out results.json] [--no-sweep]
    python benchmarks/bench_ssm.py --model-layer [--window-blocks 16 32]

``--model-layer`` times instead what one layer of the 60M model runs in a training step: its K and
V SSMs side by side (16 heads of 64, two B/C groups, 1536 conv channels) in bf16, the windowed scan
at each smallest block size given.

Needs CUDA. Prints a table last; ``--out`` also writes every measurement as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.attamba import ssd_triton, ssd_triton_window  # noqa: E402
from apps.attamba.ssd_reference import join_scan_inputs  # noqa: E402
from apps.attamba.ssd_torch import causal_conv_segmented, ssd_segmented  # noqa: E402
from apps.attamba.ssd_triton_conv import causal_conv_silu_segmented_triton  # noqa: E402
from apps.attamba.ssd_triton_window import ssd_segmented_window  # noqa: E402


@dataclass
class Shape:
    """The benchmarked SSM; defaults are one KV-SSM of the paper's 60M model."""

    batch: int = 16
    seq_len: int = 1024
    heads: int = 8  # SSM heads
    head_dim: int = 32  # p
    groups: int = 1  # B/C groups (g)
    state_dim: int = 128  # s
    chunk: int = 8  # uniform segment length P
    conv_width: int = 4


@dataclass
class Measurement:
    """One row of the results table."""

    op: str  # "ssd" or "conv"
    backend: str
    dtype: str
    forward_ms: Optional[float]
    forward_backward_ms: Optional[float]
    note: str = ""


def uniform_segment_starts(shape: Shape, device: torch.device) -> torch.Tensor:
    """[b, n] bool: a segment starts every P tokens."""
    positions = torch.arange(shape.seq_len, device=device)
    return (positions % shape.chunk == 0).expand(shape.batch, -1).contiguous()


def ssd_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    b, n, h, p, g, s = (shape.batch, shape.seq_len, shape.heads, shape.head_dim, shape.groups, shape.state_dim)
    u = torch.randn(b, n, h, p, device=device, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, n, h, device=device) - 1.0)
    A = -torch.exp(torch.randn(h, device=device) * 0.5)
    B = torch.randn(b, n, g, s, device=device, dtype=dtype)
    C = torch.randn(b, n, g, s, device=device, dtype=dtype)
    D = torch.randn(h, device=device)
    return [tensor.requires_grad_() for tensor in (u, dt, A, B, C, D)]


def conv_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    channels = shape.heads * shape.head_dim + 2 * shape.groups * shape.state_dim
    x = torch.randn(shape.batch, shape.seq_len, channels, device=device, dtype=dtype)
    weight = torch.randn(channels, shape.conv_width, device=device, dtype=dtype)
    bias = torch.randn(channels, device=device, dtype=dtype)
    return [tensor.requires_grad_() for tensor in (x, weight, bias)]


def time_forward_and_backward(
    fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], segment_start: torch.Tensor
) -> tuple[float, float]:
    """Median ms of a training forward (inputs require grad) and of forward + backward."""
    from triton.testing import do_bench

    grad_out = torch.randn_like(fn(*inputs, segment_start))

    def forward_backward():
        fn(*inputs, segment_start).backward(grad_out)

    forward_ms = do_bench(lambda: fn(*inputs, segment_start), return_mode="median")
    both_ms = do_bench(forward_backward, grad_to_none=inputs, return_mode="median")
    return forward_ms, both_ms


def ssd_backends(shape: Shape) -> dict[str, Callable[..., torch.Tensor]]:
    backends = {
        "torch (compiled)": torch.compile(ssd_segmented, dynamic=False),
        "triton": ssd_triton.ssd_segmented_triton,
        # The model passes its chunk size as the segment bound, and the chunks' period
        # (uniform_segment_starts: offset 0), on which the kernels align their blocks.
        "triton_window": functools.partial(ssd_segmented_window, max_segment_len=shape.chunk,
                                           segment_period=(shape.chunk, 0)),
    }
    try:
        import mamba_ssm  # noqa: F401

        from apps.attamba.ssd_mamba import ssd_segmented_mamba

        backends["mamba_ssm"] = ssd_segmented_mamba
    except ImportError:
        pass
    return backends


def conv_backends() -> dict[str, Callable[..., torch.Tensor]]:
    return {
        "torch (compiled)": torch.compile(causal_conv_segmented, dynamic=False),
        "triton": ssd_triton.causal_conv_segmented_triton,
    }


def measure(op, backend, dtype, fn, inputs, segment_start) -> Measurement:
    """Time one backend; a failure becomes a row with its error, not an abort."""
    dtype_name = str(dtype).replace("torch.", "")
    try:
        forward_ms, both_ms = time_forward_and_backward(fn, inputs, segment_start)
        row = Measurement(op, backend, dtype_name, forward_ms, both_ms)
    except Exception as error:  # one failing backend should not hide the others' numbers
        row = Measurement(op, backend, dtype_name, None, None, f"failed: {error!r:.200}")
    # Rows as they come, so a run cut short still shows what it measured.
    print(format_table([row]).splitlines()[1], flush=True)
    return row


SWEEP = [(32, 4, 32), (32, 8, 64), (64, 4, 32), (64, 8, 32), (64, 8, 64), (128, 8, 32)]


def sweep_triton_ssd(shape, dtype, device, segment_start) -> list[Measurement]:
    """The Triton scan at other (block size, warps, widest state tile) settings than its
    defaults, and (fp32) with single-TF32 dots."""
    defaults = (ssd_triton.DEFAULT_BLOCK_Q, ssd_triton.DEFAULT_NUM_WARPS, ssd_triton.MAX_TILE_S)
    rows = []

    def run(name):
        rows.append(measure("ssd", name, dtype, ssd_triton.ssd_segmented_triton,
                            ssd_inputs(shape, dtype, device), segment_start))

    try:
        for config in SWEEP:
            if config != defaults:
                ssd_triton.DEFAULT_BLOCK_Q, ssd_triton.DEFAULT_NUM_WARPS, ssd_triton.MAX_TILE_S = config
                run("triton Q={} warps={} tile={}".format(*config))
        if dtype == torch.float32:
            ssd_triton.DEFAULT_BLOCK_Q, ssd_triton.DEFAULT_NUM_WARPS, ssd_triton.MAX_TILE_S = defaults
            ssd_triton.FP32_DOT_PRECISION = "tf32"
            run("triton tf32 dots")
    finally:
        ssd_triton.DEFAULT_BLOCK_Q, ssd_triton.DEFAULT_NUM_WARPS, ssd_triton.MAX_TILE_S = defaults
        ssd_triton.FP32_DOT_PRECISION = "tf32x3"
    return rows


def kernel_breakdown(fn, inputs, segment_start, repeats: int = 10) -> list[tuple[str, float]]:
    """Mean GPU µs per forward+backward of each kernel fn launches (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    grad_out = torch.randn_like(fn(*inputs, segment_start))
    fn(*inputs, segment_start).backward(grad_out)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(repeats):
            fn(*inputs, segment_start).backward(grad_out)
        torch.cuda.synchronize()
    totals = [
        (event.key, event.device_time_total / repeats)
        for event in profiler.key_averages()
        if event.device_time_total > 0
    ]
    return sorted(totals, key=lambda item: -item[1])


MODEL_LAYER = Shape(heads=16, head_dim=64, groups=2)
"""A 60M Attamba layer's K and V SSMs as the model runs them: one scan over both (paired_forward)."""


def packed_scan_case(shape: Shape, dtype: torch.dtype, device: torch.device):
    """The windowed scan as the model calls it: (function, inputs [x, dt, A, D]) with u, B and C
    side by side in x (:func:`apps.attamba.ssd_triton_window.ssd_segmented_window_packed`)."""
    u, dt, A, B, C, D = (t.detach() for t in ssd_inputs(shape, dtype, device))
    x = join_scan_inputs(u, B, C)
    scan = functools.partial(ssd_triton_window.ssd_segmented_window_packed, groups=shape.groups,
                             state_dim=shape.state_dim, max_segment_len=shape.chunk, segment_period=(shape.chunk, 0))
    return scan, [t.requires_grad_() for t in (x, dt, A, D)]


def time_model_layer(window_blocks: list[int], device: torch.device) -> list[Measurement]:
    """bf16 scans and conv at MODEL_LAYER's shape as the model runs them (the conv with its SiLU,
    the windowed scan on u, B, C side by side), the windowed scan at each smallest block size."""
    dtype, shape = torch.bfloat16, MODEL_LAYER
    segment_start = uniform_segment_starts(shape, device)
    rows = [measure("ssd", "triton", dtype, ssd_triton.ssd_segmented_triton, ssd_inputs(shape, dtype, device), segment_start)]
    default = ssd_triton_window.MIN_BLOCK_Q
    try:
        for smallest in window_blocks:
            ssd_triton_window.MIN_BLOCK_Q = smallest
            name = f"triton_window Q={ssd_triton_window.block_size(shape.chunk)}"
            rows.append(measure("ssd", name, dtype, *packed_scan_case(shape, dtype, device), segment_start))
    finally:
        ssd_triton_window.MIN_BLOCK_Q = default
    rows.append(measure("conv", "triton + SiLU", dtype, causal_conv_silu_segmented_triton,
                        conv_inputs(shape, dtype, device), segment_start))
    return rows


def format_table(rows: list[Measurement]) -> str:
    def ms(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [f"{'op':<5} {'backend':<30} {'dtype':<9} {'fwd ms':>8} {'fwd+bwd ms':>11}  note"]
    for row in rows:
        lines.append(
            f"{row.op:<5} {row.backend:<30} {row.dtype:<9} {ms(row.forward_ms):>8} "
            f"{ms(row.forward_backward_ms):>11}  {row.note}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write all measurements here (JSON)")
    parser.add_argument("--no-sweep", action="store_true", help="time the Triton defaults only")
    parser.add_argument("--model-layer", action="store_true", help="time a 60M layer's paired K/V SSMs only")
    parser.add_argument("--window-blocks", type=int, nargs="+", default=[ssd_triton_window.MIN_BLOCK_Q],
                        help="smallest windowed-scan block sizes to time with --model-layer")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_ssm.py needs a CUDA device")
    if args.model_layer:
        print(f"{torch.cuda.get_device_name()}, shape {asdict(MODEL_LAYER)}")
        print(format_table(time_model_layer(args.window_blocks, torch.device("cuda"))))
        return
    # Two dtypes and a compiled backward each: more graphs than dynamo's default limit.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    device = torch.device("cuda")
    shape = Shape()
    segment_start = uniform_segment_starts(shape, device)
    rows: list[Measurement] = []
    ssd_fns = ssd_backends(shape)
    for dtype in (torch.float32, torch.bfloat16):
        for backend, fn in ssd_fns.items():
            rows.append(measure("ssd", backend, dtype, fn, ssd_inputs(shape, dtype, device), segment_start))
        for backend, fn in conv_backends().items():
            rows.append(measure("conv", backend, dtype, fn, conv_inputs(shape, dtype, device), segment_start))
        if not args.no_sweep:
            rows.extend(sweep_triton_ssd(shape, dtype, device, segment_start))
    breakdown = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name in ("triton", "triton_window"):
            key = f"{name} {dtype}"
            try:
                breakdown[key] = kernel_breakdown(ssd_fns[name], ssd_inputs(shape, dtype, device), segment_start)
            except Exception as error:  # the timings above matter more than this detail
                breakdown[key] = [(f"profiler failed: {error!r:.200}", 0.0)]
    table = format_table(rows)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "device": torch.cuda.get_device_name(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "python": platform.python_version(),
            "shape": asdict(shape),
            "defaults": {"block_q": ssd_triton.DEFAULT_BLOCK_Q, "num_warps": ssd_triton.DEFAULT_NUM_WARPS,
                         "max_tile_s": ssd_triton.MAX_TILE_S},
            "rows": [asdict(row) for row in rows],
            "triton_ssd_kernels_us_per_fwd_bwd": breakdown,
        }, indent=2))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, shape {asdict(shape)}")
    for dtype_name, kernels in breakdown.items():
        print(f"ssd fwd+bwd kernels, {dtype_name}: "
              + ", ".join(f"{name[:40]} {us:.1f}us" for name, us in kernels[:8]))
    print(table)


if __name__ == "__main__":
    main()
