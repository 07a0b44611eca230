"""Where a training step's time goes: one model's forward+backward+AdamW, timed and profiled.

Builds the model of a training config (any app, with dotted overrides), compiles it as the training
loop does (each block, or the whole model with ``distributed.compile_scope=model``) and runs bf16
autocast as the training loop does, on random tokens with packed documents of random length
(``--mean-doc`` tokens on average; 0: no documents), with Python's automatic garbage collection off,
gradient clipping and the non-finite check of the training loop: steps run back to back, the host
waiting only for the previous step's statistics (since the twentieth session; before it, every step
waited for the GPU, as the loop then did). Prints the median step time and tokens/s, then the
kernels that took the most GPU time over ``--profile-steps`` steps and the operators that took the
most host (CPU) time: a step far longer than its GPU time is host-bound, and the second table says
where the host spends it.

    python benchmarks/profile_step.py config=apps/attamba/configs/attamba_60m.yaml \
        [--seq-len 1024] [--batch 16] [--mean-doc 512] [--rows 25] [--gaps] [model.ssm_impl=torch ...]

``--timeline 20`` times 20 more steps without a profiler, recording when the host and when the GPU
reach each block's forward and backward (:mod:`benchmarks.step_timeline`): where the GPU's lag
behind the host falls to ~0, the GPU waits for the host. ``--gaps`` adds where the GPU idled
within the profiled steps and what the host ran meanwhile (:mod:`benchmarks.gpu_gaps`);
``--share-of _window_,_conv_`` the GPU time of the kernels so named as a share of the step (the
KV-SSM share of issue 3); ``--by-kind`` the GPU time and launches by kind of kernel
(:mod:`benchmarks.kernel_kinds`: matmuls, attention, KV-SSM kernels, ...), to set two models side
by side. ``--knobs conv.FORWARD_TILES=2`` runs the step with other KV-SSM kernel settings
(:mod:`benchmarks.kernel_knobs`, as ``benchmarks/tune_ssm_kernels.py``'s variants): kernels timed
alone there, reading the same input every repeat, can rank otherwise than inside the step
(docs/benchmarks.md, twenty-first session).

Needs CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_gaps import gap_report, is_device_work  # noqa: E402
from benchmarks.kernel_kinds import format_kinds, format_top_kernels, time_by_kind  # noqa: E402
from benchmarks.kernel_knobs import variant_applied  # noqa: E402
from benchmarks.step_timeline import StepTimeline  # noqa: E402
from lingua import distributed  # noqa: E402
from lingua.args import read_raw  # noqa: E402
from lingua.optim import build_optimizer, no_weight_decay_names  # noqa: E402
from lingua.registry import get_model_spec  # noqa: E402
from lingua.step_check import DeferredStepCheck  # noqa: E402
from lingua.train import cross_entropy, load_train_args, update  # noqa: E402


def kernel_totals(averages, steps: int) -> tuple[float, float]:
    """(kernels launched, µs of kernel time) per step from a profiler's ``key_averages()``.

    Only device-side work counts: an operator row also carries the time of the kernels it launched,
    and a ``record_function`` range its kernels' span, so summing every row counts kernels twice."""
    kernels = _kernel_events(averages)
    return sum(e.count for e in kernels) / steps, sum(e.self_device_time_total for e in kernels) / steps


def _kernel_events(averages) -> list:
    return [event for event in averages if is_device_work(event)]


def kernel_times(averages, steps: int) -> dict[str, float]:
    """Kernel name -> µs of GPU time per step, from a profiler's ``key_averages()``."""
    return {event.key: event.self_device_time_total / steps for event in _kernel_events(averages)}


def kernel_launches(averages, steps: int) -> dict[str, float]:
    """Kernel name -> launches per step, from a profiler's ``key_averages()``."""
    return {event.key: event.count / steps for event in _kernel_events(averages)}


def kernel_share(averages, names: list[str], steps: int, step_ms: float) -> str:
    """GPU time per step of the kernels whose names contain one of ``names``, and its share of a
    step of ``step_ms`` (the unprofiled median: profiling slows the host, not the kernels)."""
    rows = [event for event in _kernel_events(averages) if any(name in event.key for name in names if name)]
    lines = [f"  {event.self_device_time_total / steps / 1e3:7.3f} ms/step  {event.key}" for event in rows]
    total_ms = sum(event.self_device_time_total for event in rows) / steps / 1e3
    return "\n".join([f"kernels matching {names}: {total_ms:.3f} ms/step = {100 * total_ms / step_ms:.1f}% "
                      f"of the {step_ms:.2f} ms step", *lines])


def random_doc_ids(batch: int, n: int, mean_doc: int, device) -> torch.Tensor | None:
    """[batch, n] document numbers of geometric-length documents (None when mean_doc is 0)."""
    if mean_doc <= 0:
        return None
    starts = torch.rand(batch, n, device=device) < 1.0 / mean_doc
    starts[:, 0] = True
    return starts.long().cumsum(1) - 1


