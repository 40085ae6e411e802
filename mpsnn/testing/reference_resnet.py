"""ResNet-50 v1.5 written out in torch from torchvision's definition, as the tests' reference
for ``mpsnn.models.resnet`` and ``mpsnn.models.resnet_training`` (NCHW, any dtype, autograd
works through it). The batch norm is the caller's: inference (running statistics) or
training (batch statistics)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..models.resnet import BLOCKS

__all__ = ["resnet50_forward"]

#: ``batch_norm(y, bn_prefix) -> y`` over the convolution's output ``y``
BatchNorm = Callable[[torch.Tensor, str], torch.Tensor]


def resnet50_forward(x: torch.Tensor, t: dict[str, torch.Tensor], batch_norm: BatchNorm) -> torch.Tensor:
    """The logits of NCHW ``x`` for the torchvision-style tensors ``t``."""

    def cbr(y: torch.Tensor, conv: str, bn: str, stride: int, relu: bool) -> torch.Tensor:
        w = t[conv + ".weight"]
        y = batch_norm(F.conv2d(y, w, None, stride, w.shape[2] // 2), bn)
        return F.relu(y) if relu else y

    y = F.max_pool2d(cbr(x, "conv1", "bn1", 2, True), 3, 2, 1)
    for s, blocks in enumerate(BLOCKS, 1):
        for b in range(blocks):
            pre, stride = f"layer{s}.{b}", 2 if b == 0 and s > 1 else 1
            z = cbr(y, pre + ".conv1", pre + ".bn1", 1, True)
            z = cbr(z, pre + ".conv2", pre + ".bn2", stride, True)
            z = cbr(z, pre + ".conv3", pre + ".bn3", 1, False)
            y = F.relu(z + (cbr(y, pre + ".downsample.0", pre + ".downsample.1", stride, False) if b == 0 else y))
    return F.linear(y.mean((2, 3)), t["fc.weight"], t["fc.bias"])
