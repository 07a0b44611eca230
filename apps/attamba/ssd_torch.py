"""Fast pure-PyTorch segmented SSD scan and causal conv (no Python loop over tokens).

Same signatures and semantics as :mod:`apps.attamba.ssd_reference`; torch.compile friendly.

SSD scan: the chunked ("state space duality") form. The sequence is cut into fixed blocks of
``block_len`` tokens. Inside a block, outputs are a masked attention-like product
``y_j = sum_{i<=j} C_j.B_i * decay(i -> j) * dt_i * u_i``; across blocks, a state per block is
passed on with a small quadratic pass over blocks. Segment resets are folded into the log-decays:
a segment start gets log-decay -inf, so any decay that spans a start, i.e. the product of
per-token decays over a range (i, j] containing a start, is exactly zero. That single rule cuts
the intra-block products, the block-end states and the carried states at every reset, so
segments of any length (one token up to the whole sequence) need no special handling.

All decays are built from sums of log-decays over explicit ranges (never differences of
cumulative sums), which keeps fp32 exact-ish and keeps -inf from turning into NaN.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from apps.attamba.ssd_reference import with_first_start

DEFAULT_BLOCK_LEN = 64


def _range_sums(log_decay: torch.Tensor) -> torch.Tensor:
    """out[..., j, i] = sum_{i < k <= j} log_decay[..., k] for i <= j, and -inf for j < i.

    log_decay [..., T] -> [..., T, T]. Built with a masked cumulative sum so that -inf entries
    (segment starts) produce -inf, never NaN, and finite ranges lose no precision.
    """
    T = log_decay.shape[-1]
    # expanded[..., k, i] = log_decay[..., k], kept only where k > i.
    expanded = log_decay.unsqueeze(-1).expand(*log_decay.shape, T)
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=log_decay.device).tril(-1)
    sums = expanded.masked_fill(~strictly_lower, 0.0).cumsum(dim=-2)
    lower = torch.ones(T, T, dtype=torch.bool, device=log_decay.device).tril()
    return sums.masked_fill(~lower, float("-inf"))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def ssd_segmented(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    segment_start: torch.Tensor,
    return_final_state: bool = False,
    max_segment_len: Optional[int] = None,
    block_len: int = DEFAULT_BLOCK_LEN,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Chunked SSD scan with resets at segment starts.

    u [b, n, h, p]; dt [b, n, h] (already softplus'd); A [h] (< 0); B, C [b, n, g, s];
    D [h]; segment_start [b, n] bool. Returns y [b, n, h, p] in u's dtype, plus with
    ``return_final_state`` the state after the last token, [b, h, p, s] in the compute dtype
    (float64 for float64 inputs, else float32). Work is O(n * block_len) within blocks plus
    O((n / block_len)^2) small products across blocks.
    """
    b, n, h, p = u.shape
    g, s = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"ssm heads ({h}) must be a multiple of the B/C groups ({g})")
    r = h // g  # heads per group
    dtype = _compute_dtype(u.dtype)
    Q = min(block_len, n)
    pad = (-n) % Q
    nc = (n + pad) // Q

    starts = with_first_start(segment_start)
    # Padding at the end is inert: dt = 0 means decay 1 and no write, so outputs and the final
    # state of the real tokens are untouched.
    u_, dt_ = u.to(dtype), dt.to(dtype)
    B_, C_ = B.to(dtype), C.to(dtype)
    if pad:
        u_ = F.pad(u_, (0, 0, 0, 0, 0, pad))
        dt_ = F.pad(dt_, (0, 0, 0, pad))
        B_ = F.pad(B_, (0, 0, 0, 0, 0, pad))
        C_ = F.pad(C_, (0, 0, 0, 0, 0, pad))
        starts = F.pad(starts, (0, pad), value=False)

    u_ = u_.reshape(b, nc, Q, g, r, p)
    B_ = B_.reshape(b, nc, Q, g, s)
    C_ = C_.reshape(b, nc, Q, g, s)
    dt_ = dt_.reshape(b, nc, Q, g, r)
    starts = starts.reshape(b, nc, Q)

    log_decay = dt_ * A.to(dtype).reshape(g, r)  # [b, nc, Q, g, r]
    log_decay = log_decay.masked_fill(starts[..., None, None], float("-inf"))
    log_decay = log_decay.permute(0, 1, 3, 4, 2)  # [b, nc, g, r, Q]
    weighted_u = u_ * dt_[..., None]  # [b, nc, Q, g, r, p]

    # Within blocks: decay[..., j, i] = exp(sum of log-decays over (i, j]).
    decay = torch.exp(_range_sums(log_decay))  # [b, nc, g, r, Q, Q]
    scores = torch.einsum("bcjgs,bcigs->bcgji", C_, B_)  # [b, nc, g, Q, Q]
    y = torch.einsum("bcgrji,bcigrp->bcjgrp", decay * scores[:, :, :, None], weighted_u)

    # State each block leaves behind, from its own tokens only.
    decay_to_end = decay[..., -1, :]  # [b, nc, g, r, Q]
    block_states = torch.einsum("bcgri,bcigs,bcigrp->bcgrps", decay_to_end, B_, weighted_u)

    # Across blocks: state entering block c = sum over earlier blocks c' of their end state times
    # the decays of blocks c'+1..c-1. A leading zero state lets one pass give every entering
    # state and the final one.
    log_cum = log_decay.cumsum(dim=-1)  # [b, nc, g, r, Q], decay from block start through j
    block_log_decay = F.pad(log_cum[..., -1], (0, 0, 0, 0, 1, 0))  # [b, nc+1, g, r]
    carry = torch.exp(_range_sums(block_log_decay.permute(0, 2, 3, 1)))  # [b, g, r, nc+1, nc+1]
    block_states = F.pad(block_states, (0, 0, 0, 0, 0, 0, 0, 0, 1, 0))  # [b, nc+1, g, r, p, s]
    entering = torch.einsum("bgrzc,bcgrps->bzgrps", carry, block_states)

    y = y + torch.einsum("bcjgs,bcgrps,bcgrj->bcjgrp", C_, entering[:, :-1], torch.exp(log_cum))
    y = y.reshape(b, nc * Q, h, p)[:, :n]
    y = (y + D.to(dtype)[:, None] * u.to(dtype)).to(u.dtype)
    if return_final_state:
        return y, entering[:, -1].reshape(b, h, p, s)
    return y


