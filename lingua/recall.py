"""Multi-query associative recall (MQAR), the synthetic task of the Zoology benchmark.

A sequence starts with ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (keys from the lower
half of the vocabulary, values from the upper half, keys distinct within a sequence); then every
key appears once more as a query at a random later position, and the model must predict its
value as the next token. Query gaps follow Zoology's power law ``p(g) ∝ g^(a-1)`` (``power_a``),
so most queries come soon after the pairs; the other positions hold random tokens. Only the
answer positions carry labels (``-100`` elsewhere), so loss and accuracy measure recall alone.

    tokens: k1 v1 k2 v2 | x  k2 x  x  k1 x ...
    labels: -  -  -  -  | -  v2 -  -  v1 - ...   (label t is the target after reading token t)

Two uses: :class:`RecallStream` is a training data source with the interface of
``lingua.data.DataStream`` (endless, per-rank, resumable); :func:`evaluate_recall` reports
accuracy per (seq_len, num_kv_pairs) setting on fixed, seeded test sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lingua.interrupt import check_interrupt

IGNORE_INDEX = -100
PAD_ID = 0
"""Padding token of rows shorter than the stream's seq_len; id 0 is never a key or a value."""


@dataclass
class RecallSetting:
    """One MQAR difficulty: sequence length and number of pairs."""

    seq_len: int = 64
    num_kv_pairs: int = 4
    num_examples: int = 1000
    """Test: examples evaluated. Train: the setting's weight in the mixture."""


def _zoology_train() -> list[RecallSetting]:
    return [
        RecallSetting(64, 4, 100_000),
        RecallSetting(128, 8, 20_000),
        RecallSetting(256, 16, 20_000),
        RecallSetting(256, 32, 20_000),
        RecallSetting(256, 64, 20_000),
    ]


def _zoology_test() -> list[RecallSetting]:
    return [
        RecallSetting(64, 4, 1000),
        RecallSetting(64, 8, 1000),
        RecallSetting(64, 16, 1000),
        RecallSetting(128, 32, 1000),
        RecallSetting(256, 64, 1000),
        RecallSetting(512, 128, 1000),
    ]


@dataclass
class RecallArgs:
    """The MQAR task: vocabulary, training mixture and test settings."""

    vocab_size: int = 8192
    """Ids 1..vocab_size/2-1 are keys, vocab_size/2..vocab_size-1 values; the model's vocab_size
    must be at least this."""
    train: list[RecallSetting] = field(default_factory=_zoology_train)
    """Training mixture: each row draws a setting with probability ∝ num_examples."""
    test: list[RecallSetting] = field(default_factory=_zoology_test)
    power_a: float = 0.01
    """Exponent a of the query-gap law p(g) ∝ g^(a-1); smaller a puts queries nearer the pairs."""
    random_non_queries: bool = True
    """Fill non-query positions with random tokens (Zoology's default) instead of PAD_ID."""
    seed: int = 0
    """Seeds the test sets; training streams are seeded by the data seed."""

    def __post_init__(self) -> None:
        if self.vocab_size < 4:
            raise ValueError(f"recall.vocab_size must be >= 4, got {self.vocab_size}")
        if not self.power_a > 0:
            raise ValueError(f"recall.power_a must be > 0, got {self.power_a}")
        for where, settings in (("train", self.train), ("test", self.test)):
            for setting in settings:
                check_setting(setting, self.vocab_size, f"recall.{where}")


def check_setting(setting: RecallSetting, vocab_size: int, where: str = "recall") -> None:
    n, pairs = setting.seq_len, setting.num_kv_pairs
    if pairs < 1 or setting.num_examples < 1:
        raise ValueError(f"{where}: num_kv_pairs and num_examples must be >= 1, got {pairs} and {setting.num_examples}")
    if 4 * pairs > n:
        # The queries need room: one slot pair per query after the 2 * pairs context tokens.
        raise ValueError(f"{where}: seq_len={n} is too short for {pairs} pairs (need seq_len >= 4 * num_kv_pairs)")
    if pairs > vocab_size // 2 - 1:
        raise ValueError(f"{where}: {pairs} distinct keys do not fit in the {vocab_size // 2 - 1} key ids of vocab_size={vocab_size}")


