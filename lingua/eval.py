"""Evaluation: any registered model through stock lm-eval (0.4.x), plus held-out perplexity.

Three pieces, used by the training loop and by ``python -m apps.<app>.eval``:

- :class:`LinguaLM`, an lm-eval ``LM`` registered as ``"attamba-lm"``: ``loglikelihood``,
  ``loglikelihood_rolling`` (sliding windows of the model's context with a stride; every token
  scored once, the document's first token conditioned on BOS) and ``generate_until``.
- :func:`run_evaluation`: the configured lm-eval tasks, held-out validation perplexity per source
  and (optionally) MQAR recall accuracy, appended as one line to ``metrics.eval.jsonl``.
- :func:`main`: load a checkpoint, apply eval-time model overrides, evaluate.

The shipped task ``wikitext_local`` (``lingua/lm_eval_tasks/``) reads WikiText-2 from a local
file; lm-eval's own ``wikitext`` task also works (``eval.tasks=[wikitext]``) when the HF dataset
``EleutherAI/wikitext_document_level`` is in the local HF cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lingua.args import ConfigError, load_config
from lingua.interrupt import check_interrupt
from lingua.recall import IGNORE_INDEX, RecallArgs, evaluate_recall

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"


@dataclass
class EvalArgs:
    """What to evaluate, and how."""

    tasks: list[str] = field(default_factory=lambda: ["wikitext_local"])
    """lm-eval task names; the shipped ones (``wikitext_local``) and lm-eval's built-ins."""
    limit: Optional[float] = None
    """Documents per task (an int) or a fraction of them (< 1); None evaluates every document."""
    batch_size: int = 8
    """Windows (or requests) per forward pass."""
    max_context: Optional[int] = None
    """Tokens the model reads at once; None means the model's ``max_seqlen``."""
    rolling_stride: Optional[int] = None
    """New tokens scored per window after the first in rolling log-likelihood; smaller strides
    give every token more left context at more cost. None means ``max_context``."""
    wikitext_path: Optional[str] = None
    """WikiText-2 file (``wiki.test.tokens`` or ``.raw``) or directory for ``wikitext_local``;
    None reads the environment variable ATTAMBA_WIKITEXT_PATH."""
    val_sources: dict[str, str] = field(default_factory=dict)
    """Held-out perplexity sources: name -> jsonl path (read by lingua.data.iter_eval_batches)."""
    val_max_batches: Optional[int] = 50
    """Batches per validation source; None reads the whole file."""
    val_seq_len: Optional[int] = None
    """Sequence length of validation batches; None means ``max_context``."""
    recall: Optional[RecallArgs] = None
    """When set, also report MQAR accuracy on ``recall.test`` (see lingua.recall)."""
    max_gen_tokens: int = 256
    """Generation length for generate_until tasks that do not set ``max_gen_toks``."""
    temperature: float = 0.0
    """Sampling temperature for generate_until tasks that do not set one; 0 is greedy."""
    bootstrap_iters: int = 0
    """lm-eval's bootstrap iterations for standard errors; 0 skips them (they are slow)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"eval.max_context must be >= 2 or null, got {self.max_context}")
        if self.rolling_stride is not None and self.rolling_stride < 1:
            raise ValueError(f"eval.rolling_stride must be >= 1 or null, got {self.rolling_stride}")
        if None not in (self.rolling_stride, self.max_context) and self.rolling_stride > self.max_context:
            raise ValueError(f"eval.rolling_stride={self.rolling_stride} exceeds eval.max_context={self.max_context}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"eval.limit must be > 0 or null, got {self.limit}")
        if self.max_gen_tokens < 1:
            raise ValueError(f"eval.max_gen_tokens must be >= 1, got {self.max_gen_tokens}")


# ---------------------------------------------------------------------------------------------
# Scoring windows: the one place where the model runs for log-likelihoods.


@dataclass(frozen=True)
class Window:
    """One forward pass: the model reads ``inputs``; its last ``len(targets)`` predictions are
    scored against ``targets`` (the tokens that follow those positions)."""

    inputs: list[int]
    targets: list[int]


def rolling_windows(token_ids: Sequence[int], prefix_id: int, max_context: int, stride: int) -> list[Window]:
    """Cover ``token_ids`` by windows of at most ``max_context`` inputs, scoring each token once.

    The model reads ``[prefix_id] + token_ids`` shifted by one, so the first token is predicted
    from the prefix (BOS). The first window scores up to ``max_context`` tokens; each later one
    scores the next ``stride`` tokens (fewer at the end) and fills the rest of its inputs with
    as much preceding text as fits, so every token sees at least ``max_context - stride + 1``
    tokens of left context once the document is longer than the window.
    """
    if not 1 <= stride <= max_context:
        raise ValueError(f"rolling stride must be in [1, max_context={max_context}], got {stride}")
    stream = [prefix_id, *token_ids]  # stream[i] predicts token_ids[i]
    windows, scored = [], 0
    while scored < len(token_ids):
        end = min(scored + (max_context if scored == 0 else stride), len(token_ids))
        start = max(0, end - max_context)
        windows.append(Window(stream[start:end], list(token_ids[scored:end])))
        scored = end
    return windows


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _progress(iterable, total: int, description: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are a nicety, not a dependency
        return iterable
    return tqdm(iterable, total=total, desc=description, disable=not enabled)


def _batch_tokens(batch: Sequence[Window], longest: int, pad_id: int, pad_multiple: int) -> torch.Tensor:
    """[len(batch), width] right-padded inputs, width a multiple of ``pad_multiple`` (or ``longest``)."""
    width = min(longest, -(-max(len(w.inputs) for w in batch) // pad_multiple) * pad_multiple)
    tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
    for row, window in enumerate(batch):
        tokens[row, : len(window.inputs)] = torch.tensor(window.inputs)
    return tokens


@torch.no_grad()
def score_windows(
    model: nn.Module, windows: Sequence[Window], batch_size: int, pad_id: int = 0, pad_multiple: int = 64, progress: bool = True
) -> list[tuple[float, bool]]:
    """Summed log-probability of each window's targets, and whether greedy decoding picks them all.

    Windows are sorted by length so padding is small; rows are right-padded (a causal model never
    sees the padding from the scored positions) to a multiple of ``pad_multiple`` tokens, or to
    the longest window, so that a compiled model or cached block masks meet few shapes.

    Under torchrun every rank passes the same windows; the batches are shared out in rounds, as
    :func:`validation_perplexity` shares its batches, and the scores gathered, so every rank
    returns all of them.
    """
    device = model_device(model)
    rank, world = _rank_and_world()
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].inputs))
    longest = max((len(w.inputs) for w in windows), default=0)
    batches = [order[first : first + batch_size] for first in range(0, len(order), batch_size)]
    scores: dict[int, tuple[float, bool]] = {}
    groups = list(rounds(batches, world))
    for group in _progress(groups, len(groups), "scoring windows", progress):
        check_interrupt()
        indices, mine = my_share(group, rank)
        batch = [windows[i] for i in indices]
        logits = model(_batch_tokens(batch, longest, pad_id, pad_multiple).to(device))  # [B, width, V]
        if not mine:
            continue
        for row, window in enumerate(batch):
            n, k = len(window.inputs), len(window.targets)
            log_probs = F.log_softmax(logits[row, n - k : n].float(), dim=-1)  # [k, V]
            targets = torch.tensor(window.targets, device=device)
            total = log_probs.gather(-1, targets[:, None]).sum().item()
            greedy = bool((log_probs.argmax(-1) == targets).all())
            scores[indices[row]] = (total, greedy)
    if world > 1:
        every_rank: list[Optional[dict]] = [None] * world
        torch.distributed.all_gather_object(every_rank, scores)
        scores = {index: score for part in every_rank for index, score in part.items()}
    return [scores[index] for index in range(len(windows))]


# ---------------------------------------------------------------------------------------------
# The lm-eval adapter.

try:
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register_lm
except ImportError:  # lm-eval is optional: held-out perplexity and recall work without it
    _LMBase = object

    def _register_lm(*names):
        return lambda cls: cls


def _bos_id(tokenizer: Any) -> int:
    for name in ("bos_id", "eos_id"):
        token = getattr(tokenizer, name, None)
        if token is not None and token >= 0:
            return token
    raise ValueError("the tokenizer has neither bos_id nor eos_id; rolling log-likelihood needs one as the prefix")


WINDOW_WIDTHS = 16
"""Most distinct padded window widths the adapter makes (see LinguaLM.pad_multiple)."""


@_register_lm("attamba-lm", "lingua")
class LinguaLM(_LMBase):
    """lm-eval's view of a framework model: text in, log-likelihoods and generations out.

    ``model(tokens [B, n]) -> logits [B, n, V]`` is all it needs; generation goes through
    ``lingua.generate`` (the model's cache when it has one, else full recomputation).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        batch_size: int = 8,
        max_context: Optional[int] = None,
        rolling_stride: Optional[int] = None,
        max_gen_tokens: int = 256,
        temperature: float = 0.0,
    ):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = int(batch_size)
        model_args = getattr(model, "args", None)
        self.max_context = int(max_context or getattr(model_args, "max_seqlen", 0))
        if self.max_context < 2:
            raise ValueError("max_context must be given for a model without args.max_seqlen")
        self.rolling_stride = int(rolling_stride or self.max_context)
        if not 1 <= self.rolling_stride <= self.max_context:
            raise ValueError(f"rolling_stride must be in [1, {self.max_context}], got {self.rolling_stride}")
        self.max_gen_tokens, self.temperature = max_gen_tokens, temperature
        self.prefix_id = _bos_id(tokenizer)
        # Windows are padded to at most WINDOW_WIDTHS widths: each width (and batch size) is a
        # FlexAttention compile on CUDA, and dynamo gives up compiling after 64 shapes.
        self.pad_multiple = 64 * -(-self.max_context // (64 * WINDOW_WIDTHS))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "LinguaLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "LinguaLM":
        """lm-eval's own API: ``simple_evaluate(model="attamba-lm", model_args="ckpt=RUN_DIR,...")``.

        ``ckpt`` and ``device`` load the model; ``model.<field>=value`` overrides its args (e.g.
        ``model.eval_token_chunk=16``); the other keys are this class's keyword arguments.
        """
        options = {**arg_dict, **{k: v for k, v in (additional_config or {}).items() if v is not None}}
        options.pop("max_batch_size", None)  # lm-eval's automatic batch sizing is not supported
        if "ckpt" not in options:
            raise ValueError(f"model_args for attamba-lm need ckpt=PATH, got {sorted(options)}")
        overrides = {key.split(".", 1)[1]: options.pop(key) for key in list(options) if key.startswith("model.")}
        run_args = EvalRunArgs(ckpt=str(options.pop("ckpt")), device=str(options.pop("device", "auto")), model=overrides)
        model, tokenizer, _ = load_model(run_args)
        return cls(model, tokenizer, **options)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_bos=False, add_eos=False))

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        per_request = [
            rolling_windows(self.encode(request.args[0]), self.prefix_id, self.max_context, self.rolling_stride)
            for request in requests
        ]
        flat = [window for windows in per_request for window in windows]
        scores = iter(score_windows(self.model, flat, self.batch_size, pad_multiple=self.pad_multiple, progress=not disable_tqdm))
        totals = [sum(next(scores)[0] for _ in windows) for windows in per_request]
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _context_continuation(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Word-separating spaces belong to the continuation; encoding the joined text and cutting
        # it keeps subword merges across the boundary as the model saw them in training.
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        whole = self.encode(stripped + continuation)
        context_ids = self.encode(stripped)
        return whole[: len(context_ids)], whole[len(context_ids) :]

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        windows = []
        for request in requests:
            context, continuation = request.args[0], request.args[1]
            context_ids, continuation_ids = self._context_continuation(context, continuation)
            if not continuation_ids:
                raise ValueError(f"empty continuation after tokenization for context {context[-50:]!r}")
            stream = [self.prefix_id, *context_ids, *continuation_ids]
            inputs = stream[:-1][-self.max_context :]
            windows.append(Window(inputs, continuation_ids[-len(inputs) :]))
        results = score_windows(self.model, windows, self.batch_size, pad_multiple=self.pad_multiple, progress=not disable_tqdm)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        from lingua.generate import GenerateArgs, generate_text  # only generation tasks need it

        if is_sharded(self.model):
            # The caches call a block's pieces one by one, outside the block's forward, where
            # FSDP would gather their sharded parameters.
            raise GenerationUnderFSDPError(
                "generation tasks cannot run on an FSDP-sharded model during training; evaluate the "
                "checkpoint with python -m apps.<app>.eval (or train with distributed.parallelism=ddp)"
            )

        # Requests with the same settings are generated together, batch_size prompts at a time.
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            gen_kwargs = dict(request.args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = gen_kwargs.get("do_sample", self.temperature > 0)
            temperature = float(gen_kwargs.get("temperature", self.temperature)) if sampling else 0.0
            key = (tuple(until), int(gen_kwargs.get("max_gen_toks", self.max_gen_tokens)), temperature)
            groups.setdefault(key, []).append(index)
        batches = [
            (key, indices[first : first + self.batch_size])
            for key, indices in groups.items()
            for first in range(0, len(indices), self.batch_size)
        ]
        # Under torchrun the batches are shared out in rounds, as the scoring passes are. Generation
        # makes no collective call (FSDP is refused above), so a rank without a batch in the last
        # round just waits for the next interrupt vote.
        rank, world = _rank_and_world()
        texts: dict[int, str] = {}
        rounds_of_batches = list(rounds(batches, world))
        for group in _progress(rounds_of_batches, len(rounds_of_batches), "generating", not disable_tqdm):
            check_interrupt()
            ((until, max_tokens, temperature), indices), mine = my_share(group, rank)
            if not mine:
                continue
            args = GenerateArgs(max_new_tokens=max_tokens, temperature=temperature, stop=list(until))
            texts.update(zip(indices, generate_text(self.model, self.tokenizer, [requests[i].args[0] for i in indices], args)))
        if world > 1:
            every_rank: list[Optional[dict]] = [None] * world
            torch.distributed.all_gather_object(every_rank, texts)
            texts = {index: text for part in every_rank for index, text in part.items()}
        outputs = [texts[index] for index in range(len(requests))]
        for request, text in zip(requests, outputs):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return outputs


# ---------------------------------------------------------------------------------------------
# Running an evaluation.


def shipped_tasks() -> list[str]:
    """Tasks defined in ``lingua/lm_eval_tasks`` (one folder per task, named after it)."""
    return sorted(path.name for path in TASKS_DIR.iterdir() if (path / f"{path.name}.yaml").is_file())


def task_manager(wikitext_path: Optional[str] = None, include_defaults: bool = True):
    """An lm-eval TaskManager that also knows the tasks shipped in ``lingua/lm_eval_tasks``.

    ``wikitext_path`` reaches the ``wikitext_local`` loader through the task metadata.
    ``include_defaults=False`` skips indexing lm-eval's thousands of built-in tasks (~30 s).
    """
    from lm_eval.tasks import TaskManager

    metadata = {"wikitext_path": wikitext_path} if wikitext_path else None
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults, metadata=metadata)


def run_lm_eval(model: nn.Module, tokenizer: Any, args: EvalArgs) -> dict[str, dict[str, float]]:
    """Run ``args.tasks`` through lm-eval's own evaluator; per task, its numeric metrics."""
    import lm_eval

    lm = LinguaLM(model, tokenizer, args.batch_size, args.max_context, args.rolling_stride, args.max_gen_tokens, args.temperature)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(args.tasks),
        limit=limit,
        task_manager=task_manager(args.wikitext_path, include_defaults=not set(args.tasks) <= set(shipped_tasks())),
        bootstrap_iters=args.bootstrap_iters,
        log_samples=False,
    )
    # The LM reports rank 0 of 1, so lm-eval hands every rank all requests (score_windows shares
    # the forward passes out), but under torchrun it returns results on local rank 0 only.
    scores = None if results is None else {
        task: {key: float(value) for key, value in metrics.items() if "," in key and isinstance(value, (int, float))}
        for task, metrics in results["results"].items()
    }
    return _from_rank_zero(scores)


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (unchanged in a single process)."""
    if _rank_and_world()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the torchrun process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rounds(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive groups of ``size`` items (the last one shorter): one round of work per rank."""
    group: list[Any] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def my_share(group: list[Any], rank: int) -> tuple[Any, bool]:
    """Rank ``rank``'s item of a round, and whether it is its own: a rank past the end of the
    last round repeats the first item and drops the result, since every rank runs one forward
    pass per round (FSDP's forward passes and the per-batch interrupt vote are collective)."""
    return (group[rank], True) if rank < len(group) else (group[0], False)


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 8192) -> torch.Tensor:
    """Σ next-token loss (float32) of logits [T, V] against labels [T] (IGNORE_INDEX skipped), a
    chunk of tokens at a time: one float32 copy of all the logits and its log-softmax would take
    2 × 4 · T · V bytes (16 GiB for 64k tokens over 32k ids), more than a long-context model's
    evaluation batch itself."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for first in range(0, logits.shape[0], chunk_tokens):
        chunk = slice(first, first + chunk_tokens)
        total += F.cross_entropy(logits[chunk].float(), labels[chunk], ignore_index=IGNORE_INDEX, reduction="sum")
    return total


@torch.no_grad()
def validation_perplexity(model: nn.Module, tokenizer: Any, path: str, seq_len: int, batch_size: int, max_batches: Optional[int]) -> float:
    """exp(mean next-token loss) over the labelled tokens of a held-out jsonl file.

    Under torchrun the batches are shared out: in each round of world-size batches, rank r scores
    the r-th (:func:`my_share`), and the sums are added up across ranks.
    """
    from lingua.data import iter_eval_batches

    device = model_device(model)
    rank, world = _rank_and_world()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, labelled tokens
    for group in rounds(iter_eval_batches(path, tokenizer, seq_len, batch_size, max_batches), world):
        check_interrupt()
        batch, mine = my_share(group, rank)
        weight = 1.0 if mine else 0.0
        doc_ids = None if batch.doc_ids is None else batch.doc_ids.to(device)
        logits = model(batch.tokens.to(device), doc_ids)  # [B, n, V]
        labels = batch.labels.to(device)
        loss = summed_cross_entropy(logits.flatten(0, 1), labels.flatten())
        sums += weight * torch.stack([loss.double(), (labels != IGNORE_INDEX).sum().double()])
    if world > 1:
        torch.distributed.all_reduce(sums)
    total_loss, total_tokens = sums.tolist()
    if total_tokens == 0:
        raise ValueError(f"validation source {path} gave no labelled tokens")
    return math.exp(total_loss / total_tokens)


def check_ready(args: EvalArgs) -> None:
    """Fail before training starts, not at the first evaluation, when evaluation could not run:
    lm-eval missing, WikiText-2 not found, a validation source missing."""
    if args.tasks:
        try:
            import lm_eval  # noqa: F401
        except ImportError as error:
            raise ImportError(f"eval.tasks={list(args.tasks)} needs lm-eval: pip install -e '.[eval]'") from error
    if "wikitext_local" in args.tasks:
        from lingua.lm_eval_tasks.wikitext_local.utils import find_wikitext, resolve_split_files

        resolve_split_files(find_wikitext(args.wikitext_path))
    for name, path in args.val_sources.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"eval.val_sources.{name}: {path} does not exist")


def _is_main_process() -> bool:
    return _rank_and_world()[0] == 0


@contextlib.contextmanager
def preserved_rng():
    """Restore Python's, NumPy's and torch's random states on exit: lm-eval reseeds all three,
    and evaluation must not change what training draws next."""
    from lingua.checkpoint import capture_rng, restore_rng

    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), capture_rng()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        restore_rng(torch_state)


def run_evaluation(model: nn.Module, tokenizer: Any, args: EvalArgs, step: int, dump_dir: Optional[str]) -> dict:
    """Evaluate ``model`` as configured and append one line to ``dump_dir/metrics.eval.jsonl``.

    Under data parallelism every rank must call this (the forward passes are collective under
    FSDP); every rank computes the same numbers and only rank 0 writes. The model's training mode
    is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with preserved_rng():
            record: dict[str, Any] = {"global_step": step, "created_at": datetime.now(timezone.utc).isoformat()}
            if args.tasks:
                record.update(run_lm_eval(model, tokenizer, args))
            context = args.max_context or model.args.max_seqlen
            for name, path in args.val_sources.items():
                seq_len = args.val_seq_len or context
                record[f"val/{name}/ppl"] = validation_perplexity(model, tokenizer, path, seq_len, args.batch_size, args.val_max_batches)
            if args.recall is not None:
                record.update(evaluate_recall(model, args.recall, args.batch_size))
    finally:
        model.train(was_training)
    if dump_dir is not None and _is_main_process():
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(dump_dir) / "metrics.eval.jsonl", "a") as out:
            out.write(json.dumps(record) + "\n")
    return record


