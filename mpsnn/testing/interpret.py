"""pytest plugin: run the Triton engines of batch normalization, the optimizers, pooling,
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

_ENGINES = {"batch_norm", "optimizers", "pooling", "softmax", "upsampling"}


def _engine(name: str, *tensors: torch.Tensor):  # type: ignore[no-untyped-def]
    if name not in _ENGINES or not all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) and (t.dim() == 0 or t.stride(-1) == 1)
                                       for t in tensors):
        return None
    return importlib.import_module(f"mpsnn.backends.triton.{name}")


def pytest_configure(config) -> None:  # type: ignore[no-untyped-def]
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("mpsnn.testing.interpret: set TRITON_INTERPRET=1 before Python starts (Triton reads it at import)")
    dispatch.triton_engine = _engine  # type: ignore[assignment]
