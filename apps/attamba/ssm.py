"""The KV-SSM: a Mamba2 mixer whose state and conv taps reset at segment starts.

Attamba feeds keys and values through two of these (DESIGN.md, "KV-SSM"):

    [z, u, B, C, dt] = in_proj(x)
    (u, B, C) = SiLU(depthwise causal conv(u, B, C))      # never reaches across a segment start
    dt = softplus(dt + dt_bias);  A = -exp(A_log)
    S_t = exp(dt_t A) S_{t-1} [t does not start a segment] + dt_t u_t ⊗ B_t;  y_t = S_t C_t + D u_t
    out = out_proj(RMSNorm(y * SiLU(z)))

Three entry points share the parameters: :meth:`KVSSM.forward` (training, whole sequences;
:func:`paired_forward` runs a layer's K and V SSMs together through one conv and one scan call),
:meth:`KVSSM.forward_with_state` (prefill: also returns the state after the last token) and
:meth:`KVSSM.step` (decode: one token from an :class:`SSMState`). The sequence operations come
from a backend chosen by ``SSMArgs.impl``; every backend has the signatures of
:mod:`apps.attamba.ssd_reference`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from apps.attamba.ssd_reference import split_scan_inputs
from apps.attamba.ssd_torch import positions_in_segment
from lingua.decode_weights import PairedLinear
from lingua.kv_cache import cuda_kernel
from lingua.transformer import RMSNorm, rms_norm

logger = logging.getLogger(__name__)

IMPLS = ("auto", "torch", "triton", "triton_window", "mamba_ssm", "reference")


@dataclass
class SSMArgs:
    """Sizes, initialisation and backend of one KV-SSM."""

    state_dim: int = 128
    """State size D_S per head (the length of B and C)."""
    ssm_heads: int = 8
    """Heads, each with its own scalar decay A and step dt."""
    ssm_hidden_dim: Optional[int] = None
    """Width of u, z and y (split across heads); None means the module's output width."""
    n_groups: int = 1
    """Groups of B/C shared by ssm_heads / n_groups heads each (1: shared by all heads)."""
    conv_size: int = 4
    """Width of the depthwise causal conv over (u, B, C); 1 disables mixing across tokens."""
    dt_bias: bool = True
    """Learn a per-head bias added to dt before the softplus."""
    A_init_min: float = 1.0
    """-A is initialised uniformly in [A_init_min, A_init_max]."""
    A_init_max: float = 16.0
    dt_min: float = 1e-3
    """dt (after the softplus) is initialised log-uniformly in [dt_min, dt_max] ..."""
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    """... and clamped from below at dt_init_floor."""
    impl: str = "auto"
    """Backend of the sequence operations: 'auto' ('triton_window' on CUDA when Triton imports,
    else 'torch'), 'torch' (chunked PyTorch), 'triton' (chunked SSD carrying states across blocks;
    any segment lengths), 'triton_window' (Triton kernels that carry no state, for segments of at
    most 64 tokens, such as Attamba's chunks; 'triton' otherwise), 'mamba_ssm' (the mamba-ssm and
    causal-conv1d CUDA kernels), or 'reference' (float64 token loop; tests only)."""

    def __post_init__(self) -> None:
        for name in ("state_dim", "ssm_heads", "n_groups", "conv_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ssm.{name} must be >= 1, got {getattr(self, name)}")
        if self.ssm_heads % self.n_groups:
            raise ValueError(
                f"ssm.ssm_heads={self.ssm_heads} must be a multiple of ssm.n_groups={self.n_groups} "
                "(each B/C group serves the same number of heads)"
            )
        if self.ssm_hidden_dim is not None:
            check_hidden_dim(self.ssm_hidden_dim, self.ssm_heads)
        if not 0 < self.A_init_min <= self.A_init_max:
            raise ValueError(
                f"ssm.A_init_min and ssm.A_init_max must satisfy 0 < min <= max, got "
                f"{self.A_init_min} and {self.A_init_max}"
            )
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(
                f"ssm.dt_min and ssm.dt_max must satisfy 0 < min <= max, got {self.dt_min} and {self.dt_max}"
            )
        if self.dt_init_floor <= 0:
            raise ValueError(f"ssm.dt_init_floor must be > 0, got {self.dt_init_floor}")
        if self.impl not in IMPLS:
            raise ValueError(f"ssm.impl must be one of {', '.join(IMPLS)}; got '{self.impl}'")


