"""Running Triton kernels on CPU tensors under Triton's interpreter, for the kernel tests.

``TRITON_INTERPRET=1`` is read when a kernel is decorated, so a test module calls
:func:`interpret_without_cuda` before it imports the module that defines the kernels.
"""

from __future__ import annotations

import os

import torch


def interpret_without_cuda() -> None:
    """Without CUDA, run kernels under the interpreter (kernel modules imported after this)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


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
