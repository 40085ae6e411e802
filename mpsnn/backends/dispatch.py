"""Pick the engine for each call: a Triton kernel on CUDA where one exists and the data
layout suits it, else torch eager. The torch path is also the CPU implementation."""
from __future__ import annotations

import os

import torch

from ..core.enums import MPSCNNNeuronType
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


def neuron_forward(x: torch.Tensor, out: torch.Tensor, p: NeuronParams, quantize=None, bias: torch.Tensor | None = None) -> None:
    """``out[...] = f(x + bias)`` (``bias``: one value per channel, the last axis, or None),
    computed in float32. ``quantize`` (a callable) post-processes values for unorm storage."""
    tri = _triton() if quantize is None and x.numel() else None
    if tri is not None and _fast_ok(x, out) and (bias is None or (bias.is_contiguous() and bias.device == x.device)):
        tri.neuron_forward(x, out, p, bias=bias)
        return
    if quantize is None and p.neuron_type == MPSCNNNeuronType.reLU and x.dtype == out.dtype and x.dtype in _WIDE:
        # ReLU in the storage's own (float32/64) arithmetic, straight into `out`: torch's
        # leaky ReLU is `x > 0 ? x : a·x`, which equals `x >= 0 ? x : a·x` everywhere (at ±0
        # both give x; -inf·0 is NaN in both)
        if bias is not None:
            torch.add(x, bias.to(x.dtype), out=out)
            x = out
        torch._C._nn.leaky_relu(x, p.a, out=out)
        return
    if bias is not None:
        x = _as_compute(x) + bias.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    y = torch_eager.neuron_forward(x, p)
    out.copy_(quantize(y) if quantize is not None else y)


def neuron_gradient(dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor, p: NeuronParams, quantize=None) -> None:
    """``out[...] = dy * f'(x)``."""
    tri = _triton() if quantize is None and x.numel() else None
    if tri is not None and _fast_ok(dy, x, out):
        tri.neuron_gradient(dy, x, out, p)
        return
    if quantize is None and p.neuron_type == MPSCNNNeuronType.reLU and dy.dtype == x.dtype == out.dtype and x.dtype in _WIDE:
        # dy·f'(x) with f' = (x >= 0 ? 1 : a), in two passes (an infinite dy times a zero
        # slope stays NaN, as in the general form). The 0/1 slope is written straight into
        # `out` in its dtype and multiplied in place: a bool mask times dy would convert the
        # mask in an unvectorised pass (5x slower on the CPU, 64x28x28x32 float32)
        if p.a == 0.0 and not _overlaps(out, dy) and not _overlaps(out, x):
            torch.ge(x, 0, out=out)
            out.mul_(dy)
            return
        slope = x >= 0 if p.a == 0.0 else torch.where(x >= 0, x.new_ones(()), x.new_full((), p.a))
        torch.mul(dy, slope, out=out)
        return
    dx = _as_compute(dy) * torch_eager.neuron_derivative(x, p)
    out.copy_(quantize(dx) if quantize is not None else dx)