def check_hidden_dim(hidden_dim: int, heads: int) -> None:
    if hidden_dim < 1 or hidden_dim % heads:
        raise ValueError(
            f"the SSM hidden width ({hidden_dim}; ssm.ssm_hidden_dim, or the output width when it is "
            f"null) must be a positive multiple of ssm.ssm_heads={heads}"
        )


@dataclass
class SSMState:
    """Decode state of one KV-SSM for a batch of rows; index rows like a tensor.

    ``conv``: [B, conv_channels, conv_size - 1], the last conv inputs of the current segment
    (oldest first, zero before the segment start). ``ssm``: [B, heads, head_dim, state_dim].
    """

    conv: torch.Tensor
    ssm: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.ssm.shape[0]

    def __getitem__(self, rows) -> "SSMState":
        return SSMState(self.conv[rows], self.ssm[rows])

    def __setitem__(self, rows, other: "SSMState") -> None:
        """Copy ``other``'s rows into ``rows`` of this state, in place."""
        self.conv[rows] = other.conv
        self.ssm[rows] = other.ssm

    def copy_(self, other: "SSMState", rows: Optional[torch.Tensor] = None) -> None:
        """Overwrite this state in place with ``other``; with ``rows`` [B] (bool) only those rows.
        No data-dependent indexing, so a captured decode step can do it."""
        if rows is None:
            self.conv.copy_(other.conv)
            if other.ssm is not self.ssm:  # a step that updated the state in place
                self.ssm.copy_(other.ssm)
            return
        self.conv.copy_(torch.where(rows[:, None, None], other.conv, self.conv))
        self.ssm.copy_(torch.where(rows[:, None, None, None], other.ssm, self.ssm))

    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes

    def reset(self, rows: torch.Tensor) -> "SSMState":
        """A copy with the rows where ``rows`` [B] (bool) is True zeroed."""
        keep = ~rows.to(torch.bool)
        return SSMState(self.conv * keep[:, None, None], self.ssm * keep[:, None, None, None])

    def to(self, *args, **kwargs) -> "SSMState":
        return SSMState(self.conv.to(*args, **kwargs), self.ssm.to(*args, **kwargs))


SSDFunction = Callable[..., torch.Tensor]
ConvFunction = Callable[..., torch.Tensor]


