"""pytest plugin: run the Triton engines of arithmetic, batch normalization, the optimizers, pooling,
softmax and upsampling on CPU tensors through Triton's interpreter, so that the public kernels' engine paths (and the families'
tests written for them) run on a machine without a GPU.

    pip install triton          # the interpreter needs the package, not a GPU
    TRITON_INTERPRET=1 python3 -m pytest -p mpsnn.testing.interpret tests/kernels/test_pooling.py

The interpreter executes the kernels with NumPy: it checks their logic, not the compiled
code (integer division, for instance, floors there while compiled code may truncate), so a
run on a CUDA device stays the final word. ``test_engine_dispatch.py``'s CPU test fails under
this plugin by design (the plugin makes CPU tensors eligible).
"""
from __future__ import annotations

import importlib
import os

import torch

from mpsnn.backends import dispatch

os.environ.setdefault("TRITON_INTERPRET", "1")

def _patch_interpreter() -> None:
    """Two repairs to Triton 3.6's interpreter. It holds scalars as 1-element arrays and
    converts them with ``int(array)``, which NumPy 2 refuses (a ``range`` with runtime bounds
    in a kernel then fails): scalars convert through ``.item()`` here. Its ``maxnumf`` /
    ``minnumf`` (``tl.maximum`` / ``tl.minimum`` of floats without NaN propagation) use
    ``np.maximum`` / ``np.minimum``, which propagate NaN, where compiled code returns the
    number: they use ``np.fmax`` / ``np.fmin`` here. Its ``dot`` multiplies bfloat16
    operands as their raw 16-bit patterns: they are widened to float32 first here."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    interpreter.InterpreterBuilder.create_maxnumf = lambda self, a, b: self.binary_op(a, b, np.fmax)  # type: ignore[attr-defined]
    interpreter.InterpreterBuilder.create_minnumf = lambda self, a, b: self.binary_op(a, b, np.fmin)  # type: ignore[attr-defined]
    dot = interpreter.InterpreterBuilder.create_dot

    def widen(h):  # type: ignore[no-untyped-def]
        if h.dtype == tl.bfloat16:
            return interpreter.TensorHandle(interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32),
                                            tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot  # type: ignore[attr-defined]
    original = interpreter._patch_lang_tensor
    if getattr(original, "_mpsnn", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._mpsnn = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


_patch_interpreter()

_ENGINES = {"arithmetic", "batch_norm", "optimizers", "pooling", "softmax", "upsampling"}


def _engine(name: str, *tensors: torch.Tensor):  # type: ignore[no-untyped-def]
    if name not in _ENGINES or not all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) and (t.dim() == 0 or t.stride(-1) == 1)
                                       for t in tensors):
        return None
    return importlib.import_module(f"mpsnn.backends.triton.{name}")


def pytest_configure(config) -> None:  # type: ignore[no-untyped-def]
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("mpsnn.testing.interpret: set TRITON_INTERPRET=1 before Python starts (Triton reads it at import)")
    dispatch.triton_engine = _engine  # type: ignore[assignment]
