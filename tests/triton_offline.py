"""Compiling Triton kernels for a Hopper GPU on a machine without one.

The Triton interpreter (what the CPU tests run) accepts code that the compiler refuses — a global
that is not a constexpr, a loop-carried value that changes type — and such errors would otherwise
first show on the device. Triton's wheel ships ``ptxas``, so the whole pipeline down to a cubin
runs on CPU given an explicit target. Run as ``python -m tests.triton_offline [attention] [ssm]``
(without ``TRITON_INTERPRET``, which turns kernels into interpreted functions); it prints one line per
kernel variant (with its registers per thread: Attamba's attention kernels and its
KV-SSM's windowed SSD and conv kernels) and exits non-zero on the first failure.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Optional

HOPPER = ("cuda", 90, 32)


def ptxas_available() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def compile_for_hopper(
    kernel, pointers: dict[str, str], floats: set[str], constexprs: dict, num_warps: int, num_stages: int,
    launch_options: Optional[dict] = None, divisible: frozenset[str] = frozenset(),
):
    """Compile ``kernel`` to a cubin for sm_90: pointer arguments by element type, the named float
    scalars, every other argument an int32; ``launch_options`` as a launch passes them (e.g. the
    attention's register caps). Returns Triton's compiled kernel.

    As a launch with aligned tensors would, pointers and ``stride*`` arguments are marked divisible
    by 16: without that Triton cannot prove the alignment asynchronous copies need, and the code
    (its software pipelining above all) would not be what the device runs. So are the int
    arguments named in ``divisible``, as a launch marks sizes that are multiples of 16 (a 60M
    layer's token and channel counts): masks on them then keep loads vectorized."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
        if name in pointers or name.startswith("stride") or name in divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, **(launch_options or {})}
    return triton.compile(source, target=GPUTarget(*HOPPER), options=options)


def resource_usage(compiled) -> str:
    """Registers per thread and stack bytes of a compiled kernel, as cuobjdump reports them
    (registers bound how many blocks share a multiprocessor)."""
    import re
    import subprocess
    import tempfile

    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return f"registers {found.group(1)}, stack {found.group(2)} B" if found else "resource usage unknown"


def compile_attention_kernels() -> list[str]:
    """Every constexpr variant of Attamba's attention kernels at the CUDA tiles, d = 64 and 128."""
    from apps.attamba import attention_triton as kernels

    config = kernels.CUDA_CONFIG
    floats = {"qk_scale", "sm_scale"}
    benchmarked = kernels.PeriodicMask(chunk_size=8, offset=0, leading=16)  # the window tiles of L = 16
    done = []
    for head_dim, backward, docs, chunk_window in itertools.product((64, 128), (False, True), (False, True), (False, True)):
        pointers = {name: "bf16" for name in ("Q", "K", "V", "DO", "O", "OUT")}
        pointers.update(LSE="fp32", DELTA="fp32", DOC_START="i32")
        constexprs = dict(
            HEAD_DIM=head_dim, BLOCK_M=config.dq_queries if backward else config.forward_queries,
            BLOCK_N=config.dq_keys if backward else config.forward_keys, CHUNK_WINDOW=chunk_window,
            WINDOW_KEYS=kernels._window_tile(
                benchmarked, config.dq_keys if backward else config.forward_keys,
                config.dq_window_tiles if backward else config.forward_window_tiles,
            ),
            HAS_DOCS=docs, PRECISION="tf32", BACKWARD=backward,
        )
        warps = config.dq_warps if backward else config.forward_warps
        stages = config.backward_stages if backward else config.forward_stages
        registers = kernels._register_limit(config.dq_registers if backward else config.forward_registers, head_dim)
        compiled = compile_for_hopper(kernels._query_kernel, pointers, floats, constexprs, warps, stages, registers)
        done.append(
            f"_query_kernel d={head_dim} backward={backward} docs={docs} chunk_window={chunk_window}: "
            + resource_usage(compiled)
        )
    for head_dim, docs, chunk_window in itertools.product((64, 128), (False, True), (False, True)):
        pointers = {name: "bf16" for name in ("Q", "K", "V", "DO", "DK", "DV")}
        pointers.update(LSE="fp32", DELTA="fp32", SLOT_GRADS="fp32", DOC_START="i32", DOC_END="i32")
        constexprs = dict(
            HEAD_DIM=head_dim, BLOCK_M=config.dkv_queries, BLOCK_N=config.dkv_keys, CHUNK_WINDOW=chunk_window,
            WINDOW_QUERIES=kernels._window_tile(benchmarked, config.dkv_queries, config.dkv_window_tiles),
            HAS_DOCS=docs, PRECISION="tf32", REVERSE=config.dkv_reverse,
        )
        compiled = compile_for_hopper(
            kernels._dkv_kernel, pointers, floats, constexprs, config.dkv_warps, config.backward_stages,
            kernels._register_limit(config.dkv_registers, head_dim),
        )
        done.append(f"_dkv_kernel d={head_dim} docs={docs} chunk_window={chunk_window}: " + resource_usage(compiled))
    compiled = compile_for_hopper(
        kernels._add_slot_grads, {"DK": "bf16", "DV": "bf16", "SLOT_GRADS": "fp32"}, set(), dict(HEAD_DIM=64, BLOCK=64), 4, 1
    )
    done.append("_add_slot_grads d=64: " + resource_usage(compiled))
    return done


def compile_ssm_kernels() -> list[str]:
    """The KV-SSM's windowed SSD kernels (forward, backward; head dim 64, state 128, blocks of 16,
    32 and 64 tokens, TF32 and bf16 dots, blocks aligned to the segments or not) and its segmented conv (forward with and without a bias
    or the SiLU, backward, and the split backward's two kernels, the weights' with and without the
    SiLU), the output gates' norm (forward, backward), in bf16, and the queries' and keys' rotation
    with the residual (forward, backward) as autocast runs it."""
    from apps.attamba import ssd_triton_conv as conv
    from apps.attamba import ssd_triton_window as window

    tensors = ("u", "B", "C", "y", "dy", "du", "dB", "dC", "x", "w", "bias", "out", "dout", "dx", "dpre")
    pointers = {f"{name}_ptr": "bf16" for name in tensors}
    pointers.update({f"{name}_ptr": "fp32" for name in ("A", "D", "ddt", "dA_part", "dD_part", "dw_part")})
    pointers.update(dt_ptr="bf16", start_ptr="u8", dist_ptr="i32")
    ssd_tiles = dict(BLOCK_P=64, BLOCK_S=128, TILE=window.TILE_S)
    conv_tiles = dict(K=4, BLOCK_N=conv.BLOCK_N, BLOCK_C=conv.BLOCK_C, CHANNELS_FASTEST=False)  # the one-kernel backward's
    forward_tiles = dict(conv_tiles, BLOCK_N=conv.FORWARD_BLOCK_N, TILES=conv.FORWARD_TILES,
                         CHANNELS_FASTEST=conv.FORWARD_CHANNELS_FASTEST)
    # Each conv kernel at the settings its launch uses: the dx kernel its own channel tile, the
    # weight gradients SPLIT_* with the SiLU and PLAIN_SPLIT_* without.
    dx_tiles = dict(K=4, BLOCK_N=conv.DX_BLOCK_N, BLOCK_C=conv.DX_BLOCK_C, CHANNELS_FASTEST=conv.DX_CHANNELS_FASTEST)
    dw_tiles = dict(K=4, BLOCK_N=conv.SPLIT_BLOCK_N, BLOCK_C=conv.BLOCK_C, SPAN=conv.SPLIT_TOKENS,
                    CHANNELS_FASTEST=conv.DW_CHANNELS_FASTEST)
    plain_dw_tiles = dict(K=4, BLOCK_N=conv.PLAIN_SPLIT_BLOCK_N, BLOCK_C=conv.BLOCK_C, SPAN=conv.PLAIN_SPLIT_TOKENS,
                          CHANNELS_FASTEST=conv.DW_CHANNELS_FASTEST)
    variants = [
        (kernel, dict(BLOCK_Q=block_q, PRECISION=precision, ALIGNED=aligned, **ssd_tiles,
                      TILE_P=window.BACKWARD_TILE_P if backward else window.FORWARD_TILE_P),
         window._warps(block_q, backward), window.NUM_STAGES)
        for kernel, backward in ((window._window_fwd_kernel, False), (window._window_bwd_kernel, True))
        for block_q in (16, 32, 64)
        for precision in ("tf32", "bf16")
        for aligned in (False, True)
    ] + [
        (conv._conv_fwd_kernel, dict(HAS_BIAS=True, SILU=True, **forward_tiles), conv.NUM_WARPS, 3),  # the model's
        (conv._conv_fwd_kernel, dict(HAS_BIAS=True, SILU=False, **forward_tiles), conv.NUM_WARPS, 3),
        (conv._conv_fwd_kernel, dict(HAS_BIAS=False, SILU=False, **forward_tiles), conv.NUM_WARPS, 3),
        (conv._conv_bwd_kernel, conv_tiles, conv.NUM_WARPS, 3),
        (conv._conv_dx_kernel, dx_tiles, conv.DX_WARPS, 3),
        (conv._conv_dw_kernel, dict(HAS_BIAS=True, SILU=True, **dw_tiles), conv.SPLIT_WARPS, 3),  # the model's
        (conv._conv_dw_kernel, dict(HAS_BIAS=False, SILU=False, **plain_dw_tiles), conv.PLAIN_SPLIT_WARPS, 3),
    ]
    from apps.attamba import gated_norm_triton as gate

    gate_tiles = dict(BLOCK_M=gate.BLOCK_M, BLOCK_H=512)  # a 60M layer's gates: 512 channels each
    variants += [
        (gate._gated_norm_fwd_kernel, gate_tiles, gate.NUM_WARPS, 3),
        (gate._gated_norm_bwd_kernel, dict(SPAN=gate.SPAN, **gate_tiles), gate.NUM_WARPS, 3),
    ]
    pointers.update({f"{name}_ptr": "bf16" for name in ("z", "dz")})
    pointers.update({f"{name}_ptr": "fp32" for name in ("rstd",)})
    from apps.attamba import rotary_triton as rotary

    # Under autocast, as training runs: q and kv bf16, the residual fp32; heads of 64.
    rotary_tiles = dict(HALF_D=32, HAS_RESIDUAL=True, ROUND_SUM=False, BLOCK_T=rotary.BLOCK_T, BLOCK_E=rotary.BLOCK_E)
    variants += [(kernel, rotary_tiles, rotary.NUM_WARPS, 3)
                 for kernel in (rotary._rotate_qkv_fwd_kernel, rotary._rotate_qkv_bwd_kernel)]
    rotated = ("q", "kv", "q_out", "k_out", "v_out", "dq", "dk", "dv", "dq_in", "dkv")
    pointers.update({f"{name}_ptr": "bf16" for name in rotated})
    pointers.update({f"{name}_ptr": "fp32" for name in ("res", "dres", "cos", "sin")})
    done = []
    for kernel, constexprs, warps, stages in variants:
        used = {name: kind for name, kind in pointers.items() if name in kernel.arg_names}
        # A 60M layer's token, channel and row counts are multiples of 16, which a launch marks.
        sizes = frozenset({"n", "c", "M", "H", "e", "n_rows"}) & set(kernel.arg_names)
        compiled = compile_for_hopper(kernel, used, {"eps"} & set(kernel.arg_names), constexprs, warps, stages,
                                      divisible=sizes)
        switches = " ".join(f"{key}={value}" for key, value in constexprs.items() if key in ("BLOCK_Q", "HAS_BIAS", "PRECISION", "SILU", "ALIGNED"))
        done.append(f"{kernel.__name__}{' ' + switches if switches else ''}: " + resource_usage(compiled))
    return done


GROUPS = {"attention": compile_attention_kernels, "ssm": compile_ssm_kernels}


def main(groups: list[str]) -> int:
    """Compile the named groups of kernels (all without names)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        print(f"unknown kernel groups {unknown}; the groups are {sorted(GROUPS)}", file=sys.stderr)
        return 2
    for group in groups or GROUPS:
        for line in GROUPS[group]():
            print("compiled for sm_90:", line)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main(sys.argv[1:]))
