"""Slot-addressed key/value buffers shared by the inference caches of every model family.

A :class:`KVSlots` buffer keeps keys and values of up to ``slots`` positions per row; position p
lives in slot ``p mod slots`` and every slot records the position it holds (:data:`EMPTY` when
none), so attention masks come from positions alone and the buffers never change shape (a decode
step can be captured in a CUDA graph). With as many slots as positions it is a plain KV-cache;
with fewer it is a ring (a sliding window, or Attamba's window of recent tokens).
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

EMPTY = -1
"""Position recorded in a slot that holds nothing."""


def write_slots(
    buffers: tuple[torch.Tensor, ...], slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
) -> None:
    """Store k, v [B, H, m, d] and ``positions`` [B, m] in slots[b, i] [B, m] of each row of the
    (k, v, positions) buffers ([B, H, S, d] twice, [B, S]); a row's m slots must differ.

    Written with ``index_put_`` on the whole buffers: compiled by Inductor that updates the written
    entries in place, whereas a ``scatter_`` (or any write through a view) becomes a copy of the
    whole buffer every step (gigabytes at long context). One call per buffer, whatever m."""
    k_buffer, v_buffer, positions_buffer = buffers
    write_kv_slots(k_buffer, v_buffer, slots, k, v)
    positions_buffer[torch.arange(k_buffer.shape[0], device=slots.device)[:, None], slots] = positions


def write_kv_slots(k_buffer: torch.Tensor, v_buffer: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """:func:`write_slots` without the positions: k, v [B, H, m, d] into slots [B, m] of the
    [B, H, S, d] buffers."""
    rows = torch.arange(k_buffer.shape[0], device=slots.device)[:, None, None]
    heads = torch.arange(k_buffer.shape[1], device=slots.device)[None, :, None]
    index = (rows, heads, slots[:, None, :])  # an [B, H, m] grid of entries
    k_buffer[index] = k
    v_buffer[index] = v


class KVSlots:
    """Keys and values of up to ``slots`` positions per row; position p lives in slot p mod slots.

    With ``slots`` >= every position it is a plain KV-cache; with fewer it is a ring that keeps
    the most recent ``slots`` positions. The slots may be a range ``first .. first + slots - 1``
    of larger buffers (the Attamba cache keeps its compressed keys and its window in one tensor so
    attention needs no concatenation): ``k``, ``v`` ([B, Hkv, slots, d]) and ``positions``
    ([B, slots]) are views of that range, sliced from the whole buffers on every access. A decode
    step writes through the whole buffers (:func:`write_slots`); were the views kept as tensors
    of their own, a compiled step that writes and then reads them would see two aliased inputs,
    and Inductor copies the whole buffers every step.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, first: int = 0):
        """k, v [B, Hkv, S, d], positions [B, S]: buffers whose slots first .. S - 1 are ours."""
        self.buffers = (k, v, positions)
        self.first = first
        self.slots = k.shape[2] - first

    @property
    def k(self) -> torch.Tensor:
        return self.buffers[0][:, :, self.first :]

    @property
    def v(self) -> torch.Tensor:
        return self.buffers[1][:, :, self.first :]

    @property
    def positions(self) -> torch.Tensor:
        return self.buffers[2][:, self.first :]

    @classmethod
    def empty(cls, batch: int, kv_heads: int, slots: int, head_dim: int, device, dtype) -> "KVSlots":
        k = torch.zeros(batch, kv_heads, slots, head_dim, device=device, dtype=dtype)
        positions = torch.full((batch, slots), EMPTY, dtype=torch.long, device=device)
        return cls(k, torch.zeros_like(k), positions)

    def slot_of(self, position: torch.Tensor) -> torch.Tensor:
        """The slot of the whole buffers that ``position`` (any shape) goes to."""
        return self.first + position % self.slots

    def write_one(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> None:
        """Store k, v [B, Hkv, 1, d] of one token per row at ``position`` [B]."""
        write_slots(self.buffers, self.slot_of(position)[:, None], k, v, position[:, None])

    def write_many(self, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor) -> None:
        """Store k, v [B, Hkv, m, d] of positions start[b] + i for i < lengths[b].

        Built as a gather over slots (each slot takes the newest position that maps to it, if that
        one is new) rather than a scatter, because with m > slots several positions share a slot.
        """
        m = k.shape[2]
        newest = self.newest_positions(start + lengths)  # [B, slots]
        fresh = newest >= start[:, None]  # [B, slots]
        index = (newest - start[:, None]).clamp(0, m - 1)
        index = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # [B, Hkv, slots, d]
        keep_old = ~fresh[:, None, :, None]
        self.k.copy_(torch.where(keep_old, self.k, k.gather(2, index)))
        self.v.copy_(torch.where(keep_old, self.v, v.gather(2, index)))
        self.positions.copy_(torch.where(fresh, newest, self.positions))

    def newest_positions(self, end: torch.Tensor) -> torch.Tensor:
        """[B, slots]: the newest position below ``end`` [B] that maps to each slot (< 0: none)."""
        slot = torch.arange(self.slots, device=end.device)
        return end[:, None] - 1 - (end[:, None] - 1 - slot) % self.slots

    def pretend_filled(self, end: torch.Tensor) -> None:
        """Hold positions 0..end[b]-1 with random keys and values (benchmarks skip the prefill)."""
        self.k.normal_()
        self.v.normal_()
        newest = self.newest_positions(end)
        self.positions.copy_(torch.where(newest >= 0, newest, EMPTY))

    def live(self, lowest: torch.Tensor) -> torch.Tensor:
        """[B, slots] bool: filled slots holding a position >= ``lowest`` [B]."""
        return (self.positions >= 0) & (self.positions >= lowest[:, None])

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


# cuDNN attention builds a plan per new shape (~7 ms of CPU each on an H100), and eager decoding
# changes the key length every step; the memory-efficient kernel takes masks without that cost.
# With static shapes the plan is built once, and cuDNN was then ~2x faster per step (H100, bf16).
_CHANGING_SHAPE_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_STATIC_SHAPE_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attend_slots(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, static_shapes: bool = False
) -> torch.Tensor:
    """Attention of q [B, H, m, d] over cached k, v [B, Hkv, S, d] where ``allowed`` [B, m, S]."""
    with sdpa_kernel(_STATIC_SHAPE_BACKENDS if static_shapes else _CHANGING_SHAPE_BACKENDS):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[:, None], enable_gqa=q.shape[1] != k.shape[1]
        )


