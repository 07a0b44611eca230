"""Kernel settings by name: the module-level knobs of the Triton kernels, set for one run.

A variant is text such as ``"conv.BLOCK_N=32,window.BF16_DOTS=0"`` (``"default"``: none), each knob
given as ``<module>.<name>`` with ``module`` one of :data:`MODULES`: the KV-SSM's windowed scan
(``window``), its conv (``conv``) and its output gates (``norm``). ``benchmarks/tune_ssm_kernels.py``
times the kernels alone under each variant; ``benchmarks/profile_step.py --knobs`` runs a whole
training step under one.
"""

from __future__ import annotations

import contextlib

from apps.attamba import gated_norm_triton, ssd_triton_conv, ssd_triton_window

MODULES = {"window": ssd_triton_window, "conv": ssd_triton_conv, "norm": gated_norm_triton}


def parse_variant(text: str) -> dict[str, int]:
    """``"a=1,b=0"`` -> {"a": 1, "b": 0}; ``"default"`` -> {}."""
    if text == "default":
        return {}
    items = [item.split("=") for item in text.split(",")]
    if any(len(item) != 2 or not item[1].lstrip("-").isdigit() for item in items):
        raise ValueError(f"a variant is 'name=integer' items joined by commas, or 'default'; got '{text}'")
    return {key: int(value) for key, value in items}


def _knob(name: str) -> tuple[object, str]:
    """'conv.BLOCK_N' -> (the conv module, 'BLOCK_N'), or a ValueError naming what exists."""
    module_name, _, knob = name.partition(".")
    if module_name not in MODULES:
        raise ValueError(f"unknown kernel module '{module_name}' in '{name}'; knobs belong to one of {sorted(MODULES)}")
    module = MODULES[module_name]
    if not knob.isupper() or not hasattr(module, knob):
        raise ValueError(f"{module.__name__} has no knob '{knob}'")
    return module, knob


@contextlib.contextmanager
def variant_applied(text: str):
    """Sets the module knobs a variant names ("conv.BLOCK_N=32,window.BF16_DOTS=0"; "default": none),
    each in its knob's type, and puts the previous values back on exit."""
    values = parse_variant(text)
    targets = {name: _knob(name) for name in values}
    previous = {name: getattr(module, knob) for name, (module, knob) in targets.items()}
    try:
        for name, value in values.items():
            setattr(*targets[name], type(previous[name])(value))
        yield
    finally:
        for name, value in previous.items():
            setattr(*targets[name], value)