def make_mqar(
    seq_len: int,
    num_kv_pairs: int,
    num_examples: int,
    vocab_size: int,
    generator: torch.Generator,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MQAR examples: (tokens [N, seq_len], labels [N, seq_len]); see the module docstring."""
    check_setting(RecallSetting(seq_len, num_kv_pairs, num_examples), vocab_size)
    n_keys = vocab_size // 2 - 1  # key ids 1..vocab_size/2-1 (0 is the pad id)
    keys = torch.rand(num_examples, n_keys, generator=generator).argsort(dim=1)[:, :num_kv_pairs] + 1  # [N, k]
    values = torch.randint(vocab_size // 2, vocab_size, (num_examples, num_kv_pairs), generator=generator)  # [N, k]
    context = 2 * num_kv_pairs

    # Query i sits at slot gap_i of the region after the pairs (slots are 2 tokens apart).
    slots = (seq_len - context) // 2
    gap_weights = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(gap_weights.expand(num_examples, slots), num_kv_pairs, replacement=False, generator=generator)
    query_positions = context + 2 * gaps  # [N, k]

    if random_non_queries:
        tokens = torch.randint(0, vocab_size, (num_examples, seq_len), generator=generator)
    else:
        tokens = torch.full((num_examples, seq_len), PAD_ID, dtype=torch.long)
    tokens[:, 0:context:2], tokens[:, 1:context:2] = keys, values
    tokens.scatter_(1, query_positions, keys)
    labels = torch.full((num_examples, seq_len), IGNORE_INDEX, dtype=torch.long)
    labels.scatter_(1, query_positions, values)
    return tokens, labels


def _mix(*numbers: int) -> int:
    """One 63-bit seed from several integers, the same in every process and Python version."""
    seed = 0
    for number in numbers:
        seed = (seed * 1_000_003 + number) % 2**63
    return seed


class RecallStream:
    """Endless MQAR training batches with ``lingua.data.DataStream``'s interface.

    Each row draws a training setting (∝ ``num_examples``) and is right-padded to ``seq_len``
    with PAD_ID and ignored labels, so every batch has one shape (no recompiles). Batch i of a
    rank is a pure function of (seed, rank, i): resuming needs only i.
    """

    def __init__(self, args: RecallArgs, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        longest = max(setting.seq_len for setting in args.train)
        if seq_len < longest:
            raise ValueError(f"data.seq_len={seq_len} is shorter than the longest recall.train seq_len={longest}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.args, self.batch_size, self.seq_len = args, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.weights = torch.tensor([float(setting.num_examples) for setting in args.train])
        self.batches_done = 0
        self.skipped_lines = 0

    def __iter__(self) -> "RecallStream":
        return self

    def __next__(self):
        from lingua.data import Batch  # lingua.data may import this module

        generator = torch.Generator().manual_seed(_mix(self.seed, self.rank, self.world_size, self.batches_done))
        choice = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=generator)
        tokens = torch.full((self.batch_size, self.seq_len), PAD_ID, dtype=torch.long)
        labels = torch.full((self.batch_size, self.seq_len), IGNORE_INDEX, dtype=torch.long)
        for index in choice.unique().tolist():
            rows = (choice == index).nonzero().flatten()
            setting = self.args.train[index]
            setting_tokens, setting_labels = make_mqar(
                setting.seq_len, setting.num_kv_pairs, len(rows), self.args.vocab_size, generator,
                self.args.power_a, self.args.random_non_queries,
            )
            tokens[rows, : setting.seq_len] = setting_tokens
            labels[rows, : setting.seq_len] = setting_labels
        self.batches_done += 1
        return Batch(tokens, labels, torch.zeros_like(tokens))

    def state_dict(self) -> dict:
        return {"recall_batches_done": self.batches_done, "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        saved = {key: state.get(key) for key in ("seed", "rank", "world_size")}
        expected = {"seed": self.seed, "rank": self.rank, "world_size": self.world_size}
        if saved != expected:
            raise ValueError(f"recall data state was saved with {saved}, this stream has {expected}")
        self.batches_done = int(state["recall_batches_done"])

    def close(self) -> None:
        """Nothing to release; here for DataStream's interface."""


def recall_test_set(args: RecallArgs, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed examples of test setting ``index`` (the same for every model and run)."""
    setting = args.test[index]
    generator = torch.Generator().manual_seed(_mix(args.seed, index))
    return make_mqar(
        setting.seq_len, setting.num_kv_pairs, setting.num_examples, args.vocab_size, generator,
        args.power_a, args.random_non_queries,
    )


@torch.no_grad()
def recall_hits(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, batch_size: int) -> tuple[int, int]:
    """(correctly predicted answers, answers) of ``model`` (argmax) on the labelled positions."""
    device = next(model.parameters()).device
    correct, total = 0, 0
    for first in range(0, len(tokens), batch_size):
        check_interrupt()
        batch_labels = labels[first : first + batch_size].to(device)
        logits = model(tokens[first : first + batch_size].to(device))  # [B, n, V]
        answered = batch_labels != IGNORE_INDEX
        correct += int((logits.argmax(-1) == batch_labels)[answered].sum())
        total += int(answered.sum())
    return correct, total


def evaluate_recall(model: nn.Module, args: RecallArgs, batch_size: int = 64) -> dict[str, float]:
    """MQAR accuracy: ``recall/acc`` over all answers and ``recall/acc/<seq_len>x<pairs>`` per
    test setting (the model in whatever mode it is; the caller sets eval mode)."""
    results, correct_all, total_all = {}, 0, 0
    for index, setting in enumerate(args.test):
        correct, total = recall_hits(model, *recall_test_set(args, index), batch_size)
        results[f"recall/acc/{setting.seq_len}x{setting.num_kv_pairs}"] = correct / total
        correct_all, total_all = correct_all + correct, total_all + total
    if total_all:
        results["recall/acc"] = correct_all / total_all
    return results
