"""AdamW and learning-rate schedules (warmup then cosine, linear, constant or warmup-stable-decay)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

SCHEDULERS = ("cosine", "linear", "constant", "wsd")


@dataclass
class OptimArgs:
    lr: float = 3e-3
    weight_decay: float = 0.033
    beta1: float = 0.9
    beta2: float = 0.95
    epsilon: float = 1e-8
    clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    scheduler: str = "cosine"
    """'cosine', 'linear', 'constant' or 'wsd' (warmup-stable-decay), each after a linear warmup."""
    warmup: int = 5000
    """Warmup steps, from ~0 up to lr."""
    lr_min_ratio: float = 1e-6
    """The schedule ends at lr * lr_min_ratio."""
    decay_fraction: float = 0.2
    """wsd: the fraction of steps, at the end, spent decaying linearly."""

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"optim.scheduler must be one of {SCHEDULERS}, got '{self.scheduler}'")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"optim.warmup must be >= 0, got {self.warmup}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction must be in [0, 1], got {self.decay_fraction}")


def lr_multiplier(step: int, args: OptimArgs, total_steps: int) -> float:
    """The factor on args.lr after `step` optimizer steps."""
    if step < args.warmup:
        return (step + 1) / (args.warmup + 1)
    floor = args.lr_min_ratio
    progress = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
    if args.scheduler == "constant":
        return 1.0
    if args.scheduler == "linear":
        return floor + (1 - floor) * (1 - progress)
    if args.scheduler == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = total_steps - int(args.decay_fraction * total_steps)  # wsd
    if step < decay_start:
        return 1.0
    decay_progress = (step - decay_start) / max(1, total_steps - decay_start)
    return floor + (1 - floor) * (1 - min(1.0, decay_progress))


WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "module.")


def canonical_name(name: str) -> str:
    """A parameter's name with compile / checkpoint / DDP wrapper prefixes removed."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters marked ``_no_weight_decay`` (SSM decay rates, step sizes, skips).

    Call it before parallelising: FSDP replaces parameters and drops such marks, names stay.
    """
    return {canonical_name(n) for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}


def build_optimizer(model: nn.Module, args: OptimArgs, total_steps: int, no_decay: set[str] | None = None):
    """Fused AdamW and its LambdaLR schedule; parameters named in ``no_decay`` (default: those
    marked on ``model``) get no weight decay. Fused on every device: the training loop skips
    non-finite updates through its ``found_inf`` (:mod:`lingua.step_check`)."""
    no_decay = no_weight_decay_names(model) if no_decay is None else no_decay
    named = [(canonical_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = [p for n, p in named if n not in no_decay]
    exempt = [p for n, p in named if n in no_decay]
    groups = [{"params": decayed}] + ([{"params": exempt, "weight_decay": 0.0}] if exempt else [])
    optimizer = torch.optim.AdamW(
        groups,
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        eps=args.epsilon,
        weight_decay=args.weight_decay,
        fused=True,
    )
    scheduler = LambdaLR(optimizer, partial(lr_multiplier, args=args, total_steps=total_steps))
    return optimizer, scheduler
