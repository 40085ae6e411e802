"""Pick the engine for each call: a Triton kernel on CUDA where one exists and the data
layout suits it, else torch eager. The torch path is also the CPU implementation."""
from __future__ import annotations

import os

import torch

from . import torch_eager
from .torch_eager import NeuronParams

_triton_neuron = None
_triton_checked = False


def _triton():
    """The Triton neuron module, or None when Triton is unusable (CPU-only installs) or
    disabled with ``MPSNN_DISABLE_TRITON=1``."""
    global _triton_neuron, _triton_checked
    if not _triton_checked:
        _triton_checked = True
        if os.environ.get("MPSNN_DISABLE_TRITON", "") not in ("", "0") or not torch.cuda.is_available():
            _triton_neuron = None
        else:
            try:
                from .triton import neuron as mod
                _triton_neuron = mod if mod.available() else None
            except ImportError:
                _triton_neuron = None
    return _triton_neuron


def _fast_ok(*tensors: torch.Tensor) -> bool:
    t0 = tensors[0]
    return all(t.is_cuda and t.is_contiguous() and t.shape == t0.shape and t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in tensors)


def neuron_forward(x: torch.Tensor, out: torch.Tensor, p: NeuronParams, quantize=None) -> None:
    """``out[...] = f(x)``. ``quantize`` (a callable) post-processes values for unorm storage."""
    tri = _triton() if quantize is None and x.numel() else None
    if tri is not None and _fast_ok(x, out):
        tri.neuron_forward(x, out, p)
        return
    y = torch_eager.neuron_forward(x, p)
    out.copy_(quantize(y) if quantize is not None else y)


def neuron_gradient(dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor, p: NeuronParams, quantize=None) -> None:
    """``out[...] = dy * f'(x)``."""
    tri = _triton() if quantize is None and x.numel() else None
    if tri is not None and _fast_ok(dy, x, out):
        tri.neuron_gradient(dy, x, out, p)
        return
    dx = _as_compute(dy) * torch_eager.neuron_derivative(x, p)
    out.copy_(quantize(dx) if quantize is not None else dx)


def _as_compute(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


_triton_reduce = None


#: from this many elements the Triton column sum pays for its launch (~30 µs of host time
#: against ~10 µs for torch's reduction, which runs at ~0.8 TB/s on an H100)
COLUMN_SUM_TRITON_MIN = 1 << 21


def column_sum(e: torch.Tensor) -> torch.Tensor:
    """``Σ_{n,y,x} e[n, y, x, c]`` of an NHWC tensor, accumulated and returned in float32: the
    Triton column sum on CUDA for large contiguous tensors, torch's reduction otherwise."""
    global _triton_reduce
    if (e.is_cuda and e.numel() >= COLUMN_SUM_TRITON_MIN and e.is_contiguous() and e.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and _triton() is not None):
        if _triton_reduce is None:
            from .triton import reduce as mod
            _triton_reduce = mod
        return _triton_reduce.column_sum(e.view(-1, e.shape[-1]))
    return e.sum(dim=tuple(range(e.dim() - 1)), dtype=torch.float32)

