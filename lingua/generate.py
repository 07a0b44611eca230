"""Generation: the one sampling loop every model shares, and the ``generate`` command line.

A model family supports cached decoding by providing two functions (as methods of the model, or
registered once with :func:`register_cache_support`, conventionally from ``apps/<app>/cache.py``
beside ``apps/<app>/model.py``, which is imported on first use):

    cache = new_cache(model, batch_size, max_len, device, dtype)
    logits = forward_cached(model, tokens [B, m], cache, lengths: LongTensor[B] | None) -> [B, m, V]

``forward_cached`` with m > 1 is a prefill (one forward pass over the prompts builds the cache);
with m == 1 and no ``lengths`` it is one decode step. Prompts of different lengths are
RIGHT-padded and ``lengths[b]`` says how many tokens of row b are real; each row then continues
at its own position. A cache also provides ``nbytes()`` and ``entries_per_layer()`` for
accounting. A model without cache support is generated from by re-running the full forward pass
over the whole sequence at every step (slow, but correct for any model).

On CUDA the decode step has static shapes (preallocated buffers, ``cache.static_shapes = True``)
and is replayed from a CUDA graph, optionally of the step compiled by ``torch.compile``.

    python -m apps.attamba.generate ckpt=RUN_DIR prompt="Once upon a time" max_new_tokens=64 temperature=0
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

NewCache = Callable[[nn.Module, int, int, torch.device, torch.dtype], Any]
ForwardCached = Callable[[nn.Module, torch.Tensor, Any, Optional[torch.Tensor]], torch.Tensor]
StopCheck = Callable[[int, list[int]], bool]
"""Called as ``stop_check(row, new_tokens_of_row)`` after each step; True ends that row."""

FAST_DECODE_MODES = ("cuda_graph", "compile", "compile_pdl", "compile_max_autotune", "eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerateArgs:
    """How to sample continuations."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    """0 picks the most likely token (greedy); higher flattens the distribution."""
    top_k: Optional[int] = None
    """Sample only among the k most likely tokens; None or 0 keeps all."""
    top_p: Optional[float] = None
    """Sample only among the most likely tokens whose probabilities sum to top_p (nucleus)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a generation (the text is cut before the first one); EOS always ends it."""
    seed: int = 0
    dtype: str = "float32"
    """Precision the command line casts the model to: float32, bfloat16 or float16."""
    device: str = "cuda"
    """Device the command line loads the model on; falls back to cpu without CUDA."""
    fast_decode: str = "cuda_graph"
    """Static-shape decode path on CUDA: 'cuda_graph' (capture one step, replay it), 'compile'
    (capture one step compiled by torch.compile), 'compile_pdl' (the same, with Programmatic
    Dependent Launch: each of Inductor's kernels may start while the one before it finishes, which
    pays where a step is hundreds of small kernels, as at batch 1), 'compile_max_autotune' (Inductor
    choosing each matmul among cuBLAS and its own Triton kernels, which can take in the
    surrounding pointwise work: slower to compile) or 'eager'. CPU always runs eager."""
    use_cache: bool = True
    """False re-runs the full forward pass every step even for models with a cache (for checks)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 or null, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] or be null, got {self.top_p}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        if self.fast_decode not in FAST_DECODE_MODES:
            raise ValueError(f"fast_decode must be one of {', '.join(FAST_DECODE_MODES)}, got '{self.fast_decode}'")


@dataclass(frozen=True)
class CacheSupport:
    new_cache: NewCache
    forward_cached: ForwardCached


_CACHE_SUPPORT: dict[type, CacheSupport] = {}


def register_cache_support(model_cls: type, new_cache: NewCache, forward_cached: ForwardCached) -> None:
    _CACHE_SUPPORT[model_cls] = CacheSupport(new_cache, forward_cached)