#: dtypes the CPU ReLU fast paths compute in directly (16-bit storage goes through float32)
_WIDE = (torch.float32, torch.float64)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` may share memory (one storage: conservative for disjoint views)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _as_compute(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


_triton_reduce = None

#: from this many elements a column sum takes a bandwidth-bound engine (cuBLAS or Triton)
#: instead of torch's reduction (cheaper to launch, but ~1 TB/s for tall [M, C] matrices on
#: an H100)
COLUMN_SUM_FAST_MIN = 1 << 21

#: how ``torch.mm(..., out_dtype=torch.float32)`` works for 16-bit CUDA matrices: "out" (into
#: a given tensor), "new" (returns a new tensor only), False (not at all: ``aten::mm.dtype`` is
#: missing in older torch builds), None (not tried yet)
_mm_mode: str | bool | None = None
#: per (device, dtype): a row of ones, grown as needed, for the matrix-vector column sum
_ones: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _ones_row(m: int, like: torch.Tensor) -> torch.Tensor:
    key = (like.device, like.dtype)
    row = _ones.get(key)
    if row is None or row.shape[1] < m:
        row = _ones[key] = torch.ones(1, max(m, 2 * row.shape[1] if row is not None else m), dtype=like.dtype, device=like.device)
    return row[:, :m]


def _mm_column_sum(x2: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor | None:
    """``ones[1, M] @ x2[M, C]`` in cuBLAS with float32 accumulation and a float32 result,
    written into ``out`` (``[C]``) where this torch can; None when it cannot at all."""
    global _mm_mode
    m, c = x2.shape
    ones = _ones_row(m, x2)
    if _mm_mode is None:
        for mode in ("out", "new"):
            try:
                res = _mm_column_sum_as(mode, ones, x2, out)
            except (TypeError, RuntimeError, NotImplementedError):
                continue
            _mm_mode = mode
            return res
        _mm_mode = False
    if _mm_mode is False:
        return None
    return _mm_column_sum_as(str(_mm_mode), ones, x2, out)


def _mm_column_sum_as(mode: str, ones: torch.Tensor, x2: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    c = x2.shape[1]
    if mode == "out":
        res = out.view(1, c) if out is not None else torch.empty((1, c), dtype=torch.float32, device=x2.device)
        torch.mm(ones, x2, out_dtype=torch.float32, out=res)
    else:
        res = torch.mm(ones, x2, out_dtype=torch.float32)
    if res.dtype != torch.float32:
        raise TypeError("mm ignored out_dtype")
    return res.view(c)


def column_sum(e: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """``Σ_{n,y,x} e[n, y, x, c]`` of a channels-last tensor, accumulated in float32 (the
    bias gradient of a convolution). Returns a float32 ``[C]`` tensor; with ``out`` (float32,
    contiguous ``[C]``) the sum is written there (added to it when ``accumulate``) and
    ``out`` is returned.

    Engines: for large contiguous CUDA tensors, 16-bit ones go through cuBLAS as a
    matrix-vector product with a ones row (float32 accumulation, the result written straight
    into ``out``: one launch, ~2.6 TB/s on an H100) and float32 ones through the Triton column
    sum (a float32 matrix product could round its inputs to TF32); everything else through
    torch's reduction. Every engine's result is deterministic."""
    c = e.shape[-1]
    fast = e.is_cuda and e.numel() >= COLUMN_SUM_FAST_MIN and e.is_contiguous()
    res = None
    if fast and e.dtype in (torch.float16, torch.bfloat16):
        res = _mm_column_sum(e.view(-1, c), None if accumulate else out)
    if res is None and fast and e.dtype in (torch.float32, torch.float16, torch.bfloat16) and _triton() is not None:
        global _triton_reduce
        if _triton_reduce is None:
            from .triton import reduce as mod
            _triton_reduce = mod
        res = _triton_reduce.column_sum(e.view(-1, c))
    if res is None:
        dims = tuple(range(e.dim() - 1))
        if out is not None and not accumulate and out.dtype == torch.float32:
            return torch.sum(e, dim=dims, dtype=torch.float32, out=out)
        res = e.sum(dim=dims, dtype=torch.float32)
    if out is None:
        return res
    if accumulate:
        out.add_(res)
    elif res is not out and res.data_ptr() != out.data_ptr():
        out.copy_(res)
    return out


_triton_modules: dict[str, object] = {}


def triton_engine(name: str, *tensors: torch.Tensor):  # type: ignore[no-untyped-def]
    """``mpsnn.backends.triton.<name>`` when Triton is usable (see :func:`_triton`) and every
    tensor is a CUDA float32/float16/bfloat16 tensor with contiguous channels (last
    dimension), else None: the caller then takes its torch path."""
    if _triton() is None or not all(t.is_cuda and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                    and (t.dim() == 0 or t.stride(-1) == 1) for t in tensors):
        return None
    mod = _triton_modules.get(name)
    if mod is None:
        import importlib
        mod = _triton_modules[name] = importlib.import_module(f"{__package__}.triton.{name}")
    return mod


def engine_out(out: torch.Tensor | None, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device,
               accept=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Where a fast engine writes its result: ``out`` (a destination region handed down by the
    kernel, see ``mpsnn.kernels.results.direct_out``) when it has this shape and dtype,
    contiguous channels and passes ``accept(out)`` where given, else a new tensor."""
    if (out is not None and tuple(out.shape) == tuple(shape) and out.dtype == dtype and out.stride(-1) == 1
            and (accept is None or accept(out))):
        return out
    return torch.empty(tuple(shape), dtype=dtype, device=device)
