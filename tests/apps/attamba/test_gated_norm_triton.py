"""The fused output gates RMSNorm(y * SiLU(z)) against a float64 PyTorch reference.

Without CUDA the kernels run under the Triton interpreter on CPU tensors; with CUDA compiled, and
the ``gpu`` test adds the 60M model's shape in bf16.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import DEVICE, allow_one_element_index_in_interpreter, requires_cuda

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from apps.attamba import gated_norm_triton  # noqa: E402
from apps.attamba.gated_norm_triton import gated_rms_norm_triton  # noqa: E402
from lingua.transformer import rms_norm  # noqa: E402

if gated_norm_triton._INTERPRETED:
    allow_one_element_index_in_interpreter()


def gated_rms_norm_reference(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """What gated_rms_norm_triton computes, in PyTorch and in y's dtype throughout (float64 here;
    lingua's rms_norm would round through float32)."""
    G, H = weight.shape
    gated = y.unflatten(-1, (G, H)) * torch.nn.functional.silu(z.unflatten(-1, (G, H)))
    out = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + eps) * weight.to(y.dtype)
    return out.movedim(-2, 0)


def gate_inputs(shape, groups, hidden, dtype=torch.float32, seed=0):
    """y, z [*shape, G·H] (z a strided slice, as of a wider matmul output) and weight [G, H]."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(*shape, groups * hidden, generator=generator)
    z = torch.randn(*shape, groups * hidden + 16, generator=generator)[..., 8:8 + groups * hidden]
    weight = 1 + 0.1 * torch.randn(groups, hidden, generator=generator)
    return y.to(DEVICE, dtype), z.to(DEVICE, dtype), weight.to(DEVICE)


def errors_against_reference(y, z, weight, eps=1e-5):
    """Relative errors of the output and of the gradients of y, z and weight."""
    leaves = [t.detach().requires_grad_() for t in (y, z, weight)]
    out = gated_rms_norm_triton(*leaves, eps)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device, out.dtype)
    out.backward(grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in (y, z, weight)]
    ref = gated_rms_norm_reference(*ref_leaves, eps)
    ref.backward(grad.double())
    assert all(leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape for leaf in leaves)
    errors = {}
    for name, got, want in zip(("out", "dy", "dz", "dweight"), [out] + [t.grad for t in leaves],
                               [ref] + [t.grad for t in ref_leaves]):
        errors[name] = ((got.double() - want).norm() / want.norm()).item()
    assert out.shape == (weight.shape[0], *y.shape[:-1], weight.shape[1]) and out.dtype == y.dtype
    return errors


@pytest.mark.parametrize("groups, hidden, shape", [(2, 24, (3, 7)), (1, 32, (2, 9)), (2, 40, (70,))])
def test_gated_norm_matches_reference(groups, hidden, shape, monkeypatch):
    # 21 and 70 rows leave partial tiles and spans; 24 and 40 channels a partly filled row tile.
    monkeypatch.setattr(gated_norm_triton, "SPAN", 8)
    errors = errors_against_reference(*gate_inputs(shape, groups, hidden))
    assert max(errors.values()) < 1e-5, errors


def test_reference_is_the_models_gate():
    """The reference is out_proj's input as KVSSM._gate computes it, per gate."""
    y, z, weight = gate_inputs((2, 5), 2, 16)
    expected = [rms_norm(part_y * torch.nn.functional.silu(part_z), w, 1e-5)
                for part_y, part_z, w in zip(y.chunk(2, -1), z.chunk(2, -1), weight)]
    torch.testing.assert_close(gated_rms_norm_reference(y, z, weight, 1e-5), torch.stack(expected))


def test_gated_norm_ops_fakes_and_compile():
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    y, z, weight = gate_inputs((6,), 2, 16)
    y, z, weight = (t.requires_grad_() for t in (y, z.contiguous(), weight))
    torch.library.opcheck(torch.ops.attamba.gated_rms_norm_fwd.default, (y, z, weight, 1e-5), test_utils=checks)
    out, rstd = torch.ops.attamba.gated_rms_norm_fwd(y, z, weight, 1e-5)
    backward_args = (torch.randn_like(out), y.detach(), z.detach(), weight.detach(), rstd)
    torch.library.opcheck(torch.ops.attamba.gated_rms_norm_bwd.default, backward_args, test_utils=checks[:2])
    torch._dynamo.reset()
    compiled = torch.compile(gated_rms_norm_triton, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(y, z, weight, 1e-5), gated_rms_norm_triton(y, z, weight, 1e-5))


def test_gated_norm_rejects_mismatched_shapes():
    y, z, weight = gate_inputs((4,), 2, 16)
    with pytest.raises(ValueError, match="weight \\[G, H\\]"):
        gated_rms_norm_triton(y, z[..., :16], weight, 1e-5)
    with pytest.raises(ValueError, match="weight \\[G, H\\]"):
        gated_rms_norm_triton(y, z, weight[:, :8], 1e-5)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gated_norm_at_model_shape_on_gpu(dtype, record_property):
    # A 60M layer's two gates over 4k tokens: hidden 512, bf16 as in training.
    errors = errors_against_reference(*gate_inputs((4, 1024), 2, 512, dtype=dtype))
    for name, error in errors.items():
        record_property(name, error)
    assert max(errors.values()) < (1e-5 if dtype == torch.float32 else 1e-2), errors
