"""KVSSM: backends agree, decoding token by token equals the forward pass, resets are exact."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from apps.attamba.ssd_torch import causal_conv_segmented, ssd_segmented
from apps.attamba.ssm import (
    KVSSM, PairedStepWeights, SSMArgs, SSMState, init_paired_state, load_backend, paired_forward, paired_state, paired_step,
)

DIM_IN, DIM_OUT = 6, 8


def tiny_ssm(dtype=torch.float64, seed=0, **overrides) -> KVSSM:
    torch.manual_seed(seed)
    settings = dict(state_dim=4, ssm_heads=2, n_groups=1, conv_size=4, impl="torch")
    settings.update(overrides)
    return KVSSM(DIM_IN, DIM_OUT, SSMArgs(**settings)).to(dtype)


def inputs(batch, n, dtype, seed=1):
    """x [batch, n, DIM_IN] and random segment starts (about one token in four)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, DIM_IN, generator=generator, dtype=torch.float64).to(dtype)
    segment_start = torch.rand(batch, n, generator=generator) < 0.25
    return x, segment_start


def decode(module: KVSSM, x, segment_start, state=None):
    """Run ``module.step`` over every token; returns outputs [B, n, dim_out] and the last state."""
    if state is None:
        state = module.init_state(x.shape[0], x.device, x.dtype)
    outputs = []
    for t in range(x.shape[1]):
        y, state = module.step(x[:, t], state, segment_start[:, t])
        outputs.append(y)
    return torch.stack(outputs, dim=1), state


# Relative tolerances. Outputs of fp64 modules are only fp32-exact: lingua's RMSNorm normalises
# in fp32. SSM states and conv tails keep the full precision.
OUTPUT_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}
STATE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_close(actual, expected, tolerance):
    assert actual.shape == expected.shape
    if expected.numel() == 0:
        return
    error = (actual - expected).abs().max().item()
    assert error <= tolerance * max(1.0, expected.abs().max().item()), f"max abs error {error:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [1, 2])
