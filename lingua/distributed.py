"""Process groups and model parallelisation, applied from outside the model.

One process without ``torchrun`` works as is. Under ``torchrun`` the backend is NCCL on CUDA and
gloo on CPU. ``parallelize_model`` applies, per block of ``model.layers``: activation
checkpointing, ``torch.compile``, then FSDP2 (``fully_shard``) with bf16 mixed precision, or DDP.
"""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

PARALLELISMS = ("auto", "none", "ddp", "fsdp")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("block", "model")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class DistributedArgs:
    parallelism: str = "auto"
    """'auto' (FSDP2 under torchrun, none otherwise), 'none', 'ddp' or 'fsdp' (FSDP2 full shard)."""
    model_dtype: str = "fp32"
    """Compute dtype: 'fp32' or 'bf16' (mixed precision: parameters and optimizer stay fp32)."""
    compile: bool = False
    """torch.compile the blocks (CUDA); ``compile_scope`` says whether one by one or all together."""
    compile_scope: str = "block"
    """'block': compile each block on its own (FSDP shards block by block; activation
    checkpointing wraps blocks). 'model': compile the whole model but its output head as one
    graph, so that with 'reduce-overhead' one CUDA graph replays a forward and one a backward
    instead of one per block: the host launches a step in a few calls rather than per block, for
    models whose host falls behind the GPU (the 60M Attamba on an H200). Not with FSDP, whose
    per-block hooks would cut the graph."""
    compile_mode: str = "default"
    """torch.compile mode: 'default', 'reduce-overhead' (CUDA graphs: replays each compiled block's,
    or the whole model's, kernels without the host launching them one by one; for host-bound steps),
    'max-autotune' or 'max-autotune-no-cudagraphs'."""
    compile_dynamic: bool = False
    """Compile a block once more with symbolic values for whatever changed between its calls
    (``torch.compile(dynamic=None)``) instead of once per distinct value (``dynamic=False``).
    Attamba's cyclic chunks give each layer its own chunk offset, so static compiles make one
    graph per layer; with this, layers 1 to L-1 share one graph with the offset symbolic. Shapes
    that change between calls (evaluation lengths) turn symbolic too, and FlexAttention's lowering
    rejects a symbolic offset: off for ``attn_impl: flex``."""
    inductor_options: dict[str, Any] = field(default_factory=dict)
    """Inductor settings for this run's compiles, by their ``torch._inductor.config`` names (nested
    keys join with dots: ``distributed.inductor_options.triton.unique_kernel_names=true``), on top of
    what ``compile_mode`` sets; the loss's compile takes them too, without CUDA graphs."""
    activation_checkpointing: str = "none"
    """'none', 'full' (recompute each block) or 'selective' (every other block)."""
    allow_tf32: bool = True
    backend: str = "auto"
    """Process-group backend: 'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'."""

    def __post_init__(self) -> None:
        if self.parallelism not in PARALLELISMS:
            raise ValueError(f"distributed.parallelism must be one of {PARALLELISMS}, got '{self.parallelism}'")
        if self.model_dtype not in DTYPES:
            raise ValueError(f"distributed.model_dtype must be one of {tuple(DTYPES)}, got '{self.model_dtype}'")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"distributed.compile_mode must be one of {COMPILE_MODES}, got '{self.compile_mode}'")
        if self.compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"distributed.compile_scope must be one of {COMPILE_SCOPES}, got '{self.compile_scope}'")
        unknown = sorted(set(inductor_settings(self)) - set(_inductor_config_names())) if self.inductor_options else []
        if unknown:
            raise ValueError(f"distributed.inductor_options: not settings of torch._inductor.config: {unknown}")
        if self.activation_checkpointing not in ("none", "full", "selective"):
            raise ValueError(
                "distributed.activation_checkpointing must be 'none', 'full' or 'selective', "
                f"got '{self.activation_checkpointing}'"
            )


def _inductor_config_names() -> list[str]:
    from torch._inductor import config

    return list(config.get_config_copy())


