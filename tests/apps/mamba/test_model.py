"""The Mamba2 baseline: registry, document resets, gradients, config checks, configs, training."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from apps.mamba.args import MambaArgs
from apps.mamba.model import MambaLM
from lingua.args import ConfigError, build_config
from lingua.registry import get_model_spec, registered_models
from lingua.train import load_train_args, train, train_args_schema
from tests.lingua.train_helpers import read_losses, write_corpus

REPO_ROOT = Path(__file__).resolve().parents[3]
VOCAB = 50


def tiny_mamba(seed: int = 0, **overrides) -> MambaLM:
    torch.manual_seed(seed)
    sizes = dict(dim=32, n_layers=2, vocab_size=VOCAB, max_seqlen=64, state_dim=8, ssm_heads=4, multiple_of=16)
    model = MambaLM(MambaArgs(**{**sizes, **overrides}))
    model.init_weights()
    return model


def test_registered_as_mamba():
    spec = get_model_spec("mamba")
    assert spec.model_cls is MambaLM and spec.args_cls is MambaArgs
    assert "mamba" in registered_models()


@pytest.mark.parametrize("mlp", [False, True])
def test_logits_shape(mlp):
    model = tiny_mamba(mlp=mlp)
    with torch.no_grad():
        logits = model(torch.randint(0, VOCAB, (3, 10)))
    assert logits.shape == (3, 10, VOCAB)
    assert torch.isfinite(logits).all()


def test_documents_do_not_see_each_other():
    model = tiny_mamba()
    tokens = torch.randint(0, VOCAB, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 8 + [1] * 4])
    changed = tokens.clone()
    changed[0, :5] = (changed[0, :5] + 1) % VOCAB  # edit only the first document of each row
    changed[1, :8] = (changed[1, :8] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(tokens, doc_ids), model(changed, doc_ids)
        unmasked = model(changed)
    torch.testing.assert_close(before[0, 5:], after[0, 5:], rtol=0, atol=0)
    torch.testing.assert_close(before[1, 8:], after[1, 8:], rtol=0, atol=0)
    assert not torch.equal(before[0, :5], after[0, :5])
    # Without doc_ids the row is one document: the second part does see the first.
    assert not torch.allclose(unmasked[0, 5:], after[0, 5:])


@pytest.mark.parametrize("mlp", [False, True])
def test_gradients_reach_every_parameter(mlp):
    model = tiny_mamba(mlp=mlp)
    tokens = torch.randint(0, VOCAB, (2, 16))
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    model(tokens, doc_ids).logsumexp(-1).mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_tied_embeddings_share_the_head():
    model = tiny_mamba(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.num_params() == tiny_mamba().num_params() - VOCAB * 32


def test_sizes_and_flops():
    args = MambaArgs(dim=32, n_layers=2, vocab_size=VOCAB, state_dim=8, ssm_heads=4)
    assert args.hidden_dim == 64 and args.ssm_args().ssm_hidden_dim == 64
    model = MambaLM(args)
    non_embedding = model.num_params(exclude_embeddings=True)
    assert model.num_params() - non_embedding == VOCAB * 32
    # 6 per weight plus the scan: 3 × 5 FLOPs per state entry (64 channels × 8 states) per layer.
    assert model.flops_per_token(128) == 6 * non_embedding + 3 * 5 * 64 * 8 * 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dim=0), "model.dim must be >= 1"),
        (dict(ssm_heads=3), r"inner width 64 \(model.ssm_hidden_dim, or 2 × model.dim"),
        (dict(ssm_hidden_dim=30), "multiple of model.ssm_heads=4"),
        (dict(ssm_n_groups=3), "model.ssm_heads=4 must be a multiple of model.ssm_n_groups=3"),
        (dict(state_dim=0), "model.state_dim must be >= 1"),
        (dict(A_init_min=0.0), "model.A_init_min and model.A_init_max"),
        (dict(dt_min=0.5, dt_max=0.1), "model.dt_min and model.dt_max"),
        (dict(ssm_impl="cuda"), "model.ssm_impl must be one of"),
        (dict(init_std=0.0), "model.init_std must be > 0"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    sizes = dict(dim=32, n_layers=2, state_dim=8, ssm_heads=4)
    with pytest.raises(ValueError, match=message):
        MambaArgs(**{**sizes, **overrides})


def test_recall_config_builds_and_matches_the_transformers_size():
    sizes = {}
    for name in ("apps/mamba/configs/recall_mamba.yaml", "apps/main/configs/recall_transformer.yaml"):
        raw = OmegaConf.load(REPO_ROOT / name)
        args = build_config(train_args_schema(raw.model_type), raw)
        assert args.data.recall is not None and args.model.vocab_size >= args.eval.recall.vocab_size
        assert args.model.max_seqlen >= max(setting.seq_len for setting in args.eval.recall.test)
        sizes[raw.model_type] = get_model_spec(raw.model_type).build(args.model).num_params(exclude_embeddings=True)
    assert sizes["mamba"] == pytest.approx(sizes["transformer"], rel=0.02)


@pytest.mark.parametrize("name", ["debug.yaml", "mamba_60m.yaml"])
def test_configs_load(name):
    args = load_train_args([f"config={REPO_ROOT / 'apps/mamba/configs' / name}"], "mamba")
    assert args.model_type == "mamba" and isinstance(args.model, MambaArgs)


def test_bad_key_in_config_is_a_config_error():
    with pytest.raises(ConfigError, match="n_heads"):
        load_train_args([f"config={REPO_ROOT / 'apps/mamba/configs/debug.yaml'}", "model.n_heads=4"], "mamba")


def test_a_few_training_steps_with_the_debug_config(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    run = tmp_path / "run"
    args = load_train_args(
        [
            f"config={REPO_ROOT / 'apps/mamba/configs/debug.yaml'}",
            f"dump_dir={run}",
            f"data.sources={{{corpus}: 1.0}}",
            "data.seq_len=64",
            "data.batch_size=2",
            "model.max_seqlen=64",
            "steps=4",
            "optim.warmup=2",
            "logging.freq=1",
            "checkpoint.every=0",
            "eval_every=0",
            "eval_at_end=false",
            "export_at_end=false",
            "device=cpu",
        ],
        "mamba",
    )
    summary = train(args)
    assert summary["step"] == 4
    losses = read_losses(run)
    assert sorted(losses) == [1, 2, 3, 4] and all(loss == loss for loss in losses.values())
