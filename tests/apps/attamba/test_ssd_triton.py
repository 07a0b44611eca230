"""The Triton SSD scan and causal conv against the float64 references, forward and backward.

Without CUDA the kernels run under the Triton interpreter on CPU tensors at tiny sizes; with
CUDA the same tests run compiled, and the ``gpu`` tests add model-sized shapes and bf16.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from tests.triton_interpreter import allow_one_element_index_in_interpreter

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from apps.attamba import ssd_triton  # noqa: E402
from apps.attamba.ssd_reference import (  # noqa: E402
    causal_conv_reference, join_scan_inputs, split_scan_inputs, ssd_reference,
)
from apps.attamba.ssd_torch import ssd_segmented  # noqa: E402
from apps.attamba.ssd_triton import causal_conv_segmented_triton, ssd_segmented_triton  # noqa: E402
from apps.attamba.ssd_triton_conv import causal_conv_silu_segmented_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="compiled Triton kernels need CUDA"
)

if DEVICE == "cpu" and not ssd_triton._INTERPRETED:
    pytest.skip(
        "apps.attamba.ssd_triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py "
        "sets it without CUDA)",
        allow_module_level=True,
    )


if ssd_triton._INTERPRETED:
    allow_one_element_index_in_interpreter()


# Chunkings, as segment_start [b, n] bool.
def uniform_starts(b: int, n: int, chunk: int, offset: int = 0) -> torch.Tensor:
    """A segment starts after every token t with (t + 1 + offset) % chunk == 0 (DESIGN.md)."""
    t = torch.arange(n)
    ends = (t + 1 + offset) % chunk == 0
    starts = torch.zeros(n, dtype=torch.bool)
    starts[1:] = ends[:-1]
    return starts.expand(b, n).clone()


def random_length_starts(b: int, n: int, mean_length: int, seed: int) -> torch.Tensor:
    """Segment lengths drawn from {1..2·mean_length-1}, fresh per row."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.zeros(b, n, dtype=torch.bool)
    for row in range(b):
        t = 0
        while t < n:
            starts[row, t] = True
            t += int(torch.randint(1, 2 * mean_length, (1,), generator=generator))
    return starts


