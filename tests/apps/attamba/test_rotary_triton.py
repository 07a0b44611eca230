"""The fused rotation of an Attamba layer's queries and keys (with the SSMs' residual) against the
unfused PyTorch path it replaces, forward and backward, and inside the model.

Without CUDA the kernels run under the Triton interpreter on CPU tensors; with CUDA compiled, and
the ``gpu`` test adds the 60M model's shape in bf16.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import DEVICE, allow_one_element_index_in_interpreter, requires_cuda

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from apps.attamba import model as attamba_model  # noqa: E402
from apps.attamba import rotary_triton  # noqa: E402
from apps.attamba.rotary_triton import rotate_qkv_triton  # noqa: E402
from lingua.transformer import RotaryEmbedding, apply_rotary_token_major  # noqa: E402

if rotary_triton._INTERPRETED:
    allow_one_element_index_in_interpreter()


def rotate_qkv_unfused(q, kv, residual, cos, sin, head_dim):
    """What the model computes without the kernels: RoPE(q), RoPE(residual + kv[0]), residual + kv[1],
    then the keys and values cast to the queries' dtype as the attention casts them."""
    def rotated(x):
        return apply_rotary_token_major(x.unflatten(-1, (-1, head_dim)), cos, sin).flatten(-2)

    k, v = (kv[0], kv[1]) if residual is None else (residual + kv[0], residual + kv[1])
    return rotated(q), rotated(k).to(q.dtype), v.to(q.dtype)


def qkv_inputs(b, n, heads, head_dim, dtype, residual=True, seed=0, residual_dtype=None):
    """q, kv, residual (in ``residual_dtype``, default ``dtype``), and the angles of n positions."""
    generator = torch.Generator().manual_seed(seed)
    e = heads * head_dim
    q, kv = torch.randn(b, n, e, generator=generator), torch.randn(2, b, n, e, generator=generator)
    res = torch.randn(b, n, e, generator=generator).to(DEVICE, residual_dtype or dtype) if residual else None
    cos, sin = RotaryEmbedding(head_dim, 10000.0)(torch.arange(n))
    return [q.to(DEVICE, dtype), kv.to(DEVICE, dtype), res], cos.to(DEVICE), sin.to(DEVICE)


def fused_and_unfused(b, n, heads, head_dim, dtype, residual, residual_dtype=None):
    """Outputs and input gradients of both paths on the same inputs and output gradients."""
    (q, kv, res), cos, sin = qkv_inputs(b, n, heads, head_dim, dtype, residual, residual_dtype=residual_dtype)
    generator = torch.Generator().manual_seed(5)
    grads = [torch.randn(q.shape, generator=generator).to(DEVICE, dtype) for _ in range(3)]
    results = []
    for rotate in (rotate_qkv_triton, lambda *a: rotate_qkv_unfused(*a, head_dim)):
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (q, kv, res)]
        outs = rotate(*leaves, cos, sin)
        torch.autograd.backward(outs, grads)
        results.append(([o.detach() for o in outs], [leaf.grad for leaf in leaves if leaf is not None]))
    return results


@pytest.mark.parametrize("residual", [True, False])
def test_fused_rotation_equals_the_unfused_path(residual):
    # 2 x 11 rows (a partial 16-row tile), 3 heads of 8 (a partial 128-channel tile).
    (outs, grads), (outs_ref, grads_ref) = fused_and_unfused(2, 11, 3, 8, torch.float32, residual)
    for name, got, want in zip(("q", "k", "v", "dq", "dkv", "dresidual"), outs + grads, outs_ref + grads_ref):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("residual_dtype", [torch.float16, torch.float32], ids=["fp16", "autocast"])
def test_fused_rotation_rounds_as_the_unfused_path(residual_dtype):
    # Half precision throughout (the sums rounded before the rotation), and autocast's mix: the
    # residual (a norm's output) in fp32, so the sums and their gradients stay fp32. fp16 rather
    # than bf16, which the interpreter converts to by truncating (compiled kernels round). Equal bit
    # for bit under the interpreter; compiled, FMA contraction may move the last bit.
    exact = dict(rtol=0, atol=0) if rotary_triton._INTERPRETED else {}
    (outs, grads), (outs_ref, grads_ref) = fused_and_unfused(2, 11, 3, 8, torch.float16, True, residual_dtype)
    for name, got, want in zip(("q", "k", "v", "dq", "dkv", "dresidual"), outs + grads, outs_ref + grads_ref):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, **exact, msg=name)


