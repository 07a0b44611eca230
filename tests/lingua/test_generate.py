"""The shared generation loop: greedy equals full-forward argmax, sampling, EOS and stop strings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from apps.main.model import TransformerArgs, TransformerLM
from lingua.generate import (
    GenerateArgs,
    cache_support,
    cut_at_stop,
    generate_text,
    generate_tokens,
    main,
    sample_next,
)
from lingua.tokenizer import ByteTokenizer

VOCAB = 258  # the bytes tokenizer's


def tiny_transformer(sliding_window=None) -> TransformerLM:
    torch.manual_seed(0)
    args = TransformerArgs(
        dim=32, n_layers=2, n_heads=4, vocab_size=VOCAB, multiple_of=16, sliding_window=sliding_window
    )
    model = TransformerLM(args)
    model.init_weights()
    return model.eval()


def argmax_by_recomputation(model, prompt: list[int], steps: int) -> list[int]:
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    return sequence[len(prompt) :]


PROMPTS = [[1, 2, 3], [7], [4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_greedy_equals_argmax_of_full_forward(sliding_window):
    model = tiny_transformer(sliding_window)
    args = GenerateArgs(max_new_tokens=7, temperature=0.0, device="cpu")
    generated = generate_tokens(model, PROMPTS, args)
    assert generated == [argmax_by_recomputation(model, prompt, 7) for prompt in PROMPTS]
    assert generate_tokens(model, PROMPTS, args) == generated  # deterministic
    assert generate_tokens(model, PROMPTS, GenerateArgs(max_new_tokens=7, use_cache=False)) == generated


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = tiny_transformer()
    sampled = GenerateArgs(max_new_tokens=6, temperature=1.5, top_k=50, top_p=0.9, seed=3)
    first = generate_tokens(model, PROMPTS, sampled)
    assert generate_tokens(model, PROMPTS, sampled) == first
    greedy = generate_tokens(model, PROMPTS, GenerateArgs(max_new_tokens=6))
    assert generate_tokens(model, PROMPTS, GenerateArgs(max_new_tokens=6, temperature=2.0, top_k=1)) == greedy
    assert generate_tokens(model, PROMPTS, GenerateArgs(max_new_tokens=6, temperature=2.0, top_p=1e-6)) == greedy


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, -1)
    generator = torch.Generator().manual_seed(0)
    top_k = sample_next(logits, GenerateArgs(temperature=1.0, top_k=2), generator)
    assert set(top_k.tolist()) == {0, 1}
    # top_p=0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it, so tokens 0 and 1 stay.
    top_p = sample_next(logits, GenerateArgs(temperature=1.0, top_p=0.7), generator)
    assert set(top_p.tolist()) == {0, 1}
    assert abs((top_p == 0).float().mean().item() - 0.5 / 0.8) < 0.05


def test_eos_ends_a_row_and_is_not_returned():
    model = tiny_transformer()
    free = generate_tokens(model, PROMPTS, GenerateArgs(max_new_tokens=6))
    eos = free[0][2]
    stopped = generate_tokens(model, PROMPTS, GenerateArgs(max_new_tokens=6), eos_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos)]
    for row, out in zip(free[1:], stopped[1:]):
        assert out == (row[: row.index(eos)] if eos in row else row)


def test_stop_strings_cut_the_text():
    model = tiny_transformer()
    tokenizer = ByteTokenizer()
    prompts = ["ab", "hello there"]
    free = generate_text(model, tokenizer, prompts, GenerateArgs(max_new_tokens=8))
    stop = free[0][3:5]  # a string the first generation contains, not at its start
    cut = generate_text(model, tokenizer, prompts, GenerateArgs(max_new_tokens=8, stop=[stop]))
    assert cut[0] == free[0][: free[0].index(stop)]
    assert cut[1] == (free[1][: free[1].index(stop)] if stop in free[1] else free[1])
    assert cut_at_stop("one. two\nthree", [".", "\n"]) == ("one", True)
    assert cut_at_stop("none here", ["."]) == ("none here", False)


class BigramModel(nn.Module):
    """A model without cache support: the next token depends on the last one only."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(VOCAB, VOCAB)

    def forward(self, tokens: torch.Tensor, doc_ids=None) -> torch.Tensor:
        return self.table(tokens)


def test_model_without_cache_falls_back_to_recomputation():
    torch.manual_seed(0)
    model = BigramModel()
    assert cache_support(model) is None
    generated = generate_tokens(model, PROMPTS, GenerateArgs(max_new_tokens=5))
    for prompt, out in zip(PROMPTS, generated):
        expected, last = [], prompt[-1]
        for _ in range(5):
            last = int(model.table.weight[last].argmax())
            expected.append(last)
        assert out == expected


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        GenerateArgs(temperature=-1)
    with pytest.raises(ValueError, match="top_p must lie in"):
        GenerateArgs(top_p=1.5)
    with pytest.raises(ValueError, match="at least one token"):
        generate_tokens(tiny_transformer(), [[1], []], GenerateArgs(max_new_tokens=2))


def test_command_line_generates_from_an_export(tmp_path, capsys):
    from apps.attamba.args import AttambaArgs
    from apps.attamba.model import AttambaLM
    from lingua.checkpoint import export_consolidated
    from lingua.train import TrainArgs

    torch.manual_seed(0)
    model_args = AttambaArgs(dim=32, n_layers=2, n_heads=4, multiple_of=16, state_dim=8, ssm_heads=2, token_chunk=4, leading_tokens=3)
    model = AttambaLM(model_args)
    model.init_weights()
    export_consolidated(model, TrainArgs(model_type="attamba", model=model_args), tmp_path / "export")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("second prompt\n\nthird\n")
    main([f"ckpt={tmp_path / 'export'}", "prompt=first", f"prompts_file={prompts_file}", "max_new_tokens=5", "device=cpu"])
    printed = capsys.readouterr().out
    texts = generate_text(model.eval(), ByteTokenizer(), ["first", "second prompt", "third"], GenerateArgs(max_new_tokens=5))
    for prompt, text in zip(["first", "second prompt", "third"], texts):
        assert f"=== {prompt!r}\n{prompt}{text}\n" in printed
    assert "tokens/s" in printed and "cache" in printed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["transformer", "attamba"])
@pytest.mark.parametrize("mode", ["cuda_graph", "compile", "compile_pdl", "compile_max_autotune"])
def test_static_shape_decode_on_cuda_matches_eager(family, mode):
    if family == "attamba":
        from apps.attamba.args import AttambaArgs
        from apps.attamba.model import AttambaLM

        torch.manual_seed(0)
        # Head dim 16: compiled FlexAttention (the prefill's attention on CUDA) needs at least 16.
        model = AttambaLM(AttambaArgs(dim=64, n_layers=2, n_heads=4, multiple_of=16, state_dim=8, ssm_heads=2, token_chunk=4, leading_tokens=3))
        model.init_weights()
    else:
        model = tiny_transformer()
    model = model.cuda().eval()
    eager = generate_tokens(model, PROMPTS, GenerateArgs(max_new_tokens=12, fast_decode="eager"))
    assert generate_tokens(model, PROMPTS, GenerateArgs(max_new_tokens=12, fast_decode=mode)) == eager
