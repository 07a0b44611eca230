"""The model registry: one name per model family, so the one training loop can build any of them.

A model family registers its args dataclass and model class once (in its app's ``__init__``):

    register_model("attamba", AttambaArgs, AttambaLM)

A registered model class must be an ``nn.Module`` built as ``ModelClass(args)`` that provides:

- ``forward(tokens: LongTensor[B, n], doc_ids: LongTensor[B, n] | None = None) -> logits[B, n, V]``
  where ``doc_ids`` numbers the documents packed in each row (attention never crosses them);
- ``init_weights() -> None``: (re)initialises every parameter (called after FSDP sharding too);
- ``flops_per_token(seq_len: int) -> float``: training FLOPs (forward + backward) per token;
- ``layers``: an ``nn.ModuleList`` of blocks, the unit of FSDP sharding, compile and checkpointing.

For generation it may also provide ``new_cache`` and ``forward_cached`` (see ``lingua.generate``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    args_cls: type
    model_cls: type[nn.Module]

    def build(self, args: Any) -> nn.Module:
        return self.model_cls(args)


_REGISTRY: dict[str, ModelSpec] = {}

# Apps register on import; these are imported on demand so `get_model_spec` works from anywhere.
_APP_MODULES = {"transformer": "apps.main", "attamba": "apps.attamba", "mamba": "apps.mamba"}


def register_model(name: str, args_cls: type, model_cls: type[nn.Module]) -> None:
    existing = _REGISTRY.get(name)
    if existing is not None and existing.model_cls is not model_cls:
        raise ValueError(f"model name '{name}' is already registered to {existing.model_cls.__name__}")
    _REGISTRY[name] = ModelSpec(name, args_cls, model_cls)


def get_model_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY and name in _APP_MODULES:
        importlib.import_module(_APP_MODULES[name])
    if name not in _REGISTRY:
        raise KeyError(f"unknown model '{name}'; registered models: {', '.join(registered_models())}")
    return _REGISTRY[name]


def registered_models() -> list[str]:
    return sorted(set(_REGISTRY) | set(_APP_MODULES))
