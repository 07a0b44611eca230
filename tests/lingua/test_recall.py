"""MQAR: generated answers match the pairs, the oracle scores 1.0, streams are seeded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lingua.recall import IGNORE_INDEX, RecallArgs, RecallSetting, RecallStream, evaluate_recall, make_mqar


class RecallOracle(nn.Module):
    """Answers every query perfectly: reads the pairs at the start and looks the key up."""

    def __init__(self, vocab_size: int, num_kv_pairs: int):
        super().__init__()
        self.vocab_size, self.num_kv_pairs = vocab_size, num_kv_pairs
        self.anchor = nn.Parameter(torch.zeros(()))  # so the model has a device

    def forward(self, tokens: torch.Tensor, doc_ids=None) -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, self.vocab_size)
        for row, sequence in enumerate(tokens.tolist()):
            pairs = dict(zip(sequence[0 : 2 * self.num_kv_pairs : 2], sequence[1 : 2 * self.num_kv_pairs : 2]))
            for position, token in enumerate(sequence):
                if position >= 2 * self.num_kv_pairs and token in pairs:
                    logits[row, position, pairs[token]] = 1.0
        return logits


def test_answers_match_the_pairs_and_only_queries_are_labelled():
    generator = torch.Generator().manual_seed(3)
    vocab, pairs, n = 64, 6, 48
    tokens, labels = make_mqar(n, pairs, 20, vocab, generator)
    assert tokens.shape == labels.shape == (20, n)
    for row_tokens, row_labels in zip(tokens.tolist(), labels.tolist()):
        keys, values = row_tokens[0 : 2 * pairs : 2], row_tokens[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(1 <= k < vocab // 2 for k in keys)
        assert all(vocab // 2 <= v < vocab for v in values)
        answered = [t for t, label in enumerate(row_labels) if label != IGNORE_INDEX]
        assert len(answered) == pairs and min(answered) >= 2 * pairs
        assert sorted(row_tokens[t] for t in answered) == sorted(keys)  # each key queried once
        for t in answered:
            assert row_labels[t] == values[keys.index(row_tokens[t])]


def test_generation_is_seeded_and_checks_its_settings():
    a = make_mqar(32, 4, 5, 64, torch.Generator().manual_seed(1))
    b = make_mqar(32, 4, 5, 64, torch.Generator().manual_seed(1))
    c = make_mqar(32, 4, 5, 64, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="seq_len=16 is too short"):
        make_mqar(16, 8, 1, 64, torch.Generator())
    with pytest.raises(ValueError, match="key ids"):
        RecallArgs(vocab_size=16, train=[RecallSetting(64, 8)], test=[])


def test_oracle_accuracy_is_one_and_a_constant_model_near_zero():
    args = RecallArgs(vocab_size=64, train=[], test=[RecallSetting(32, 4, 10), RecallSetting(64, 4, 7)])
    results = evaluate_recall(RecallOracle(64, 4), args, batch_size=4)
    assert results == {"recall/acc/32x4": 1.0, "recall/acc/64x4": 1.0, "recall/acc": 1.0}
    constant = evaluate_recall(RecallOracle(64, 0), args, batch_size=4)  # never finds a key
    assert constant["recall/acc"] < 0.2


def test_stream_batches_are_padded_seeded_and_resumable():
    args = RecallArgs(vocab_size=128, train=[RecallSetting(32, 4, 1), RecallSetting(64, 8, 1)], test=[])
    stream = RecallStream(args, batch_size=6, seq_len=80, seed=5)
    batches = [next(stream) for _ in range(3)]
    assert all(b.tokens.shape == b.labels.shape == b.doc_ids.shape == (6, 80) for b in batches)
    assert all(((b.labels != IGNORE_INDEX).sum(1) > 0).all() for b in batches)
    assert (batches[0].labels[:, 64:] == IGNORE_INDEX).all()  # padding is never a target
    resumed = RecallStream(args, batch_size=6, seq_len=80, seed=5)
    resumed.load_state_dict(RecallStream(args, 6, 80, seed=5).state_dict() | {"recall_batches_done": 2})
    assert torch.equal(next(resumed).tokens, batches[2].tokens)
    other_rank = RecallStream(args, batch_size=6, seq_len=80, seed=5, rank=1, world_size=2)
    assert not torch.equal(next(other_rank).tokens, batches[0].tokens)
    with pytest.raises(ValueError, match="shorter than the longest"):
        RecallStream(args, batch_size=2, seq_len=48)


def test_recall_configs_load_and_have_matched_sizes():
    from omegaconf import OmegaConf

    from lingua.args import build_config
    from lingua.data import DataArgs
    from lingua.registry import get_model_spec
    from lingua.train import train_args_schema

    sizes = {}
    for name in ("apps/attamba/configs/recall_attamba_p8.yaml", "apps/main/configs/recall_transformer.yaml"):
        path = Path(__file__).resolve().parents[2] / name
        raw = OmegaConf.load(path)
        if "recall" not in {f for f in DataArgs.__dataclass_fields__}:
            raw.data.pop("recall")  # the data.recall switch is not in DataArgs yet
        args = build_config(train_args_schema(raw.model_type), raw)
        assert isinstance(args.eval.recall, RecallArgs) and args.eval.recall.vocab_size <= args.model.vocab_size
        assert args.data.seq_len >= max(s.seq_len for s in args.eval.recall.train)
        assert args.model.max_seqlen >= max(s.seq_len for s in args.eval.recall.test)
        sizes[raw.model_type] = get_model_spec(raw.model_type).build(args.model).num_params(exclude_embeddings=True)
    assert sizes["attamba"] == pytest.approx(sizes["transformer"], rel=0.02)


@pytest.mark.parametrize("config", [
    "apps/attamba/configs/recall_attamba_p8.yaml", "apps/main/configs/recall_transformer.yaml", "apps/mamba/configs/recall_mamba.yaml",
])
def test_the_easy_recall_overlay_layers_on_every_recall_config(config):
    from lingua.train import load_train_args

    root = Path(__file__).resolve().parents[2]
    args = load_train_args([f"config={root / config}", f"config={root / 'configs/recall_easy.yaml'}"], "attamba")
    assert args.model.vocab_size == args.data.recall.vocab_size == args.eval.recall.vocab_size == 512
    assert [(s.seq_len, s.num_kv_pairs) for s in args.data.recall.train] == [(64, 4)] == [(s.seq_len, s.num_kv_pairs) for s in args.eval.recall.test]
    assert args.data.seq_len == 64 and args.optim.lr == 3e-3
    assert args.model.dim == 128  # the recall config's model survives the overlay