def cuda_kernel(device, module: str, name: str) -> Optional[Callable[..., torch.Tensor]]:
    """``module.name``, a Triton kernel's entry point, for a CUDA ``device`` where the module (and
    Triton) imports; None otherwise, and the caller runs its PyTorch path. Caches resolve their
    decode kernels with it once, outside any compiled step."""
    if torch.device(device).type != "cuda":
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None


def load_decode_attention(device) -> Optional[Callable[..., torch.Tensor]]:
    """:func:`lingua.decode_attention.decode_attention` on CUDA, else None (decode then runs SDPA
    over a materialized mask)."""
    return cuda_kernel(device, "lingua.decode_attention", "decode_attention")


def visible_slots(positions: torch.Tensor, lowest: torch.Tensor, windowed_from: int) -> torch.Tensor:
    """Bool like ``positions`` [..., S] (slot s holds position ``positions[..., s]``, negative when
    empty): a filled slot before ``windowed_from`` (Attamba's compressed boundaries) is visible when
    its position is < ``lowest`` (broadcast to positions: the query's window start), one from
    ``windowed_from`` on (the window) when its position is >= ``lowest``. The rule
    :mod:`lingua.decode_attention`'s kernel applies."""
    slot = torch.arange(positions.shape[-1], device=positions.device)
    return (positions >= 0) & torch.where(slot < windowed_from, positions < lowest, positions >= lowest)


def attend_one_query(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, lowest: torch.Tensor,
    windowed_from: int, cache: "PositionedCache",
) -> torch.Tensor:
    """A decode step's attention: q [B, H, 1, d] over cached k, v [B, Hkv, S, d] whose slots hold
    ``positions`` [B, S], visible as :func:`visible_slots` says for window start ``lowest`` [B].
    Runs ``cache.decode_attention`` when set (a Triton kernel that splits the keys over programs),
    else SDPA over that rule's mask."""
    if cache.decode_attention is not None:
        return cache.decode_attention(q, k, v, positions, lowest, windowed_from)
    visible = visible_slots(positions, lowest[:, None], windowed_from)  # [B, S]
    return attend_slots(q, k, v, visible[:, None], cache.static_shapes)


def causal_allowed(
    key_positions: torch.Tensor, query_positions: torch.Tensor, window: Optional[int]
) -> torch.Tensor:
    """[B, m, S] bool: key (position, -1 if empty) visible to query: causal, within ``window``."""
    keys, queries = key_positions[:, None, :], query_positions[:, :, None]
    allowed = (keys >= 0) & (keys <= queries)
    if window is not None:
        allowed = allowed & (keys > queries - window)
    return allowed


def right_aligned_columns(lengths: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices [B, m] for right-padded rows of ``lengths`` tokens in m columns: gathering
    ``source`` moves each row's padding in front, so that the row ends at column m - 1 (and its
    first real token sits where ``source == 0``); gathering that at ``back`` restores the order."""
    shift = (m - lengths)[:, None]
    column = torch.arange(m, device=lengths.device)[None, :]
    return (column - shift) % m, (column + shift) % m


def check_prefill(tokens: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """Validate ``lengths`` for a prompt batch ``tokens`` [B, m]; return it (all m if None)."""
    batch, m = tokens.shape
    if lengths is None:
        return torch.full((batch,), m, dtype=torch.long, device=tokens.device)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape [{batch}] (one per row of tokens), got {tuple(lengths.shape)}")
    if bool((lengths < 0).any()) or bool((lengths > m).any()):
        raise ValueError(f"lengths must lie in 0..{m} (the padded prompt width), got {lengths.tolist()}")
    return lengths.to(device=tokens.device, dtype=torch.long)


class PositionedCache:
    """What every cache of this framework shares: each row's next position and a host-side bound.

    ``horizon`` bounds the positions written so far without a device sync, so a cache detects
    overflow, and eager decoding of a full KV-cache attends only over its filled part. With
    ``static_shapes`` (set by lingua.generate.DecodeStep before capturing a CUDA graph) every step
    has the same shapes and DecodeStep advances ``horizon``. ``decode_attention``: the kernel
    decode steps attend with (see :func:`attend_one_query`), or None for SDPA; a subclass sets it
    where the kernel was measured faster. Subclasses fill ``layers``.
    """

    def __init__(self, batch: int, max_len: int, device):
        self.max_len = max_len
        self.decode_attention: Optional[Callable[..., torch.Tensor]] = None
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)  # next position per row
        self.horizon = 0
        self.static_shapes = False
        self.layers: list = []

    def nbytes(self) -> int:
        """Bytes of the allocated buffers of every layer."""
        return sum(layer.nbytes() for layer in self.layers)

    def advance_horizon(self, new_horizon: int) -> None:
        if new_horizon > self.max_len:
            raise ValueError(
                f"cache of max_len={self.max_len} is full: {self.horizon} positions used, "
                f"{new_horizon - self.horizon} more requested"
            )
        self.horizon = new_horizon