def document_starts(b: int, n: int, seed: int) -> torch.Tensor:
    """A few long segments per row (documents packed into one sequence)."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.rand(b, n, generator=generator) < 3.0 / n
    return starts


CHUNKINGS = {
    "uniform": lambda b, n: uniform_starts(b, n, 4),
    "cyclic_offset": lambda b, n: uniform_starts(b, n, 8, offset=3),
    "random_lengths": lambda b, n: random_length_starts(b, n, 5, seed=1),
    "documents": lambda b, n: document_starts(b, n, seed=2),
    "one_segment": lambda b, n: torch.zeros(b, n, dtype=torch.bool),
    "every_token": lambda b, n: torch.ones(b, n, dtype=torch.bool),
}


def ssd_inputs(b, n, h, p, g, s, dtype=torch.float32, device=DEVICE, seed=0):
    """Random (u, dt, A, B, C, D): dt in the softplus range, A < 0; u, B, C in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    u = randn(b, n, h, p).to(dtype)
    dt = torch.nn.functional.softplus(randn(b, n, h) - 1.0)
    A = -torch.exp(randn(h) * 0.5)
    B = randn(b, n, g, s).to(dtype)
    C = randn(b, n, g, s).to(dtype)
    D = randn(h)
    return [tensor.to(device) for tensor in (u, dt, A, B, C, D)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def forward_and_grads(fn, inputs, segment_start, grad_out, as_double):
    """fn's output and the gradients of <output, grad_out> w.r.t. every float input."""
    leaves = [
        None if tensor is None else (tensor.double() if as_double else tensor).detach().requires_grad_()
        for tensor in inputs
    ]
    out = fn(*leaves, segment_start)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [None if leaf is None else leaf.grad for leaf in leaves]


def assert_scan_matches(candidate, oracle, inputs, names, y_shape, segment_start, tolerance, record=None):
    """``candidate``'s output y (shaped ``y_shape``, in the first input's dtype) and the gradients
    of its ``inputs`` (called ``names``) against ``oracle``'s in float64."""
    first = inputs[0]
    # Rounded to the inputs' dtype first, so that both sides see the same upstream gradient.
    grad_out = torch.randn(y_shape, generator=torch.Generator().manual_seed(7)).to(first.device, first.dtype)
    y, grads = forward_and_grads(candidate, inputs, segment_start, grad_out, False)
    y_ref, grads_ref = forward_and_grads(oracle, inputs, segment_start, grad_out, True)
    errors = {"y": relative_error(y, y_ref)}
    for name, tensor, grad, grad_ref in zip(names, inputs, grads, grads_ref):
        assert grad.dtype == tensor.dtype and grad.shape == tensor.shape
        errors[f"d{name}"] = relative_error(grad, grad_ref)
    if record is not None:
        for name, error in errors.items():
            record(name, error)
    failing = {name: error for name, error in errors.items() if not error < tolerance}
    assert not failing, f"relative errors above {tolerance}: {failing}"
    assert y.dtype == first.dtype and y.shape == y_shape


def assert_ssd_matches(oracle, inputs, segment_start, tolerance, record=None, candidate=None):
    """``candidate`` (default: the chunked Triton scan) against ``oracle`` in float64."""
    assert_scan_matches(candidate or ssd_segmented_triton, oracle, inputs, ("u", "dt", "A", "B", "C", "D"),
                        inputs[0].shape, segment_start, tolerance, record)


# Small shapes: the interpreter on CPU, compiled on CUDA.


@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
def test_ssd_matches_reference(chunking):
    # n = 37 leaves a partial last block; g = 1 < h shares B/C across heads, whose gradients
    # add up in one buffer.
    b, n, h, p, g, s = 2, 37, 2, 16, 1, 16
    inputs = ssd_inputs(b, n, h, p, g, s)
    starts = CHUNKINGS[chunking](b, n).to(DEVICE)
    assert_ssd_matches(ssd_reference, inputs, starts, 1e-5)


@pytest.mark.parametrize("block_q, max_tile_s", [(16, 64), (32, 16)])
def test_ssd_per_head_groups_padded_dims_and_block_sizes(monkeypatch, block_q, max_tile_s):
    # g = h (each head its own B/C), p and s not powers of two, segments crossing blocks; with
    # 16-wide state tiles, s = 40 takes three tiles, the last partly padding.
    monkeypatch.setattr(ssd_triton, "DEFAULT_BLOCK_Q", block_q)
    monkeypatch.setattr(ssd_triton, "MAX_TILE_S", max_tile_s)
    b, n, h, p, g, s = 1, 50, 2, 6, 2, 40
    inputs = ssd_inputs(b, n, h, p, g, s, seed=3)
    starts = random_length_starts(b, n, 12, seed=4).to(DEVICE)
    assert_ssd_matches(ssd_reference, inputs, starts, 1e-5)


def test_decay_gradient_stays_accurate_over_long_blocks(monkeypatch):
    # 128-token blocks of ~8-token segments: summing per-token +/- terms with one cumsum over the
    # block (the old backward) lost fp32 precision as segments cancelled: dA 5.7e-6 here, and the
    # GPU config test failed at 1.06e-5. Summing each exponent over the a_i it spans: 1.1e-6.
    monkeypatch.setattr(ssd_triton, "DEFAULT_BLOCK_Q", 128)
    monkeypatch.setattr(ssd_triton, "DEFAULT_NUM_WARPS", 8)
    b, n, h, p, g, s = 1, 200, 2, 32, 1, 128
    inputs = ssd_inputs(b, n, h, p, g, s)
    starts = random_length_starts(b, n, 8, seed=12).to(DEVICE)
    errors = {}
    assert_ssd_matches(ssd_reference, inputs, starts, 1e-5, lambda name, error: errors.__setitem__(name, error))
    assert errors["dA"] < 3e-6, errors


@pytest.mark.parametrize("contiguous_C", [False, True])
def test_ssd_reads_strided_inputs(contiguous_C):
    # u, B and C as slices of one projection, the way the KV-SSM splits its conv output; or C
    # alone contiguous, so that B and C differ in strides.
    b, n, h, p, g, s = 1, 20, 2, 16, 1, 16
    u, dt, A, _, _, D = ssd_inputs(b, n, h, p, g, s)
    packed = torch.randn(b, n, h * p + 2 * g * s, device=DEVICE)
    u = packed[..., : h * p].unflatten(-1, (h, p))
    B = packed[..., h * p : h * p + g * s].unflatten(-1, (g, s))
    C = packed[..., h * p + g * s :].unflatten(-1, (g, s))
    assert not u.is_contiguous() and not B.is_contiguous()
    if contiguous_C:
        C = C.contiguous()
    starts = uniform_starts(b, n, 6).to(DEVICE)
    assert_ssd_matches(ssd_reference, [u, dt, A, B, C, D], starts, 1e-5)


def test_ssd_final_state_matches_reference():
    b, n, h, p, g, s = 2, 40, 2, 16, 2, 16
    inputs = ssd_inputs(b, n, h, p, g, s, seed=5)
    starts = random_length_starts(b, n, 9, seed=6).to(DEVICE)
    y, state = ssd_segmented_triton(*inputs, starts, return_final_state=True)
    y_ref, state_ref = ssd_reference(*inputs, starts, return_final_state=True)
    assert state.shape == (b, h, p, s) and state.dtype == torch.float32
    assert relative_error(state, state_ref) < 1e-5
    assert relative_error(y, y_ref) < 1e-5


def test_launch_narrows_the_tile_then_stops_pipelining_until_the_kernel_compiles(monkeypatch):
    monkeypatch.setattr(ssd_triton, "_LAUNCH_CHOICE", {})
    monkeypatch.setattr(ssd_triton, "MAX_TILE_S", 64)
    tried = []

    class KernelNeedingOneStage:
        def __getitem__(self, grid):
            def launch(*args, TILE_S, num_stages=None, **meta):
                tried.append((TILE_S, num_stages))
                if TILE_S > 32:
                    raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
                if num_stages != 1:
                    raise RuntimeError("PassManager::run failed")

            return launch

    kernel = KernelNeedingOneStage()
    ssd_triton._launch(kernel, (1,), (), 128, BLOCK_Q=64)
    ssd_triton._launch(kernel, (1,), (), 128, BLOCK_Q=64)
    # 64 and 32 and 16 pipelined, then 64 unpipelined (too big), then 32 fits; then remembered.
    assert tried == [(64, None), (32, None), (16, None), (64, 1), (32, 1), (32, 1)]


def test_launch_passes_other_errors_through(monkeypatch):
    monkeypatch.setattr(ssd_triton, "_LAUNCH_CHOICE", {})

    class BrokenKernel:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

            return launch

    with pytest.raises(RuntimeError, match="illegal memory access"):
        ssd_triton._launch(BrokenKernel(), (1,), (), 128, BLOCK_Q=64)


def test_kernels_compile_into_one_graph_with_the_same_results():
    # The kernels are custom ops: torch.compile traces a caller whole (no graph break), forward
    # and backward, and gets what eager gets.
    b, n, h, p, g, s = 1, 19, 2, 16, 1, 16
    u, dt, A, B, C, D = ssd_inputs(b, n, h, p, g, s)
    x = torch.randn(b, n, 8).to(DEVICE)
    weight, bias = torch.randn(8, 3).to(DEVICE), torch.randn(8).to(DEVICE)
    starts = uniform_starts(b, n, 4, offset=1).to(DEVICE)

    def fn(u, dt, A, B, C, D, x, weight, bias):
        conv = causal_conv_segmented_triton(x, weight, bias, starts)
        return ssd_segmented_triton(u, dt, A, B, C, D, starts).sum() + (conv * conv).sum()

    def value_and_grads(function):
        leaves = [t.detach().clone().requires_grad_() for t in (u, dt, A, B, C, D, x, weight, bias)]
        value = function(*leaves)
        value.backward()
        return value.detach(), [leaf.grad for leaf in leaves]

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    value, grads = value_and_grads(compiled)
    value_ref, grads_ref = value_and_grads(fn)
    torch.testing.assert_close(value, value_ref)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref)


