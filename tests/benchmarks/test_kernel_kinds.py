"""Kernel kinds (benchmarks/kernel_kinds.py) on kernel names as the profiler reports them."""

from __future__ import annotations

import pytest
import torch

from benchmarks.kernel_kinds import KINDS, OTHER, format_kinds, format_top_kernels, kind_of, time_by_kind


@pytest.mark.parametrize("kernel, kind", [
    ("_window_bwd_kernel", "KV-SSM scan and conv"),
    ("_conv_dw_kernel", "KV-SSM scan and conv"),
    ("_gated_norm_bwd_kernel", "KV-SSM output gates"),
    ("_dkv_kernel", "attention"),
    ("pytorch_flash::flash_bwd_kernel<Flash_bwd_kernel_traits<64, 128>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0", "attention"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdam>", "optimizer"),
    ("triton_poi_fused__to_copy_add_mul_0", "fused by Inductor"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", OTHER),
])
def test_kernels_get_their_kind_by_name(kernel, kind):
    assert kind_of(kernel) == kind


def test_times_sum_by_kind_and_print_with_shares():
    times = {"_window_fwd_kernel": 300.0, "_conv_fwd_kernel": 100.0, "nvjet_a": 500.0, "nvjet_b": 100.0, "memset": 0.0}
    totals = time_by_kind(times)
    assert list(totals) == [kind for kind, _ in KINDS] + [OTHER]
    assert totals["KV-SSM scan and conv"] == 400.0 and totals["matmul"] == 600.0 and totals[OTHER] == 0.0
    assert sum(totals.values()) == sum(times.values())
    text = format_kinds(totals)
    assert "  0.400 ms/step  40.0%  KV-SSM scan and conv" in text
    assert text.endswith("  1.000 ms/step         all kernels")
    launches = time_by_kind({"_window_fwd_kernel": 8.0, "_conv_fwd_kernel": 8.0, "nvjet_a": 40.0, "nvjet_b": 4.0, "memset": 2.0})
    text = format_kinds(totals, launches)
    assert "  0.400 ms/step  40.0%     16 launches  KV-SSM scan and conv" in text
    assert "  0.000 ms/step   0.0%      2 launches  other" in text
    assert text.endswith("  1.000 ms/step            62 launches  all kernels")


def test_profile_step_reads_kernel_times_per_step_from_device_events_only():
    from types import SimpleNamespace

    from benchmarks.profile_step import kernel_launches, kernel_times

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    averages = [
        SimpleNamespace(key="_window_bwd_kernel", device_type=cuda, self_device_time_total=600.0, count=24),
        SimpleNamespace(key="aten::mm", device_type=cpu, self_device_time_total=900.0, count=3),  # an operator, not a kernel
        # The optimizer's record_function range, mirrored on the GPU's timeline: its kernels' span.
        SimpleNamespace(key="Optimizer.step#AdamW.step", device_type=cuda, self_device_time_total=1200.0,
                        is_user_annotation=True, count=3),
    ]
    assert kernel_times(averages, steps=3) == {"_window_bwd_kernel": 200.0}
    assert kernel_launches(averages, steps=3) == {"_window_bwd_kernel": 8.0}


def test_top_kernels_are_listed_longest_first_under_their_kind():
    times = {"triton_poi_fused_add_0": 5.0, "triton_red_fused_sum_1": 50.0, "triton_poi_fused_mul_2": 20.0,
             "nvjet_a": 100.0}
    text = format_top_kernels(times, rows=2)
    lines = text.splitlines()
    inductor = lines.index("  fused by Inductor:")
    assert lines[inductor + 1].split() == ["50.0", "triton_red_fused_sum_1"]
    assert lines[inductor + 2].split() == ["20.0", "triton_poi_fused_mul_2"]
    assert "triton_poi_fused_add_0" not in text  # beyond the 2 rows
    assert "  matmul:" in lines and "KV-SSM output gates" not in text  # kinds without kernels are left out
