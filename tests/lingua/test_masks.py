"""FlexAttention through lingua.masks: it stays compiled where it runs compiled (CUDA), even inside
evaluation's force_eager stance."""

import torch

from lingua import masks


def test_flex_attention_compiles_even_under_force_eager(monkeypatch):
    # Evaluation during training runs blocks under set_stance("force_eager"); eager FlexAttention
    # would materialise the whole score matrix (gigabytes at long context), so lingua.masks leaves
    # that stance for its own compiled call. A counting backend stands in for Inductor on CPU.
    compiled_graphs = []

    def counting_backend(graph_module, example_inputs):
        compiled_graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(masks._eager_flex_attention, backend=counting_backend, dynamic=False)
    monkeypatch.setattr(masks, "_compiled_on", lambda device: True)
    monkeypatch.setattr(masks, "_compiled_flex_attention", lambda: compiled)
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    block_mask = masks.create_block_mask(lambda b, h, i, j: j <= i, None, None, 32, 32, device="cpu")
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        out = masks.flex_attention(q, k, v, block_mask=block_mask)
    assert len(compiled_graphs) == 1, "the flex call ran eagerly under force_eager"
    torch.testing.assert_close(out, masks._eager_flex_attention(q, k, v, block_mask=block_mask))

    # As in training: a compiled block traces the call into its own graph; under force_eager the
    # block runs eagerly and the call still goes through its compiled wrapper.
    class Block(torch.nn.Module):
        def forward(self, q, k, v):
            return masks.flex_attention(2 * q, k, v, block_mask=block_mask) + 1

    block = torch.compile(Block(), backend=counting_backend, dynamic=False)
    more_heads = [torch.randn(1, 4, 32, 16) for _ in range(3)]  # a new shape: a new compile if compiled
    with torch.no_grad():
        block(q, k, v)
        assert len(compiled_graphs) == 2, "the block's own graph"
        with torch.compiler.set_stance("force_eager"):
            block(*more_heads)
    assert len(compiled_graphs) == 3, "under force_eager the block ran eagerly and its flex call compiled"
