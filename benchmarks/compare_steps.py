"""Two models' training steps timed against each other in one process, round after round.

Separate ``profile_step.py`` runs of Attamba and the transformer on one H200 gave Attamba 22.2 to
25.2 ms a step from call to call while the transformer held 17.8–18.6 (docs/benchmarks.md,
nineteenth session): Attamba's step leans on the host, whose speed drifts within a process and
differs between machines. Here both models are built (compiled as the training loop compiles them;
``distributed.compile_scope=model`` in one model's overrides compiles it whole), warmed up, then
timed in turn, ``--steps`` steps each a round, every other round in the opposite order, so drift
shows as spread across rounds rather than as a difference between the models. Per round: each
model's median ms a step and A's tokens/s over B's; at the end, the medians over rounds and the
range of the ratio.

    python benchmarks/compare_steps.py --a config=apps/attamba/configs/attamba_60m.yaml \\
        --b config=apps/main/configs/transformer_60m.yaml [--rounds 6] [--steps 20] [--warmup 30] \\
        [--seq-len 1024] [--batch 16] [--mean-doc 512] [distributed.compile_mode=reduce-overhead ...]

``--a`` and ``--b`` take a model's own overrides (space-separated, quoted when several); overrides
after the options apply to both. Needs CUDA (``--device cpu --no-compile`` smoke-tests it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compare_attention_kernels import round_order  # noqa: E402
from benchmarks.profile_step import automatic_gc_off, make_training_step, time_steps  # noqa: E402


def ratio_summary(rounds: list[tuple[float, float]]) -> str:
    """Medians of each model's per-round ms, and A's tokens/s over B's (= B's ms over A's): its
    median over rounds and its range."""
    a_ms = statistics.median(a for a, _ in rounds)
    b_ms = statistics.median(b for _, b in rounds)
    ratios = [b / a for a, b in rounds]
    return (f"A {a_ms:.2f} ms/step, B {b_ms:.2f} ms/step over {len(rounds)} rounds: A's tokens/s = "
            f"{statistics.median(ratios):.3f}x B's (rounds {min(ratios):.3f}-{max(ratios):.3f})")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help='model A\'s overrides, e.g. "config=apps/attamba/configs/attamba_60m.yaml"')
    parser.add_argument("--b", required=True, help="model B's overrides")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each model a round")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps of each model first (compiles, then settles)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--mean-doc", type=int, default=512)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test the script")
    options, shared = parser.parse_known_args(argv)
    if options.rounds < 1 or options.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    if options.device == "cuda" and not torch.cuda.is_available():
        print("compare_steps needs a CUDA device; none found, nothing measured.")
        return 0
    device = torch.device(options.device)
    models = {}
    for label, own in (("A", options.a), ("B", options.b)):
        step = make_training_step([*own.split(), *shared], options.seq_len, options.batch, options.mean_doc, device,
                                  compile=not options.no_compile)
        # Warm up each model as soon as it is built: its compile and CUDA-graph recording then
        # happen before the other model exists, as in a run of its own.
        time_steps(step.run, options.warmup, device)
        models[label] = step
        print(f"{label}: {step.args.model_type} ({own}) warmed up over {options.warmup} steps", flush=True)
    rounds = []
    with automatic_gc_off():
        for round_index in range(options.rounds):
            ms = {}
            for label, step in round_order(list(models.items()), round_index):
                ms[label] = statistics.median(time_steps(step.run, options.steps, device))
            rounds.append((ms["A"], ms["B"]))
            print(f"round {round_index + 1}: A {ms['A']:.2f} ms, B {ms['B']:.2f} ms, "
                  f"A/B tokens/s {ms['B'] / ms['A']:.3f}", flush=True)
    print(f"n={options.seq_len} batch={options.batch} mean_doc={options.mean_doc}, {options.steps} steps a round")
    print(ratio_summary(rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