def inductor_settings(args: DistributedArgs) -> dict[str, Any]:
    """``inductor_options`` flattened to dotted names ({"triton": {"x": 1}} -> {"triton.x": 1})."""

    def flatten(options: dict, prefix: str) -> dict[str, Any]:
        flat = {}
        for key, value in options.items():
            if isinstance(value, dict):
                flat.update(flatten(value, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = value
        return flat

    return flatten(args.inductor_options, "")


def compile_settings(args: DistributedArgs) -> dict[str, Any]:
    """The blocks' (or the whole model's) ``torch.compile`` ``mode``, or with ``inductor_options``
    its ``options``: torch.compile takes one or the other, so the mode goes in as the settings it
    stands for."""
    mode = None if args.compile_mode == "default" else args.compile_mode
    if not args.inductor_options:
        return {"mode": mode}
    from torch._inductor import list_mode_options

    mode_settings = list_mode_options(mode) if mode else {}  # (None would list every mode's)
    return {"options": {**mode_settings, **inductor_settings(args)}}


def mark_step_begin(args: DistributedArgs) -> None:
    """Tell CUDA-graph replay (compile modes 'reduce-overhead', 'max-autotune') that a new
    training iteration starts, so the previous iteration's graph outputs may be overwritten."""
    if args.compile and args.compile_mode in ("reduce-overhead", "max-autotune"):
        torch.compiler.cudagraph_mark_step_begin()


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(args: DistributedArgs, device: str = "auto") -> DistEnv:
    """Join the torchrun process group if there is one; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
        torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
        torch.backends.cudnn.allow_tf32 = args.allow_tf32
    if world_size > 1 and not dist.is_initialized():
        backend = args.backend
        if backend == "auto":
            backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=torch_device if backend == "nccl" else None)
    return DistEnv(rank, local_rank, world_size, torch_device)


def destroy_distributed() -> None:
    global _HOST_GROUP
    _HOST_GROUP = None  # destroyed with the default group
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int, rank: int = 0) -> None:
    """Same seed on every rank for model init; call again with the rank for per-rank streams."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def all_reduce_mean(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of ``tensor`` over ranks (on device: no host sync)."""
    if not env.is_distributed:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / env.world_size


_HOST_GROUP = None


def any_rank(flag: bool, env: DistEnv) -> bool:
    """Whether ``flag`` is True on any rank: the same answer everywhere. Voted on the host (a gloo
    group made on first use by every rank), so it waits for no GPU work."""
    if not env.is_distributed:
        return flag
    global _HOST_GROUP
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    vote = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=_HOST_GROUP)
    return bool(vote.item())


def resolve_parallelism(args: DistributedArgs, env: DistEnv) -> str:
    if args.parallelism == "auto":
        return "fsdp" if env.is_distributed else "none"
    return args.parallelism


def _apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for index, block in enumerate(model.layers):
        if mode == "full" or (mode == "selective" and index % 2 == 0):
            model.layers[index] = checkpoint_wrapper(block, preserve_rng_state=True)


def compile_loss(loss: Callable, args: DistributedArgs) -> Callable:
    """``loss`` compiled when the blocks are (``args.compile``), else as is.

    Eager, a cross-entropy over the logits materialises them in float32 and their log-softmax
    beside them (2 GiB each for 16k tokens over 32k ids): ~9 ms of the 60M transformer's step on an
    H100, which compiling it took from 27.5 to 19.6-19.9 ms (docs/benchmarks.md, twelfth session).
    Compiled, it reads the bf16 logits in one fused reduction and writes their gradient in one
    pass. No CUDA graphs here whatever ``compile_mode`` says: the loss is a few kernels, and a
    graph's output buffer would be overwritten by the next micro-step while the loop still sums
    the last one. ``inductor_options`` apply."""
    if not args.compile:
        return loss
    options = {"options": inductor_settings(args)} if args.inductor_options else {}
    return torch.compile(loss, dynamic=False, **options)


def parallelize_model(model: nn.Module, args: DistributedArgs, env: DistEnv) -> nn.Module:
    """Checkpointing and sharding per block of ``model.layers``, compiling per block or the whole
    model (``args.compile_scope``); returns the model to train."""
    if args.activation_checkpointing != "none":
        _apply_activation_checkpointing(model, args.activation_checkpointing)
    parallelism = resolve_parallelism(args, env)
    if args.compile:
        # Static by default: blocks share one code object, so a per-layer int (Attamba's chunk
        # offset) would otherwise turn symbolic after the second layer (compile_dynamic), which
        # FlexAttention's lowering rejects. Each distinct layer then costs one compile, hence the
        # higher limit.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        dynamic = None if args.compile_dynamic else False
        settings = compile_settings(args)
        if args.compile_scope == "model":
            if parallelism == "fsdp":
                raise ValueError(
                    "distributed.compile_scope=model compiles the whole forward as one graph, which FSDP's "
                    "per-block hooks would cut: use compile_scope=block with fsdp, or parallelism=ddp"
                )
            compile_whole(model, dynamic=dynamic, **settings)
        else:
            for index, block in enumerate(model.layers):
                model.layers[index] = torch.compile(block, dynamic=dynamic, **settings)
    if parallelism == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=DTYPES[args.model_dtype], reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    if parallelism == "ddp":
        if not env.is_distributed:
            raise ValueError("distributed.parallelism=ddp needs torchrun with more than one process")
        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def compile_whole(model: nn.Module, **compile_options) -> None:
    """``distributed.compile_scope=model``: compile the model's ``hidden_states`` (all of it but the
    output head, see ``lingua.transformer.LanguageModelBase``) as one graph, in place, so that
    parameter names stay as they are. ``compile_options`` go to ``torch.compile``."""
    model.hidden_states = torch.compile(model.hidden_states, **compile_options)


def autocast_context(args: DistributedArgs, env: DistEnv, parallelism: str):
    """bf16 autocast where FSDP's mixed precision does not already cast."""
    if args.model_dtype == "bf16" and parallelism != "fsdp":
        return torch.autocast(device_type=env.device.type, dtype=torch.bfloat16)
    return nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
