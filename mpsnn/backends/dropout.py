"""Dropout numerics in torch (CPU and CUDA): the random keep-mask and its application.

Pure functions on NHWC tensors; no host synchronisation on the encode path (the generator is
seeded on the host from a Python int, the draw runs on the tensor's device).

Mask recipe (the contract :class:`mpsnn.MPSCNNDropout` documents)::

    g = torch.Generator(device); g.manual_seed(seed)
    keep = torch.rand(shape, generator=g, device=device, dtype=torch.float32) < keep_probability

``shape`` has size 1 along every broadcast (stride-0) axis; the caller expands it. The same
seed and shape give the same mask on the same kind of device (CPU and CUDA generators differ).
"""
from __future__ import annotations

import torch

__all__ = ["derived_seed", "dropout_apply", "dropout_mask"]

_U64 = (1 << 64) - 1
#: SplitMix64's Weyl increment (the golden ratio in 64-bit fixed point)
_GOLDEN = 0x9E3779B97F4A7C15


def derived_seed(seed: int, index: int) -> int:
    """Seed of entry ``index`` of a batch encode: ``(seed + index * 0x9E3779B97F4A7C15) mod 2**64``
    (``index == 0`` gives ``seed`` itself)."""
    return (seed + index * _GOLDEN) & _U64


def dropout_mask(shape: tuple[int, ...], keep_probability: float, seed: int, device: torch.device) -> torch.Tensor:
    """A boolean keep-mask of ``shape`` (True = kept) drawn with the recipe of the module
    docstring; each element is True with probability ``keep_probability``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    u = torch.rand(shape, generator=g, device=device, dtype=torch.float32)
    return u < keep_probability


def dropout_apply(x: torch.Tensor, mask: torch.Tensor, keep_probability: float) -> torch.Tensor:
    """``m * x / keep_probability`` element-wise, ``mask`` broadcast against ``x``.

    Computed in float32 (float64 for float64 input). A dropped element is ``0 * x``: IEEE
    arithmetic, so a dropped NaN or infinity gives NaN, exactly as the formula reads (and as
    ``torch.nn.functional.dropout``). Serves both the forward pass (``x`` = source) and the
    gradient (``x`` = incoming gradient).
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(dt) * mask.to(dt)
    return y.div_(keep_probability)