class Backend(NamedTuple):
    """A backend's sequence operations."""

    ssd: SSDFunction
    """The segmented SSD scan, with the signature of ``ssd_reference``."""
    conv: ConvFunction
    """The segmented causal conv, with the signature of ``causal_conv_reference``."""
    conv_silu: Optional[ConvFunction] = None
    """SiLU(conv(...)) with the SiLU inside the conv's kernels (same signature), where the
    backend has them."""
    ssd_packed: Optional[Callable[..., torch.Tensor]] = None
    """The scan reading u, B and C side by side in one tensor (signature of
    :func:`apps.attamba.ssd_triton_window.ssd_segmented_window_packed`), where the backend has it."""
    gated_norm: Optional[Callable[..., torch.Tensor]] = None
    """The output gates RMSNorm(y * SiLU(z)) of several SSMs side by side in one kernel each way
    (signature of :func:`apps.attamba.gated_norm_triton.gated_rms_norm_triton`), where the backend
    has it."""
    rotate_qkv: Optional[Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = None
    """An Attamba layer's query rotation, the SSMs' residual and the key rotation in one kernel each
    way (signature of :func:`apps.attamba.rotary_triton.rotate_qkv_triton`), where the backend has it."""

    def conv_and_scan(self, conv_in: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
                      sizes: "_ScanSizes", dt: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
                      segment_start: torch.Tensor, return_final_state: bool = False,
                      max_segment_len: Optional[int] = None, segment_period: Optional[tuple[int, int]] = None):
        """(u, B, C) = SiLU(conv(conv_in)), then the scan: y [b, n, heads, head_dim] (and the
        final state with ``return_final_state``). ``segment_period`` (P, offset): segments start at
        least wherever (t + offset) mod P == 0 (periodic chunks); the packed scan can use it."""
        if self.conv_silu is not None:
            conv_out = self.conv_silu(conv_in, conv_weight, conv_bias, segment_start)
        else:
            conv_out = F.silu(self.conv(conv_in, conv_weight, conv_bias, segment_start))
        if self.ssd_packed is not None and not return_final_state:
            return self.ssd_packed(conv_out, dt, A, D, segment_start, sizes.groups, sizes.state_dim,
                                   max_segment_len=max_segment_len, segment_period=segment_period)
        u, B, C = sizes.split_conv_output(conv_out)
        return self.ssd(u, dt, A, B, C, D, segment_start, return_final_state=return_final_state,
                        max_segment_len=max_segment_len)


def load_backend(impl: str, device: torch.device) -> Backend:
    """The sequence operations of ``impl`` for ``device``."""
    if impl == "auto":
        if device.type == "cuda":
            try:
                # The windowed kernels skip the state pass, and fall back to 'triton' by
                # themselves when the caller gives no segment bound of at most 64 tokens.
                return load_backend("triton_window", device)
            except ImportError as error:
                logger.warning("ssm impl 'auto': Triton kernels unavailable (%s); using 'torch'", error)
        return load_backend("torch", device)
    if impl == "torch":
        from apps.attamba.ssd_torch import causal_conv_segmented, ssd_segmented

        return Backend(ssd_segmented, causal_conv_segmented)
    if impl == "reference":
        from apps.attamba.ssd_reference import causal_conv_reference, ssd_reference

        return Backend(ssd_reference, causal_conv_reference)
    if impl == "mamba_ssm":
        from apps.attamba.ssd_mamba import causal_conv_segmented_mamba, ssd_segmented_mamba

        return Backend(ssd_segmented_mamba, causal_conv_segmented_mamba)
    if impl == "triton":
        try:
            import apps.attamba.ssd_triton as module
        except ImportError as error:
            raise ImportError(
                f"ssm impl 'triton' needs apps.attamba.ssd_triton and the triton package ({error}); "
                "set ssm impl to 'torch' to run without them"
            ) from error
        from apps.attamba.gated_norm_triton import gated_rms_norm_triton
        from apps.attamba.rotary_triton import rotate_qkv_triton
        from apps.attamba.ssd_triton_conv import causal_conv_silu_segmented_triton

        return Backend(module.ssd_segmented_triton, module.causal_conv_segmented_triton, causal_conv_silu_segmented_triton,
                       gated_norm=gated_rms_norm_triton, rotate_qkv=rotate_qkv_triton)
    if impl == "triton_window":
        chunked = load_backend("triton", device)
        import apps.attamba.ssd_triton_window as window

        return chunked._replace(ssd=window.ssd_segmented_window, ssd_packed=window.ssd_segmented_window_packed)
    raise ValueError(f"ssm impl must be one of {', '.join(IMPLS)}; got '{impl}'")


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """SSM states accumulate in fp32 (fp64 when the model runs in fp64, for tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _ScanSizes:
    """Widths of a KV-SSM's scan (or of two side by side): u is heads x head_dim (the rest of the
    conv channels), B and C are groups x state_dim each."""

    heads: int
    groups: int
    state_dim: int

    @staticmethod
    def of(ssm: "KVSSM", copies: int = 1) -> "_ScanSizes":
        return _ScanSizes(copies * ssm.heads, copies * ssm.args.n_groups, ssm.args.state_dim)

    def split_conv_output(self, conv_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., channels] -> u [..., heads, head_dim], B and C [..., groups, state_dim]."""
        return split_scan_inputs(conv_out, self.heads, self.groups, self.state_dim)


