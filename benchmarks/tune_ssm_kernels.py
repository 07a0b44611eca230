"""Launch settings of the KV-SSM's windowed scan and conv kernels: GPU time per kernel, and error.

At a 60M layer's paired K/V SSM shape (``bench_ssm.MODEL_LAYER``: b=16, n=1024, 16 heads of 64,
2 B/C groups, state 128, P=8, 1536 conv channels, bf16), each variant sets module knobs of
:mod:`apps.attamba.ssd_triton_window` (``ALIGNED_BLOCKS``, ``MIN_BLOCK_Q``, ``FORWARD_WARPS``,
``BACKWARD_WARPS``, ``NUM_STAGES``, ``TILE_S``, ``FORWARD_TILE_P``, ``BACKWARD_TILE_P``, ``BF16_DOTS``) or :mod:`apps.attamba.ssd_triton_conv` (``BLOCK_N``,
``BLOCK_C``, ``NUM_WARPS``, ``SPLIT_*``, ``DX_*``, ``FORWARD_*``, ``*_CHANNELS_FASTEST``) or :mod:`apps.attamba.gated_norm_triton` (``norm.BLOCK_M``,
``norm.NUM_WARPS``, ``norm.SPAN``), then runs the scan, the conv and the output gates forward and
backward under the profiler. Reported: each kernel's mean GPU µs (kernels
only, no host time) and the scan's relative error (‖triton − ref‖ / ‖ref‖ over y and every input
gradient, worst one) against the float64 ``torch`` scan on the same inputs.

    python benchmarks/tune_ssm_kernels.py [--repeats 10] [--out tune_ssm.json]

Both run as in the model: the conv with its SiLU inside, the scan on u, B and C side by side in one
tensor (:func:`apps.attamba.ssd_triton_window.ssd_segmented_window_packed`).

Needs CUDA; on a CPU it says so and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.attamba import gated_norm_triton  # noqa: E402
from apps.attamba.ssd_torch import ssd_segmented  # noqa: E402
from apps.attamba.ssd_reference import split_scan_inputs  # noqa: E402
from apps.attamba.ssd_triton_conv import causal_conv_silu_segmented_triton  # noqa: E402
from benchmarks.bench_ssm import MODEL_LAYER, conv_inputs, packed_scan_case, uniform_segment_starts  # noqa: E402
from benchmarks.kernel_knobs import variant_applied  # noqa: E402

VARIANTS = (
    "default",
    "window.ALIGNED_BLOCKS=0",  # blocks at k·Q, three score tiles (as for random chunks)
    "window.BF16_DOTS=0",
    "window.MIN_BLOCK_Q=32",  # 32-token blocks take LARGER_BLOCK_WARPS[32]: the earlier defaults
    "window.BACKWARD_WARPS=2",
    "window.BACKWARD_WARPS=4",
    "window.FORWARD_WARPS=2",
    "window.BACKWARD_TILE_P=64",  # whole heads both ways (before the sixteenth session)
    "window.FORWARD_TILE_P=32",
    "window.BACKWARD_TILE_P=16",
    "window.TILE_S=64",
    "window.TILE_S=128",
    "window.NUM_STAGES=2",
    "window.NUM_STAGES=4",
    "conv.DX_CHANNELS_FASTEST=0",  # before the twenty-first session
    "conv.FORWARD_CHANNELS_FASTEST=1",
    "conv.DW_CHANNELS_FASTEST=1",
    "conv.FORWARD_BLOCK_N=32,conv.FORWARD_TILES=2",  # faster here, slower in the training step
    "conv.NUM_WARPS=8",
    "conv.BLOCK_N=32",
    "conv.BLOCK_N=128,conv.NUM_WARPS=8",
    "conv.SPLIT_BACKWARD=0",
    "conv.SPLIT_TOKENS=256",
    "conv.SPLIT_BLOCK_N=16",  # the default before the seventeenth session
    "conv.SPLIT_BLOCK_N=4",
    "conv.DX_BLOCK_C=64,conv.DX_WARPS=4",  # the forward's tiles (before the seventeenth session)
    "conv.DX_WARPS=1",
    "conv.SPLIT_BLOCK_N=64,conv.SPLIT_WARPS=8",
    "conv.BLOCK_C=128,conv.NUM_WARPS=8,conv.SPLIT_WARPS=8",
    "conv.SPLIT_WARPS=4,conv.SPLIT_BLOCK_N=32,conv.SPLIT_TOKENS=1024",  # the thirteenth session's
    "conv.SPLIT_WARPS=1",
    "norm.BLOCK_M=4",
    "norm.BLOCK_M=8,norm.NUM_WARPS=8",
    "norm.SPAN=32",
    "norm.SPAN=128",
    "default",  # the two default rows' spread is the noise
)
KERNELS = ("_window_fwd_kernel", "_window_bwd_kernel", "_conv_fwd_kernel", "_conv_bwd_kernel", "_conv_dx_kernel",
           "_conv_dw_kernel", "_gated_norm_fwd_kernel", "_gated_norm_bwd_kernel")


def scan_error(window, reference_grads, inputs, segment_start, grad_out) -> float:
    """Worst relative error of y and each input gradient against the float64 reference."""
    leaves = [tensor.detach().clone().requires_grad_() for tensor in inputs]
    y = window(*leaves, segment_start)
    y.backward(grad_out)
    got = [y.detach(), *(leaf.grad for leaf in leaves)]
    return max(float((g.double() - r).norm() / r.norm()) for g, r in zip(got, reference_grads))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_ssm_kernels needs a CUDA device; none found, nothing measured.")
        return 0
    from torch.profiler import ProfilerActivity, profile

    device, shape = torch.device("cuda"), MODEL_LAYER
    torch.manual_seed(0)
    segment_start = uniform_segment_starts(shape, device)
    window, scan_in = packed_scan_case(shape, torch.bfloat16, device)
    conv_in = conv_inputs(shape, torch.bfloat16, device)
    tokens = (shape.batch, shape.seq_len)
    grad_y = torch.randn(*tokens, shape.heads, shape.head_dim, device=device, dtype=torch.bfloat16)
    grad_conv = torch.randn_like(conv_in[0])
    # Both output gates: y as the scan writes it, z as its matmul does.
    hidden = shape.heads * shape.head_dim // 2
    gate_in = [torch.randn(*tokens, 2 * hidden, device=device, dtype=torch.bfloat16).requires_grad_()
               for _ in range(2)] + [torch.ones(2, hidden, device=device, requires_grad=True)]
    grad_gate = torch.randn(2, *tokens, hidden, device=device, dtype=torch.bfloat16)

    def reference_scan(x, dt, A, D, segment_start):
        u, B, C = split_scan_inputs(x, shape.heads, shape.groups, shape.state_dim)
        return ssd_segmented(u, dt, A, B, C, D, segment_start)

    # The reference: the torch scan in float64 on the same (bf16-valued) inputs.
    leaves = [tensor.detach().double().requires_grad_() for tensor in scan_in]
    y_ref = reference_scan(*leaves, segment_start)
    y_ref.backward(grad_y.double())
    reference = [y_ref.detach(), *(leaf.grad for leaf in leaves)]

    def run_once():
        window(*scan_in, segment_start).backward(grad_y)
        causal_conv_silu_segmented_triton(*conv_in, segment_start).backward(grad_conv)
        gated_norm_triton.gated_rms_norm_triton(*gate_in, 1e-5).backward(grad_gate)

    rows = []
    for text in args.variants:
        try:
            with variant_applied(text):
                run_once()  # compiles this variant
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.repeats):
                        run_once()
                    torch.cuda.synchronize()
                times = {event.key: event.device_time_total / args.repeats for event in prof.key_averages()}
                row = {"variant": text, **{kernel: times.get(kernel) for kernel in KERNELS},
                       "scan_rel_error": scan_error(window, reference, scan_in, segment_start, grad_y)}
        except Exception as error:  # one failing variant should not hide the others
            row = {"variant": text, "error": f"{error!r:.300}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "shape": vars(shape), "rows": rows},
                                       indent=1))
    names = [k.strip("_").replace("_kernel", "").replace("gated_norm", "gate") for k in KERNELS]
    print(f"\n{'variant':52s} " + " ".join(f"{name:>11s}" for name in names) + "   rel.err")
    for row in rows:
        cells = " ".join(f"{row[k]:11.1f}" if row.get(k) is not None else f"{'-':>11s}" for k in KERNELS)
        print(f"{row['variant']:52s} {cells}   {row.get('scan_rel_error', float('nan')):.2e} {row.get('error', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