def test_ssd_rejects_mismatched_shapes():
    u, dt, A, B, C, D = ssd_inputs(1, 8, 3, 16, 1, 16)
    starts = torch.zeros(1, 8, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of the B/C groups"):
        ssd_segmented_triton(u, dt, A, B.expand(1, 8, 2, 16), C.expand(1, 8, 2, 16), D, starts)
    with pytest.raises(ValueError, match="segment_start"):
        ssd_segmented_triton(u, dt, A, B, C, D, starts[:, :4])


def silu_of_reference_conv(x, weight, bias, starts):
    return torch.nn.functional.silu(causal_conv_reference(x, weight, bias, starts))


CONVS = {  # with the SiLU or without: (kernels, float64 oracle)
    "conv": (causal_conv_segmented_triton, causal_conv_reference),
    "conv_silu": (causal_conv_silu_segmented_triton, silu_of_reference_conv),
}


@pytest.mark.parametrize("conv", sorted(CONVS))
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("width", [4, 2])
def test_conv_matches_reference(with_bias, width, conv):
    b, n, c = 2, 70, 20  # two token blocks, a partial channel block
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(b, n, 2 * c, generator=generator)[..., :c].to(DEVICE)  # strided, like a split
    weight = torch.randn(c, width, generator=generator).to(DEVICE)
    bias = torch.randn(c, generator=generator).to(DEVICE) if with_bias else None
    starts = random_length_starts(b, n, 3, seed=9).to(DEVICE)
    grad_out = torch.randn(b, n, c, generator=generator).to(DEVICE)
    inputs = [x, weight, bias]
    kernels, oracle = CONVS[conv]
    out, grads = forward_and_grads(kernels, inputs, starts, grad_out, False)
    out_ref, grads_ref = forward_and_grads(oracle, inputs, starts, grad_out, True)
    assert relative_error(out, out_ref) < 1e-6
    for grad, grad_ref in zip(grads, grads_ref):
        if grad_ref is None:
            assert grad is None
        else:
            assert relative_error(grad, grad_ref) < 1e-6


@pytest.mark.parametrize("conv", sorted(CONVS))
@pytest.mark.parametrize("split", [True, False], ids=["split", "one_kernel"])
@pytest.mark.parametrize("width, tokens, tile", [(4, 32, 8), (3, 48, 16), (1, 16, 16), (2, 128, 32), (5, 32, 16)])
def test_conv_backward_kernels_match_reference(monkeypatch, split, width, tokens, tile, conv):
    # n = 70 leaves a partial span and a partial tile; width 5 takes the one-kernel backward either way.
    from apps.attamba import ssd_triton_conv

    monkeypatch.setattr(ssd_triton_conv, "SPLIT_BACKWARD", split)
    monkeypatch.setattr(ssd_triton_conv, "SPLIT_TOKENS", tokens)
    monkeypatch.setattr(ssd_triton_conv, "SPLIT_BLOCK_N", tile)
    b, n, c = 2, 70, 20
    generator = torch.Generator().manual_seed(width)
    x = torch.randn(b, n, 2 * c, generator=generator)[..., :c].to(DEVICE)
    weight = torch.randn(c, width, generator=generator).to(DEVICE)
    bias = torch.randn(c, generator=generator).to(DEVICE)
    starts = (random_length_starts(b, n, 3, seed=9) | document_starts(b, n, seed=2)).to(DEVICE)
    grad_out = torch.randn(b, n, c, generator=generator).to(DEVICE)
    inputs = [x, weight, bias]
    kernels, oracle = CONVS[conv]
    out, grads = forward_and_grads(kernels, inputs, starts, grad_out, False)
    out_ref, grads_ref = forward_and_grads(oracle, inputs, starts, grad_out, True)
    assert relative_error(out, out_ref) < 1e-6
    for name, grad, grad_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        assert relative_error(grad, grad_ref) < 1e-6, name


@pytest.mark.parametrize("tiles", [1, 3])
@pytest.mark.parametrize("channels_fastest", [False, True])
def test_conv_launch_layouts_match_reference(monkeypatch, tiles, channels_fastest):
    # Either grid order in every kernel, the forward's programs walking several token tiles
    # (n = 70: one program, a partial tile).
    from apps.attamba import ssd_triton_conv

    monkeypatch.setattr(ssd_triton_conv, "FORWARD_BLOCK_N", 32)
    monkeypatch.setattr(ssd_triton_conv, "FORWARD_TILES", tiles)
    for kernel in ("FORWARD", "DX", "DW"):
        monkeypatch.setattr(ssd_triton_conv, f"{kernel}_CHANNELS_FASTEST", channels_fastest)
    b, n, c = 3, 70, 80  # two channel blocks
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(b, n, c, generator=generator).to(DEVICE)
    weight = torch.randn(c, 4, generator=generator).to(DEVICE)
    bias = torch.randn(c, generator=generator).to(DEVICE)
    starts = (random_length_starts(b, n, 3, seed=4) | document_starts(b, n, seed=5)).to(DEVICE)
    grad_out = torch.randn(b, n, c, generator=generator).to(DEVICE)
    kernels, oracle = CONVS["conv_silu"]
    out, grads = forward_and_grads(kernels, [x, weight, bias], starts, grad_out, False)
    out_ref, grads_ref = forward_and_grads(oracle, [x, weight, bias], starts, grad_out, True)
    assert relative_error(out, out_ref) < 1e-6
    for name, grad, grad_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        assert relative_error(grad, grad_ref) < 1e-6, name


@pytest.mark.parametrize("silu", [True, False])
def test_split_conv_backward_needs_whole_tiles(monkeypatch, silu):
    # The weight gradients' settings: SPLIT_* with the SiLU (the model's conv), PLAIN_SPLIT_*
    # without it (the plain conv).
    from apps.attamba import ssd_triton_conv

    knobs = "SPLIT_" if silu else "PLAIN_SPLIT_"
    monkeypatch.setattr(ssd_triton_conv, "SPLIT_BACKWARD", True)
    monkeypatch.setattr(ssd_triton_conv, knobs + "TOKENS", 40)
    monkeypatch.setattr(ssd_triton_conv, knobs + "BLOCK_N", 16)
    x = torch.randn(1, 8, 4, device=DEVICE, requires_grad=True)
    starts = torch.zeros(1, 8, dtype=torch.bool, device=DEVICE)
    out = ssd_triton_conv.causal_conv_segmented_triton(x, torch.ones(4, 4, device=DEVICE), None, starts, silu=silu)
    with pytest.raises(ValueError, match=f"^{knobs}TOKENS \\(40\\) must be a multiple of {knobs}BLOCK_N"):
        out.sum().backward()


def test_conv_never_reads_across_a_segment_start():
    # A spike just before a start must not reach the new segment.
    x = torch.zeros(1, 12, 1, device=DEVICE)
    x[0, 5] = 1.0
    starts = torch.zeros(1, 12, dtype=torch.bool, device=DEVICE)
    starts[0, 6] = True
    out = causal_conv_segmented_triton(x, torch.ones(1, 4, device=DEVICE), None, starts)
    assert out[0, 5, 0] == 1.0
    assert torch.all(out[0, 6:, 0] == 0.0)


# Model-sized shapes and bf16, CUDA only.


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("chunking", ["uniform", "cyclic_offset", "random_lengths", "documents"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [(2, 256, 4, 32, 1, 64), (2, 300, 4, 64, 4, 32)],
    ids=["shared_bc", "per_head_bc"],
)
def test_ssd_matches_reference_on_gpu(chunking, dtype, shape, record_property):
    b, n, h, p, g, s = shape
    inputs = ssd_inputs(b, n, h, p, g, s, dtype=dtype)
    starts = CHUNKINGS[chunking](b, n).to(DEVICE)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert_ssd_matches(ssd_reference, inputs, starts, tolerance, record_property)



@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("chunking", ["uniform", "documents"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ssd_matches_chunked_torch_at_benchmark_size(chunking, dtype, record_property):
    # 16 x 1024 tokens, 8 heads of 32, state 128: ssd_torch in float64 stands in for the loop
    # reference, which it is itself tested against.
    b, n, h, p, g, s = 16, 1024, 8, 32, 1, 128
    chunkings = {"uniform": uniform_starts(b, n, 8), "documents": document_starts(b, n, seed=3)}
    inputs = ssd_inputs(b, n, h, p, g, s, dtype=dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert_ssd_matches(ssd_segmented, inputs, chunkings[chunking].to(DEVICE), tolerance, record_property)



KERNEL_CONFIGS = [(32, 4, 32), (32, 8, 64), (64, 4, 32), (64, 4, 64), (64, 8, 32), (64, 8, 64), (128, 8, 32)]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("config", KERNEL_CONFIGS, ids=lambda c: "Q{}-warps{}-tile{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ssd_kernel_configs_on_gpu(monkeypatch, config, dtype, record_property):
    # Every (block size, warps, widest state tile) the benchmark sweeps gives the same answers.
    for name, value in zip(("DEFAULT_BLOCK_Q", "DEFAULT_NUM_WARPS", "MAX_TILE_S"), config):
        monkeypatch.setattr(ssd_triton, name, value)
    b, n, h, p, g, s = 1, 200, 2, 32, 1, 128
    inputs = ssd_inputs(b, n, h, p, g, s, dtype=dtype)
    starts = random_length_starts(b, n, 8, seed=12).to(DEVICE)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert_ssd_matches(ssd_reference, inputs, starts, tolerance, record_property)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("split", [False, True], ids=["one_kernel", "split"])
@pytest.mark.parametrize("conv", sorted(CONVS))
def test_conv_matches_reference_on_gpu(dtype, split, conv, monkeypatch, record_property):
    from apps.attamba import ssd_triton_conv

    monkeypatch.setattr(ssd_triton_conv, "SPLIT_BACKWARD", split)
    b, n, c, width = 2, 300, 320, 4
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(b, n, c, generator=generator).to(DEVICE, dtype)
    weight = torch.randn(c, width, generator=generator).to(DEVICE, dtype)
    bias = torch.randn(c, generator=generator).to(DEVICE, dtype)
    starts = random_length_starts(b, n, 6, seed=11).to(DEVICE)
    grad_out = torch.randn(b, n, c, generator=generator).to(DEVICE, dtype)
    inputs = [x, weight, bias]
    kernels, oracle = CONVS[conv]
    out, grads = forward_and_grads(kernels, inputs, starts, grad_out, False)
    out_ref, grads_ref = forward_and_grads(oracle, inputs, starts, grad_out, True)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    errors = [relative_error(out, out_ref)] + [relative_error(a, r) for a, r in zip(grads, grads_ref)]
    for name, error in zip(("out", "dx", "dweight", "dbias"), errors):
        record_property(name, error)
    assert max(errors) < tolerance, errors


def _cyclic_attamba_with_reference(doc_ids: bool):
    """A 3-layer cyclic Attamba on the Triton backends (without gradients, dynamo reset), a batch,
    and the eager logits and gradients of that model on it, for the compile tests."""
    model = _cyclic_attamba()
    state, inputs, reference = _cyclic_attamba_reference(doc_ids)
    model.load_state_dict(state)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return model, inputs, reference


def _cyclic_attamba():
    from apps.attamba.args import AttambaArgs
    from apps.attamba.model import AttambaLM
    from lingua.args import build_config

    settings = dict(dim=32, n_layers=3, n_heads=2, state_dim=16, ssm_heads=2, vocab_size=40, max_seqlen=64,
                    token_chunk=4, leading_tokens=3, chunk_strategy="cyclic", ssm_impl="triton", attn_impl="triton")
    return AttambaLM(build_config(AttambaArgs, settings)).to(DEVICE)


@functools.lru_cache(maxsize=None)
def _cyclic_attamba_reference(doc_ids: bool):
    """The eager run the compile tests compare with, once per ``doc_ids`` (under the interpreter a
    forward and backward of the model take ~15 s): weights, inputs, logits and gradients."""
    torch.manual_seed(0)
    model = _cyclic_attamba()
    model.init_weights()
    tokens = torch.randint(0, 40, (2, 24), device=DEVICE)
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24], device=DEVICE) if doc_ids else None
    logits_ref = model(tokens, docs)
    logits_ref.square().mean().backward()
    grads_ref = [p.grad.clone() for p in model.parameters()]
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return state, (tokens, docs), (logits_ref.detach(), grads_ref)


def _assert_same_logits_and_gradients(model, logits: torch.Tensor, reference) -> None:
    logits_ref, grads_ref = reference
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    for grad, grad_ref in zip((p.grad for p in model.parameters()), grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dynamic", [False, None])
@pytest.mark.parametrize("doc_ids", [False, True])
def test_attamba_blocks_compile_whole_with_cyclic_offsets(doc_ids, dynamic):
    # What distributed.parallelize_model does on GPU: each block compiled, with static shapes, or
    # (distributed.compile_dynamic) letting what changes between calls turn symbolic. fullgraph
    # makes any graph break (an SSM backend, the attention masks) an error. Static, each layer's
    # cyclic offset specialises its own graph; dynamic, the second layer's compile makes the offset
    # symbolic and serves every later layer.
    model, inputs, reference = _cyclic_attamba_with_reference(doc_ids)
    for index, block in enumerate(list(model.layers)):
        model.layers[index] = torch.compile(block, backend="aot_eager", dynamic=dynamic, fullgraph=True)
    logits = model(*inputs)
    logits.square().mean().backward()
    offsets = len(set(model.layer_boundary_offsets(24)))
    assert offsets == 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == (offsets if dynamic is False else 2)
    _assert_same_logits_and_gradients(model, logits, reference)


def test_attamba_compiles_as_one_graph_with_cyclic_offsets():
    # distributed.compile_scope=model: the whole model but its head, every layer's chunk tables and
    # document bounds included, in one graph (fullgraph: no break), equal to the eager model with
    # gradients.
    from lingua.distributed import compile_whole

    model, inputs, reference = _cyclic_attamba_with_reference(doc_ids=True)
    compile_whole(model, backend="aot_eager", dynamic=False, fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. dynamo tracing through a cache
        logits = model(*inputs)
    logits.square().mean().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    _assert_same_logits_and_gradients(model, logits, reference)


@pytest.mark.gpu
@requires_cuda
def test_attamba_compiled_whole_by_inductor_with_the_speed_options_on_gpu():
    # The one-GPU setting of docs/benchmarks.md (twenty-fourth session): Inductor itself (not
    # aot_eager) with combo kernels and a higher realize_reads_threshold, through the training
    # loop's compile settings, equal to the eager model with gradients.
    from lingua.distributed import DistributedArgs, compile_settings, compile_whole

    model, inputs, reference = _cyclic_attamba_with_reference(doc_ids=True)
    args = DistributedArgs(compile=True, inductor_options={"combo_kernels": True, "realize_reads_threshold": 8})
    compile_whole(model, dynamic=False, fullgraph=True, **compile_settings(args))
    logits = model(*inputs)
    logits.square().mean().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    _assert_same_logits_and_gradients(model, logits, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_custom_ops_fakes_match_their_kernels(dtype):
    # torch.compile plans memory from the fake (meta) kernels; a wrong stride there failed the
    # compiled backward on the GPU once. opcheck compares fakes and real outputs, strides included.
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    b, n = 1, 19
    u, dt, A, B, C, D = (t.requires_grad_() for t in ssd_inputs(b, n, 2, 16, 1, 16, dtype=dtype))
    starts = uniform_starts(b, n, 4, offset=1).to(DEVICE)
    for final_state in (False, True):
        args = (u, dt, A, B, C, D, ssd_triton._as_bytes(starts), final_state, 16, 4)
        torch.library.opcheck(torch.ops.attamba.ssd_segmented_fwd.default, args, test_utils=checks)
    y, states, decay, _ = torch.ops.attamba.ssd_segmented_fwd(u, dt, A, B, C, D, ssd_triton._as_bytes(starts), False, 16, 4)
    backward_args = (torch.randn_like(y), *(t.detach() for t in (u, dt, A, B, C, D)), ssd_triton._as_bytes(starts),
                     states, decay, 16, 4)
    torch.library.opcheck(torch.ops.attamba.ssd_segmented_bwd.default, backward_args, test_utils=checks[:2])

    from apps.attamba.ssd_triton_conv import _distance_to_segment_start

    x = torch.randn(b, n, 8, device=DEVICE).to(dtype).requires_grad_()
    weight = torch.randn(8, 3, device=DEVICE).to(dtype).requires_grad_()
    bias = torch.randn(8, device=DEVICE).to(dtype).requires_grad_()
    dist = _distance_to_segment_start(starts, cap=2)
    for silu in (False, True):
        for conv_bias in (bias, None):
            args = (x, weight, conv_bias, dist, silu)
            torch.library.opcheck(torch.ops.attamba.causal_conv_segmented_fwd.default, args, test_utils=checks)
            backward_args = (torch.randn_like(x), x.detach(), weight.detach(),
                             None if conv_bias is None else conv_bias.detach(), dist, silu)
            torch.library.opcheck(torch.ops.attamba.causal_conv_segmented_bwd.default, backward_args, test_utils=checks[:2])


@pytest.mark.parametrize("cap", [0, 1, 3, 7])
def test_distance_to_segment_start_is_capped_positions_in_segment(cap):
    """The conv's per-token distance to its segment start, made of shifted copies of the starts,
    equals the scan-based positions in segment capped at ``cap`` (sequences shorter than it too)."""
    from apps.attamba.ssd_torch import positions_in_segment
    from apps.attamba.ssd_triton_conv import _distance_to_segment_start

    generator = torch.Generator().manual_seed(cap)
    for n in (1, 2, 5, 40):
        starts = torch.rand(3, n, generator=generator) < 0.3
        distance = _distance_to_segment_start(starts, cap)
        assert distance.dtype == torch.int32
        assert torch.equal(distance, positions_in_segment(starts).clamp_max(cap).to(torch.int32))


# The windowed kernels (no carried state) for segments no longer than a block.

from apps.attamba import ssd_triton_window  # noqa: E402
from apps.attamba.ssd_triton_window import ssd_segmented_window  # noqa: E402

SHORT_CHUNKINGS = {  # name: (segment_start maker, the bound the caller would pass, the period or None)
    "uniform": (lambda b, n: uniform_starts(b, n, 4), 4, (4, 0)),
    "cyclic_offset": (lambda b, n: uniform_starts(b, n, 8, offset=3), 8, (8, 3)),
    "random_lengths": (lambda b, n: random_length_starts(b, n, 5, seed=1), 9, None),
    "every_token": (lambda b, n: torch.ones(b, n, dtype=torch.bool), 1, (1, 0)),
    "block_long_straddling": (lambda b, n: uniform_starts(b, n, 32, offset=5), 32, (32, 5)),
    "documents_cut_chunks": (lambda b, n: uniform_starts(b, n, 8, offset=1) | document_starts(b, n, seed=3), 8, (8, 1)),
}
PERIODIC_CHUNKINGS = sorted(name for name, (_, _, period) in SHORT_CHUNKINGS.items() if period is not None)


def window_with_bound(bound, period=None):
    """The windowed scan given the caller's bound and, for blocks aligned to the segments, the period."""
    if period is not None:  # the aligned kernels must be the ones that run
        assert ssd_triton_window.block_layout(bound, period)[1] >= 0
    return lambda *args: ssd_segmented_window(*args, max_segment_len=bound, segment_period=period)


@pytest.mark.parametrize("chunking, aligned", [(name, False) for name in sorted(SHORT_CHUNKINGS)]
                         + [(name, True) for name in PERIODIC_CHUNKINGS])
def test_windowed_ssd_matches_reference(chunking, aligned):
    # n = 77 spans three 32-token blocks, partial last; segments cross block edges. Aligned, the
    # blocks start at k·Q - offset: the first one reaches before token 0, the last past n.
    b, n, h, p, g, s = 2, 77, 2, 16, 1, 40
    make_starts, bound, period = SHORT_CHUNKINGS[chunking]
    inputs = ssd_inputs(b, n, h, p, g, s, seed=4 if aligned else 0)
    assert_ssd_matches(ssd_reference, inputs, make_starts(b, n).to(DEVICE), 1e-5,
                       candidate=window_with_bound(bound, period if aligned else None))


def test_block_layout_aligns_blocks_only_to_periods_that_divide_them(monkeypatch):
    assert ssd_triton_window.block_layout(8, (8, 3)) == (16, 3)
    assert ssd_triton_window.block_layout(32, (32, 5)) == (32, 5)
    assert ssd_triton_window.block_layout(8, None) == (16, -1)
    assert ssd_triton_window.block_layout(6, (6, 2)) == (16, -1)  # 6 divides no power of two
    assert ssd_triton_window.block_layout(65, (65, 0)) == (128, -1)  # too long for one block: no window kernels
    monkeypatch.setattr(ssd_triton_window, "ALIGNED_BLOCKS", False)
    assert ssd_triton_window.block_layout(8, (8, 3)) == (16, -1)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("chunking, aligned", [
    ("cyclic_offset", False), ("cyclic_offset", True), ("random_lengths", False), ("documents_cut_chunks", False),
    ("documents_cut_chunks", True), ("block_long_straddling", False), ("block_long_straddling", True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_windowed_ssd_matches_reference_at_model_shape_on_gpu(chunking, aligned, dtype, record_property):
    # A 60M layer's paired K/V heads (16 of 64, two B/C groups, state 128) on fewer tokens. bf16 runs
    # the kernels' bf16 dots (ssd_triton_window.BF16_DOTS), which the interpreter never takes.
    b, n, h, p, g, s = 2, 300, 16, 64, 2, 128
    make_starts, bound, period = SHORT_CHUNKINGS[chunking]
    inputs = ssd_inputs(b, n, h, p, g, s, dtype=dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert_ssd_matches(ssd_reference, inputs, make_starts(b, n).to(DEVICE), tolerance, record_property,
                       candidate=window_with_bound(bound, period if aligned else None))


def test_windowed_ssd_with_head_groups_and_the_largest_block():
    b, n, h, p, g, s = 1, 150, 4, 8, 2, 16
    inputs = ssd_inputs(b, n, h, p, g, s, seed=3)
    starts = uniform_starts(b, n, 64, offset=20).to(DEVICE)
    assert ssd_triton_window.block_size(64) == 64
    assert_ssd_matches(ssd_reference, inputs, starts, 1e-5, candidate=window_with_bound(64))


@pytest.mark.parametrize("bound, final_state", [(None, False), (65, False), (8, True)])
def test_windowed_ssd_falls_back_to_the_chunked_kernels(monkeypatch, bound, final_state):
    calls = []
    monkeypatch.setattr(ssd_triton_window, "_window_forward", lambda *a: calls.append(a))
    inputs = ssd_inputs(1, 20, 2, 16, 1, 16)
    starts = uniform_starts(1, 20, 8).to(DEVICE)
    result = ssd_segmented_window(*inputs, starts, return_final_state=final_state, max_segment_len=bound)
    expected = ssd_segmented_triton(*inputs, starts, return_final_state=final_state)
    for got, want in zip(result if final_state else [result], expected if final_state else [expected]):
        torch.testing.assert_close(got, want)
    assert not calls


@pytest.mark.parametrize("packed", [False, True])
def test_windowed_ssd_op_fake_matches_and_compiles_whole(packed):
    b, n, g, s = 1, 40, 1, 16
    u, dt, A, B, C, D = ssd_inputs(b, n, 2, 16, g, s)
    x = join_scan_inputs(u, B, C).requires_grad_()
    u, dt, A, B, C, D = (t.requires_grad_() for t in (u, dt, A, B, C, D))
    starts = ssd_triton._as_bytes(uniform_starts(b, n, 8, offset=2).to(DEVICE))
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    for block_shift in (-1, 2):
        args = (x, dt, A, D, starts, g, s, 16, block_shift)
        torch.library.opcheck(torch.ops.attamba.ssd_window_fwd.default, args, test_utils=checks)
        backward_args = (torch.randn_like(u), *(t.detach() for t in (x, dt, A, D)), starts, g, s, 16, block_shift)
        torch.library.opcheck(torch.ops.attamba.ssd_window_bwd.default, backward_args, test_utils=checks[:2])
    torch._dynamo.reset()
    segment_start = uniform_starts(b, n, 8, offset=2).to(DEVICE)
    if packed:
        def scan(x, dt, A, D):
            return ssd_triton_window.ssd_segmented_window_packed(x, dt, A, D, segment_start, g, s, max_segment_len=8,
                                                                 segment_period=(8, 2))
        inputs = (x, dt, A, D)
    else:
        def scan(u, dt, A, B, C, D):
            return window_with_bound(8)(u, dt, A, B, C, D, segment_start)
        inputs = (u, dt, A, B, C, D)
    compiled = torch.compile(scan, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), scan(*inputs))


def packed_inputs(b, n, h, p, g, s, seed=0):
    """(x, dt, A, D): u | B | C side by side in x [b, n, h·p + 2·g·s], as a KV-SSM's conv writes them."""
    u, dt, A, B, C, D = ssd_inputs(b, n, h, p, g, s, seed=seed)
    return [join_scan_inputs(u, B, C), dt, A, D]


def assert_packed_scan_matches(inputs, heads, groups, state_dim, segment_start, bound, period=None):
    """ssd_segmented_window_packed against a split and ssd_reference in float64: the output and the
    gradients of x, dt, A and D."""
    def oracle(x, dt, A, D, segment_start):
        u, B, C = split_scan_inputs(x, heads, groups, state_dim)
        return ssd_reference(u, dt, A, B, C, D, segment_start)

    def candidate(x, dt, A, D, segment_start):
        return ssd_triton_window.ssd_segmented_window_packed(x, dt, A, D, segment_start, groups, state_dim,
                                                             max_segment_len=bound, segment_period=period)

    x = inputs[0]
    y_shape = split_scan_inputs(x, heads, groups, state_dim)[0].shape
    assert_scan_matches(candidate, oracle, inputs, ("x", "dt", "A", "D"), y_shape, segment_start, 1e-5)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("chunking", ["cyclic_offset", "documents_cut_chunks"])
def test_packed_windowed_scan_matches_reference(monkeypatch, chunking, aligned):
    # Two groups of two heads: dB and dC land in the packed gradient after the heads' sums. Heads of
    # 32 columns taken 16 at a time forward and backward (*_TILE_P), as the kernels split a 64-column head.
    monkeypatch.setattr(ssd_triton_window, "FORWARD_TILE_P", 16)
    monkeypatch.setattr(ssd_triton_window, "BACKWARD_TILE_P", 16)
    b, n, h, p, g, s = 2, 77, 4, 32, 2, 24
    make_starts, bound, period = SHORT_CHUNKINGS[chunking]
    assert_packed_scan_matches(packed_inputs(b, n, h, p, g, s, seed=2), h, g, s, make_starts(b, n).to(DEVICE), bound,
                               period if aligned else None)


def test_packed_scan_falls_back_to_the_chunked_kernels(monkeypatch):
    calls = []
    monkeypatch.setattr(ssd_triton_window, "_window_forward", lambda *a: calls.append(a))
    b, n, h, p, g, s = 1, 20, 2, 16, 1, 16
    assert_packed_scan_matches(packed_inputs(b, n, h, p, g, s), h, g, s, uniform_starts(b, n, 8).to(DEVICE), None)
    assert not calls


def test_packed_scan_rejects_a_bad_width():
    x, dt, A, D = packed_inputs(1, 8, 2, 16, 1, 16)
    with pytest.raises(ValueError, match="h·p \\+ 2·g·s"):
        ssd_triton_window.ssd_segmented_window_packed(x[..., 1:], dt, A, D, uniform_starts(1, 8, 4), 1, 16, max_segment_len=4)


@pytest.mark.parametrize("strategy", ["cyclic", "random"])
def test_attamba_with_windowed_ssm_matches_the_torch_ssm(strategy):
    # The model passes each layer's segment bound (P; 2P-1 for random chunks) to the backend.
    from apps.attamba.args import AttambaArgs
    from apps.attamba.model import AttambaLM
    from lingua.args import build_config

    settings = dict(dim=32, n_layers=2, n_heads=2, state_dim=16, ssm_heads=2, vocab_size=40, max_seqlen=80,
                    token_chunk=8, leading_tokens=3, chunk_strategy=strategy)
    tokens = torch.randint(0, 40, (2, 70), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    doc_ids = torch.tensor([[0] * 30 + [1] * 40, [0] * 70], device=DEVICE)
    results = []
    for impl in ("torch", "triton_window"):
        torch.manual_seed(0)
        model = AttambaLM(build_config(AttambaArgs, {**settings, "ssm_impl": impl})).to(DEVICE)
        model.init_weights()
        torch.manual_seed(1)  # the same random chunks for both
        logits = model(tokens, doc_ids)
        logits.square().mean().backward()
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    (logits, grads), (logits_ref, grads_ref) = results[1], results[0]
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "groups, state_dim, head_dim, conv_size, dt_bias, fused_conv, by_position",
    [(1, 16, 8, 3, True, False, False), (2, 12, 20, 3, True, False, True), (1, 16, 8, 4, True, True, False),
     (2, 12, 20, 2, False, True, True), (1, 80, 72, 4, True, True, False)],
)
def test_fused_decode_step_matches_the_torch_recurrence(
    groups, state_dim, head_dim, conv_size, dt_bias, fused_conv, by_position
):
    # state_dim 12 and head_dim 20 leave partly filled tiles (16 rows a program, 16 state columns);
    # state 80 and head dim 72 give 2·72 + 4·80 = 464 conv channels: conv programs of 128 channels
    # cross the u | B | C borders, and the last is partly filled. by_position: the kernels read
    # the segment starts from a table at each row's position, as a cache's decode step has them.
    from apps.attamba.ssm import KVSSM, PairedStepWeights, SSMArgs, init_paired_state, paired_step
    from apps.attamba.ssm_step_triton import conv_step_, ssm_step_

    torch.manual_seed(0)
    args = SSMArgs(state_dim=state_dim, ssm_heads=2, n_groups=groups, conv_size=conv_size, dt_bias=dt_bias, impl="torch")
    first, second = (KVSSM(16, 2 * head_dim, args).to(DEVICE) for _ in range(2))
    reference = PairedStepWeights.of(first, second, torch.float32)
    fused = PairedStepWeights.of(first, second, torch.float32)
    fused.fused_step = ssm_step_
    fused.fused_conv = conv_step_ if fused_conv else None
    width = first.in_proj.out_features
    batch = 3
    state = init_paired_state(first, batch, DEVICE, torch.float32)
    state.conv.normal_()
    state.ssm.normal_()
    state.ssm[1] = 1e30  # row 1 starts a segment first: nothing of this may survive
    expected_state = init_paired_state(first, batch, DEVICE, torch.float32)
    expected_state.copy_(state)
    storage = state.ssm.data_ptr()
    starts = torch.tensor([[False, True, False], [False, False, True], [True, False, False]], device=DEVICE)
    with torch.no_grad():
        for t in range(starts.shape[0]):
            x_1, x_2 = torch.randn(2, batch, 16, device=DEVICE)
            # Strided views of one output, as a decode step's stacked matmul gives them.
            stacked = torch.randn(batch, 3 + 2 * width, device=DEVICE)
            k_1, k_2 = stacked[:, 3 : 3 + width], stacked[:, 3 + width :]
            k_1.copy_(first.in_proj(x_1))
            k_2.copy_(second.in_proj(x_2))
            expected = paired_step(reference, k_1, k_2, expected_state, starts[t])
            if by_position:  # a table whose entries at the rows' positions are starts[t]
                positions = torch.tensor([5, 2, 7], device=DEVICE)
                table = torch.zeros(9, dtype=torch.bool, device=DEVICE).index_put((positions,), starts[t])
                table[[0, 1, 3]] = ~table[[0, 1, 3]].any()  # entries no row reads differ from the rest
                got = paired_step(fused, k_1, k_2, state, table, in_place=True, positions=positions)
            else:
                got = paired_step(fused, k_1, k_2, state, starts[t], in_place=True)
            expected_state = expected[2]
            for got_y, expected_y in zip(got[:2], expected[:2]):
                torch.testing.assert_close(got_y, expected_y, rtol=1e-5, atol=1e-5)
            assert got[2] is state and state.ssm.data_ptr() == storage
            torch.testing.assert_close(state.ssm, expected_state.ssm, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(state.conv, expected_state.conv)


def test_fused_conv_step_refuses_bad_shapes():
    from apps.attamba.ssm_step_triton import conv_step_

    hidden, bc, heads, batch = 8, 4, 2, 2
    channels, width = hidden + 2 * bc, 2 * hidden + 2 * bc + heads
    projected = torch.zeros(batch, width, device=DEVICE)
    weight, bias = torch.zeros(2 * channels, 4, device=DEVICE), torch.zeros(2 * channels, device=DEVICE)
    state, starts = torch.zeros(batch, 2 * channels, 3, device=DEVICE), torch.zeros(batch, dtype=torch.bool, device=DEVICE)
    conv_step_(projected, projected, weight, bias, None, starts, state, hidden, bc, heads)  # fits
    with pytest.raises(ValueError, match="expected conv_state"):
        conv_step_(projected, projected, weight[:, :3], bias, None, starts, state, hidden, bc, heads)
    with pytest.raises(ValueError, match="both projections"):
        conv_step_(projected[:, 1:], projected, weight, bias, None, starts, state, hidden, bc, heads)
    with pytest.raises(ValueError, match="dt_bias"):
        conv_step_(projected, projected, weight, bias, bias, starts, state, hidden, bc, heads)
    with pytest.raises(ValueError, match="segment_start"):
        conv_step_(projected, projected, weight, bias, None, starts[:1], state, hidden, bc, heads)
    positions = torch.tensor([0, 1], device=DEVICE)
    conv_step_(projected, projected, weight, bias, None, starts, state, hidden, bc, heads, positions=positions)  # fits
    with pytest.raises(ValueError, match="table"):
        conv_step_(projected, projected, weight, bias, None, starts, state, hidden, bc, heads, positions=positions[:1])


def test_fused_conv_step_op_passes_opcheck_and_compiles():
    from apps.attamba.ssm_step_triton import conv_step_

    torch.manual_seed(0)
    hidden, bc, heads, batch = 8, 4, 2, 2
    channels, width = hidden + 2 * bc, 2 * hidden + 2 * bc + heads
    first, second = torch.randn(2, batch, width, device=DEVICE)
    weight, bias = torch.randn(2 * channels, 4, device=DEVICE), torch.randn(2 * channels, device=DEVICE)
    dt_bias, starts = torch.randn(2 * heads, device=DEVICE), torch.tensor([True, False], device=DEVICE)
    state = torch.randn(batch, 2 * channels, 3, device=DEVICE)
    checks = ("test_schema", "test_faketensor")
    for positions in (None, torch.tensor([1, 0], device=DEVICE)):
        arguments = (first, second, weight, bias, dt_bias, starts, positions, state, hidden, bc, heads, torch.float32)
        torch.library.opcheck(torch.ops.attamba.conv_step_.default, arguments, test_utils=checks)
    arguments = (first, second, weight, bias, dt_bias, starts, state, hidden, bc, heads, torch.float32)
    torch._dynamo.reset()
    compiled_state, eager_state = state.clone(), state.clone()
    compiled = torch.compile(lambda s: conv_step_(*arguments[:6], s, *arguments[7:]), backend="aot_eager", fullgraph=True)
    for got, expected in zip(compiled(compiled_state), conv_step_(*arguments[:6], eager_state, *arguments[7:])):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(compiled_state, eager_state)
    assert not torch.equal(compiled_state, state)


def test_decode_step_ops_take_any_row_stride():
    """The ops leave the layout to Inductor (no copy to eager's strides) and make a dense last
    dimension themselves where they are given none."""
    torch.manual_seed(0)
    for op in (torch.ops.attamba.conv_step_.default, torch.ops.attamba.ssm_step_.default):
        assert torch.Tag.flexible_layout in op.tags
    heads, head_dim, state_dim = 2, 8, 16
    width = heads * head_dim + 2 * state_dim
    xbc = torch.randn(width, 2, device=DEVICE).t()  # [2, width] with a last stride of 2
    dt, A, D = torch.rand(2, heads, device=DEVICE), -torch.rand(heads, device=DEVICE), torch.randn(heads, device=DEVICE)
    starts = torch.tensor([True, False], device=DEVICE)
    state = torch.randn(2, heads, head_dim, state_dim, device=DEVICE)
    dense_state = state.clone()
    got = torch.ops.attamba.ssm_step_.default(xbc, dt, A, D, starts, None, state, 1)
    torch.testing.assert_close(got, torch.ops.attamba.ssm_step_.default(xbc.contiguous(), dt, A, D, starts, None, dense_state, 1))
    torch.testing.assert_close(state, dense_state)


def test_fused_decode_step_refuses_bad_shapes():
    from apps.attamba.ssm_step_triton import ssm_step_

    state = torch.zeros(2, 4, 8, 16, device=DEVICE)
    xbc = torch.zeros(2, 4 * 8 + 2 * 16, device=DEVICE)
    dt, A, D, starts = torch.zeros(2, 4, device=DEVICE), torch.zeros(4, device=DEVICE), torch.zeros(4, device=DEVICE), torch.zeros(2, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        ssm_step_(xbc, dt, A, D, starts, state.double(), 1)
    with pytest.raises(ValueError, match="multiple of groups"):
        ssm_step_(xbc, dt, A, D, starts, state, 3)
    with pytest.raises(ValueError, match="expected xbc"):
        ssm_step_(xbc[:, 1:], dt, A, D, starts, state, 1)
    with pytest.raises(ValueError, match="segment_start"):
        ssm_step_(xbc, dt, A, D, starts[:1], state, 1)
    with pytest.raises(ValueError, match="table"):
        ssm_step_(xbc, dt, A, D, starts[:, None], state, 1, positions=torch.zeros(2, dtype=torch.long, device=DEVICE))


def test_fused_decode_step_op_passes_opcheck_and_compiles():
    from apps.attamba.ssm_step_triton import ssm_step_

    torch.manual_seed(0)
    heads, head_dim, state_dim = 4, 8, 16
    xbc = torch.randn(2, heads * head_dim + 2 * state_dim, device=DEVICE)
    dt, A, D = torch.rand(2, heads, device=DEVICE), -torch.rand(heads, device=DEVICE), torch.randn(heads, device=DEVICE)
    starts = torch.tensor([True, False], device=DEVICE)
    state = torch.randn(2, heads, head_dim, state_dim, device=DEVICE)
    checks = ("test_schema", "test_faketensor")
    for positions in (None, torch.tensor([1, 1], device=DEVICE)):
        arguments = (xbc, dt, A, D, starts, positions, state.clone(), 1)
        torch.library.opcheck(torch.ops.attamba.ssm_step_.default, arguments, test_utils=checks)
    torch._dynamo.reset()
    compiled_state, eager_state = state.clone(), state.clone()
    compiled = torch.compile(lambda s: ssm_step_(xbc, dt, A, D, starts, s, 1) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(compiled_state), ssm_step_(xbc, dt, A, D, starts, eager_state, 1) * 2)
    torch.testing.assert_close(compiled_state, eager_state)
    assert not torch.equal(compiled_state, state)


def test_mamba_decodes_with_the_fused_step_like_the_full_forward(monkeypatch):
    from apps.attamba.ssm_step_triton import ssm_step_
    from apps.mamba.cache import MambaCache
    from lingua.generate import prefill_decode_logits
    from tests.apps.mamba.test_model import VOCAB, tiny_mamba

    calls = []

    def counting_step(*args):
        calls.append(1)
        return ssm_step_(*args)

    original = MambaCache.__init__

    def with_fused_step(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.fused_step = counting_step  # what a CUDA cache picks; here under the interpreter

    monkeypatch.setattr(MambaCache, "__init__", with_fused_step)
    model = tiny_mamba().eval().to(DEVICE)
    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        full = model(tokens)
        cached = prefill_decode_logits(model, tokens, torch.tensor([1, 5, 12], device=DEVICE))
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    assert calls, "the decode steps ran the Triton recurrence"


@pytest.mark.parametrize("overrides", [dict(token_chunk=4, leading_tokens=3), dict(kv_proj=True, token_chunk=8, leading_tokens=16, conv_size=2)])
def test_attamba_decodes_with_the_fused_conv_and_step_like_the_full_forward(monkeypatch, overrides):
    from apps.attamba.ssm import PairedStepWeights
    from apps.attamba.ssm_step_triton import conv_step_, ssm_step_
    from tests.apps.attamba.test_cache import MIXED_LENGTHS, assert_decode_matches_forward, tiny_attamba

    calls = []

    def counting(kernel):
        def run(*args, **kwargs):
            calls.append(kernel.__name__)
            return kernel(*args, **kwargs)
        return run

    original = PairedStepWeights.of

    def with_kernels(*args, **kwargs):
        weights = original(*args, **kwargs)
        # What a CUDA cache picks; here under the interpreter.
        weights.fused_step, weights.fused_conv = counting(ssm_step_), counting(conv_step_)
        return weights

    monkeypatch.setattr(PairedStepWeights, "of", staticmethod(with_kernels))
    # On CUDA, head dim 16: the full forward's compiled FlexAttention needs at least 16.
    model = tiny_attamba(**overrides, dim=64 if DEVICE == "cuda" else 32).to(DEVICE)
    assert_decode_matches_forward(model, n=22, lengths=MIXED_LENGTHS, device=DEVICE)
    assert "conv_step_" in calls and "ssm_step_" in calls
