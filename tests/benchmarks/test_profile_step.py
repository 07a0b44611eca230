"""benchmarks/profile_step.py's options that need no GPU (the profiling itself needs CUDA)."""

from __future__ import annotations

import gc
import sys

import pytest

from apps.attamba import ssd_triton_conv
from benchmarks import profile_step


def test_knobs_hold_for_the_whole_step_and_are_restored(monkeypatch):
    seen = {}

    def record(options, overrides, device):
        seen.update(tiles=ssd_triton_conv.FORWARD_TILES, order=ssd_triton_conv.DX_CHANNELS_FASTEST,
                    overrides=overrides, device=device.type, collecting=gc.isenabled())

    monkeypatch.setattr(profile_step, "profile_training_step", record)
    before = (ssd_triton_conv.FORWARD_TILES, ssd_triton_conv.DX_CHANNELS_FASTEST)
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--device", "cpu", "--knobs",
                                      "conv.FORWARD_TILES=3,conv.DX_CHANNELS_FASTEST=0", "model.dim=64"])
    profile_step.main()
    assert seen == {"tiles": 3, "order": False, "overrides": ["model.dim=64"], "device": "cpu", "collecting": False}
    assert (ssd_triton_conv.FORWARD_TILES, ssd_triton_conv.DX_CHANNELS_FASTEST) == before
    assert gc.isenabled(), "automatic garbage collection is back on"


@pytest.mark.parametrize("knobs, message", [
    ("attention.BLOCK=16", "unknown kernel module 'attention'"),
    ("conv.BLOKC_N=16", "no knob 'BLOKC_N'"),
    ("conv.BLOCK_N", "name=integer"),
])
def test_bad_knobs_are_refused_before_the_step(monkeypatch, knobs, message):
    monkeypatch.setattr(profile_step, "profile_training_step", lambda *args: pytest.fail("ran"))
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--device", "cpu", "--knobs", knobs])
    with pytest.raises(ValueError, match=message):
        profile_step.main()
