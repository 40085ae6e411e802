"""Host arrays of floats that kernels take as parameters (PReLU slopes, biases, batch-norm
vectors, quantisation tables)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import MPSTypeError


def float32_array(owner: str, name: str, value: Any, copy: bool = True) -> np.ndarray:
    """``value`` as a flat float32 array: bytes (read as native float32), a torch tensor or
    any NumPy array-like. With ``copy=False`` a float32 NumPy array comes back as a view of
    the caller's data. Anything else raises :class:`~mpsnn.MPSTypeError`."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(value, dtype=np.float32)
    elif isinstance(value, torch.Tensor):
        arr = value.detach().to("cpu", torch.float32).numpy().reshape(-1)
    else:
        try:
            arr = np.asarray(value, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise MPSTypeError(f"{owner}: `{name}` must be an array of float32 values (bytes, array or tensor), "
                               f"but got {type(value).__name__}") from None
    return arr.astype(np.float32, copy=True) if copy else arr