@pytest.mark.parametrize("residual_dtype", [torch.float32, None], ids=["autocast", "no_residual"])
def test_fused_rotation_ops_fakes_and_compile(residual_dtype):
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    (q, kv, res), cos, sin = qkv_inputs(2, 5, 2, 8, torch.float16, residual_dtype is not None,
                                        residual_dtype=residual_dtype)
    q, kv = q.requires_grad_(), kv.requires_grad_()
    torch.library.opcheck(torch.ops.attamba.rotate_qkv_fwd.default, (q, kv, res, cos, sin), test_utils=checks)
    grads = [torch.randn_like(q) for _ in range(3)]
    backward_args = (*grads, cos, sin, kv.dtype, residual_dtype)
    torch.library.opcheck(torch.ops.attamba.rotate_qkv_bwd.default, backward_args, test_utils=checks[:2])
    torch._dynamo.reset()
    compiled = torch.compile(rotate_qkv_triton, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(q, kv, res, cos, sin), rotate_qkv_triton(q, kv, res, cos, sin)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fused_rotation_refuses_mismatched_inputs():
    (q, kv, res), cos, sin = qkv_inputs(1, 4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match=r"expected q and residual \[B, n, E\] and kv \[2, B, n, E\]"):
        rotate_qkv_triton(q, kv[0], res, cos, sin)
    with pytest.raises(ValueError, match=r"cos and sin must be \[n, d/2\] with n=4"):
        rotate_qkv_triton(q, kv, res, cos[:3], sin[:3])
    with pytest.raises(ValueError, match="must be float32, bfloat16 or float16"):
        rotate_qkv_triton(q, kv.double(), res, cos, sin)


def _small_attamba(**overrides):
    from apps.attamba.args import AttambaArgs
    from lingua.args import build_config

    torch.manual_seed(0)
    settings = dict(dim=32, n_layers=2, n_heads=2, state_dim=16, ssm_heads=2, vocab_size=40, max_seqlen=64,
                    token_chunk=4, leading_tokens=3, chunk_strategy="cyclic", ssm_impl="triton", attn_impl="sdpa_dense")
    model = attamba_model.AttambaLM(build_config(AttambaArgs, {**settings, **overrides})).to(DEVICE)
    model.init_weights()
    return model


def _logits_and_grads_with_and_without_fusion(monkeypatch, model, autocast: bool):
    """The model's logits and parameter gradients on one batch with the fused rotation, then with
    it turned off; and how many times the kernels ran."""
    tokens = torch.randint(0, 40, (2, 24), device=DEVICE)
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24], device=DEVICE)
    calls = []
    real_rotate = rotary_triton.rotate_qkv_triton

    def counted(*args):
        calls.append(1)
        return real_rotate(*args)

    results = []
    for fused in (True, False):
        backend = attamba_model.load_backend("triton", torch.device(DEVICE))
        backend = backend._replace(rotate_qkv=counted if fused else None)
        monkeypatch.setattr(attamba_model, "load_backend", lambda impl, device, backend=backend: backend)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens, docs)
        logits.float().square().mean().backward()
        results.append((logits.detach().float(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    return results, len(calls)


@pytest.mark.parametrize("residual_ssm", [True, False])
def test_attamba_with_the_fused_rotation_equals_it_without(monkeypatch, residual_ssm):
    model = _small_attamba(residual_ssm=residual_ssm)
    ((logits, grads), (logits_ref, grads_ref)), calls = _logits_and_grads_with_and_without_fusion(monkeypatch, model, False)
    assert calls == 2  # both layers took the kernels
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-6)
    for (name, _), grad, grad_ref in zip(model.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@requires_cuda
def test_attamba_with_the_fused_rotation_under_autocast_on_gpu(monkeypatch):
    # Training's setting: bf16 autocast over fp32 weights (the residual is then fp32, q and kv bf16).
    model = _small_attamba(attn_impl="triton")
    ((logits, grads), (logits_ref, grads_ref)), calls = _logits_and_grads_with_and_without_fusion(monkeypatch, model, True)
    assert calls == 2
    torch.testing.assert_close(logits, logits_ref, rtol=2e-2, atol=2e-2)
    for (name, _), grad, grad_ref in zip(model.named_parameters(), grads, grads_ref):
        assert ((grad - grad_ref).norm() / grad_ref.norm()).item() < 2e-2, name


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype, residual_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                   (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "autocast"])
def test_fused_rotation_at_the_60m_shape_on_gpu(dtype, residual_dtype, record_property):
    # 16 x 1024 tokens, 8 heads of 64: the 60M layer's. The sums round as the unfused path's do,
    # so the two differ only where the rotation's fp32 arithmetic does (FMA contraction).
    (outs, grads), (outs_ref, grads_ref) = fused_and_unfused(16, 1024, 8, 64, dtype, True, residual_dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for name, got, want in zip(("q", "k", "v", "dq", "dkv", "dresidual"), outs + grads, outs_ref + grads_ref):
        assert got.dtype == want.dtype, name
        error = ((got.double() - want.double()).norm() / want.double().norm()).item()
        record_property(name, error)
        assert error < tolerance, (name, error)
