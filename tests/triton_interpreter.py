"""Running Triton kernels on CPU tensors under Triton's interpreter, for the kernel tests
(tests/conftest.py sets ``TRITON_INTERPRET=1`` when there is no CUDA)."""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the kernel tests run: compiled on CUDA, else interpreted on CPU tensors."""
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need CUDA")


def allow_one_element_index_in_interpreter() -> None:
    """Triton 3.6's interpreter turns loop bounds into Python ints with ``int(array)``, which
    numpy >= 2.4 refuses for the one-element arrays it holds; read the element instead."""
    import triton.runtime.interpreter as interpreter

    if getattr(interpreter._patch_lang_tensor, "_reads_element", False):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._reads_element = True
    interpreter._patch_lang_tensor = patch_lang_tensor
