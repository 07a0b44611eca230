"""Triton kernels (forward and backward) for what an Attamba layer does between its projections and
its attention: rotate the queries, add the SSMs' residual, rotate the keys.

    q_rot = RoPE(q),  k_rot = RoPE(residual + kv[0]),  v = residual + kv[1]

with q, residual [B, n, E] and kv [2, B, n, E] (both SSMs' outputs as their batched out_proj
writes them). The same as ``lingua.transformer.apply_rotary_token_major`` on ``combine``'s sums,
rounding where the unfused path rounds (the sums in their promoted dtype, the rotation in fp32),
then cast to the queries' dtype as the attention would.

Why a kernel: left to torch.compile in the whole-model graph, the keys' rotation took two kernels
a layer (the real and imaginary halves written apart, then interleaved), the residual's RMSNorm was
recomputed in each of them, and the backward's gradient of kv (the stack that the batched
out_proj's backward reads) loaded both halves' inputs for every element: ~150 µs a layer of
pointwise kernels around a 60M layer's attention. Here one kernel each way reads every input once
and writes every output once (~35 µs a layer each way on an H200, near its memory bandwidth;
docs/benchmarks.md, twenty-third session); the backward writes the gradient of kv already stacked
and the residual's (the keys' and values' gradients summed) beside it.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from apps.attamba.ssd_triton import _INTERPRETED

BLOCK_T = 16
BLOCK_E = 128
NUM_WARPS = 4
"""Tokens and channels of a tile, and warps (a first choice, not tuned)."""


@triton.jit
def _pairs(x, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """[T, E] -> its even and odd columns, [T, E/2] each."""
    return tl.split(tl.reshape(x, (BLOCK_T, BLOCK_E // 2, 2)))


@triton.jit
def _interleaved(even, odd, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Even and odd columns [T, E/2] -> [T, E]."""
    return tl.reshape(tl.join(even, odd), (BLOCK_T, BLOCK_E))