def cache_support(model: nn.Module) -> Optional[CacheSupport]:
    """The cache functions of ``model``'s family, or None if it has none."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model wraps the original
    if callable(getattr(model, "new_cache", None)) and callable(getattr(model, "forward_cached", None)):
        return CacheSupport(
            lambda m, *args: m.new_cache(*args), lambda m, *args: m.forward_cached(*args)
        )
    model_cls = type(model)
    if model_cls not in _CACHE_SUPPORT:
        # Convention: apps/<app>/cache.py sits beside apps/<app>/model.py and registers on import.
        cache_module = model_cls.__module__.rsplit(".", 1)[0] + ".cache"
        try:
            importlib.import_module(cache_module)
        except ModuleNotFoundError as error:
            if error.name != cache_module:
                raise
    for cls in model_cls.__mro__:
        if cls in _CACHE_SUPPORT:
            return _CACHE_SUPPORT[cls]
    return None


@torch.no_grad()
def prefill_decode_logits(model: nn.Module, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Logits [B, n, V] of ``tokens`` computed the way generation computes them, to check a cache.

    Row b's first ``lengths[b]`` tokens go through one prefill, the rest one decode step at a
    time (all rows step together, each at its own position). The result must equal
    ``model(tokens)``: the defining test of a model family's cache.
    """
    support = cache_support(model)
    if support is None:
        raise ValueError(f"{type(model).__name__} has no cache support (new_cache / forward_cached)")
    batch, n = tokens.shape
    width, steps = int(lengths.max()), n - int(lengths.min())
    cache = support.new_cache(model, batch, width + steps, tokens.device, next(model.parameters()).dtype)
    prefill = support.forward_cached(model, tokens[:, :width], cache, lengths)
    logits = torch.zeros(batch, n, prefill.shape[-1], dtype=prefill.dtype, device=prefill.device)
    for row in range(batch):
        logits[row, : lengths[row]] = prefill[row, : lengths[row]]
    rows, position = torch.arange(batch, device=tokens.device), lengths.clone()
    for _ in range(steps):
        step = support.forward_cached(model, tokens[rows, position.clamp(max=n - 1)][:, None], cache, None)
        inside = position < n  # rows past their end keep stepping on junk, which is never read
        logits[rows[inside], position[inside]] = step[inside, 0]
        position += 1
    return logits


