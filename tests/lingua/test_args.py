"""Config loading: YAML plus dotted overrides; every problem named before any work starts."""

import pytest

from lingua.args import ConfigError, load_config
from lingua.optim import OptimArgs
from lingua.train import TrainArgs, load_train_args


def test_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.5\nwarmup: 3\n")
    args = load_config(OptimArgs, [f"config={path}", "warmup=7"])
    assert (args.lr, args.warmup) == (0.5, 7)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["model.dimm=3"], "unknown config key 'model.dimm'"),
        (["steps=many"], "bad value for config key 'steps'"),
        (["optim.scheduler=triangle"], "optim.scheduler must be one of"),
        (["model_type=nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["config=/does/not/exist.yaml"], "config file not found: /does/not/exist.yaml"),
        (["stepsonly"], "expected key=value"),
    ],
)
def test_config_errors_name_the_key(argv, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        load_train_args(argv, "transformer")


def test_dict_override_replaces_the_yaml_dict(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  sources: {a.jsonl: 1.0}\n")
    args = load_train_args([f"config={path}", "data.sources={b.jsonl: 2.0}"], "transformer")
    assert args.data.sources == {"b.jsonl": 2.0}


def test_missing_required_value_is_named():
    from dataclasses import dataclass

    from omegaconf import MISSING

    @dataclass
    class Needs:
        path: str = MISSING

    with pytest.raises(ConfigError, match="missing required config value 'path'"):
        load_config(Needs, [])


def test_model_section_is_typed_by_the_registry():
    args = load_train_args(["model.dim=64", "model.n_heads=4"], "transformer")
    assert type(args.model).__name__ == "TransformerArgs" and args.model.dim == 64
    assert isinstance(args, TrainArgs)
