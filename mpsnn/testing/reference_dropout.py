"""References for the dropout family, written from spec/dropout.md and the mask contract in
``mpsnn.kernels.dropout``'s docstring; nothing shared with ``mpsnn.backends.dropout``.

The generator is not part of Apple's spec, so the mask itself cannot come from an independent
formula: :func:`documented_mask` rebuilds it from the *documented* recipe (torch's generator,
the seed derivation, the stride broadcast), and the forward/gradient references take a mask
and apply the spec's formula in float64.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["documented_mask", "dropout_forward", "dropout_gradient", "mask_from_data", "batch_entry_seed"]

_U64 = (1 << 64) - 1


def _f32(v: float) -> float:
    return float(np.float32(v))


def batch_entry_seed(seed: int, k: int) -> int:
    """The documented seed of ``encode_batch`` entry ``k``: ``(seed + k * 0x9E3779B97F4A7C15) mod 2**64``."""
    return (seed + k * 0x9E3779B97F4A7C15) % (_U64 + 1)


def documented_mask(block: tuple[int, int, int, int], keep_probability: float, seed: int,
                    stride: tuple[int, int, int], device: Any = "cpu") -> np.ndarray:
    """The mask the documented recipe gives for a written block ``(count, h, w, Nin)`` and
    ``stride = (sx, sy, sz)``: a float64 ``[count, h, w, Nin]`` array of 0/1."""
    count, h, w, c = block
    sx, sy, sz = stride
    shape = (count, h if sy else 1, w if sx else 1, c if sz else 1)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    u = torch.rand(shape, generator=gen, device=device, dtype=torch.float32)
    keep = (u < _f32(keep_probability)).cpu().numpy().astype(np.float64)
    return np.broadcast_to(keep, block).copy()


def mask_from_data(data: bytes, block: tuple[int, int, int, int]) -> np.ndarray:
    """Decode ``mask_data`` (uint8, ``[count][Nin][h][w]``) into a float64 NHWC array."""
    count, h, w, c = block
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size != count * h * w * c:
        raise ValueError(f"mask_data holds {raw.size} bytes, expected {count * h * w * c}")
    return raw.reshape(count, c, h, w).transpose(0, 2, 3, 1).astype(np.float64)


def dropout_forward(x: Any, mask: Any, keep_probability: float) -> np.ndarray:
    """dropout.md §1: ``out = m * in / keepProbability`` (keepProbability is a float32)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(mask, np.float64) * np.asarray(x, np.float64) / _f32(keep_probability)


def dropout_gradient(dy: Any, mask: Any, keep_probability: float) -> np.ndarray:
    """dropout.md §3: ``dIn = m * g / keepProbability``."""
    return dropout_forward(dy, mask, keep_probability)
