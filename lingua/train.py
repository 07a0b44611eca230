"""The one training loop, used by every app: ``python -m apps.<app>.train config=run.yaml key=value``.

It builds the model named by ``model_type`` from the registry, then trains it with gradient
accumulation, clipping, a NaN/inf guard, periodic validation/evaluation and checkpoints, and
saves-and-exits on SIGTERM or SIGUSR1 (preemption). Resuming from the newest checkpoint in
``dump_dir`` reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from lingua import distributed
from lingua.args import ConfigError, build_config, read_raw, save_config, to_dict
from lingua.checkpoint import CheckpointArgs, CheckpointManager, export_consolidated, load_model_weights
from lingua.data import DataArgs, build_data_stream
from lingua.distributed import DistributedArgs
from lingua.metrics import LoggingArgs, MetricLogger, Throughput, format_line, memory_stats, peak_flops, setup_logging
from lingua.optim import OptimArgs, build_optimizer, no_weight_decay_names
from lingua.profiling import ProfilerArgs, StepProfiler
from lingua.registry import get_model_spec
from lingua.step_check import DeferredStepCheck, StepStats
from lingua.tokenizer import build_tokenizer, check_vocab

logger = logging.getLogger("lingua")


@dataclass
class TrainArgs:
    name: str = "run"
    dump_dir: str = "runs/run"
    """Run directory: config.yaml, metrics.jsonl, metrics.eval.jsonl, checkpoints/."""
    model_type: str = "attamba"
    """Registry name of the model family ('attamba', 'transformer', ...)."""
    model: Any = None
    """The model family's args dataclass; its fields come from the registry."""
    steps: int = 1000
    """Optimizer steps to train for."""
    grad_acc_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    seed: int = 42
    device: str = "auto"
    """'auto' (CUDA if available), 'cuda' or 'cpu'."""
    max_nan_steps: int = 10
    """Skip the update of steps whose loss or gradient is NaN/inf (on the device; a skipped step
    still counts towards ``steps``); stop (with a checkpoint) after this many."""
    gc_every: int = 1000
    """Run Python's garbage collector every this many steps (automatic collection is off)."""
    eval_every: int = 0
    """Evaluate (lm-eval tasks and validation perplexity, see `eval`) every this many steps; 0 = off.
    Under torchrun every rank takes part (validation batches and lm-eval's scoring passes shared
    out); rank 0 writes the results.
    Compiled blocks run eagerly during evaluation (no recompiles for eval mode or new shapes);
    FlexAttention stays compiled."""
    eval_at_end: bool = True
    export_at_end: bool = True
    """Write a consolidated safetensors export to <dump_dir>/export at the end."""
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    distributed: DistributedArgs = field(default_factory=DistributedArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    profiling: ProfilerArgs = field(default_factory=ProfilerArgs)
    eval: Any = None
    """lingua.eval.EvalArgs: what periodic and final evaluation runs."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.grad_acc_steps < 1:
            raise ValueError(f"steps and grad_acc_steps must be >= 1, got {self.steps} and {self.grad_acc_steps}")


def train_args_schema(model_type: str) -> DictConfig:
    """TrainArgs with its `model` and `eval` sections typed, for key and type checking."""
    from lingua.eval import EvalArgs

    spec = get_model_spec(model_type)
    schema = OmegaConf.structured(TrainArgs)
    schema.model = OmegaConf.structured(spec.args_cls)
    schema.eval = OmegaConf.structured(EvalArgs)
    schema.model_type = model_type
    return schema


def load_train_args(argv: Sequence[str], default_model_type: str) -> TrainArgs:
    raw = read_raw(argv)
    model_type = raw.get("model_type", default_model_type)
    try:
        schema = train_args_schema(model_type)
    except KeyError as error:
        raise ConfigError(f"bad value for config key 'model_type': {error.args[0]}") from None
    return build_config(schema, raw)


class _Preemption:
    """Turns SIGTERM/SIGUSR1 into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        logger.warning("received signal %d: will save a checkpoint and exit after this step", signum)
        self.requested = True


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1), ignore_index=-100)


def update(optimizer: torch.optim.Optimizer, check: DeferredStepCheck, step: int, loss: torch.Tensor,
           clip: float, mark: Optional[Callable[[str], None]] = None) -> None:
    """The optimizer's part of a training step: clip the norm of its parameters' gradients to
    ``clip`` (0: no clipping, the norm still measured), arm the non-finite check with it and
    ``loss`` (the update is skipped on the device where either is not finite; the host reads them
    later, see :mod:`lingua.step_check`), update and clear the gradients. ``mark(name)``, if
    given, is called after the clipping, the arming and the update (a benchmark's timeline)."""
    mark = mark or (lambda name: None)
    # The optimizer's own lists: model.parameters() walks the module tree every step (0.14 ms of
    # host time for the 60M Attamba's 150 modules on this project's CPU machine, 0.002 ms so).
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip if clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    mark("gradients clipped")
    check.arm(step, loss, grad_norm)
    mark("check armed")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark("parameters updated")


