"""The Mamba2 baseline's inference cache: one recurrent state per layer, of fixed size.

Per layer the mixer's :class:`~apps.attamba.ssm.SSMState` (the last conv_size - 1 conv inputs
and the state per head), whatever the context length: a decode step reads it, runs one
``KVSSM.step`` and writes it back in place (on CUDA the recurrence is one Triton kernel that
updates the state where it lies), so every shape is fixed and a step can be captured in a CUDA
graph.

Prompts of different lengths are RIGHT-padded with ``lengths`` as for the transformer. Prefill is
one forward pass (``KVSSM.forward_with_state``) over the prompts rotated so that every row ends
at the last column, with a segment start at its first real token: the padding moved in front of
it cannot leak into its state, and the final state is every row's own. A prefill that continues
a filled cache runs token by token (``forward_with_state`` takes no initial state), each row
advancing only through its own ``lengths[b]`` tokens.
"""

from __future__ import annotations

from typing import Optional

import torch

from apps.attamba.ssm import SSMState, fused_step_for
from apps.mamba.model import MambaLM
from lingua.generate import register_cache_support
from lingua.kv_cache import PositionedCache, check_prefill, right_aligned_columns


class LayerState:
    """One layer's recurrent state in fixed buffers, overwritten in place."""

    def __init__(self, state: SSMState):
        self.state = state

    def store(self, new: SSMState, rows: Optional[torch.Tensor] = None) -> None:
        """Copy ``new`` in; with ``rows`` [B] (bool) only those rows, the others keep theirs."""
        self.state.copy_(new, rows)

    def nbytes(self) -> int:
        return self.state.nbytes()


class MambaCache(PositionedCache):
    """Every layer's :class:`LayerState` plus each row's next position."""

    def __init__(self, model: MambaLM, batch: int, max_len: int, device, dtype):
        super().__init__(batch, max_len, device)
        self.layers = [LayerState(layer.mixer.init_state(batch, device, dtype)) for layer in model.layers]
        # On CUDA a decode step's recurrence is one Triton kernel that updates the state in place.
        self.fused_step = fused_step_for(device)

    def live_nbytes(self) -> int:
        """The whole state is live from the first token on: the same as :meth:`nbytes`."""
        return self.nbytes()

    def entries_per_layer(self) -> torch.Tensor:
        """[n_layers, B]: cached (k, v) entries; a recurrent state holds none, at any length."""
        return torch.zeros(len(self.layers), self.positions.shape[0], dtype=torch.long, device=self.positions.device)

    def pretend_filled(self, n: int) -> None:
        """Every row has read n tokens, with random states: a benchmark's stand-in for a prefill."""
        self.advance_horizon(n)
        self.positions.fill_(n)
        for layer in self.layers:
            layer.state.conv.normal_()
            layer.state.ssm.normal_()


def new_cache(model: MambaLM, batch_size: int, max_len: int, device, dtype) -> MambaCache:
    return MambaCache(model, batch_size, max_len, device, dtype)


def _prefill(model: MambaLM, tokens: torch.Tensor, cache: MambaCache, lengths: torch.Tensor) -> torch.Tensor:
    """One forward pass over prompts that start at position 0; fills every layer's state."""
    m = tokens.shape[1]
    source, back = right_aligned_columns(lengths, m)  # [B, m]
    rotated = tokens.gather(1, source)
    segment_start = source == 0  # [B, m]: each row's first real token
    empty = lengths == 0  # such rows hold only padding: their state is zeroed below
    x = model.tok_embeddings(rotated)
    for layer, layer_cache in zip(model.layers, cache.layers):
        x, state = layer.prefill(x, segment_start)
        layer_cache.store(state.reset(empty))
    cache.positions.add_(lengths)
    logits = model.output(model.norm(x))  # [B, m, V], rotated
    return logits.gather(1, back[..., None].expand(-1, -1, logits.shape[2]))


def _decode(model: MambaLM, tokens: torch.Tensor, cache: MambaCache, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token per row (tokens [B, 1]); with ``rows`` [B] (bool) only those rows advance."""
    x = model.tok_embeddings(tokens[:, 0])  # [B, E]
    # Only a step that advances every row may update the states in place.
    fused_step = cache.fused_step if rows is None else None
    for layer, layer_cache in zip(model.layers, cache.layers):
        x, state = layer.step(x, layer_cache.state, fused_step=fused_step)
        layer_cache.store(state, rows)
    cache.positions.add_(1 if rows is None else rows.long())
    return model.output(model.norm(x))[:, None]


def forward_cached(
    model: MambaLM, tokens: torch.Tensor, cache: MambaCache, lengths: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Logits [B, m, V] for ``tokens`` [B, m] continuing each row of ``cache``; updates the cache.

    m == 1 without ``lengths`` is a decode step. Otherwise a prefill of right-padded rows of
    ``lengths`` tokens: one forward pass when the cache is empty, else token by token.
    """
    if tokens.shape[1] == 1 and lengths is None:
        if not cache.static_shapes:  # a captured step cannot run Python: DecodeStep advances it
            cache.advance_horizon(cache.horizon + 1)
        return _decode(model, tokens, cache)
    lengths = check_prefill(tokens, lengths)
    filled = cache.horizon > 0
    cache.advance_horizon(int((cache.positions + lengths).max()))
    if not filled:
        return _prefill(model, tokens, cache, lengths)
    steps = [_decode(model, tokens[:, i : i + 1], cache, rows=i < lengths) for i in range(tokens.shape[1])]
    return torch.cat(steps, dim=1)


register_cache_support(MambaLM, new_cache, forward_cached)
