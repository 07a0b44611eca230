"""The transformer baseline: its SDPA and FlexAttention paths agree with an explicit mask."""

import pytest
import torch

from apps.main.model import TransformerArgs, TransformerLM
from lingua import masks


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_flex_equals_sdpa_with_documents_and_window(sliding_window):
    torch.manual_seed(0)
    args = TransformerArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, sliding_window=sliding_window)
    sdpa = TransformerLM(args)
    sdpa.init_weights()
    flex = TransformerLM(TransformerArgs(**{**vars(args), "attn_impl": "flex"}))
    flex.load_state_dict(sdpa.state_dict())
    tokens = torch.randint(0, 100, (2, 24))
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 3 + [1] * 20 + [2]])
    with torch.no_grad():  # FlexAttention has no CPU backward
        for docs in (None, doc_ids):
            torch.testing.assert_close(flex(tokens, docs), sdpa(tokens, docs), atol=1e-5, rtol=1e-5)


def test_documents_do_not_see_each_other():
    torch.manual_seed(0)
    model = TransformerLM(TransformerArgs(dim=32, n_layers=2, n_heads=2, vocab_size=50))
    model.init_weights()
    tokens = torch.randint(0, 50, (1, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    changed = tokens.clone()
    changed[0, :5] = (changed[0, :5] + 1) % 50  # edit only the first document
    with torch.no_grad():
        before, after = model(tokens, doc_ids), model(changed, doc_ids)
    torch.testing.assert_close(before[0, 5:], after[0, 5:], rtol=0, atol=0)
    assert not torch.equal(before[0, :5], after[0, :5])


def test_dense_mask_is_causal_within_documents_and_window():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1]])
    mask = masks.causal_dense_mask(doc_ids, 5, 2, torch.device("cpu"))[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 1, 1, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("per_row", [False, True], ids=["shared_positions", "per_row_positions"])
def test_token_major_rotary_equals_the_head_major_one(per_row):
    """apply_rotary_token_major on [B, n, H, d] is apply_rotary on the [B, H, n, d] view, and it
    keeps the token-major layout (what the Attamba kernels read in place)."""
    from lingua.transformer import RotaryEmbedding, apply_rotary, apply_rotary_token_major

    torch.manual_seed(4)
    x = torch.randn(2, 7, 3, 8)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9]]) if per_row else torch.arange(7)
    cos, sin = RotaryEmbedding(8)(positions)
    rotated = apply_rotary_token_major(x, cos, sin)
    assert rotated.is_contiguous()
    torch.testing.assert_close(rotated.transpose(1, 2), apply_rotary(x.transpose(1, 2), cos, sin), rtol=0, atol=0)


def test_rotary_table_spans_equal_the_computed_angles_and_are_not_saved():
    """A model's rotary tables (positions below max_seqlen) give what computing the angles gives,
    bit for bit; spans past the table are computed; the tables stay out of checkpoints."""
    from lingua.transformer import RotaryEmbedding

    rope = RotaryEmbedding(8, 500.0, table_positions=16)
    for start, n in ((0, 16), (5, 7), (10, 9), (40, 3)):
        expected = rope(torch.arange(start, start + n))
        for got, want in zip(rope.span(start, n, torch.device("cpu")), expected):
            assert torch.equal(got, want), (start, n)
    model = TransformerLM(TransformerArgs(dim=16, n_layers=1, n_heads=2, vocab_size=11, max_seqlen=12))
    assert model.rope.table_cos.shape == (12, 4)
    assert not any("table" in name for name in model.state_dict())