def train(args: TrainArgs) -> dict:
    """Train; returns a summary (final step, last loss, skipped steps) for scripts and tests."""
    env = distributed.init_distributed(args.distributed, args.device)
    setup_logging(env.rank)
    run_dir = Path(args.dump_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(args, run_dir / "config.yaml")
    distributed.barrier()

    if 0 < args.eval_every < args.steps or args.eval_at_end:
        from lingua.eval import check_ready

        try:
            check_ready(args.eval)  # a missing WikiText file or lm-eval fails now, not hours in
        except (ImportError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from error
    tokenizer = build_tokenizer(args.data.tokenizer)
    check_vocab(tokenizer, args.model.vocab_size)
    distributed.seed_everything(args.seed)  # identical initial weights on every rank
    spec = get_model_spec(args.model_type)
    with torch.device(env.device):
        model = spec.build(args.model)
        model.init_weights()
    if args.checkpoint.init_from:
        load_model_weights(model, args.checkpoint.init_from)
    raw_model = model
    n_params = sum(p.numel() for p in raw_model.parameters())
    flops_per_token = raw_model.flops_per_token(args.data.seq_len)
    logger.info("model %s: %.2fM parameters, %.3g training FLOPs/token", args.model_type, n_params / 1e6, flops_per_token)

    no_decay = no_weight_decay_names(model)
    parallelism = distributed.resolve_parallelism(args.distributed, env)
    model = distributed.parallelize_model(model, args.distributed, env)
    loss_fn = distributed.compile_loss(cross_entropy, args.distributed)
    autocast = distributed.autocast_context(args.distributed, env, parallelism)
    optimizer, scheduler = build_optimizer(model, args.optim, args.steps, no_decay)
    distributed.seed_everything(args.seed, env.rank)  # per-rank streams from here on
    data = build_data_stream(args.data, env.rank, env.world_size)
    checkpoints = CheckpointManager(run_dir / "checkpoints", args.checkpoint, env)

    step, nan_steps = 0, 0
    latest = checkpoints.latest() if args.checkpoint.resume else None
    if latest is not None:
        state = checkpoints.load(latest, model, optimizer, scheduler)
        step, nan_steps = state["step"], state["nan_steps"]
        data.load_state_dict(state["data"])
        logger.info("resumed from %s at step %d", latest, step)

    def save(is_eval: bool = False) -> None:
        state = {"step": step, "nan_steps": nan_steps, "data": data.state_dict()}
        path = checkpoints.save(step, model, optimizer, scheduler, state, args, is_eval=is_eval)
        logger.info("checkpoint saved to %s", path)

    metrics = MetricLogger(run_dir, args.logging, env.is_main, config=to_dict(args))
    throughput = Throughput(flops_per_token, peak_flops(env.device, args.logging.peak_flops), env.world_size)
    profiler = StepProfiler(args.profiling, run_dir, env.rank)
    preemption = _Preemption()
    evaluator = _Evaluator(args, tokenizer, run_dir, env, preemption)
    gc.disable()
    gc.collect()
    model.train()
    last_loss = float("nan")

    first_step = step
    check = DeferredStepCheck(optimizer, env.device)

    def absorb(finished: list[StepStats]) -> Optional[StepStats]:
        """Counts the finished steps that were skipped (stopping after too many); the last one."""
        nonlocal nan_steps, last_loss
        for stats in finished:
            if stats.finite:
                last_loss = stats.loss
                continue
            nan_steps += 1
            logger.warning("step %d: non-finite loss or gradient, update skipped (%d so far)", stats.step, nan_steps)
            if nan_steps >= args.max_nan_steps:
                save()
                raise RuntimeError(f"stopping: {nan_steps} non-finite steps (train.max_nan_steps)")
        return finished[-1] if finished else None

    def summary(preempted: bool) -> dict:
        # loss is NaN when this call ran no step (it resumed a run already at args.steps).
        return {"step": step, "first_step": first_step, "loss": last_loss, "nan_steps": nan_steps, "preempted": preempted}

    try:
        while step < args.steps:
            loss_sum = torch.zeros((), device=env.device)
            for micro in range(args.grad_acc_steps):
                batch = next(data)
                tokens = batch.tokens.to(env.device, non_blocking=True)
                labels = batch.labels.to(env.device, non_blocking=True)
                doc_ids = batch.doc_ids.to(env.device, non_blocking=True)
                last_micro = micro == args.grad_acc_steps - 1
                sync = nullcontext() if last_micro or parallelism != "ddp" else model.no_sync()
                distributed.mark_step_begin(args.distributed)
                with sync, autocast:
                    loss = loss_fn(model(tokens, doc_ids), labels) / args.grad_acc_steps
                loss.backward()
                loss_sum += loss.detach()
                throughput.add(tokens.numel())
            update(optimizer, check, step + 1, distributed.all_reduce_mean(loss_sum, env), args.optim.clip)
            scheduler.step()
            step += 1
            profiler.step(step)
            if step % args.gc_every == 0:
                gc.collect()

            logged = step % args.logging.freq == 0 or step == args.steps
            # Saving, evaluating and FSDP are collective: every rank must stop at the same step,
            # even when the signal reached the ranks at different times.
            stopping = distributed.any_rank(preemption.requested, env)
            evaluated = args.eval_every > 0 and step % args.eval_every == 0 and step < args.steps and not stopping
            saved = bool(args.checkpoint.every and step % args.checkpoint.every == 0 and step < args.steps) or stopping
            # This step's statistics at once where they are logged or a checkpoint or evaluation
            # follows; otherwise those of the step before, which the GPU has finished.
            latest = absorb(check.finished(wait_for_all=logged or evaluated or saved))
            if logged:
                record = {
                    "global_step": step,
                    "loss/out": latest.loss,
                    "optim/lr": scheduler.get_last_lr()[0],
                    "optim/grad_norm": latest.grad_norm,
                    "optim/nan_steps": nan_steps,
                    "data/skipped_lines": data.skipped_lines,
                    **throughput.read(),
                    **memory_stats(env.device),
                }
                metrics.log(record)
                logger.info(format_line(record))
                throughput.reset()

            if evaluated:
                evaluator.run(distributed.unwrap(model), step)
                throughput.reset()  # keep evaluation time out of tokens/s
                stopping = distributed.any_rank(preemption.requested, env)  # a signal during it
            if saved or stopping:
                save()
            if evaluated and args.checkpoint.keep_eval != 0 and not stopping:
                save(is_eval=True)
            if stopping:
                logger.warning("preempted: checkpoint saved at step %d, exiting", step)
                return summary(preempted=True)
        save()
        if args.eval_at_end:
            evaluator.run(distributed.unwrap(model), step)
            if distributed.any_rank(preemption.requested, env):  # the checkpoint is saved; a rerun redoes the rest
                logger.warning("preempted during the final evaluation: exiting without the export")
                return summary(preempted=True)
        if args.export_at_end:
            export_consolidated(model, args, run_dir / "export")
        return summary(preempted=False)
    finally:
        gc.enable()
        profiler.close()
        metrics.close()
        data.close()


class _Evaluator:
    """Periodic evaluation. Every rank takes part (under FSDP each forward pass gathers the
    parameters from all ranks, so all must run the same number of passes); rank 0 writes."""

    def __init__(
        self, args: TrainArgs, tokenizer, run_dir: Path, env: distributed.DistEnv, preemption: Optional[_Preemption] = None
    ):
        self.args, self.tokenizer, self.run_dir, self.env = args, tokenizer, run_dir, env
        self.preemption = preemption

    def _should_stop(self) -> bool:
        # A vote, so every rank leaves the evaluation at the same batch (its passes are collective).
        return self.preemption is not None and distributed.any_rank(self.preemption.requested, self.env)

    def run(self, model: torch.nn.Module, step: int) -> Optional[dict]:
        from lingua.eval import GenerationUnderFSDPError, run_evaluation
        from lingua.interrupt import EvaluationInterrupted, interruptible

        # run_evaluation switches the model to eval mode (eval-time chunking) and back. Validation
        # batches, lm-eval's scoring passes and its generation batches are shared out across ranks.
        # Compiled blocks run eagerly here: eval mode and evaluation's batch
        # shapes would each recompile every block (minutes for Attamba, whose layers compile
        # separately) and use up dynamo's recompile limit. FlexAttention and its block masks stay
        # compiled on CUDA (lingua.masks): eagerly they would materialise the whole score matrix.
        results = None
        try:
            with torch.no_grad(), torch.compiler.set_stance("force_eager"), interruptible(self._should_stop):
                results = run_evaluation(model, self.tokenizer, self.args.eval, step, str(self.run_dir))
        except GenerationUnderFSDPError as error:
            # Every rank meets it at the same request, so training can go on without the results.
            if self.env.is_main:
                logger.error("step %d: evaluation skipped: %s", step, error)
        except EvaluationInterrupted:
            if self.env.is_main:
                logger.warning("step %d: evaluation stopped by a signal; no results written", step)
        distributed.barrier()
        return results if self.env.is_main else None


def main(argv: Optional[Sequence[str]] = None, default_model_type: str = "attamba") -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        # Bad settings, whether the config loader or the run's start (evaluation inputs) finds them.
        train(load_train_args(argv, default_model_type))
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    finally:
        distributed.destroy_distributed()
