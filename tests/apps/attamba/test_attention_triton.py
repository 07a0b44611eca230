"""The Triton kernels of Attamba attention against the materialized mask, in float64.

Without CUDA the kernels run under the Triton interpreter (tests/conftest.py) with 16-row tiles,
so the short sequences here cross several query and key blocks; the GPU tests run the CUDA tiles
at training sizes in bf16.
"""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from apps.attamba import attention_triton
from apps.attamba.attention import _naive_attention, attamba_attention, prepare_attention, reference_mask
from apps.attamba.attention_triton import PeriodicMask, document_bounds, periodic_attention
from apps.attamba.chunking import periodic_boundaries, random_boundaries
from tests.triton_interpreter import allow_one_element_index_in_interpreter
from tests.triton_offline import ptxas_available

REPO_ROOT = Path(__file__).resolve().parents[3]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need CUDA")

if DEVICE == "cpu":
    allow_one_element_index_in_interpreter()


def documents(batch: int, n: int) -> torch.Tensor:
    """Two rows of packed documents with different cuts (one of three tokens)."""
    rows = [[0] * (n // 3) + [1] * (n - n // 3), [0] * (n // 2) + [1] * 3 + [2] * (n - n // 2 - 3)]
    return torch.tensor(rows[:batch] * (batch // 2 or 1), device=DEVICE)[:batch]


def reference(q, k, v, mask: PeriodicMask, doc_ids, grad):
    """Output and input gradients through the materialized mask, in float64."""
    n = q.shape[2]
    boundaries = periodic_boundaries(n, mask.chunk_size, mask.offset, q.device)
    leading = "chunk" if mask.chunk_window else mask.leading
    allowed = reference_mask(boundaries, leading, doc_ids, n)
    inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = _naive_attention(*inputs, allowed)
    out.backward(grad.double())
    return out, [x.grad for x in inputs]


def kernel(q, k, v, mask: PeriodicMask, doc_ids, grad):
    inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = periodic_attention(*inputs, mask, doc_ids)
    out.backward(grad)
    return out, [x.grad for x in inputs]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


CASES = [
    # n, P, offset, L ("chunk": the current partial chunk), documents
    (40, 4, 0, 3, False),
    (40, 8, 3, 16, False),  # cyclic offset, window longer than a chunk
    (57, 4, 1, "chunk", False),
    (40, 4, 2, 1, True),
    (70, 8, 7, 5, True),  # first boundary at position 0
    (33, 4, 0, "chunk", True),
    (35, 1, 0, 1, False),  # P=1, L=1: plain causal attention over every key
    (30, 4, 0, 64, False),  # window longer than the sequence: no compressed key is ever seen
    (80, 2, 1, 2, True),  # more slots than a key block
]


@pytest.mark.parametrize(
    "reverse,window_tiles", [(False, True), (True, False)],
    ids=["slot_queries_forward_window_tiles", "slot_queries_reversed_block_tiles"],
)
@pytest.mark.parametrize("n,chunk_size,offset,leading,docs", CASES)
def test_kernels_equal_the_materialized_mask(n, chunk_size, offset, leading, docs, reverse, window_tiles, monkeypatch):
    """Every loop order the configs choose between: the dK/dV slots' queries first to last or
    reversed, and the window's positions past a block's edge in their own tiles or in the block's."""
    tiles = dict(forward_window_tiles=window_tiles, dq_window_tiles=window_tiles, dkv_window_tiles=window_tiles)
    for name in ("INTERPRETER_CONFIG", "CUDA_CONFIG"):
        monkeypatch.setattr(attention_triton, name, replace(getattr(attention_triton, name), dkv_reverse=reverse, **tiles))
    torch.manual_seed(n + chunk_size + offset)
    q, k, v, grad = (torch.randn(2, 2, n, 16, device=DEVICE) for _ in range(4))
    mask = PeriodicMask(chunk_size, offset, 0 if leading == "chunk" else leading, chunk_window=leading == "chunk")
    doc_ids = documents(2, n) if docs else None
    out, grads = kernel(q, k, v, mask, doc_ids, grad)
    expected, expected_grads = reference(q, k, v, mask, doc_ids, grad)
    bound = 1e-5 if DEVICE == "cpu" else 2e-3  # tf32x3 on the GPU
    assert relative_error(out, expected) < bound
    for name, actual, wanted in zip("qkv", grads, expected_grads):
        assert relative_error(actual, wanted) < bound, f"d{name}"


def random_documents(batch: int, n: int, longest: int, seed: int, device=DEVICE) -> torch.Tensor:
    """Rows of packed documents of random lengths 1..longest."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths = torch.randint(1, longest + 1, (n,), generator=generator)
        rows.append(torch.repeat_interleave(torch.arange(n), lengths)[:n])
    return torch.stack(rows).to(device)


@pytest.mark.parametrize("leading", [5, "chunk"])
@pytest.mark.parametrize("longest", [3, 12, 40])
def test_many_short_documents(leading, longest):
    """Documents shorter and longer than the 16-row tiles: the kernels skip the key blocks before a
    query block's first document and unmask those inside every row's document."""
    torch.manual_seed(longest)
    n = 100
    q, k, v, grad = (torch.randn(2, 2, n, 16, device=DEVICE) for _ in range(4))
    mask = PeriodicMask(4, 3, 0 if leading == "chunk" else leading, chunk_window=leading == "chunk")
    doc_ids = random_documents(2, n, longest, seed=longest)
    out, grads = kernel(q, k, v, mask, doc_ids, grad)
    expected, expected_grads = reference(q, k, v, mask, doc_ids, grad)
    bound = 1e-5 if DEVICE == "cpu" else 2e-3
    assert relative_error(out, expected) < bound
    for name, actual, wanted in zip("qkv", grads, expected_grads):
        assert relative_error(actual, wanted) < bound, f"d{name}"


def test_document_bounds():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5], [0, 1, 2, 2, 3, 3]])
    starts, ends = document_bounds(doc_ids)
    assert starts.tolist() == [[0, 0, 2, 2, 2, 5], [0] * 6, [0, 1, 2, 2, 4, 4]]
    assert ends.tolist() == [[2, 2, 5, 5, 5, 6], [6] * 6, [1, 2, 4, 4, 6, 6]]


def test_strided_inputs_and_shared_documents_row():
    """q, k, v as [B, n, H, d] transposed views (what the model passes), documents as [1, n]."""
    torch.manual_seed(5)
    n = 45
    q, k, v, grad = (torch.randn(2, n, 2, 16, device=DEVICE).transpose(1, 2) for _ in range(4))
    mask = PeriodicMask(4, 1, 6)
    doc_ids = documents(2, n)[:1]
    out, grads = kernel(q, k, v, mask, doc_ids, grad)
    expected, expected_grads = reference(q, k, v, mask, doc_ids.expand(2, -1), grad)
    bound = 1e-5 if DEVICE == "cpu" else 2e-3
    assert relative_error(out, expected) < bound
    for actual, wanted in zip(grads, expected_grads):
        assert relative_error(actual, wanted) < bound
    # Written token-major like the inputs: the model's W_o and rotary backward read them as they are.
    assert out.stride() == q.stride() and all(grad.stride() == q.stride() for grad in grads)


def test_outputs_and_gradients_take_their_inputs_layouts():
    """Each gradient is laid out as its input (a contiguous q, token-major k, a [H, B, n, d]-ordered
    v), the output as q, and the values do not depend on the layouts."""
    torch.manual_seed(12)
    n = 37
    q = torch.randn(2, 3, n, 16, device=DEVICE)
    k = torch.randn(2, n, 3, 16, device=DEVICE).transpose(1, 2)
    v = torch.randn(3, 2, n, 16, device=DEVICE).transpose(0, 1)
    grad = torch.randn(2, 3, n, 16, device=DEVICE)
    mask = PeriodicMask(4, 2, 5)
    out, grads = kernel(q, k, v, mask, None, grad)
    dense_out, dense_grads = kernel(q.contiguous(), k.contiguous(), v.contiguous(), mask, None, grad)
    assert out.stride() == q.stride()
    for name, gradient, x, dense in zip("qkv", grads, (q, k, v), dense_grads):
        assert gradient.stride() == x.stride(), f"d{name}"
        torch.testing.assert_close(gradient, dense, rtol=0, atol=0)
    torch.testing.assert_close(out, dense_out, rtol=0, atol=0)


def test_keys_and_values_take_the_query_dtype():
    """As under autocast: q from a bf16 matmul, k and v from float32 SSMs (here float32 / float64)."""
    torch.manual_seed(9)
    n = 21
    q, k, v = (torch.randn(1, 2, n, 16, device=DEVICE) for _ in range(3))
    k64 = k.double().requires_grad_()
    out = periodic_attention(q, k64, v.double(), PeriodicMask(4, 0, 3))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, periodic_attention(q, k, v, PeriodicMask(4, 0, 3)))
    out.sum().backward()
    assert k64.grad.dtype == torch.float64


def test_the_op_passes_opcheck():
    """Fake (meta) implementation, autograd registration and schema, as torch.compile needs them."""
    torch.manual_seed(6)
    q, k = (torch.randn(1, 2, 24, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 24, 2, 16, device=DEVICE).transpose(1, 2).requires_grad_()  # token-major
    torch.library.opcheck(
        torch.ops.attamba.periodic_attention_fwd.default,
        (q, k, v, *document_bounds(documents(1, 24)), 4, 1, 3, False),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_the_backward_op_passes_opcheck():
    """The backward op's fake says the gradients' shapes, dtypes and strides as its kernels make them."""
    torch.manual_seed(8)
    q, k, grad = (torch.randn(2, 2, 24, 16, device=DEVICE) for _ in range(3))
    v = torch.randn(2, 24, 2, 16, device=DEVICE).transpose(1, 2)  # token-major: so is dv
    starts, ends = document_bounds(documents(2, 24))
    out, lse = torch.ops.attamba.periodic_attention_fwd(q, k, v, starts, ends, 4, 1, 3, False)
    torch.library.opcheck(torch.ops.attamba.periodic_attention_bwd.default,
                          (grad, q, k, v, out, lse, starts, ends, 4, 1, 3, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_eager_calls_and_the_custom_op_give_the_same_outputs_and_gradients():
    """Eager calls skip the custom op's dispatch (an autograd.Function over the same kernels);
    torch.compile traces the op. Both must agree exactly."""
    torch.manual_seed(7)
    q, k, v, grad = (torch.randn(2, 2, 40, 16, device=DEVICE) for _ in range(4))
    starts, ends = document_bounds(documents(2, 40))
    mask = PeriodicMask(4, 1, 3)
    eager = kernel(q, k, v, mask, documents(2, 40), grad)
    inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = torch.ops.attamba.periodic_attention_fwd(*inputs, starts, ends, 4, 1, 3, False)[0]
    out.backward(grad)
    assert torch.equal(out, eager[0])
    for name, actual, wanted in zip("qkv", [x.grad for x in inputs], eager[1]):
        assert torch.equal(actual, wanted), f"d{name}"


def test_attn_impl_triton_dispatches_by_boundaries():
    n = 29
    periodic = prepare_attention(periodic_boundaries(n, 4, 1), 3, None, n, 2, "triton", head_dim=16)
    assert periodic.impl == "triton" and periodic.periodic == PeriodicMask(4, 1, 3)
    chunked = prepare_attention(periodic_boundaries(n, 4, 1), "chunk", None, n, 2, "triton", head_dim=16)
    assert chunked.periodic == PeriodicMask(4, 1, 0, chunk_window=True)
    # Random boundaries, unsupported heads and pseudo-chunking go through FlexAttention.
    generator = torch.Generator().manual_seed(0)
    assert prepare_attention(random_boundaries(2, n, 4, generator), 3, None, n, 2, "triton", head_dim=16).impl == "flex"
    assert prepare_attention(periodic_boundaries(n, 4, 1), 3, None, n, 2, "triton", head_dim=24).impl == "flex"
    assert prepare_attention(periodic_boundaries(n, 4, 1), 3, None, n, 2, "triton", causal=True).causal


def test_attamba_attention_through_the_kernels_equals_the_reference():
    torch.manual_seed(7)
    n = 37
    q, k, v = (torch.randn(2, 2, n, 16, device=DEVICE) for _ in range(3))
    boundaries = periodic_boundaries(n, 4, 2, DEVICE)
    doc_ids = documents(2, n)
    out = attamba_attention(q, k, v, boundaries, 5, doc_ids, "triton")
    expected = attamba_attention(q, k, v, boundaries, 5, doc_ids, "reference")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bad_inputs_fail_clearly():
    q = torch.randn(1, 2, 8, 24, device=DEVICE)
    with pytest.raises(ValueError, match="head sizes"):
        periodic_attention(q, q, q, PeriodicMask(4, 0, 2))
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="same shape|one shape"):
        periodic_attention(q, q[:, :1], q, PeriodicMask(4, 0, 2))
    with pytest.raises(ValueError, match="bad periodic mask"):
        periodic_attention(q, q, q, PeriodicMask(4, 4, 2))
    with pytest.raises(ValueError, match="bad periodic mask"):
        periodic_attention(q, q, q, PeriodicMask(4, 0, 0))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    "n,chunk_size,offset,leading,docs,head_dim",
    [(4096, 8, 0, 16, False, 64), (4096, 8, 5, 16, True, 64), (2048, 8, 3, "chunk", True, 64), (1500, 4, 1, 32, False, 128)],
)
def test_kernels_on_gpu_in_bf16(n, chunk_size, offset, leading, docs, head_dim):
    torch.manual_seed(n + offset)
    q, k, v, grad = (torch.randn(2, 4, n, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    mask = PeriodicMask(chunk_size, offset, 0 if leading == "chunk" else leading, chunk_window=leading == "chunk")
    doc_ids = documents(2, n) if docs else None
    out, grads = kernel(q, k, v, mask, doc_ids, grad)
    expected, expected_grads = reference(q, k, v, mask, doc_ids, grad)
    assert relative_error(out, expected) < 1e-2
    for name, actual, wanted in zip("qkv", grads, expected_grads):
        assert relative_error(actual, wanted) < 1e-2, f"d{name}"


@pytest.mark.gpu
@requires_cuda
def test_kernels_inside_a_compiled_function_on_gpu():
    torch.manual_seed(8)
    n = 1024
    q, k, v, grad = (torch.randn(2, 4, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    boundaries = periodic_boundaries(n, 8, 2, "cuda")

    def attend(q, k, v):
        return attamba_attention(q, k, v, boundaries, 16, None, "triton") * 2

    compiled = torch.compile(attend, fullgraph=True)
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = compiled(*inputs)
    out.backward(grad)
    eager_inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = attend(*eager_inputs)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    for actual, wanted in zip(inputs, eager_inputs):
        torch.testing.assert_close(actual.grad, wanted.grad, atol=1e-2, rtol=1e-2)



def test_a_model_trains_through_the_kernels_like_through_gathered_sdpa():
    """A cyclic-chunked model with packed documents: loss and every gradient, kernels against SDPA."""
    from apps.attamba.args import AttambaArgs
    from apps.attamba.model import AttambaLM

    results = []
    for impl in ("sdpa_gathered", "triton"):
        torch.manual_seed(10)
        args = AttambaArgs(
            dim=32, n_layers=2, n_heads=2, vocab_size=50, state_dim=8, ssm_heads=2, ssm_impl="torch",
            token_chunk=4, chunk_strategy="cyclic", leading_tokens=3, attn_impl=impl,
        )
        model = AttambaLM(args).to(DEVICE)
        model.init_weights()
        tokens = torch.randint(0, 50, (2, 40), device=DEVICE)
        logits = model(tokens, documents(2, 40))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (loss_sdpa, grads_sdpa), (loss_kernels, grads_kernels) = results
    torch.testing.assert_close(loss_kernels, loss_sdpa, atol=1e-5, rtol=1e-5)
    for name, grad in grads_sdpa.items():
        torch.testing.assert_close(grads_kernels[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(not ptxas_available(), reason="this Triton wheel ships no ptxas for an offline compile")
def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """What the interpreter lets through but the compiler refuses shows here, before the device."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    # The attention's kernels, and the KV-SSM's (scan in TF32 and bf16, aligned or not; conv;
    # gates) with the rotation, each group in its own process: one compiler per core.
    expected = {"attention": 25, "ssm": 35}
    runs = {
        group: subprocess.Popen([sys.executable, "-m", "tests.triton_offline", group], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for group in expected
    }
    for group, run in runs.items():
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-3000:]
        assert stdout.count("compiled for sm_90") == expected[group], group


def test_compiles_without_a_graph_break_with_documents():
    """The document bounds are plain tensor ops before the custom op: one graph under torch.compile."""
    torch.manual_seed(11)
    n = 40
    q, k, v = (torch.randn(2, 2, n, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    doc_ids = random_documents(2, n, 9, seed=3)
    mask = PeriodicMask(4, 1, 3)
    compiled = torch.compile(lambda q, k, v, d: periodic_attention(q, k, v, mask, d), backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, doc_ids)
    out.sum().backward()
    torch.testing.assert_close(out, periodic_attention(q, k, v, mask, doc_ids))
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_compiled_blocks_take_the_forwards_shared_document_bounds():
    """The model computes the documents' bounds once and hands them to every layer's plan: blocks
    compiled whole (a graph break is an error) give the eager loss and gradients."""
    from apps.attamba.args import AttambaArgs
    from apps.attamba.model import AttambaLM

    def loss_and_grads(compile_blocks: bool):
        torch.manual_seed(3)
        args = AttambaArgs(
            dim=32, n_layers=2, n_heads=2, vocab_size=50, state_dim=8, ssm_heads=2, ssm_impl="torch",
            token_chunk=4, chunk_strategy="cyclic", leading_tokens=3, attn_impl="triton",
        )
        model = AttambaLM(args).to(DEVICE)
        model.init_weights()
        if compile_blocks:
            torch._dynamo.reset()
            for index, block in enumerate(list(model.layers)):
                model.layers[index] = torch.compile(block, backend="aot_eager", dynamic=False, fullgraph=True)
        tokens = torch.randint(0, 50, (2, 40), device=DEVICE)
        loss = torch.nn.functional.cross_entropy(model(tokens, documents(2, 40)).flatten(0, 1), tokens.flatten())
        loss.backward()
        # A compiled block names its parameters under _orig_mod.
        return loss.detach(), {name.replace("._orig_mod", ""): p.grad for name, p in model.named_parameters()}

    (loss_eager, grads_eager), (loss_compiled, grads_compiled) = loss_and_grads(False), loss_and_grads(True)
    torch.testing.assert_close(loss_compiled, loss_eager, atol=1e-5, rtol=1e-5)
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads_compiled[name], grad, atol=1e-5, rtol=1e-4, msg=name)
