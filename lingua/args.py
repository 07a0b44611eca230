"""Configs: nested dataclasses filled from YAML files and dotted command-line overrides.

    python -m apps.attamba.train config=run.yaml optim.lr=1e-3 model.token_chunk=8

Every config is a plain dataclass. OmegaConf checks keys and types against it; a dataclass's
``__post_init__`` checks values. Any of these problems stops the run before any work with a
:class:`ConfigError` that names the key and what was expected.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, missing or out of range."""


def _describe(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or "<root>"
    first_line = str(error).splitlines()[0]
    if isinstance(error, ConfigKeyError):
        return f"unknown config key '{key}': {first_line}"
    if isinstance(error, MissingMandatoryValue):
        return f"missing required config value '{key}': set it in the YAML or as {key}=..."
    return f"bad value for config key '{key}': {first_line}"


def split_cli(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` into YAML paths (``config=...``) and dotted overrides (``a.b=c``)."""
    config_paths, overrides = [], []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"expected key=value on the command line, got '{arg}'")
        key, value = arg.split("=", 1)
        if key == "config":
            config_paths.append(value)
        else:
            overrides.append(arg)
    return config_paths, overrides


def read_raw(argv: Sequence[str]) -> DictConfig:
    """Merge the YAML files and overrides in ``argv`` without a schema (for peeking at keys)."""
    config_paths, overrides = split_cli(argv)
    parts = []
    for path in config_paths:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        parts.append(OmegaConf.load(path))
    merged = OmegaConf.merge(*parts) if parts else OmegaConf.create()
    # An override sets its key outright: `data.sources={a: 1}` replaces the YAML's sources
    # rather than adding to them.
    for override in overrides:
        key = override.split("=", 1)[0]
        value = OmegaConf.select(OmegaConf.from_dotlist([override]), key)
        OmegaConf.update(merged, key, value, merge=False, force_add=True)
    return merged


def build_config(schema: Any, raw: DictConfig | dict) -> Any:
    """Validate ``raw`` against ``schema`` (a dataclass type or a structured DictConfig)."""
    try:
        base = schema if isinstance(schema, DictConfig) else OmegaConf.structured(schema)
        merged = OmegaConf.merge(base, raw)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(_describe(error)) from None
    except (ValueError, TypeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(str(error)) from None


def load_config(schema: type[T], argv: Sequence[str]) -> T:
    """Build a ``schema`` dataclass from ``config=...`` YAML files and dotted overrides."""
    return build_config(schema, read_raw(argv))


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(to_yaml(config))


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
