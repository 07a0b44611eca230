"""Slow, obviously correct float64 references for the KV-SSM's two sequence operations.

Both loop over tokens exactly as the recurrences read in DESIGN.md ("KV-SSM"); the fast
implementations (``ssd_torch``, ``ssd_triton``, ``ssd_mamba``) share these signatures and are
tested against them.

Segments: ``segment_start`` [b, n] is True at the first token of each segment. The SSM state and
the causal conv taps reset there; position 0 always starts a segment, flagged or not.
"""

from __future__ import annotations

from typing import Optional, Union

import torch


def split_scan_inputs(x: torch.Tensor, heads: int, groups: int, state_dim: int) -> tuple[torch.Tensor, ...]:
    """The scan's inputs side by side, as a KV-SSM's conv writes them: x [..., h·p + 2·g·s] ->
    views u [..., h, p], B and C [..., g, s] (h = ``heads``, g = ``groups``, s = ``state_dim``)."""
    bc = groups * state_dim
    u, B, C = x.split([x.shape[-1] - 2 * bc, bc, bc], dim=-1)
    return u.unflatten(-1, (heads, -1)), B.unflatten(-1, (groups, state_dim)), C.unflatten(-1, (groups, state_dim))


def join_scan_inputs(u: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """u [b, n, h, p], B and C [b, n, g, s] -> one tensor [b, n, h·p + 2·g·s] (a copy; the inverse
    of :func:`split_scan_inputs`)."""
    return torch.cat([u.flatten(2), B.flatten(2), C.flatten(2)], dim=-1)


def with_first_start(segment_start: torch.Tensor) -> torch.Tensor:
    """segment_start [b, n] as bool with position 0 always a start (the sequence start resets)."""
    first = torch.zeros_like(segment_start, dtype=torch.bool)
    first[:, 0] = True
    return segment_start.to(torch.bool) | first


def ssd_reference(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    segment_start: torch.Tensor,
    return_final_state: bool = False,
    max_segment_len: Optional[int] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Selective state-space scan with resets, one token at a time in float64.

    u [b, n, h, p]; dt [b, n, h] (already softplus'd, > 0); A [h] (< 0); B, C [b, n, g, s] with
    head i reading group i // (h // g); D [h]; segment_start [b, n] bool.

        S_t = exp(dt_t * A) * S_{t-1} * [t is not a segment start] + dt_t * u_t ⊗ B_t   # [p, s]
        y_t = S_t C_t + D * u_t

    Returns y [b, n, h, p] in u's dtype, and with ``return_final_state`` also the state after
    the last token, S [b, h, p, s] in float64. ``max_segment_len``, a bound on every segment's
    length that the caller guarantees, is part of every backend's signature; only the windowed
    Triton kernels (``apps.attamba.ssd_triton_window``) use it.
    """
    b, n, h, p = u.shape
    g = B.shape[2]
    if h % g:
        raise ValueError(f"ssm heads ({h}) must be a multiple of the B/C groups ({g})")
    heads_per_group = h // g
    u64, dt64, A64, D64 = u.double(), dt.double(), A.double(), D.double()
    # Expand groups to heads once: [b, n, h, s].
    B64 = B.double().repeat_interleave(heads_per_group, dim=2)
    C64 = C.double().repeat_interleave(heads_per_group, dim=2)
    starts = with_first_start(segment_start)

    state = u64.new_zeros(b, h, p, B.shape[-1])
    outputs = []
    for t in range(n):
        keep = (~starts[:, t]).double()[:, None, None, None]  # [b, 1, 1, 1]
        decay = torch.exp(dt64[:, t] * A64)[:, :, None, None]  # [b, h, 1, 1]
        write = (dt64[:, t, :, None] * u64[:, t])[..., None] * B64[:, t, :, None, :]  # [b, h, p, s]
        state = decay * state * keep + write
        y_t = torch.einsum("bhps,bhs->bhp", state, C64[:, t]) + D64[:, None] * u64[:, t]
        outputs.append(y_t)
    y = torch.stack(outputs, dim=1).to(u.dtype)
    if return_final_state:
        return y, state
    return y


def causal_conv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    segment_start: torch.Tensor,
) -> torch.Tensor:
    """Depthwise causal convolution that never reaches back across a segment start (float64 loop).

    x [b, n, c]; weight [c, k] with tap k-1 multiplying the current token; bias [c] or None;
    segment_start [b, n] bool. out_t = bias + sum_i weight[:, k-1-i] * x_{t-i}, where x_{t-i}
    counts as zero when t-i lies before the start of t's segment. No activation. Returns x.dtype.
    """
    b, n, c = x.shape
    k = weight.shape[1]
    x64, w64 = x.double(), weight.double()
    starts = with_first_start(segment_start)
    out = x64.new_zeros(b, n, c)
    for row in range(b):
        segment_begin = 0
        for t in range(n):
            if starts[row, t]:
                segment_begin = t
            for i in range(min(k, t - segment_begin + 1)):
                out[row, t] += w64[:, k - 1 - i] * x64[row, t - i]
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)