def positions_in_segment(segment_start: torch.Tensor) -> torch.Tensor:
    """segment_start [b, n] bool -> [b, n] long: index of each token within its segment."""
    n = segment_start.shape[1]
    positions = torch.arange(n, device=segment_start.device).expand_as(segment_start)
    starts = with_first_start(segment_start)
    segment_begin = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=1).values
    return positions - segment_begin


def causal_conv_segmented(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    segment_start: torch.Tensor,
) -> torch.Tensor:
    """Depthwise causal conv that never reaches across a segment start (no activation).

    x [b, n, c]; weight [c, k] (tap k-1 multiplies the current token); bias [c] or None;
    segment_start [b, n] bool. Returns [b, n, c] in x's dtype. A sum of k shifted copies of x,
    each masked where its shift would read from before the token's segment.
    """
    n = x.shape[1]
    k = weight.shape[1]
    offset = positions_in_segment(segment_start)[..., None]  # [b, n, 1]
    out = x * weight[:, k - 1]
    for shift in range(1, min(k, n)):
        shifted = F.pad(x, (0, 0, shift, 0))[:, :n]  # shifted[:, t] = x[:, t - shift]
        out = out + torch.where(offset >= shift, shifted, torch.zeros_like(shifted)) * weight[:, k - 1 - shift]
    if bias is not None:
        out = out + bias
    return out.to(x.dtype)
