"""The kernel comparison's loader and steps (its timing needs CUDA): another tree's attention
module loads beside this tree's, under its own custom ops, and computes what this tree's does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apps.attamba import attention_triton
from benchmarks.compare_attention_kernels import (
    attention_inputs,
    attention_step,
    load_attention_module,
    main,
    round_order,
)
from tests.triton_interpreter import allow_one_element_index_in_interpreter

REPO_ROOT = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    allow_one_element_index_in_interpreter()


def gradients_of(step, inputs) -> list[torch.Tensor]:
    """Run ``step`` (which clears the gradients after its backward) and catch the gradients."""
    caught = []
    hooks = [x.register_hook(lambda grad: caught.append(grad.clone())) for x in inputs[:3]]
    step()
    for hook in hooks:
        hook.remove()
    return caught


@pytest.mark.parametrize("token_major", [False, True], ids=["head_major", "token_major"])
def test_a_loaded_tree_computes_what_this_tree_does(token_major):
    loaded = load_attention_module(REPO_ROOT)
    assert loaded is not attention_triton and hasattr(getattr(torch.ops, loaded.__name__), "periodic_attention_fwd")
    inputs = attention_inputs(2, 37, 2, 16, token_major, DEVICE, torch.float32, seed=3)
    assert inputs[0].transpose(1, 2).is_contiguous() == token_major
    doc_ids = torch.tensor([[0] * 20 + [1] * 17, [0] * 37], device=DEVICE)
    grads = [gradients_of(attention_step(module, inputs, 4, 5, 1, doc_ids), inputs) for module in (attention_triton, loaded)]
    assert len(grads[0]) == 3
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


def test_a_tree_without_the_attention_ops_is_refused(tmp_path):
    module = tmp_path / "apps" / "attamba" / "attention_triton.py"
    module.parent.mkdir(parents=True)
    module.write_text("x = 1\n")
    with pytest.raises(ValueError, match="no attamba:: custom ops"):
        load_attention_module(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_without_cuda_it_says_so(capsys):
    assert main(["--base", str(REPO_ROOT)]) == 0
    assert "needs a CUDA device" in capsys.readouterr().out


def test_each_row_runs_first_in_half_of_the_rounds():
    rows = ["this", "base"]
    orders = [round_order(rows, index) for index in range(4)]
    assert [order[0] for order in orders] == ["this", "base", "this", "base"]
    assert all(sorted(order) == sorted(rows) for order in orders)
