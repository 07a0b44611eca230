"""Training metrics: ``metrics.jsonl`` (keys of DESIGN.md "Logs"), readable stdout lines, and
optional wandb (offline mode works). Only rank 0 writes."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

logger = logging.getLogger("lingua")

# Dense bf16 tensor-core peaks, for MFU.
_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


@dataclass
class LoggingArgs:
    freq: int = 10
    """Log every this many optimizer steps."""
    wandb: bool = False
    """Also log to Weights & Biases (set WANDB_MODE=offline to log without network)."""
    wandb_project: str = "attamba"
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 picks a known bf16 peak from the GPU's name (CPU: 1e12)."""


def setup_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout, force=True
    )


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def peak_flops(device: torch.device, configured: float = 0.0) -> float:
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in _PEAK_BF16_FLOPS.items():
            if key in name:
                return flops
        return 100e12
    return 1e12


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    gib = 1024**3
    return {
        "memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
        "memory/max_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
    }


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


class MetricLogger:
    """Writes one JSON object per logged step to ``<run>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, run_dir: Path, args: LoggingArgs, enabled: bool, config: Optional[dict] = None):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.wandb = None
        if enabled and args.wandb:
            import wandb

            self.wandb = wandb.init(project=args.wandb_project, dir=str(run_dir), config=config, resume="allow")

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**metrics, "created_at": now_iso()}
        append_jsonl(self.path, record)
        if self.wandb is not None:
            self.wandb.log(metrics, step=metrics.get("global_step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class Throughput:
    """Tokens per second and MFU between two log points."""

    def __init__(self, flops_per_token: float, peak: float, world_size: int):
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        wps = self.tokens / elapsed  # this rank's tokens per second
        return {"speed/wps": wps, "speed/MFU": 100 * wps * self.flops_per_token / self.peak, "speed/step_time": elapsed}


def format_line(metrics: dict[str, Any]) -> str:
    """A readable stdout line for a metrics record."""
    parts = [f"step {metrics['global_step']}"]
    for key, label, fmt in (
        ("loss/out", "loss", "{:.4f}"),
        ("optim/grad_norm", "gnorm", "{:.3f}"),
        ("optim/lr", "lr", "{:.2e}"),
        ("speed/wps", "tok/s", "{:,.0f}"),
        ("speed/MFU", "MFU%", "{:.1f}"),
        ("memory/max_allocated_gib", "mem GiB", "{:.1f}"),
    ):
        value = metrics.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            parts.append(f"{label} {fmt.format(value)}")
    return " | ".join(parts)