def sample_next(logits: torch.Tensor, args: GenerateArgs, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]: greedy, or tempered top-k/top-p sampling."""
    logits = logits.float()
    if args.temperature == 0:
        return logits.argmax(-1)
    logits = logits / args.temperature
    if args.top_k:
        kth = torch.topk(logits, min(args.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if args.top_p is not None and args.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the more likely ones before it already reach top_p (the first stays).
        drop_sorted = probs.cumsum(-1) - probs >= args.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class GenerationStats:
    """What one generate call did: token counts, timings, and the cache's allocated bytes."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    cache_bytes: Optional[int] = None
    cached: bool = False
    batch: int = 1

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens produced per second by decode steps, summed over the batch's rows."""
        return self.decode_steps * self.batch / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def _right_pad(rows: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> tokens [B, max_len] (zero-padded on the right) and lengths [B]."""
    width = max(len(row) for row in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    lengths = torch.as_tensor([len(row) for row in rows], dtype=torch.long)
    return tokens.to(device), lengths.to(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# torch.compile's arguments for each compiled fast_decode mode (this class captures the graph).
_COMPILE_SETTINGS = {
    "compile": {},
    "compile_pdl": {"options": {"triton.enable_pdl": True}},
    "compile_max_autotune": {"mode": "max-autotune-no-cudagraphs"},
}


class DecodeStep:
    """One decode step ``tokens [B] -> last logits [B, V]``: eager, or replayed from a CUDA graph.

    ``cuda_graph`` captures one eager step; ``compile`` captures one step of the step compiled by
    torch.compile (fused kernels, then the graph removes the launch cost); ``compile_pdl`` turns on
    Inductor's Programmatic Dependent Launch (Hopper and later); ``compile_max_autotune``
    compiles with Inductor's "max-autotune-no-cudagraphs" mode (this class captures the graph).
    All need a cache with
    ``static_shapes``, ``horizon`` and ``advance_horizon`` (see apps/main/cache.py): the captured
    step cannot run Python, so the cache's host-side position bound is advanced here instead.
    """

    def __init__(self, support: CacheSupport, model: nn.Module, cache: Any, batch: int, device, mode: str):
        self.support, self.model, self.cache = support, model, cache
        static = device.type == "cuda" and hasattr(cache, "static_shapes")
        self.mode = mode if static else "eager"
        self.static_tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_logits: Optional[torch.Tensor] = None
        if self.mode != "eager":
            cache.static_shapes = True
        self._step = self._eager
        if self.mode in _COMPILE_SETTINGS:
            # Every cache shape compiles anew (dynamic=False); past dynamo's recompile limit (8) the
            # step would silently run uncompiled.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._step = torch.compile(self._eager, dynamic=False, **_COMPILE_SETTINGS[self.mode])

    def _eager(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.support.forward_cached(self.model, tokens, self.cache, None)[:, -1]

    def __call__(self, next_tokens: torch.Tensor) -> torch.Tensor:
        if self.mode == "eager":
            return self._eager(next_tokens[:, None])
        self.cache.advance_horizon(self.cache.horizon + 1)
        self.static_tokens.copy_(next_tokens[:, None])
        if self.graph is None:
            # The first step runs on a side stream (the warm-up CUDA graphs need; it also compiles),
            # then one step is captured: capture records kernels without running them.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = self._step(self.static_tokens)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_logits = self._step(self.static_tokens)
            return logits
        self.graph.replay()
        return self.static_logits.clone()


def _generate_cached(model, support, prompt_ids, args, stop_row, stats: GenerationStats) -> list[list[int]]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tokens, lengths = _right_pad(prompt_ids, device)
    batch = len(prompt_ids)
    cache = support.new_cache(model, batch, tokens.shape[1] + args.max_new_tokens, device, dtype)
    start = time.perf_counter()
    logits = support.forward_cached(model, tokens, cache, lengths)
    last = logits[torch.arange(batch, device=device), lengths - 1]  # [B, V]
    _synchronize(device)
    stats.prefill_seconds = time.perf_counter() - start
    step = DecodeStep(support, model, cache, batch, device, args.fast_decode)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    start = time.perf_counter()
    for i in range(args.max_new_tokens):
        next_tokens = sample_next(last, args, generator)
        for row, token in enumerate(next_tokens.tolist()):
            if not done[row]:
                done[row] = stop_row(row, outputs[row], token)
        if all(done) or i == args.max_new_tokens - 1:
            break
        last = step(next_tokens)
        stats.decode_steps += 1
    _synchronize(device)
    stats.decode_seconds = time.perf_counter() - start
    stats.cache_bytes = cache.nbytes()
    stats.cached = True
    return outputs


def _generate_uncached(model, prompt_ids, args, stop_row) -> list[list[int]]:
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sequences = [list(row) for row in prompt_ids]
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    done = [False] * len(prompt_ids)
    for _ in range(args.max_new_tokens):
        tokens, lengths = _right_pad(sequences, device)
        logits = model(tokens)
        last = logits[torch.arange(len(sequences), device=device), lengths - 1]
        next_tokens = sample_next(last, args, generator).tolist()
        for row, token in enumerate(next_tokens):
            if not done[row]:
                done[row] = stop_row(row, outputs[row], token)
            sequences[row].append(token)
        if all(done):
            break
    return outputs


def generate_with_stats(
    model: nn.Module,
    prompt_ids: list[list[int]],
    args: GenerateArgs,
    eos_id: Optional[int] = None,
    stop_check: Optional[StopCheck] = None,
) -> tuple[list[list[int]], GenerationStats]:
    """:func:`generate_tokens` plus timings and the cache's size."""
    if not prompt_ids or any(len(row) == 0 for row in prompt_ids):
        raise ValueError("every prompt needs at least one token (prepend BOS to an empty prompt)")

    def stop_row(row: int, output: list[int], token: int) -> bool:
        """Record ``token`` for ``row`` unless it is EOS; True when the row is finished."""
        if eos_id is not None and token == eos_id:
            return True
        output.append(token)
        return stop_check is not None and stop_check(row, output)

    stats = GenerationStats(prompt_tokens=sum(len(row) for row in prompt_ids), batch=len(prompt_ids))
    support = cache_support(model) if args.use_cache else None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if support is not None:
                outputs = _generate_cached(model, support, prompt_ids, args, stop_row, stats)
            else:
                start = time.perf_counter()
                outputs = _generate_uncached(model, prompt_ids, args, stop_row)
                stats.decode_seconds = time.perf_counter() - start
                stats.decode_steps = max(len(row) for row in outputs)
    finally:
        model.train(was_training)
    stats.new_tokens = sum(len(row) for row in outputs)
    return outputs, stats


def generate_tokens(
    model: nn.Module,
    prompt_ids: list[list[int]],
    args: GenerateArgs,
    eos_id: Optional[int] = None,
    stop_check: Optional[StopCheck] = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``args.max_new_tokens`` tokens (the prompt is not repeated).

    A row ends at ``eos_id`` (not included) or when ``stop_check`` says so. Uses the model's
    cache when it has one, else re-runs the full forward pass each step.
    """
    return generate_with_stats(model, prompt_ids, args, eos_id, stop_check)[0]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string, and whether one occurred."""
    cut = min((index for index in (text.find(s) for s in stop if s) if index >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate_text_with_stats(
    model: nn.Module, tokenizer, prompts: list[str], args: GenerateArgs
) -> tuple[list[str], GenerationStats]:
    prompt_ids = [tokenizer.encode(prompt, add_bos=True, add_eos=False) for prompt in prompts]

    def stop_check(row: int, output: list[int]) -> bool:
        return cut_at_stop(tokenizer.decode(output), args.stop)[1]

    outputs, stats = generate_with_stats(
        model, prompt_ids, args, tokenizer.eos_id, stop_check if args.stop else None
    )
    return [cut_at_stop(tokenizer.decode(row), args.stop)[0] for row in outputs], stats


def generate_text(model: nn.Module, tokenizer, prompts: list[str], args: GenerateArgs) -> list[str]:
    """Continuations of ``prompts`` (BOS prepended), each cut before its first stop string."""
    return generate_text_with_stats(model, tokenizer, prompts, args)[0]


@dataclass
class GenerateCLIArgs(GenerateArgs):
    """The ``generate`` command line: a checkpoint, prompts, and how to sample."""

    ckpt: str = ""
    """A run directory, checkpoint directory or consolidated export."""
    prompt: Optional[str] = None
    prompts_file: Optional[str] = None
    """A text file with one prompt per line (added to ``prompt``)."""
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of the model args before building, e.g. model.eval_token_chunk=16."""


def main(argv: Optional[Sequence[str]] = None) -> None:
    from lingua.args import load_config
    from lingua.checkpoint import load_for_inference
    from lingua.tokenizer import build_tokenizer, check_vocab

    cli = load_config(GenerateCLIArgs, sys.argv[1:] if argv is None else argv)
    if not cli.ckpt:
        raise ValueError("ckpt=PATH is required (a run directory, checkpoint or export)")
    prompts = [cli.prompt] if cli.prompt is not None else []
    if cli.prompts_file:
        with open(cli.prompts_file) as file:
            prompts += [line.rstrip("\n") for line in file if line.strip()]
    if not prompts:
        raise ValueError('give prompt="..." or prompts_file=PATH (one prompt per line)')
    device = cli.device if cli.device != "cuda" or torch.cuda.is_available() else "cpu"
    model, train_args = load_for_inference(cli.ckpt, device, cli.model or None)
    model = model.to(DTYPES[cli.dtype])
    tokenizer = build_tokenizer(train_args.data.tokenizer)
    check_vocab(tokenizer, model.args.vocab_size)
    args = GenerateArgs(**{f.name: getattr(cli, f.name) for f in dataclasses.fields(GenerateArgs)})
    texts, stats = generate_text_with_stats(model, tokenizer, prompts, args)
    for prompt, text in zip(prompts, texts):
        print(f"=== {prompt!r}\n{prompt}{text}\n")
    cache_note = f"cache {stats.cache_bytes / 2**20:.2f} MiB" if stats.cached else "no cache (full recompute)"
    print(
        f"{stats.new_tokens} new tokens for {len(prompts)} prompts ({stats.prompt_tokens} prompt tokens); "
        f"prefill {stats.prefill_seconds:.3f}s, decode {stats.decode_tokens_per_second:.1f} tokens/s; {cache_note}"
    )
