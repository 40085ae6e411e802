"""Which optional engines a test run can use."""
from __future__ import annotations

import importlib
from types import ModuleType

import torch


def triton_module(name: str) -> ModuleType | None:
    """``mpsnn.backends.triton.<name>`` when Triton and a CUDA device are usable, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        mod = importlib.import_module(f"mpsnn.backends.triton.{name}")
    except ImportError:
        return None
    return mod if mod.available() else None
