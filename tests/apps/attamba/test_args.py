"""AttambaArgs: values from YAML and the command line, errors at config time, eval overrides, and
every shipped config builds."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from apps.attamba.args import AttambaArgs
from lingua.args import ConfigError, build_config

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "apps" / "attamba" / "configs"


def build(**values) -> AttambaArgs:
    return build_config(AttambaArgs, values)


@pytest.mark.parametrize("text,expected", [("leading_tokens: 16", 16), ("leading_tokens: chunk", "chunk"), ("leading_tokens: '32'", 32)])
def test_leading_tokens_from_yaml(text, expected):
    assert build_config(AttambaArgs, OmegaConf.create(text)).leading_tokens == expected


@pytest.mark.parametrize("override,expected", [("leading_tokens=16", 16), ("leading_tokens=chunk", "chunk")])
def test_leading_tokens_from_the_command_line(override, expected):
    assert build_config(AttambaArgs, OmegaConf.from_dotlist([override])).leading_tokens == expected


@pytest.mark.parametrize(
    "values,key",
    [
        ({"token_chunk": 0}, "token_chunk"),
        ({"token_chunk": 2048}, "token_chunk"),
        ({"chunk_count": 0}, "chunk_count"),
        ({"chunk_count": 2048}, "chunk_count"),
        ({"eval_token_chunk": 0}, "eval_token_chunk"),
        ({"eval_chunk_count": 5000}, "eval_chunk_count"),
        ({"leading_tokens": 0}, "leading_tokens"),
        ({"leading_tokens": "many"}, "leading_tokens"),
        ({"eval_leading_tokens": -3}, "eval_leading_tokens"),
        ({"chunk_strategy": "zigzag"}, "chunk_strategy"),
        ({"eval_chunk_strategy": "zigzag"}, "eval_chunk_strategy"),
        ({"attn_impl": "sdpa"}, "attn_impl"),
        ({"fssm_split_count": 0}, "fssm_split_count"),
        ({"state_dim": 0}, "state_dim"),
        ({"attn_dim": 256}, "attn_dim"),
        ({"n_kv_heads": 2}, "n_kv_heads"),
        ({"sliding_window": 64}, "sliding_window"),
        ({"n_heads": 7}, "n_heads"),  # the base class's checks still run
    ],
)
def test_bad_settings_fail_at_config_time_naming_the_key(values, key):
    with pytest.raises(ConfigError, match=f"model.{key}"):
        build(**values)


def test_bad_attn_impl_lists_the_choices():
    with pytest.raises(ConfigError, match="sdpa_gathered"):
        build(attn_impl="flash")


def test_eval_chunking_defaults_to_training():
    args = build(token_chunk=4, chunk_strategy="random", leading_tokens="chunk")
    assert args.chunking(training=False) == args.chunking(training=True)


def test_eval_overrides():
    args = build(token_chunk=4, chunk_count=16, eval_token_chunk=32, eval_chunk_strategy="uniform", eval_leading_tokens="64")
    train, evaluation = args.chunking(True), args.chunking(False)
    assert (train.chunk_size(1024), train.strategy, train.leading_tokens) == (64, "cyclic", 16)
    # eval_token_chunk replaces the training chunk_count.
    assert (evaluation.chunk_size(1024), evaluation.strategy, evaluation.leading_tokens) == (32, "uniform", 64)
    assert build(token_chunk=4, eval_chunk_count=8).chunking(False).chunk_size(1024) == 128


def test_ssm_args_carry_the_ssm_fields():
    ssm = build(state_dim=32, ssm_heads=4, conv_size=3, dt_bias=False, ssm_impl="torch", A_init_max=8.0).ssm_args()
    assert (ssm.state_dim, ssm.ssm_heads, ssm.conv_size, ssm.dt_bias, ssm.impl, ssm.A_init_max) == (32, 4, 3, False, "torch", 8.0)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_configs_build(path):
    args = build_config(AttambaArgs, OmegaConf.load(path).model)
    assert args.dim > 0


def test_ablations_build_on_the_60m_config_and_are_up_to_date():
    base = OmegaConf.load(CONFIGS / "attamba_60m.yaml")
    ablations = sorted((CONFIGS / "ablations").glob("*.yaml"))
    assert len(ablations) >= 25 + 5 + 2 + 2 + 2 + 3
    names = set()
    for path in ablations:
        config = OmegaConf.merge(base, OmegaConf.load(path))
        build_config(AttambaArgs, config.model)
        names.add(config.name)
    assert len(names) == len(ablations)
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "make_ablation_configs.py"), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
