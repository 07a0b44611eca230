"""Optional KV-SSM backend on the ``mamba-ssm`` and ``causal-conv1d`` CUDA kernels.

Same signatures and semantics as :mod:`apps.attamba.ssd_reference`. Segments are handed to the
kernels as ``seq_idx`` (segment ids, int32 [b, n]): both kernels treat a change of id as a fresh
sequence, which is exactly our reset at a segment start. This is how the seed's code ran the
KV-SSMs; it is kept for comparison (install with ``pip install -e .[fast]``).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from apps.attamba.ssd_reference import with_first_start

MAMBA_CHUNK_SIZE = 64


def _segment_ids(segment_start: torch.Tensor) -> torch.Tensor:
    """segment_start [b, n] bool -> int32 segment ids [b, n] counting from 0 in each row."""
    return (with_first_start(segment_start).to(torch.int32).cumsum(dim=1) - 1).to(torch.int32).contiguous()


def _import_error(package: str, error: ImportError) -> ImportError:
    return ImportError(
        f"ssm impl 'mamba_ssm' needs the '{package}' package (CUDA only): pip install -e .[fast], "
        f"or set ssm impl to 'torch' or 'triton' ({error})"
    )


def ssd_segmented_mamba(
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
    """mamba-ssm's chunked scan with ``seq_idx``; shapes as :func:`ssd_reference.ssd_reference`."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as error:
        raise _import_error("mamba-ssm", error) from error
    result = mamba_chunk_scan_combined(
        u.contiguous(),
        dt.contiguous(),
        A,
        B.contiguous(),
        C.contiguous(),
        MAMBA_CHUNK_SIZE,
        D=D,
        seq_idx=_segment_ids(segment_start),
        dt_softplus=False,
        return_final_states=return_final_state,
    )
    if return_final_state:
        y, final_state = result
        return y.to(u.dtype), final_state
    return result.to(u.dtype)


def causal_conv_segmented_mamba(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    segment_start: torch.Tensor,
) -> torch.Tensor:
    """causal-conv1d's depthwise conv with ``seq_idx``; shapes as ``causal_conv_reference``."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError as error:
        raise _import_error("causal-conv1d", error) from error
    # The kernel wants [b, c, n] with channels contiguous when seq_idx is given: a transpose of
    # a contiguous [b, n, c] is exactly that layout.
    out = causal_conv1d_fn(
        x.contiguous().transpose(1, 2),
        weight.to(x.dtype),
        None if bias is None else bias.to(x.dtype),
        seq_idx=_segment_ids(segment_start),
        activation=None,
    )
    return out.transpose(1, 2)
