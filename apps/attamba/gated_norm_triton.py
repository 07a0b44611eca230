"""Triton kernels (forward and backward) for the KV-SSM's output gate: RMSNorm(y * SiLU(z)).

Same result as ``lingua.transformer.rms_norm(y * F.silu(z), weight, eps)`` (DESIGN.md, "KV-SSM":
what out_proj reads), for G gates side by side — an Attamba layer's K and V SSMs, G = 2:

    y, z [..., G·H] -> out [G, ..., H],  out[g] = RMSNorm_g(y[..., g] * SiLU(z[..., g]))

One kernel each way. Left to torch.compile, the gates took several fused kernels a layer of the
60M model, forward and backward, each reading and writing [tokens, G·H] again, and the gradient of
z was copied into one with dt's.
Here the forward reads y and z once and writes the normalised output and one float32 scale per
row; the backward reads y, z and the output gradient once, recomputes the rest, and writes the
gradients of y and z (each as one [.., G·H] tensor, as their producers wrote them) and per-span
sums of the weight gradient. The product y * SiLU(z) is never rounded to the storage dtype.

The output comes group-major, [G, ..., H], so that both out_proj can run as one batched matmul
and its input gradient comes back in the layout the backward reads.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from apps.attamba.ssd_triton import _INTERPRETED
from apps.attamba.ssd_triton_conv import _silu_grad

BLOCK_M = 2
"""Rows per tile (each row is one token's H channels of one gate). At a 60M layer's two gates (16k
tokens, H = 512, bf16, H100): forward 36.3 µs, backward 69.2 µs with 2 rows on 4 warps, against
36.9 / 81.0 with 4 rows and 37.1 / 90.3 with 8 (benchmarks/tune_ssm_kernels.py, fourteenth
session)."""
NUM_WARPS = 4
SPAN = 64
"""Rows of one backward program: its weight-gradient sums cover them (32 or 128 timed the same)."""


@triton.jit
def _gate_tile(y_ptr, z_ptr, rows, cols, g, M, H, stride_y, stride_z):
    """y and z [BLOCK_M, BLOCK_H] of gate g at ``rows`` (fp32, zero outside), SiLU(z)'s sigmoid, the mask."""
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    col = g * H + cols[None, :]
    y = tl.load(y_ptr + r64 * stride_y + col, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + r64 * stride_z + col, mask=mask, other=0.0).to(tl.float32)
    return y, z, tl.sigmoid(z), mask


@triton.jit
def _gated_norm_fwd_kernel(
    y_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr,
    M, H, stride_y, stride_z, eps,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One tile of rows of gate g: out [G, M, H] (dense) and 1/RMS per row, rstd [G, M]."""
    g = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    y, z, sig, mask = _gate_tile(y_ptr, z_ptr, rows, cols, g, M, H, stride_y, stride_z)
    gated = y * z * sig
    rstd = tl.rsqrt(tl.sum(gated * gated, axis=1) / H + eps)
    w = tl.load(w_ptr + g * H + cols, mask=cols < H, other=0.0).to(tl.float32)
    out = gated * rstd[:, None] * w[None, :]
    out_offs = (g * M + rows.to(tl.int64)[:, None]) * H + cols[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + g * M + rows, rstd, mask=rows < M)


@triton.jit
def _gated_norm_bwd_kernel(
    y_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr, dw_part_ptr,
    M, H, stride_y, stride_z, stride_dout_g, stride_dout_m,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, SPAN: tl.constexpr,
):
    """SPAN rows of gate g: dy and dz ([M, G·H], dense) and this span's sum of the weight
    gradient, dw_part [spans, G, H].

    With n = gated · rstd the normalised rows and dn = dout · w, the gradient of gated is
    rstd · (dn - n · mean(dn · n)) (the mean over the row's H channels)."""
    span, g = tl.program_id(0), tl.program_id(1)
    G = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_H)
    w = tl.load(w_ptr + g * H + cols, mask=cols < H, other=0.0).to(tl.float32)
    # Summed elementwise tile by tile and over rows once at the end: a reduction across rows in
    # every tile crosses warps.
    dw = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for first in range(span * SPAN, tl.minimum(span * SPAN + SPAN, M), BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        y, z, sig, mask = _gate_tile(y_ptr, z_ptr, rows, cols, g, M, H, stride_y, stride_z)
        r64 = rows.to(tl.int64)[:, None]
        dout = tl.load(dout_ptr + g * stride_dout_g + r64 * stride_dout_m + cols[None, :], mask=mask, other=0.0)
        dout = dout.to(tl.float32)
        rstd = tl.load(rstd_ptr + g * M + rows, mask=rows < M, other=0.0)
        act = z * sig
        normed = y * act * rstd[:, None]
        dw += dout * normed
        dnormed = dout * w[None, :]
        dgated = rstd[:, None] * (dnormed - normed * (tl.sum(dnormed * normed, axis=1) / H)[:, None])
        grad_offs = r64 * (G * H) + g * H + cols[None, :]
        tl.store(dy_ptr + grad_offs, (dgated * act).to(dy_ptr.dtype.element_ty), mask=mask)
        dz = _silu_grad(dgated * y, z)
        tl.store(dz_ptr + grad_offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + (span * G + g) * H + cols, tl.sum(dw, axis=0), mask=cols < H)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., W] -> [M, W] with a dense last dim (a view where the strides allow)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, t.shape[-1])


@torch.library.custom_op("attamba::gated_rms_norm_fwd", mutates_args=())
def _gated_norm_forward(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """y, z [M, G·H], weight [G, H] -> out [G, M, H] in y's dtype, rstd [G, M] float32."""
    G, H = weight.shape
    M = y.shape[0]
    out = torch.empty((G, M, H), device=y.device, dtype=y.dtype)
    rstd = torch.empty((G, M), device=y.device, dtype=torch.float32)
    _gated_norm_fwd_kernel[(triton.cdiv(M, BLOCK_M), G)](
        y, z, weight.contiguous(), out, rstd, M, H, y.stride(0), z.stride(0), eps,
        BLOCK_M=BLOCK_M, BLOCK_H=triton.next_power_of_2(H), num_warps=NUM_WARPS,
    )
    return out, rstd


@_gated_norm_forward.register_fake
def _gated_norm_forward_fake(y, z, weight, eps):
    G, H = weight.shape
    return y.new_empty((G, y.shape[0], H)), y.new_empty((G, y.shape[0]), dtype=torch.float32)


@torch.library.custom_op("attamba::gated_rms_norm_bwd", mutates_args=())
def _gated_norm_backward(
    dout: torch.Tensor, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dy, dz (dense, shaped and typed like y and z), and dweight's float32 partial sums
    [spans, G, H] (one per SPAN rows), which the autograd formula sums and casts to the weight's
    dtype (compiled, in one fused reduction)."""
    G, H = weight.shape
    M = y.shape[0]
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dy = torch.empty((M, G * H), device=y.device, dtype=y.dtype)
    dz = torch.empty((M, G * H), device=z.device, dtype=z.dtype)
    spans = triton.cdiv(M, SPAN)
    dw_part = torch.empty((spans, G, H), device=y.device, dtype=torch.float32)
    if SPAN % BLOCK_M:
        raise ValueError(f"SPAN ({SPAN}) must be a multiple of BLOCK_M ({BLOCK_M})")
    _gated_norm_bwd_kernel[(spans, G)](
        y, z, weight.contiguous(), rstd, dout, dy, dz, dw_part,
        M, H, y.stride(0), z.stride(0), dout.stride(0), dout.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_H=triton.next_power_of_2(H), SPAN=SPAN, num_warps=NUM_WARPS,
    )
    return dy, dz, dw_part


@_gated_norm_backward.register_fake
def _gated_norm_backward_fake(dout, y, z, weight, rstd):
    spans = triton.cdiv(y.shape[0], SPAN)
    return y.new_empty(y.shape), z.new_empty(z.shape), weight.new_empty((spans, *weight.shape), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    y, z, weight, _ = inputs
    ctx.save_for_backward(y, z, weight, output[1])


def _autograd(ctx, dout, _drstd):
    y, z, weight, rstd = ctx.saved_tensors
    dy, dz, dw_part = _gated_norm_backward(dout, y, z, weight, rstd)
    return dy, dz, dw_part.sum(0).to(weight.dtype), None


torch.library.register_autograd("attamba::gated_rms_norm_fwd", _autograd, setup_context=_setup_context)


def gated_rms_norm_triton(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(y * SiLU(z)) for G gates side by side: y, z [..., G·H], weight [G, H] -> [G, ..., H]
    in y's dtype (see the module's docstring)."""
    if weight.dim() != 2 or y.shape != z.shape or y.shape[-1] != weight.numel():
        raise ValueError(
            f"expected y and z [..., G·H] and weight [G, H]; got y {tuple(y.shape)}, z {tuple(z.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if y.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError("gated_rms_norm_triton needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    out, _ = _gated_norm_forward(_rows(y), _rows(z), weight, eps)
    return out.unflatten(1, y.shape[:-1])

