"""Attention masks shared by every model: causal, document and sliding-window masks, as dense
boolean tensors (for SDPA and tests) and as FlexAttention block masks."""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as _eager_flex_attention


def causal_dense_mask(
    doc_ids: Optional[torch.Tensor], n: int, sliding_window: Optional[int], device: torch.device
) -> torch.Tensor:
    """Boolean mask, True where query i may attend key j: j <= i, same document, within window.

    Shape [B, 1, n, n] with ``doc_ids`` [B, n], else [1, 1, n, n].
    """
    position = torch.arange(n, device=device)
    allowed = position[None, :] <= position[:, None]
    if sliding_window is not None:
        allowed = allowed & (position[:, None] - position[None, :] < sliding_window)
    allowed = allowed[None, None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return allowed


def causal_block_mask(
    doc_ids: Optional[torch.Tensor],
    batch: int,
    n: int,
    sliding_window: Optional[int],
    device: torch.device,
) -> BlockMask:
    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx
        if sliding_window is not None:
            allowed = allowed & (q_idx - kv_idx < sliding_window)
        if doc_ids is not None:
            allowed = allowed & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return allowed

    return build_block_mask(mask_mod, batch if doc_ids is not None else None, n, n, device)


def build_block_mask(mask_mod, batch: Optional[int], q_len: int, kv_len: int, device) -> BlockMask:
    """``create_block_mask``, compiled on CUDA: masks that depend on the batch (documents) are
    rebuilt every step, and the eager build costs milliseconds of host time and materialises the
    whole [B, q_len, kv_len] mask."""
    if not _compiled_on(torch.device(device)):
        return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)
    with _compiling_allowed():
        return _compiled_create_block_mask()(mask_mod, B=batch, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_create_block_mask():
    return torch.compile(create_block_mask)


def _compiled_on(device: torch.device) -> bool:
    """Whether FlexAttention and its masks run compiled on ``device`` (CUDA: eager there is slow
    and memory-hungry; CPU tests stay eager)."""
    return device.type == "cuda"


@contextlib.contextmanager
def _compiling_allowed():
    """Compile here even under ``torch.compiler.set_stance("force_eager")``, which evaluation
    during training uses so that its new shapes do not recompile every block: eager FlexAttention
    materialises the [B, H, n, n_keys] scores, gigabytes at long context."""
    if torch.compiler.is_compiling():  # traced inside a compiled block: already compiled
        yield
        return
    with torch.compiler.set_stance("default"):
        yield


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    # Many shapes would exceed dynamo's default recompile limit (8), after which flex_attention
    # silently falls back to an eager path with O(n^2) memory.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(_eager_flex_attention, dynamic=False)


def flex_attention(q, k, v, block_mask: BlockMask, **kwargs) -> torch.Tensor:
    """FlexAttention, compiled on CUDA (where eager is slow and memory-hungry), eager on CPU."""
    if not _compiled_on(q.device):
        return _eager_flex_attention(q, k, v, block_mask=block_mask, **kwargs)
    with _compiling_allowed():
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask, **kwargs)