@dataclass
class TrainingStep:
    """One model's training step as the training loop runs it: forward under bf16 autocast, the
    loss, backward, gradient clipping, the non-finite check armed on the device
    (:mod:`lingua.step_check`), AdamW, on fixed random tokens (packed documents of random lengths)."""

    run: Callable[..., None]
    """``run(mark=None)``: one step; ``mark(name)``, if given, is called at the loss, after the
    backward, within the optimizer's part (:func:`lingua.train.update`) and after it
    (:class:`benchmarks.step_timeline.StepTimeline.mark`)."""
    args: object
    """The model's training args (``lingua.train.TrainArgs``)."""
    model: torch.nn.Module


def make_training_step(overrides: list[str], seq_len: int, batch: int, mean_doc: int, device: torch.device,
                       compile: bool = True, eager_loss: bool = False) -> TrainingStep:
    """Build a training config's model (``overrides``: ``config=...`` and dotted settings) compiled
    as ``distributed.parallelize_model`` compiles it (each block, or the whole model with
    ``distributed.compile_scope=model``), and return its step."""
    model_type = read_raw(overrides).get("model_type", "attamba")
    args = load_train_args(
        [*overrides, f"model.max_seqlen={seq_len}", "distributed.model_dtype=bf16", f"distributed.compile={compile}"],
        model_type,
    )
    env = distributed.DistEnv(0, 0, 1, device)
    torch.manual_seed(0)
    with device:
        model = get_model_spec(args.model_type).build(args.model)
        model.init_weights()
    no_decay = no_weight_decay_names(model)
    model = distributed.parallelize_model(model, args.distributed, env)
    loss_fn = cross_entropy if eager_loss else distributed.compile_loss(cross_entropy, args.distributed)
    autocast = distributed.autocast_context(args.distributed, env, "none")
    optimizer, _ = build_optimizer(model, args.optim, 1000, no_decay)
    tokens = torch.randint(0, args.model.vocab_size, (batch, seq_len + 1), device=device)
    doc_ids = random_doc_ids(batch, seq_len, mean_doc, device)

    check = DeferredStepCheck(optimizer, device)

    def run(mark: Callable[[str], None] | None = None) -> None:
        mark = mark or (lambda name: None)
        distributed.mark_step_begin(args.distributed)
        with autocast:
            loss = loss_fn(model(tokens[:, :-1], doc_ids), tokens[:, 1:])
        mark("loss")
        loss.backward()
        mark("backward done")
        # The training loop's update, and its host waiting only for the previous step's statistics.
        update(optimizer, check, 0, loss.detach(), args.optim.clip, mark)
        check.finished()
        mark("statistics read")  # the step before this one's, waited for if need be

    return TrainingStep(run, args, model)


@contextlib.contextmanager
def automatic_gc_off():
    """Python's automatic garbage collection off (after one collection) as the training loop runs
    (lingua.train), and back as it was on exit. Left on, its collections land in some steps and not
    others, and cost more the more Python objects a model's forward makes (Attamba's layer plans)."""
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> list[float]:
    """Milliseconds between the ends of consecutive calls of ``step`` (the first: from the start),
    run back to back as the training loop runs them: the host waits only where the step itself
    waits (for the previous step's statistics), so the times are the loop's steady pace. Waits for
    the GPU once, at the end."""
    times = []
    last = time.perf_counter()
    for index in range(steps):
        step()
        if index == steps - 1 and device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append((now - last) * 1e3)
        last = now
    return times