def test_torch_backend_matches_reference(dtype, groups):
    module = tiny_ssm(dtype, n_groups=groups)
    x, segment_start = inputs(2, 19, dtype)
    fast = module(x, segment_start)
    module.impl = "reference"
    assert fast.shape == (2, 19, DIM_OUT)
    assert_close(fast, module(x, segment_start), OUTPUT_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("overrides", [{}, {"n_groups": 2, "conv_size": 2}, {"conv_size": 1, "dt_bias": False}])
def test_decode_equals_forward(dtype, overrides):
    module = tiny_ssm(dtype, **overrides)
    x, segment_start = inputs(3, 21, dtype)
    segment_start[1] = False  # one row is a single segment
    expected, expected_state = module.forward_with_state(x, segment_start)
    decoded, state = decode(module, x, segment_start)
    assert_close(decoded, expected, OUTPUT_TOLERANCE[dtype])
    assert state.ssm.dtype == expected_state.ssm.dtype
    assert_close(state.ssm, expected_state.ssm, STATE_TOLERANCE[dtype])
    assert_close(state.conv, expected_state.conv, STATE_TOLERANCE[dtype])


@pytest.mark.parametrize("prefill_len", [1, 2, 9, 13])
def test_prefill_then_decode_equals_forward(prefill_len):
    """The state from forward_with_state continues decoding exactly, including prefixes shorter
    than the conv tail and a segment that started right before the prefill ends."""
    module = tiny_ssm(torch.float64)
    x, segment_start = inputs(2, 16, torch.float64, seed=2)
    segment_start[0, 12] = True
    expected = module(x, segment_start)
    prefilled, state = module.forward_with_state(x[:, :prefill_len], segment_start[:, :prefill_len])
    decoded, _ = decode(module, x[:, prefill_len:], segment_start[:, prefill_len:], state)
    assert_close(torch.cat([prefilled, decoded], dim=1), expected, OUTPUT_TOLERANCE[torch.float64])


@pytest.mark.parametrize("same_input", [False, True])  # True: one in_proj matmul for both
@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("overrides", [{}, {"n_groups": 2, "conv_size": 2}, {"dt_bias": False}])
def test_paired_forward_equals_two_calls(impl, overrides, same_input):
    first, second = tiny_ssm(seed=0, impl=impl, **overrides), tiny_ssm(seed=5, impl=impl, **overrides)
    x, segment_start = inputs(2, 17, torch.float64)
    x_second = x if same_input else inputs(2, 17, torch.float64, seed=9)[0]

    def grads(outputs):
        loss = sum((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() for out in outputs)
        params = [*first.parameters(), *second.parameters()]
        return torch.autograd.grad(loss, params)

    paired = paired_forward(first, second, x, x_second, segment_start)
    separate = (first(x, segment_start), second(x_second, segment_start))
    for got, expected in zip(paired, separate):
        assert_close(got, expected, 1e-12)
    for got, expected in zip(grads(paired), grads(separate)):
        assert_close(got, expected, 1e-12)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
@pytest.mark.parametrize("same_input", [False, True])  # True: the z₁ | z₂ matmul feeds the fused gates
# None: the chunked scan on views of the conv output; with the period, blocks aligned to the segments.
@pytest.mark.parametrize("max_segment_len, segment_period", [(4, None), (4, (4, 3)), (None, None)])
def test_paired_forward_on_the_triton_kernels_equals_two_torch_calls(same_input, max_segment_len, segment_period):
    """The Triton path fuses across the two SSMs (conv with its SiLU, the scan on u | B | C, both
    gates in one kernel); each SSM alone in PyTorch is the oracle, gradients included, and every
    gradient comes back laid out like its parameter (else accumulating it copies it, eagerly, in
    every step). On CPU the kernels run under the Triton interpreter."""
    from tests.triton_interpreter import allow_one_element_index_in_interpreter

    if not torch.cuda.is_available():
        allow_one_element_index_in_interpreter()
    first, second = (tiny_ssm(torch.float32, seed=seed, impl="triton_window", n_groups=2) for seed in (0, 5))
    x, _ = inputs(2, 17, torch.float32)
    segment_start = (torch.arange(17) % 4 == 1).expand(2, 17).clone()  # (t + 3) mod 4 == 0: period (4, 3)
    x_second = x if same_input else inputs(2, 17, torch.float32, seed=9)[0]

    def outputs_and_grads(run):
        outputs = run()
        loss = sum((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() for out in outputs)
        return outputs, torch.autograd.grad(loss, [*first.parameters(), *second.parameters()])

    paired = outputs_and_grads(lambda: paired_forward(first, second, x, x_second, segment_start, max_segment_len,
                                                      segment_period))
    params = [*first.parameters(), *second.parameters()]
    assert [grad.stride() for grad in paired[1]] == [param.stride() for param in params]
    first.impl = second.impl = "torch"
    separate = outputs_and_grads(lambda: (first(x, segment_start), second(x_second, segment_start)))
    for got, expected in zip([*paired[0], *paired[1]], [*separate[0], *separate[1]]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def step_pair(first, second, x_first, x_second, state, segment_start):
    """One paired decode step of two SSMs from their inputs (as a cache takes it, prepared)."""
    weights = PairedStepWeights.of(first, second, state.ssm.dtype)
    return paired_step(weights, first.in_proj(x_first), second.in_proj(x_second), state, segment_start)


@pytest.mark.parametrize("overrides", [{}, {"n_groups": 2, "conv_size": 2}, {"conv_size": 1, "dt_bias": False}])
def test_paired_step_equals_two_steps(overrides):
    first, second = tiny_ssm(seed=0, **overrides), tiny_ssm(seed=5, **overrides)
    x, segment_start = inputs(3, 9, torch.float64)
    x_second = inputs(3, 9, torch.float64, seed=9)[0]
    # Start from non-zero states (as after a prefill), checking paired_state's layout too.
    _, state_1 = first.forward_with_state(x, segment_start)
    _, state_2 = second.forward_with_state(x_second, segment_start)
    state = paired_state(first, state_1, state_2)
    for t in range(x.shape[1]):
        y_1, state_1 = first.step(x[:, t], state_1, segment_start[:, t])
        y_2, state_2 = second.step(x_second[:, t], state_2, segment_start[:, t])
        got_1, got_2, state = step_pair(first, second, x[:, t], x_second[:, t], state, segment_start[:, t])
        assert_close(got_1, y_1, 1e-12)
        assert_close(got_2, y_2, 1e-12)
    expected = paired_state(first, state_1, state_2)
    assert_close(state.conv, expected.conv, 1e-12)
    assert_close(state.ssm, expected.ssm, 1e-12)


def test_paired_decode_from_zero_state_equals_forward():
    first, second = tiny_ssm(seed=0, n_groups=2), tiny_ssm(seed=5, n_groups=2)
    x, segment_start = inputs(2, 11, torch.float64)
    expected_1, expected_2 = paired_forward(first, second, x, 2 * x, segment_start)
    state = init_paired_state(first, 2, x.device, x.dtype)
    for t in range(x.shape[1]):
        y_1, y_2, state = step_pair(first, second, x[:, t], 2 * x[:, t], state, segment_start[:, t])
        assert_close(y_1, expected_1[:, t], 1e-10)
        assert_close(y_2, expected_2[:, t], 1e-10)


def test_shared_input_pair_writes_the_conv_input_with_its_own_matmul():
    """Without kv_proj, the paired conv input comes out of a matmul of its own, already in the
    side-by-side layout (dense: no copy into it, and its gradient is not concatenated with z's and
    dt's), and it equals that layout built from the two SSMs; z₁ and z₂ come side by side from
    another, as the fused gates read them."""
    from apps.attamba.ssm import _PairInputs, _PairParameters

    first, second = tiny_ssm(seed=0, n_groups=2), tiny_ssm(seed=5, n_groups=2)
    x, _ = inputs(2, 9, torch.float64)
    params = _PairParameters.of(first, second, torch.float64)
    pair = _PairInputs.shared(first, second, params, x)
    assert pair.conv_in.is_contiguous() and pair.conv_in.shape[-1] == 2 * first.conv_channels
    assert pair.z_side_by_side.is_contiguous() and pair.z_side_by_side.shape[-1] == 2 * first.hidden_dim
    assert all(z.data_ptr() == pair.z_side_by_side[..., i * first.hidden_dim:].data_ptr() for i, z in enumerate(pair.z))
    expected = _PairInputs.of(first, params, first.in_proj(x), second.in_proj(x))
    assert_close(pair.conv_in, expected.conv_in, 1e-12)
    assert_close(pair.dt, expected.dt, 1e-12)
    for got, want in zip(pair.z, expected.z):
        assert_close(got, want, 1e-12)


def test_paired_forward_refuses_mismatched_ssms():
    x, segment_start = inputs(1, 5, torch.float64)
    with pytest.raises(ValueError, match="same shapes"):
        paired_forward(tiny_ssm(), tiny_ssm(state_dim=8), x, x, segment_start)


def test_step_reset_forgets_the_past():
    module = tiny_ssm(torch.float64)
    x, _ = inputs(2, 8, torch.float64, seed=3)
    no_starts = torch.zeros(2, 8, dtype=torch.bool)
    _, state = decode(module, x, no_starts)
    fresh = module.init_state(2, x.device, x.dtype)
    token = x[:, 0]
    reset_rows = torch.tensor([True, False])
    after_reset, reset_state = module.step(token, state, reset_rows)
    from_scratch, _ = module.step(token, fresh, reset_rows)
    assert torch.equal(after_reset[0], from_scratch[0])
    assert not torch.allclose(after_reset[1], from_scratch[1])
    assert not torch.equal(reset_state.ssm[1], state.ssm[1]) and state.ssm[1].abs().sum() > 0


def test_forward_resets_exactly_at_segment_starts():
    """Changing tokens before a start leaves every output from the start on unchanged."""
    module = tiny_ssm(torch.float32)
    x, _ = inputs(1, 20, torch.float32, seed=4)
    segment_start = torch.zeros(1, 20, dtype=torch.bool)
    segment_start[0, 11] = True
    changed = x.clone()
    changed[:, 4:11] += 0.5
    before, after = module(x, segment_start), module(changed, segment_start)
    assert torch.equal(before[:, 11:], after[:, 11:])
    assert not torch.allclose(before[:, 4:11], after[:, 4:11])
    no_start = torch.zeros_like(segment_start)
    assert not torch.allclose(module(x, no_start)[:, 11:], module(changed, no_start)[:, 11:])


def test_none_segment_start_means_one_segment():
    module = tiny_ssm(torch.float32)
    x, _ = inputs(2, 9, torch.float32)
    assert torch.equal(module(x, None), module(x, torch.zeros(2, 9, dtype=torch.bool)))


def test_gradients_reach_every_parameter():
    module = tiny_ssm(torch.float64, n_groups=2)
    x, segment_start = inputs(2, 12, torch.float64)
    module(x, segment_start).square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient for {name}"


def test_backend_gradients_match_reference():
    x, segment_start = inputs(2, 11, torch.float64, seed=5)
    gradients = {}
    for impl in ("torch", "reference"):
        module = tiny_ssm(torch.float64, impl=impl)
        module(x, segment_start).square().sum().backward()
        gradients[impl] = {name: p.grad for name, p in module.named_parameters()}
    for name, expected in gradients["reference"].items():
        assert_close(gradients["torch"][name], expected, OUTPUT_TOLERANCE[torch.float64])


def test_reset_parameters_follows_the_args():
    args = SSMArgs(state_dim=4, ssm_heads=64, A_init_min=2.0, A_init_max=3.0, dt_min=0.01, dt_max=0.05)
    module = KVSSM(DIM_IN, 128, args)
    A = -torch.exp(module.A_log)
    assert (A <= -2.0).all() and (A >= -3.0).all()
    dt = torch.nn.functional.softplus(module.dt_bias)
    assert (dt >= 0.01 - 1e-6).all() and (dt <= 0.05 + 1e-6).all()
    assert torch.equal(module.D, torch.ones(64))
    assert module.in_proj.weight.shape == (2 * 128 + 2 * 4 + 64, DIM_IN)
    assert module.conv_weight.shape == (128 + 2 * 4, 4)


def test_dt_floor_clamps_the_initial_step():
    module = KVSSM(DIM_IN, 8, SSMArgs(state_dim=2, ssm_heads=2, dt_min=1e-6, dt_max=1e-6, dt_init_floor=1e-3))
    assert torch.allclose(torch.nn.functional.softplus(module.dt_bias), torch.full((2,), 1e-3))


def test_state_rows_index_and_assign():
    module = tiny_ssm(torch.float32)
    state = module.init_state(3, torch.device("cpu"), torch.bfloat16)
    assert state.conv.shape == (3, module.conv_channels, 3) and state.conv.dtype == torch.bfloat16
    assert state.ssm.shape == (3, 2, 4, 4) and state.ssm.dtype == torch.float32
    other = SSMState(torch.ones(1, module.conv_channels, 3, dtype=torch.bfloat16), torch.ones(1, 2, 4, 4))
    state[torch.tensor([2])] = other
    assert state[2].ssm.sum() == 32 and state[0].ssm.sum() == 0 and state.batch_size == 3
    assert state.reset(torch.tensor([False, False, True])).ssm.sum() == 0


def test_auto_uses_torch_on_cpu():
    assert load_backend("auto", torch.device("cpu")) == (ssd_segmented, causal_conv_segmented, None, None, None, None)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_auto_uses_the_windowed_kernels_on_cuda():
    # Only the device type is read, so this runs without a GPU; the windowed scan falls back to
    # the chunked kernels by itself where no segment bound is given.
    from apps.attamba.ssd_triton import causal_conv_segmented_triton
    from apps.attamba.gated_norm_triton import gated_rms_norm_triton
    from apps.attamba.rotary_triton import rotate_qkv_triton
    from apps.attamba.ssd_triton_conv import causal_conv_silu_segmented_triton
    from apps.attamba.ssd_triton_window import ssd_segmented_window, ssd_segmented_window_packed

    expected = (ssd_segmented_window, causal_conv_segmented_triton, causal_conv_silu_segmented_triton,
                ssd_segmented_window_packed, gated_rms_norm_triton, rotate_qkv_triton)
    assert load_backend("auto", torch.device("cuda")) == expected


def test_missing_triton_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "apps.attamba.ssd_triton", None)  # makes the import fail
    with pytest.raises(ImportError, match="ssm impl 'triton'.*'torch'"):
        load_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"state_dim": 0}, "ssm.state_dim must be >= 1, got 0"),
        ({"ssm_heads": 3, "n_groups": 2}, "ssm.ssm_heads=3 must be a multiple of ssm.n_groups=2"),
        ({"ssm_hidden_dim": 10, "ssm_heads": 4}, r"hidden width \(10.*multiple of ssm.ssm_heads=4"),
        ({"A_init_min": 5.0, "A_init_max": 1.0}, "A_init_min and ssm.A_init_max"),
        ({"dt_min": 0.0}, "ssm.dt_min and ssm.dt_max"),
        ({"dt_init_floor": 0.0}, "dt_init_floor must be > 0"),
        ({"impl": "cuda"}, "ssm.impl must be one of auto, torch, triton, triton_window, mamba_ssm, reference; got 'cuda'"),
    ],
)
def test_args_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        SSMArgs(**overrides)


def test_output_width_must_split_into_heads():
    with pytest.raises(ValueError, match=r"hidden width \(10.*ssm.ssm_heads=4"):
        KVSSM(DIM_IN, 10, SSMArgs(ssm_heads=4))


MAMBA_AVAILABLE = all(importlib.util.find_spec(name) for name in ("mamba_ssm", "causal_conv1d"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="mamba-ssm kernels need CUDA")
@pytest.mark.skipif(not MAMBA_AVAILABLE, reason="mamba-ssm / causal-conv1d not installed (pip install -e .[fast])")
def test_mamba_ssm_backend_matches_torch():
    module = tiny_ssm(torch.float32, state_dim=16, ssm_heads=2).cuda()
    x, segment_start = inputs(2, 150, torch.float32)
    x, segment_start = x.cuda(), segment_start.cuda()
    expected, expected_state = module.forward_with_state(x, segment_start)
    module.impl = "mamba_ssm"
    actual, state = module.forward_with_state(x, segment_start)
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(state.ssm, expected_state.ssm, rtol=1e-3, atol=1e-3)
    assert math.isfinite(actual.sum().item())
