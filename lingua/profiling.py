"""Profiling over a configured window of steps: torch profiler traces and CUDA memory snapshots."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger("lingua")


@dataclass
class ProfilerArgs:
    enabled: bool = False
    start_step: int = 10
    """First step of the traced window (after warmup and compilation)."""
    steps: int = 4
    """Steps in the window."""
    memory_snapshot: bool = True
    """On CUDA, also record allocator history and dump a memory snapshot at the window's end."""


class StepProfiler:
    """Call ``step(global_step)`` after every optimizer step; writes to ``<run>/profiling``."""

    def __init__(self, args: ProfilerArgs, run_dir: Path, rank: int):
        self.args = args
        self.out_dir = run_dir / "profiling"
        self.rank = rank
        self.profiler: Optional[torch.profiler.profile] = None
        self.cuda = torch.cuda.is_available()

    def step(self, global_step: int) -> None:
        if not self.args.enabled:
            return
        if global_step == self.args.start_step:
            self._start()
        elif self.profiler is not None and global_step >= self.args.start_step + self.args.steps:
            self._stop(global_step)

    def _start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            if self.args.memory_snapshot:
                torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self.profiler.__enter__()

    def _stop(self, global_step: int) -> None:
        self.profiler.__exit__(None, None, None)
        trace = self.out_dir / f"trace_rank{self.rank}_step{global_step}.json"
        self.profiler.export_chrome_trace(str(trace))
        logger.info("profiler trace written to %s", trace)
        if self.cuda and self.args.memory_snapshot:
            snapshot = self.out_dir / f"memory_rank{self.rank}_step{global_step}.pickle"
            with open(snapshot, "wb") as handle:
                pickle.dump(torch.cuda.memory._snapshot(), handle)
            torch.cuda.memory._record_memory_history(enabled=None)
            logger.info("memory snapshot written to %s (open with pytorch.org/memory_viz)", snapshot)
        self.profiler = None

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None