def record_timeline(training: TrainingStep, steps: int, device: torch.device) -> StepTimeline:
    """``steps`` steps with the host's and the GPU's arrival at each point recorded (hooks on the
    model's blocks, removed afterwards; none when the whole model is one compiled graph
    (``distributed.compile_scope=model``), which a hook on a block would break in pieces)."""
    timeline = StepTimeline(device)
    whole = training.args.distributed.compile and training.args.distributed.compile_scope == "model"
    handles = [] if whole else timeline.attach(training.model.layers)
    try:
        for _ in range(steps):
            timeline.begin_step()
            training.run(timeline.mark)
            timeline.end_step()
    finally:
        for handle in handles:
            handle.remove()
    return timeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--mean-doc", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40, help="timed steps; the median is of the last half")
    parser.add_argument("--profile-steps", type=int, default=3, help="0: time the steps only")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--cpu-rows", type=int, default=15, help="rows of the host-time table")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--eager-loss", action="store_true", help="the cross-entropy uncompiled, as before the twelfth session")
    # Comma-separated rather than nargs="*", which would swallow the config overrides after it.
    parser.add_argument("--shapes-of", default="", metavar="OP[,OP...]",
                        help="ops (e.g. aten::copy_,aten::fill_) whose GPU time to break down by input shapes and call site")
    parser.add_argument("--share-of", default="", metavar="NAME[,NAME...]",
                        help="kernels (substrings of their names) whose GPU time to report as a share of the step")
    parser.add_argument("--gaps", action="store_true",
                        help="also print the GPU's idle gaps per step and the host ops running in them")
    parser.add_argument("--by-kind", action="store_true",
                        help="also print the GPU time per step by kind of kernel (benchmarks/kernel_kinds.py)")
    parser.add_argument("--kind-rows", type=int, default=0, metavar="N",
                        help="with --by-kind, also list each kind's N longest kernels")
    parser.add_argument("--timeline", type=int, default=0, metavar="STEPS",
                        help="also time STEPS more steps unprofiled, recording when host and GPU reach each block's "
                             "forward and backward, the loss and the optimizer's parts (benchmarks/step_timeline.py)")
    parser.add_argument("--knobs", default="default", metavar="MODULE.KNOB=V[,...]",
                        help="KV-SSM kernel settings to run the step with, as tune_ssm_kernels.py's variants "
                             "(e.g. conv.FORWARD_BLOCK_N=32,conv.FORWARD_TILES=2): that script times kernels alone, "
                             "this inside the step")
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test the script")
    options, overrides = parser.parse_known_args()
    if options.device == "cuda" and not torch.cuda.is_available():
        sys.exit("profile_step.py needs CUDA")
    # The knobs set before the first launch: compiled graphs capture them.
    with variant_applied(options.knobs), automatic_gc_off():
        profile_training_step(options, overrides, torch.device(options.device))


def profile_training_step(options: argparse.Namespace, overrides: list[str], device: torch.device) -> None:
    training = make_training_step(overrides, options.seq_len, options.batch, options.mean_doc, device,
                                  compile=not options.no_compile, eager_loss=options.eager_loss)
    args, step, batch, n = training.args, training.run, options.batch, options.seq_len
    times = time_steps(step, options.steps, device)
    print(f"first step (compiles and autotunes): {times[0] / 1e3:.1f} s")
    steady = times[len(times) // 2:]
    ms = statistics.median(steady)
    print(f"{args.model_type} n={n} batch={batch} mean_doc={options.mean_doc}: "
          f"{ms:.2f} ms/step, {batch * n / ms * 1e3:,.0f} tok/s (median of last {len(steady)})")
    if options.timeline > 0:
        print(record_timeline(training, options.timeline, device).report())

    if options.profile_steps < 1:
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    detailed_ops = [name for name in options.shapes_of.split(",") if name]
    detail = bool(detailed_ops)
    # Python frames of aten ops are recorded only with the verbose experimental config.
    config = torch._C._profiler._ExperimentalConfig(verbose=True) if detail else None
    with profile(activities=activities, record_shapes=detail, with_stack=detail, experimental_config=config) as prof:
        for _ in range(options.profile_steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    averages = prof.key_averages()
    if device.type == "cuda":
        print(averages.table(sort_by="self_cuda_time_total", row_limit=options.rows, max_name_column_width=70))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=options.cpu_rows, max_name_column_width=70))
    # Kernel time per step against the step's wall time: a large gap means the host is the limit.
    _, gpu_us = kernel_totals(averages, options.profile_steps)
    gpu_ms = gpu_us / 1e3
    print(f"GPU (kernel) time per step {gpu_ms:.2f} ms of a {ms:.2f} ms step (profiled steps are slower)")
    for name in detailed_ops:
        print_breakdown(prof, name, options.profile_steps)
    if options.share_of:
        print(kernel_share(averages, options.share_of.split(","), options.profile_steps, ms))
    if options.gaps:
        print(gap_report(prof.events(), options.profile_steps))
    if options.by_kind:
        times_per_step = kernel_times(averages, options.profile_steps)
        print(format_kinds(time_by_kind(times_per_step), time_by_kind(kernel_launches(averages, options.profile_steps))))
        if options.kind_rows:
            print(format_top_kernels(times_per_step, options.kind_rows))


def print_breakdown(prof, name: str, steps: int, rows: int = 8) -> None:
    """``name``'s GPU time grouped by input shapes, then by the Python frames that called it."""
    by_shapes: dict[str, list[float]] = {}
    by_site: dict[str, list[float]] = {}
    for event in prof.events():
        if event.name != name:
            continue
        frames = [frame for frame in event.stack if ".py(" in frame][:4]
        for table, key in ((by_shapes, str(event.input_shapes)), (by_site, " <- ".join(frames) or "(no Python frame)")):
            count_and_time = table.setdefault(key, [0, 0.0])
            count_and_time[0] += 1
            count_and_time[1] += event.self_device_time_total
    for title, table in (("shapes", by_shapes), ("call site", by_site)):
        print(f"{name} by {title}:")
        for key, (count, us) in sorted(table.items(), key=lambda item: -item[1][1])[:rows]:
            print(f"  {count / steps:5.1f}/step {us / steps / 1e3:7.3f} ms/step  {key}")


if __name__ == "__main__":
    main()