@triton.jit
def _rotated(x, cos, sin, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """x [T, E] (fp32) with its (even, odd) pairs rotated by the angles cos, sin [T, E/2]."""
    real, imag = _pairs(x, BLOCK_T, BLOCK_E)
    return _interleaved(real * cos - imag * sin, real * sin + imag * cos, BLOCK_T, BLOCK_E)


@triton.jit
def _rotated_back(g, cos, sin, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """The gradient w.r.t. x of :func:`_rotated`, given g, the gradient w.r.t. its output."""
    g_real, g_imag = _pairs(g, BLOCK_T, BLOCK_E)
    return _interleaved(g_real * cos + g_imag * sin, g_imag * cos - g_real * sin, BLOCK_T, BLOCK_E)


@triton.jit
def _program_tile(cos_ptr, sin_ptr, n_rows, n, e, stride_cos, HALF_D: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_E: tl.constexpr):
    """This program's [T, E] tile of a dense [n_rows, e] tensor (token block, channel block):
    its offsets and mask, and its angles cos, sin [T, E/2] in fp32 from the [n, d/2] tables (row
    r is position r mod n; column pair j takes angle j mod d/2, every head rotating alike)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    pairs = tl.program_id(1) * (BLOCK_E // 2) + tl.arange(0, BLOCK_E // 2)
    offs = rows.to(tl.int64)[:, None] * e + cols[None, :]
    mask = (rows < n_rows)[:, None] & (cols < e)[None, :]
    angle_offs = (rows % n)[:, None] * stride_cos + (pairs % HALF_D)[None, :]
    angle_mask = (rows < n_rows)[:, None] & (pairs < e // 2)[None, :]
    cos = tl.load(cos_ptr + angle_offs, mask=angle_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + angle_offs, mask=angle_mask, other=0.0).to(tl.float32)
    return offs, mask, cos, sin


@triton.jit
def _rotate_qkv_fwd_kernel(
    q_ptr, kv_ptr, res_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, v_out_ptr,
    n_rows, n, e, stride_cos,
    HALF_D: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROUND_SUM: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """ROUND_SUM: the sums residual + kv are rounded to kv's dtype (the unfused sum's dtype when
    residual and kv share one below fp32; under autocast the residual is fp32, and so is the sum)."""
    offs, mask, cos, sin = _program_tile(cos_ptr, sin_ptr, n_rows, n, e, stride_cos, HALF_D, BLOCK_T, BLOCK_E)
    dtype = q_out_ptr.dtype.element_ty
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(q_out_ptr + offs, _rotated(q, cos, sin, BLOCK_T, BLOCK_E).to(dtype), mask=mask)
    k = tl.load(kv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(kv_ptr + n_rows.to(tl.int64) * e + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        k += residual
        v += residual
        if ROUND_SUM:
            k = k.to(kv_ptr.dtype.element_ty).to(tl.float32)
            v = v.to(kv_ptr.dtype.element_ty).to(tl.float32)
    tl.store(k_out_ptr + offs, _rotated(k, cos, sin, BLOCK_T, BLOCK_E).to(dtype), mask=mask)
    tl.store(v_out_ptr + offs, v.to(dtype), mask=mask)


@triton.jit
def _rotate_qkv_bwd_kernel(
    dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dq_in_ptr, dkv_ptr, dres_ptr,
    n_rows, n, e, stride_cos,
    HALF_D: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROUND_SUM: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """The gradients as the unfused path rounds them: the keys' (w.r.t. the sum) in the sum's
    dtype (ROUND_SUM as in the forward), then summed with the values' for the residual."""
    offs, mask, cos, sin = _program_tile(cos_ptr, sin_ptr, n_rows, n, e, stride_cos, HALF_D, BLOCK_T, BLOCK_E)
    dq = tl.load(dq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dq_in_ptr + offs, _rotated_back(dq, cos, sin, BLOCK_T, BLOCK_E).to(dq_in_ptr.dtype.element_ty), mask=mask)
    dk = tl.load(dk_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dk = _rotated_back(dk, cos, sin, BLOCK_T, BLOCK_E)
    dv = tl.load(dv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    kv_dtype = dkv_ptr.dtype.element_ty
    tl.store(dkv_ptr + offs, dk.to(kv_dtype), mask=mask)
    tl.store(dkv_ptr + n_rows.to(tl.int64) * e + offs, dv.to(kv_dtype), mask=mask)
    if HAS_RESIDUAL:
        if ROUND_SUM:
            dk = dk.to(kv_dtype).to(tl.float32)
        tl.store(dres_ptr + offs, (dk + dv).to(dres_ptr.dtype.element_ty), mask=mask)


def _grid(n_rows: int, e: int) -> tuple[int, int]:
    return triton.cdiv(n_rows, BLOCK_T), triton.cdiv(e, BLOCK_E)


def _round_sum(kv_dtype: torch.dtype, residual_dtype: Optional[torch.dtype]) -> bool:
    """Whether residual + kv is rounded below fp32 (see the kernels): its promoted dtype is."""
    return residual_dtype is not None and torch.promote_types(kv_dtype, residual_dtype) in (torch.bfloat16, torch.float16)


@torch.library.custom_op("attamba::rotate_qkv_fwd", mutates_args=())
def _rotate_qkv_forward(
    q: torch.Tensor, kv: torch.Tensor, residual: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> rotated q, rotated keys, values; each [B, n, E] dense, in q's dtype."""
    b, n, e = q.shape
    q, kv = q.contiguous(), kv.contiguous()
    residual = residual.contiguous() if residual is not None else None
    q_out, k_out, v_out = (torch.empty_like(q) for _ in range(3))
    _rotate_qkv_fwd_kernel[_grid(b * n, e)](
        q, kv, residual if residual is not None else q, cos, sin, q_out, k_out, v_out,
        b * n, n, e, cos.stride(0),
        HALF_D=cos.shape[1], HAS_RESIDUAL=residual is not None,
        ROUND_SUM=_round_sum(kv.dtype, None if residual is None else residual.dtype),
        BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, num_warps=NUM_WARPS,
    )
    return q_out, k_out, v_out


@_rotate_qkv_forward.register_fake
def _rotate_qkv_forward_fake(q, kv, residual, cos, sin):
    return tuple(q.new_empty(q.shape) for _ in range(3))


@torch.library.custom_op("attamba::rotate_qkv_bwd", mutates_args=())
def _rotate_qkv_backward(
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    kv_dtype: torch.dtype, residual_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> gradients of q [B, n, E] (dq's dtype), of kv [2, B, n, E] and of the residual [B, n, E]
    in their dtypes (the residual's empty without one)."""
    b, n, e = dq.shape
    dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    dq_in = torch.empty_like(dq)
    dkv = dq.new_empty((2, b, n, e), dtype=kv_dtype)
    has_residual = residual_dtype is not None
    dres = dq.new_empty((b, n, e), dtype=residual_dtype) if has_residual else dq.new_empty(0)
    _rotate_qkv_bwd_kernel[_grid(b * n, e)](
        dq, dk, dv, cos, sin, dq_in, dkv, dres if has_residual else dq_in,
        b * n, n, e, cos.stride(0),
        HALF_D=cos.shape[1], HAS_RESIDUAL=has_residual, ROUND_SUM=_round_sum(kv_dtype, residual_dtype),
        BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, num_warps=NUM_WARPS,
    )
    return dq_in, dkv, dres


@_rotate_qkv_backward.register_fake
def _rotate_qkv_backward_fake(dq, dk, dv, cos, sin, kv_dtype, residual_dtype):
    b, n, e = dq.shape
    dres = dq.new_empty((b, n, e), dtype=residual_dtype) if residual_dtype is not None else dq.new_empty(0)
    return dq.new_empty((b, n, e)), dq.new_empty((2, b, n, e), dtype=kv_dtype), dres


def _setup_context(ctx, inputs, output) -> None:
    _, kv, residual, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.dtypes = kv.dtype, None if residual is None else residual.dtype


def _autograd(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    dq_in, dkv, dres = _rotate_qkv_backward(dq, dk, dv, cos, sin, *ctx.dtypes)
    return dq_in, dkv, dres if ctx.dtypes[1] is not None else None, None, None


torch.library.register_autograd("attamba::rotate_qkv_fwd", _autograd, setup_context=_setup_context)


def rotate_qkv_triton(
    q: torch.Tensor, kv: torch.Tensor, residual: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(RoPE(q), RoPE(residual + kv[0]), residual + kv[1]) for q, residual [B, n, E] and kv [2, B,
    n, E], angles cos, sin [n, d/2] of positions 0..n-1 (d the head dim, E a multiple of it); no
    residual when it is None. Returns three dense [B, n, E] tensors in q's dtype: the dtype the
    attention computes in, which casts keys and values to it (under autocast the residual is
    fp32, and so are the unfused keys and values until then)."""
    if q.dim() != 3 or kv.shape != (2, *q.shape) or (residual is not None and residual.shape != q.shape):
        shapes = f"q {tuple(q.shape)}, kv {tuple(kv.shape)}, residual {None if residual is None else tuple(residual.shape)}"
        raise ValueError(f"expected q and residual [B, n, E] and kv [2, B, n, E]; got {shapes}")
    n, e = q.shape[1], q.shape[2]
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != n or e % (2 * cos.shape[1]):
        raise ValueError(f"cos and sin must be [n, d/2] with n={n} and E={e} a multiple of d; got {tuple(cos.shape)}, {tuple(sin.shape)}")
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    if q.dtype not in dtypes or kv.dtype not in dtypes or (residual is not None and residual.dtype not in dtypes):
        raise ValueError(f"q, kv and residual must be float32, bfloat16 or float16; got {q.dtype}, {kv.dtype}, "
                         f"{None if residual is None else residual.dtype}")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError("rotate_qkv_triton needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    if cos.stride(1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return _rotate_qkv_forward(q, kv, residual, cos, sin)
