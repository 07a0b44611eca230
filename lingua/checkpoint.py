"""Checkpoints: torch.distributed.checkpoint (DCP) of model, optimizer and scheduler, plus each
rank's training state (step, data stream, RNG); keep-last-N and evaluation checkpoints; and a
consolidated single-file export for inference.

A checkpoint is written to ``<dir>/.tmp-<step>`` and renamed to ``<dir>/<step:010d>`` only once
every rank has finished, so a crash mid-write never leaves a directory that looks complete.
Resuming takes the newest complete one.

Layout of a complete checkpoint directory:
    <step:010d>/  .metadata, *.distcp      DCP shards of {"model", "optim", "scheduler"}
                  train_state_<rank>.pt    step, data stream state, RNG states, counters
                  config.yaml              the run's resolved config
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from lingua import distributed
from lingua.args import build_config, save_config

STEP_DIR = re.compile(r"^\d{10}$")
CONSOLIDATED_NAME = "model.safetensors"


@dataclass
class CheckpointArgs:
    every: int = 1000
    """Save a checkpoint every this many steps (and at the end of training); 0 = only at the end."""
    keep_last: int = 2
    """Keep the newest N regular checkpoints (evaluation checkpoints are kept apart)."""
    keep_eval: int = -1
    """Keep the newest N checkpoints taken at evaluation steps; -1 keeps all, 0 makes none."""
    resume: bool = True
    """Resume from the newest complete checkpoint in the run directory, if any."""
    init_from: Optional[str] = None
    """Load model weights (only) from this checkpoint or export before step 0."""

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep_last < 1:
            raise ValueError(
                f"checkpoint.every must be >= 0 and checkpoint.keep_last >= 1, got {self.every} and {self.keep_last}"
            )


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _SchedulerState:
    """Adapts an LR scheduler to DCP's Stateful protocol (its state is tiny and replicated)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return {"last_epoch": torch.tensor(self.scheduler.last_epoch)}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.last_epoch = int(state["last_epoch"])
        self.scheduler._step_count = self.scheduler.last_epoch + 1
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_lr()):
            group["lr"] = lr
        self.scheduler._last_lr = [group["lr"] for group in self.scheduler.optimizer.param_groups]


def _model_and_optim_state(model: nn.Module, optimizer) -> dict:
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


class CheckpointManager:
    def __init__(self, directory: str | Path, args: CheckpointArgs, env: distributed.DistEnv):
        self.directory = Path(directory)
        self.args = args
        self.env = env
        self.eval_directory = self.directory / "eval"

    # -- discovery --------------------------------------------------------------------------
    @staticmethod
    def complete_checkpoints(directory: Path) -> list[Path]:
        if not directory.is_dir():
            return []
        return sorted(p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name))

    def latest(self) -> Optional[Path]:
        found = self.complete_checkpoints(self.directory)
        return found[-1] if found else None

    # -- saving -----------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, scheduler, train_state: dict, config: Any, is_eval=False) -> Path:
        """Write a checkpoint collectively (every rank calls this) and return its final path."""
        parent = self.eval_directory if is_eval else self.directory
        final = parent / f"{step:010d}"
        tmp = parent / f".tmp-{step:010d}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()
        state = _model_and_optim_state(model, optimizer)
        state["scheduler"] = _SchedulerState(scheduler)
        dcp.save(state, checkpoint_id=str(tmp))
        torch.save({**train_state, "rng": capture_rng()}, tmp / f"train_state_{self.env.rank}.pt")
        distributed.barrier()
        if self.env.is_main:
            save_config(config, tmp / "config.yaml")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)  # the commit point: only now does the checkpoint count as complete
            self._prune(parent, self.args.keep_eval if is_eval else self.args.keep_last)
        distributed.barrier()
        return final

    def _prune(self, parent: Path, keep: int) -> None:
        for stale in parent.glob(".tmp-*"):  # leftovers of crashed writes
            shutil.rmtree(stale, ignore_errors=True)
        if keep < 0:
            return
        complete = self.complete_checkpoints(parent)
        for old in complete[: max(0, len(complete) - keep)]:
            shutil.rmtree(old, ignore_errors=True)

    # -- loading ----------------------------------------------------------------------------
    def load(self, path: Path, model, optimizer, scheduler) -> dict:
        """Restore model, optimizer and scheduler in place; return this rank's training state."""
        state = _model_and_optim_state(model, optimizer)
        state["scheduler"] = _SchedulerState(scheduler)
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rank_file = path / f"train_state_{self.env.rank}.pt"
        if not rank_file.exists():
            raise FileNotFoundError(
                f"{rank_file} is missing: the checkpoint was written by fewer ranks than this run has"
            )
        train_state = torch.load(rank_file, weights_only=False)
        restore_rng(train_state.pop("rng"))
        return train_state


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights only, from a DCP checkpoint directory or a consolidated export."""
    path = Path(path)
    if (path / CONSOLIDATED_NAME).exists() or path.suffix == ".safetensors":
        from safetensors.torch import load_file

        file = path if path.suffix == ".safetensors" else path / CONSOLIDATED_NAME
        model.load_state_dict(load_file(str(file)))
        return
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"{path} is neither a DCP checkpoint (no .metadata) nor a consolidated export")
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])


def export_consolidated(model: nn.Module, config: Any, out_dir: str | Path) -> Path:
    """Write the full model as one safetensors file plus config.yaml (collective under FSDP)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not distributed.dist.is_initialized() or distributed.dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        # safetensors refuses shared storage (tied embeddings): store contiguous copies.
        tensors = {name: tensor.detach().contiguous().clone() for name, tensor in full_state.items()}
        save_file(tensors, str(out_dir / CONSOLIDATED_NAME))
        save_config(config, out_dir / "config.yaml")
        (out_dir / "export.json").write_text(json.dumps({"parameters": sum(t.numel() for t in tensors.values())}))
    return out_dir


def find_config(path: Path) -> Path:
    """The config.yaml of a checkpoint, an export, or a run directory."""
    for candidate in (path / "config.yaml", path.parent / "config.yaml", path.parent.parent / "config.yaml"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no config.yaml found in or above {path}")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory resolves to its newest checkpoint; a checkpoint or export to itself."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if (path / ".metadata").exists() or (path / CONSOLIDATED_NAME).exists() or path.is_file():
        return path
    for directory in (path / "checkpoints", path):
        found = CheckpointManager.complete_checkpoints(directory)
        if found:
            return found[-1]
    raise FileNotFoundError(f"no complete checkpoint or export found in {path}")


def load_for_inference(path: str | Path, device: str | torch.device = "cpu", model_overrides: Optional[dict] = None):
    """Build the model a checkpoint, export or run directory holds; return (model, train_args).

    ``model_overrides`` (e.g. ``{"eval_token_chunk": 16}``) change the model args before building.
    """
    from omegaconf import OmegaConf

    from lingua.train import train_args_schema

    checkpoint = resolve_checkpoint(path)
    raw = OmegaConf.load(find_config(checkpoint))
    if model_overrides:
        raw = OmegaConf.merge(raw, {"model": dict(model_overrides)})
    train_args = build_config(train_args_schema(raw.get("model_type", "attamba")), raw)
    from lingua.registry import get_model_spec

    model = get_model_spec(train_args.model_type).build(train_args.model)
    load_model_weights(model, checkpoint)
    return model.to(device).eval(), train_args
