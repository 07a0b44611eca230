"""A training step's GPU time by kind of kernel: matmuls, attention, KV-SSM scan and conv, ...

Two models' kernel tables differ in hundreds of rows (Inductor names its fused kernels after the ops
they fuse); grouped by kind they can be compared line by line, which is how the question "where
does Attamba's extra GPU time go against the transformer's" gets a short answer.

    from benchmarks.kernel_kinds import time_by_kind, format_kinds
    print(format_kinds(time_by_kind(kernel_times)))

``kernel_times`` maps a kernel's name to its GPU µs per step (``profile_step.py --by-kind`` builds
it from the profiler's events).
"""

from __future__ import annotations

KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # First match wins: the project's own kernels before the generic patterns.
    ("KV-SSM scan and conv", ("_window_fwd_kernel", "_window_bwd_kernel", "_conv_fwd_kernel", "_conv_bwd_kernel",
                              "_conv_dx_kernel", "_conv_dw_kernel", "_block_exit_kernel", "_state_pass_kernel",
                              "_block_output_kernel", "_block_entry_grad_kernel", "_block_grad_kernel")),
    ("KV-SSM output gates", ("_gated_norm_",)),
    # Attamba's rotation of queries and keys with the SSMs' residual (the transformer's rotation is
    # fused by Inductor).
    ("q/k rotation and residual", ("_rotate_qkv_fwd_kernel", "_rotate_qkv_bwd_kernel")),
    ("attention", ("_query_kernel", "_dkv_kernel", "_add_slot_grads", "flash", "fmha", "attention", "cudnn")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "sm90_")),
    ("optimizer", ("multi_tensor_apply", "foreach", "adam")),
    ("fused by Inductor", ("triton_",)),
)
OTHER = "other"


def kind_of(kernel: str) -> str:
    """The kind of a kernel, by its name (case-insensitive substrings of KINDS)."""
    name = kernel.lower()
    for kind, patterns in KINDS:
        if any(pattern.lower() in name for pattern in patterns):
            return kind
    return OTHER


def time_by_kind(kernel_times: dict[str, float]) -> dict[str, float]:
    """Kernel name -> µs per step, summed into kind -> µs per step (every kind listed, in KINDS' order).
    Sums launches per step by kind just as well."""
    totals = {kind: 0.0 for kind, _ in KINDS} | {OTHER: 0.0}
    for kernel, microseconds in kernel_times.items():
        totals[kind_of(kernel)] += microseconds
    return totals


def format_kinds(totals: dict[str, float], launches: dict[str, float] | None = None) -> str:
    """One line per kind (ms per step and share of the kernels' time, and with ``launches``, kind
    -> kernels launched per step, their count), then the total."""
    whole = sum(totals.values())

    def count(kind: str) -> str:
        return "" if launches is None else f" {launches[kind]:6.0f} launches"

    lines = [f"  {ms / 1e3:7.3f} ms/step {100 * ms / whole if whole else 0.0:5.1f}%{count(kind)}  {kind}"
             for kind, ms in totals.items()]
    every = "" if launches is None else f" {sum(launches.values()):6.0f} launches"
    return "\n".join(["GPU time per step by kind of kernel:", *lines, f"  {whole / 1e3:7.3f} ms/step       {every}  all kernels"])


def format_top_kernels(kernel_times: dict[str, float], rows: int) -> str:
    """Each kind's ``rows`` longest kernels (µs per step), so that a kind's total can be traced to
    the kernels in it (Inductor's fused kernels are named after the ops they fuse)."""
    by_kind: dict[str, list[tuple[str, float]]] = {}
    for kernel, microseconds in kernel_times.items():
        by_kind.setdefault(kind_of(kernel), []).append((kernel, microseconds))
    lines = [f"Longest kernels of each kind (µs/step, top {rows}):"]
    for kind in [kind for kind, _ in KINDS] + [OTHER]:
        kernels = sorted(by_kind.get(kind, []), key=lambda item: -item[1])
        if kernels:
            lines.append(f"  {kind}:")
            lines += [f"    {microseconds:8.1f}  {kernel[:110]}" for kernel, microseconds in kernels[:rows]]
    return "\n".join(lines)
