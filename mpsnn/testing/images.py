"""Small helpers the kernel tests share: make images from values, poison destinations,
read values back in float64, finish a command buffer."""
from __future__ import annotations

import numpy as np
import torch

from ..core.device import Device, MTLCommandBuffer
from ..images.image import MPSImage


def finish(cb: MTLCommandBuffer) -> None:
    """Commit ``cb`` and wait for it."""
    cb.commit()
    cb.wait_until_completed()


def image(values: np.ndarray, device: Device, dtype: torch.dtype = torch.float32) -> tuple[MPSImage, np.ndarray]:
    """An image holding ``values`` rounded to ``dtype``, and those rounded values in float64."""
    t = torch.from_numpy(np.asarray(values, np.float64)).to(device.torch_device, dtype)
    return MPSImage.from_torch(t), t.double().cpu().numpy()


def poisoned(shape: tuple[int, ...], device: Device, value: float = float("nan"), dtype: torch.dtype = torch.float32) -> tuple[MPSImage, np.ndarray]:
    """An image filled with ``value`` (NaN by default), and its contents in float64: a
    destination whose every written element must change."""
    t = torch.full(shape, value, dtype=dtype, device=device.torch_device)
    return MPSImage.from_torch(t), t.double().cpu().numpy()


def values(img: MPSImage) -> np.ndarray:
    """The image's values in float64 on the host."""
    return img.to_torch().detach().double().cpu().numpy()