def _recurrent_step(
    conv_in: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    state: SSMState,
    segment_start: Optional[torch.Tensor],
    sizes: _ScanSizes,
    fused_step: Optional[Callable[..., torch.Tensor]] = None,
) -> tuple[torch.Tensor, SSMState]:
    """The conv and the SSM recurrence for one token: conv inputs [B, channels], dt [B, heads]
    (after the softplus) -> y [B, heads, head_dim] in the state's dtype, and the new state.

    With ``fused_step`` (:func:`apps.attamba.ssm_step_triton.ssm_step_`) and an fp32 state, the
    recurrence is one kernel that updates ``state.ssm`` in place: the returned state holds that
    same tensor."""
    keep = None if segment_start is None else ~segment_start.to(torch.bool)
    conv = state.conv if keep is None else state.conv * keep[:, None, None]
    window = torch.cat([conv, conv_in.to(conv.dtype)[..., None]], dim=-1)  # [B, c, conv_size]
    conv_out = F.silu((window * conv_weight).sum(-1) + conv_bias)
    if fused_step is not None and state.ssm.dtype == torch.float32:
        starts = _segment_starts(segment_start, dt)
        y = fused_step(conv_out, dt, A, D, starts, state.ssm, sizes.groups)
        return y, SSMState(window[..., 1:], state.ssm)
    ssm_dtype = state.ssm.dtype
    previous = state.ssm if keep is None else state.ssm * keep[:, None, None, None]
    u, B, C = (t.to(ssm_dtype) for t in sizes.split_conv_output(conv_out))
    # Heads of a group read the same B and C: view the heads as [groups, heads_per_group].
    grouped = (sizes.groups, sizes.heads // sizes.groups)
    decay = torch.exp(dt * A)  # [B, heads]
    x = dt[..., None] * u  # [B, heads, head_dim]
    ssm = (decay[..., None, None] * previous).unflatten(1, grouped) + (
        x.unflatten(1, grouped)[..., None] * B[:, :, None, None, :]
    )  # [B, groups, heads_per_group, head_dim, state_dim]
    y = torch.einsum("bgkps,bgs->bgkp", ssm, C).flatten(1, 2) + D.to(ssm_dtype)[:, None] * u
    return y, SSMState(window[..., 1:], ssm.flatten(1, 2))


def fused_step_for(device) -> Optional[Callable[..., torch.Tensor]]:
    """The Triton decode step (:func:`apps.attamba.ssm_step_triton.ssm_step_`) on CUDA, else None."""
    return cuda_kernel(device, "apps.attamba.ssm_step_triton", "ssm_step_")


class KVSSM(nn.Module):
    """Mamba2 mixer with segment resets, mapping [B, n, dim_in] to [B, n, dim_out]."""

    def __init__(self, dim_in: int, dim_out: int, args: SSMArgs):
        super().__init__()
        self.args = args
        # A plain attribute so that tests and benchmarks can switch backends on one module.
        self.impl = args.impl
        self.hidden_dim = args.ssm_hidden_dim or dim_out
        check_hidden_dim(self.hidden_dim, args.ssm_heads)
        self.heads = args.ssm_heads
        self.head_dim = self.hidden_dim // args.ssm_heads
        self.bc_dim = args.n_groups * args.state_dim
        self.conv_channels = self.hidden_dim + 2 * self.bc_dim  # (u, B, C)

        self.in_proj = nn.Linear(dim_in, 2 * self.hidden_dim + 2 * self.bc_dim + self.heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_channels, args.conv_size))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_channels))
        self.dt_bias = nn.Parameter(torch.empty(self.heads)) if args.dt_bias else None
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.D = nn.Parameter(torch.empty(self.heads))
        # Decay rates, step sizes and the skip are not weights: decaying them toward 0 changes
        # the recurrence itself (as in Mamba2, lingua.optim leaves them out of weight decay).
        for parameter in (self.dt_bias, self.A_log, self.D):
            if parameter is not None:
                parameter._no_weight_decay = True
        self.norm = RMSNorm(self.hidden_dim)
        self.out_proj = nn.Linear(self.hidden_dim, dim_out, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba2-style initialisation (A, dt and D) with truncated-normal projections."""
        args = self.args
        for linear in (self.in_proj, self.out_proj):
            std = linear.in_features**-0.5
            nn.init.trunc_normal_(linear.weight, std=std, a=-3 * std, b=3 * std)
        # Depthwise conv: fan-in is the kernel width, as in nn.Conv1d's default.
        bound = args.conv_size**-0.5
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.uniform_(self.conv_bias, -bound, bound)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(args.A_init_min, args.A_init_max).log())
        if self.dt_bias is not None:
            log_dt = torch.empty_like(self.dt_bias).uniform_(math.log(args.dt_min), math.log(args.dt_max))
            dt = log_dt.exp().clamp(min=args.dt_init_floor)
            # Inverse softplus, so that softplus(dt_bias) starts at the sampled dt.
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        nn.init.ones_(self.D)
        self.norm.reset_parameters()

    def _split_projection(self, projected: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """in_proj output [..., width] -> z [..., hidden], conv inputs [..., conv_channels], dt
        [..., heads]; with ``dim=0``, the in_proj weight's rows that make each."""
        return projected.split([self.hidden_dim, self.conv_channels, self.heads], dim=dim)

    def _dt(self, dt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Raw dt [..., heads] -> softplus(dt + dt_bias) in ``dtype``."""
        dt = dt.to(dtype)
        if self.dt_bias is not None:
            dt = dt + self.dt_bias.to(dtype)
        return F.softplus(dt)

    def _gate(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z [..., hidden] -> RMSNorm(y * SiLU(z)), what out_proj reads."""
        return self.norm(y * F.silu(z))

    def _output(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z [..., hidden] -> out_proj(RMSNorm(y * SiLU(z))) [..., dim_out]."""
        return self.out_proj(self._gate(y, z))

    def _mix(self, x: torch.Tensor, segment_start: Optional[torch.Tensor], return_final_state: bool,
             max_segment_len: Optional[int] = None):
        """Shared body of forward and forward_with_state."""
        batch, n, _ = x.shape
        if segment_start is None:
            segment_start = torch.zeros(batch, n, dtype=torch.bool, device=x.device)
        backend = load_backend(self.impl, x.device)
        z, conv_in, dt = self._split_projection(self.in_proj(x))
        state_dtype = _state_dtype(x.dtype)
        A = -torch.exp(self.A_log.to(state_dtype))
        result = backend.conv_and_scan(conv_in, self.conv_weight, self.conv_bias, _ScanSizes.of(self),
                                       self._dt(dt, state_dtype), A, self.D.to(state_dtype), segment_start,
                                       return_final_state, max_segment_len)
        y, final_ssm = result if return_final_state else (result, None)
        out = self._output(y.flatten(-2), z)
        if not return_final_state:
            return out
        return out, SSMState(self._conv_tail(conv_in, segment_start), final_ssm.to(state_dtype))

    def forward(self, x: torch.Tensor, segment_start: Optional[torch.Tensor], max_segment_len: Optional[int] = None) -> torch.Tensor:
        """x [B, n, dim_in], segment_start [B, n] bool (None: one segment per row) -> [B, n, dim_out].

        ``max_segment_len``: a bound on every segment's length that the caller guarantees (for
        backends that can use it), or None."""
        return self._mix(x, segment_start, return_final_state=False, max_segment_len=max_segment_len)

    def forward_with_state(self, x: torch.Tensor, segment_start: Optional[torch.Tensor]) -> tuple[torch.Tensor, SSMState]:
        """:meth:`forward`, plus the decode state after the last token (for prefill)."""
        return self._mix(x, segment_start, return_final_state=True)

    def _conv_tail(self, conv_in: torch.Tensor, segment_start: Optional[torch.Tensor]) -> torch.Tensor:
        """The last conv_size - 1 conv inputs of each row's last segment, [B, conv_channels, k-1]."""
        batch, n, _ = conv_in.shape
        tail_len = self.args.conv_size - 1
        padded = F.pad(conv_in, (0, 0, tail_len, 0))  # [B, tail_len + n, c]; the zeros stand for t < 0
        tail = padded[:, n:]  # [B, tail_len, c], positions n - tail_len .. n - 1
        last_start = n - 1 - positions_in_segment(segment_start)[:, -1]  # [B]
        positions = torch.arange(n - tail_len, n, device=conv_in.device)
        tail = tail * (positions[None, :] >= last_start[:, None])[..., None]
        return tail.transpose(1, 2).contiguous()

    def init_state(self, batch: int, device, dtype) -> SSMState:
        """Zero decode state for ``batch`` rows; the SSM part in fp32 (fp64 for fp64)."""
        conv = torch.zeros(batch, self.conv_channels, self.args.conv_size - 1, device=device, dtype=dtype)
        ssm = torch.zeros(batch, self.heads, self.head_dim, self.args.state_dim, device=device, dtype=_state_dtype(dtype))
        return SSMState(conv, ssm)

    def step(
        self, x: torch.Tensor, state: SSMState, segment_start: Optional[torch.Tensor],
        fused_step: Optional[Callable[..., torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, SSMState]:
        """One token: x [B, dim_in] -> (y [B, dim_out], new state).

        Rows with ``segment_start`` [B] True start a new segment: their state is zeroed before
        the token is read, so the token sees no earlier conv inputs and no earlier SSM state.
        With ``fused_step`` (:func:`fused_step_for`) and an fp32 state, the recurrence is one
        Triton kernel that updates ``state.ssm`` in place (the new state holds that tensor).
        """
        z, conv_in, dt = self._split_projection(self.in_proj(x))
        ssm_dtype = state.ssm.dtype
        A = -torch.exp(self.A_log.to(ssm_dtype))
        y, state = _recurrent_step(
            conv_in, self._dt(dt, ssm_dtype), A, self.D, self.conv_weight, self.conv_bias, state, segment_start,
            _ScanSizes.of(self), fused_step,
        )
        return self._output(y.flatten(-2).to(x.dtype), z), state


def paired_forward(
    first: KVSSM,
    second: KVSSM,
    x_first: torch.Tensor,
    x_second: torch.Tensor,
    segment_start: Optional[torch.Tensor],
    max_segment_len: Optional[int] = None,
    segment_period: Optional[tuple[int, int]] = None,
    stacked: bool = False,
) -> Union[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(first(x_first, ...), second(x_second, ...))`` through one conv and one scan call; with
    ``stacked``, the two as one [2, ...] tensor (uncopied where the batched out_proj writes them so).

    An Attamba layer's K and V SSMs have the same shapes and reset at the same segment starts, so
    their conv channels and scan heads can run side by side: the conv over [u₁, u₂, B₁, B₂, C₁, C₂]
    with both weights, the scan over 2·heads heads (and 2·groups B/C groups, each still serving
    the heads of its own SSM). Same result as two calls, with half the kernel launches and half the
    host work per step: on the GPU a training step of the 60M model was host-bound, largely in
    these calls. Where the backend has them (:class:`Backend`), both SSMs' output gates run as one
    fused kernel each way and both out_proj as one batched matmul.
    """
    batch, n, _ = x_first.shape
    if segment_start is None:
        segment_start = torch.zeros(batch, n, dtype=torch.bool, device=x_first.device)
    backend = load_backend(first.impl, x_first.device)
    params = _PairParameters.of(first, second, _state_dtype(x_first.dtype))
    if x_first is x_second:
        pair = _PairInputs.shared(first, second, params, x_first)
    else:
        pair = _PairInputs.of(first, params, first.in_proj(x_first), second.in_proj(x_second))
    y = backend.conv_and_scan(pair.conv_in, params.conv_weight, params.conv_bias, _ScanSizes.of(first, copies=2),
                              pair.dt, params.A, params.D, segment_start, max_segment_len=max_segment_len,
                              segment_period=segment_period)
    y = y.flatten(-2)  # [b, n, 2·hidden]: the first SSM's heads, then the second's
    if backend.gated_norm is None:
        y_1, y_2 = y.chunk(2, dim=-1)
        outputs = first._output(y_1, pair.z[0]), second._output(y_2, pair.z[1])
        return torch.stack(outputs) if stacked else outputs
    # Both gates in one kernel each way, then both out_proj as one batched matmul each way.
    z = pair.z_side_by_side if pair.z_side_by_side is not None else torch.cat(pair.z, dim=-1)
    gated = backend.gated_norm(y, z, torch.stack([first.norm.weight, second.norm.weight]), first.norm.eps)
    out = _PairedLinear.apply(gated, first.out_proj.weight, second.out_proj.weight)
    return out if stacked else (out[0], out[1])


class _PairedLinear(torch.autograd.Function):
    """x [2, ..., H] -> [2, ..., O]: x[i] · W_iᵀ for both weights [O, H], one batched matmul each way.

    Autograd's own formula for a matmul with the stacked, transposed weights returns each weight's
    gradient transposed (xᵀ·dout), which the gradient accumulation then copies into the weight's
    layout, eagerly, two copies a layer each step; two separate linears instead make the compiled
    backward copy both input gradients into the [2, ..., H] the gates' backward reads. Here dW is
    doutᵀ·x, in the weights' layout, and dx comes out as one tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_1: torch.Tensor, weight_2: torch.Tensor) -> torch.Tensor:
        weight = torch.stack([weight_1, weight_2]).to(x.dtype)  # [2, O, H], kept for the backward
        ctx.save_for_backward(x, weight)
        ctx.weight_dtype = weight_1.dtype
        return torch.matmul(x.flatten(1, -2), weight.transpose(1, 2)).unflatten(1, x.shape[1:-1])

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        dout_rows = dout.flatten(1, -2)  # [2, M, O]
        dx = torch.matmul(dout_rows, weight.to(dout.dtype)).view(x.shape).to(x.dtype)
        dweight = torch.matmul(dout_rows.transpose(1, 2), x.flatten(1, -2).to(dout.dtype)).to(ctx.weight_dtype)
        return dx, dweight[0], dweight[1]


@dataclass
class _PairParameters:
    """Two KV-SSMs' conv taps, decay rates, skips and dt biases side by side, in the order of
    the paired conv channels and scan heads; A, D and the dt bias in the scan's dtype."""

    conv_weight: torch.Tensor
    conv_bias: torch.Tensor
    A: torch.Tensor
    D: torch.Tensor
    dt_bias: Optional[torch.Tensor]

    @staticmethod
    def of(first: KVSSM, second: KVSSM, dtype: torch.dtype) -> "_PairParameters":
        _check_pair(first, second)
        return _PairParameters(
            conv_weight=_side_by_side(first, first.conv_weight, second.conv_weight, 0),
            conv_bias=_side_by_side(first, first.conv_bias, second.conv_bias, 0),
            A=-torch.exp(torch.cat([first.A_log, second.A_log]).to(dtype)),
            D=torch.cat([first.D, second.D]).to(dtype),
            dt_bias=None if first.dt_bias is None else torch.cat([first.dt_bias, second.dt_bias]).to(dtype),
        )

    def dt(self, dt: torch.Tensor) -> torch.Tensor:
        """Both SSMs' raw dt side by side [..., 2·heads] -> softplus(dt + dt_bias) in A's dtype."""
        dt = dt.to(self.A.dtype)
        return F.softplus(dt if self.dt_bias is None else dt + self.dt_bias)


@dataclass
class _PairInputs:
    """What the conv and scan of two KV-SSMs side by side read, plus each SSM's gate z."""

    z: tuple[torch.Tensor, torch.Tensor]
    conv_in: torch.Tensor
    """[..., 2·channels] in the side-by-side order [u₁, u₂, B₁, B₂, C₁, C₂]."""
    dt: torch.Tensor
    """[..., 2·heads], after the softplus."""
    z_side_by_side: Optional[torch.Tensor] = None
    """z₁ and z₂ as one tensor [..., 2·hidden], where one matmul wrote them so."""

    @staticmethod
    def of(first: KVSSM, params: _PairParameters, projected_first: torch.Tensor, projected_second: torch.Tensor) -> "_PairInputs":
        """Both in_proj outputs, split and side by side."""
        z_1, conv_in_1, dt_1 = first._split_projection(projected_first)
        z_2, conv_in_2, dt_2 = first._split_projection(projected_second)
        dt = params.dt(torch.cat([dt_1, dt_2], dim=-1))
        return _PairInputs(z=(z_1, z_2), conv_in=_side_by_side(first, conv_in_1, conv_in_2, -1), dt=dt)

    @staticmethod
    def shared(first: KVSSM, second: KVSSM, params: _PairParameters, x: torch.Tensor) -> "_PairInputs":
        """Both SSMs reading the same x (no kv_proj): both in_proj weights as three matmuls, writing
        the conv input already side by side (its rows ordered so: no copy into the paired
        layout), z₁ and z₂ side by side, and dt₁, dt₂. Three rather than one, because the gradient
        of one output split in parts is a concatenation: the conv's and the gates' input gradients,
        each a pass over thousands of channels, would be copied into it in every backward."""
        z_1, conv_1, dt_1 = first._split_projection(first.in_proj.weight, dim=0)
        z_2, conv_2, dt_2 = first._split_projection(second.in_proj.weight, dim=0)
        conv_in = F.linear(x, _side_by_side(first, conv_1, conv_2, 0))
        z = F.linear(x, torch.cat([z_1, z_2]))
        dt = F.linear(x, torch.cat([dt_1, dt_2]))
        return _PairInputs(z=tuple(z.chunk(2, dim=-1)), conv_in=conv_in, dt=params.dt(dt), z_side_by_side=z)


def _side_by_side(first: KVSSM, a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """(u, B, C) channels of two KV-SSMs -> [u_a, u_b, B_a, B_b, C_a, C_b] along ``dim``."""
    widths = [first.hidden_dim, first.bc_dim, first.bc_dim]
    return torch.cat([part for pair in zip(a.split(widths, dim), b.split(widths, dim)) for part in pair], dim)


def paired_state(first: KVSSM, state_1: SSMState, state_2: SSMState) -> SSMState:
    """Two KV-SSMs' decode states as the one state :func:`paired_step` reads and returns."""
    return SSMState(_side_by_side(first, state_1.conv, state_2.conv, 1), torch.cat([state_1.ssm, state_2.ssm], dim=1))


def init_paired_state(first: KVSSM, batch: int, device, dtype) -> SSMState:
    """Zero decode state of two KV-SSMs stepped together (twice the channels and heads of one)."""
    single = first.init_state(batch, device, dtype)
    return SSMState(single.conv.repeat(1, 2, 1), single.ssm.repeat(1, 2, 1, 1))


@dataclass
class PairedStepWeights:
    """Two KV-SSMs' parameters as decode steps read them, prepared once (a snapshot): side by
    side (:class:`_PairParameters`), and both out_proj as one batched matmul. It spares every step
    the concatenations, which are kernels of their own. ``fused_step``: the Triton recurrence
    (:mod:`apps.attamba.ssm_step_triton`) when the parameters live on CUDA, else None."""

    first: KVSSM
    second: KVSSM
    params: _PairParameters
    out_proj: PairedLinear
    norm_weight: torch.Tensor
    """[2, 1, hidden]: both gates' RMSNorm weights, so one reduction normalises both."""
    fused_step: Optional[Callable[..., torch.Tensor]] = None
    fused_conv: Optional[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = None
    """The Triton conv and dt (:func:`apps.attamba.ssm_step_triton.conv_step_`) that feed
    ``fused_step``, on CUDA; else None."""

    @staticmethod
    @torch.no_grad()
    def of(first: KVSSM, second: KVSSM, dtype: torch.dtype) -> "PairedStepWeights":
        if first.norm.eps != second.norm.eps:
            raise ValueError("a KV-SSM pair needs gate norms of the same eps")
        device = first.A_log.device
        return PairedStepWeights(
            first, second, _PairParameters.of(first, second, dtype), PairedLinear(first.out_proj, second.out_proj),
            torch.stack([first.norm.weight, second.norm.weight])[:, None], fused_step_for(device),
            cuda_kernel(device, "apps.attamba.ssm_step_triton", "conv_step_"),
        )

    def gate(self, y: torch.Tensor, z_1: torch.Tensor, z_2: torch.Tensor) -> torch.Tensor:
        """Both SSMs' ``_gate`` at once: y [2, B, hidden] and their z [B, hidden] -> [2, B, hidden]."""
        return rms_norm(y * F.silu(torch.stack([z_1, z_2])), self.norm_weight, self.first.norm.eps)


def paired_step(
    weights: PairedStepWeights,
    projected_first: torch.Tensor,
    projected_second: torch.Tensor,
    state: SSMState,
    segment_start: Optional[torch.Tensor],
    in_place: bool = False,
    positions: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, SSMState]:
    """``first.step`` and ``second.step`` for one token, as one recurrence over both (decode's
    counterpart of :func:`paired_forward`): half the small kernels of two steps, which dominate
    a decode step. Takes both SSMs' in_proj outputs [B, width] (a cache computes them with other
    matmuls that read the same input); ``state`` comes from :func:`init_paired_state` or
    :func:`paired_state`. -> (first's y [B, dim_out], second's y, the new paired state).

    ``in_place``: overwrite ``state`` with the new state (and return it); then the recurrence
    runs as one Triton kernel where ``weights.fused_step`` is set, and the conv and dt before it
    as another where ``weights.fused_conv`` is set too.

    ``positions`` [B]: ``segment_start`` is then a table [T] of whether each position starts a
    segment, read at these positions (inside the kernels, where they run; see
    :func:`apps.attamba.ssm_step_triton.ssm_step_`)."""
    first, params = weights.first, weights.params
    sizes = _ScanSizes.of(first, copies=2)
    if in_place and weights.fused_conv is not None and weights.fused_step is not None and state.ssm.dtype == torch.float32:
        if positions is None:
            segment_start = _segment_starts(segment_start, projected_first)
        conv_out, dt = weights.fused_conv(
            projected_first, projected_second, params.conv_weight, params.conv_bias, params.dt_bias, segment_start,
            state.conv, first.hidden_dim, first.bc_dim, first.heads, params.A.dtype, positions=positions,
        )
        y = weights.fused_step(conv_out, dt, params.A, params.D, segment_start, state.ssm, sizes.groups, positions=positions)
        z = (first._split_projection(projected_first)[0], first._split_projection(projected_second)[0])
        new_state = state
    else:
        if positions is not None:
            segment_start = segment_start[positions]
        pair = _PairInputs.of(first, params, projected_first, projected_second)
        y, new_state = _recurrent_step(
            pair.conv_in, pair.dt, params.A, params.D, params.conv_weight, params.conv_bias, state, segment_start,
            sizes, fused_step=weights.fused_step if in_place else None,
        )
        z = pair.z
        if in_place:
            state.copy_(new_state)
            new_state = state
    # [B, 2·heads, head_dim] -> [2, B, hidden]: the first SSM's heads come first.
    y = y.to(projected_first.dtype).unflatten(1, (2, -1)).flatten(2).transpose(0, 1)
    out = weights.out_proj.stacked(weights.gate(y, *z))
    return out[0], out[1], new_state


def _segment_starts(segment_start: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """segment_start [B] as bool, all False where None (no row starts a segment)."""
    if segment_start is None:
        return torch.zeros(like.shape[0], dtype=torch.bool, device=like.device)
    return segment_start.to(torch.bool)


def _check_pair(first: KVSSM, second: KVSSM) -> None:
    if (first.impl != second.impl or first.in_proj.weight.shape != second.in_proj.weight.shape or first.args != second.args
            or first.norm.eps != second.norm.eps):
        raise ValueError("a KV-SSM pair needs two KV-SSMs of the same shapes, settings and backend")