class GenerationUnderFSDPError(NotImplementedError):
    """A generation task met a model whose parameters FSDP has sharded."""


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 holds ``model``'s parameters as sharded DTensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


# ---------------------------------------------------------------------------------------------
# Command line.


@dataclass
class EvalRunArgs:
    """``python -m apps.<app>.eval ckpt=... eval.tasks=[wikitext_local] model.eval_token_chunk=16``"""

    ckpt: str = "???"
    """Checkpoint directory written by the training loop."""
    dump_dir: Optional[str] = None
    """Where metrics.eval.jsonl goes; None only logs the results."""
    step: int = -1
    """global_step written with the results; -1 takes it from the checkpoint's folder name
    (0 for an export)."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: str = "float32"
    """'float32' or 'bfloat16' weights for evaluation."""
    eval: EvalArgs = field(default_factory=EvalArgs)
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of the checkpoint's model args, e.g. Attamba's eval-time chunking
    (``model.eval_token_chunk=16``, ``model.eval_chunk_strategy=random``)."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got '{self.dtype}'")


def load_model(run_args: EvalRunArgs) -> tuple[nn.Module, Any, Any]:
    """(model in eval mode with the overrides applied, tokenizer, train args) from ``run_args.ckpt``."""
    from lingua.checkpoint import load_for_inference
    from lingua.tokenizer import build_tokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if run_args.device == "auto" else run_args.device
    model, train_args = load_for_inference(run_args.ckpt, device, model_overrides=run_args.model or None)
    if run_args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    return model.eval(), build_tokenizer(train_args.data.tokenizer), train_args


def checkpoint_step(path: str) -> int:
    """The training step of a checkpoint (its folder is named by the step), else 0 (exports)."""
    from lingua.checkpoint import resolve_checkpoint

    name = resolve_checkpoint(path).name
    return int(name) if name.isdigit() else 0


def main(argv: Optional[Sequence[str]] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_args = load_config(EvalRunArgs, sys.argv[1:] if argv is None else argv)
        model, tokenizer, train_args = load_model(run_args)  # model overrides are validated here
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    step = run_args.step if run_args.step >= 0 else checkpoint_step(run_args.ckpt)
    record = run_evaluation(model, tokenizer, run_args.eval, step, run_args.dump_dir)
    logger.info("evaluation results: %s", json.dumps(record, indent=2))
    return record

