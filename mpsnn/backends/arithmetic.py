"""Element-wise arithmetic numerics (spec/arithmetic.md) in torch, on NHWC tensors.

Pure functions: operands and gradients are torch tensors (CPU or CUDA); the geometry and the
parameters are host ints and floats, so nothing here reads a tensor value on the host (no
``.item()``, no branching on data) and a faster engine can replace any function with the same
signature.

Forward (§2)::

    r   = op(primary_scale*x, secondary_scale*y) + bias        op in {+, -, *, /}
    out = min(max(r, minimum_value), maximum_value)             (NaN propagates)
    m   = minimum_value < r < maximum_value                     the clamp mask (strict)

Operands are read already broadcast (a size-1 axis stands for a stride-0 read), so the
result has the broadcast shape of ``x`` and ``y``. Comparison (``compare``) gives 1.0 / 0.0 and
ignores scales, bias and the clamp.

Gradient (§5): ``G = where(m, (primary_scale*g) * (secondary_scale*z), 0)`` (``z`` only for
multiply), then the adjoint of the forward read of the target operand, one axis at a time
(:func:`broadcast_adjoint`): a stride-0 axis is summed, a stride-1 axis is shifted into the
target's extent; reads that fell outside the image are dropped (edge mode zero) or added to
the edge pixel (edge mode clamp), then ``bias`` is added to every element. Arithmetic is
float32 (float64 in, float64 out).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: the largest finite float32, Apple's default clamp bound (``FLT_MAX``)
FLT_MAX = 3.4028234663852886e38

OPERATIONS = ("add", "subtract", "multiply", "divide", "compare")


@dataclass(frozen=True)
class ArithmeticParams:
    """What the numerics need to know about one arithmetic kernel (float32-valued floats)."""

    operation: str
    primary_scale: float = 1.0
    secondary_scale: float = 1.0
    bias: float = 0.0
    minimum_value: float = -FLT_MAX
    maximum_value: float = FLT_MAX
    comparison_type: int = 0   # MPSNNComparisonType raw value (compare only)
    threshold: float = 0.0     # compare only


@dataclass(frozen=True)
class AxisMap:
    """How one axis of the forward region maps onto the target operand: region index ``i``
    read coordinate ``start + i*stride`` (``stride`` 0 or 1) of an axis of length ``size``;
    ``clamp`` is the edge mode (True: clamp, False: zero)."""

    start: int
    stride: int
    size: int
    clamp: bool = False


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t if scale == 1.0 else t * scale


def arithmetic_forward(x: torch.Tensor, y: torch.Tensor, p: ArithmeticParams, with_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out, mask)`` for operands ``x``, ``y`` (``[N, H|1, W|1, C|1]``, broadcastable).

    ``out`` is a new float32 tensor of the broadcast shape; ``mask`` (bool, same shape) is the
    clamp mask when ``with_mask``, else None (always None for ``compare``)."""
    xs, ys = _compute(x), _compute(y)
    op = p.operation
    if op == "compare":
        return compare(xs, ys, p.comparison_type, p.threshold), None
    a, b = _scaled(xs, p.primary_scale), _scaled(ys, p.secondary_scale)
    if op == "add":
        r = a + b
    elif op == "subtract":
        r = a - b
    elif op == "multiply":
        r = a * b
    elif op == "divide":
        r = a / b
    else:
        raise ValueError(f"unknown arithmetic operation {op!r}")
    if p.bias != 0.0:
        r.add_(p.bias)
    mask = ((r > p.minimum_value) & (r < p.maximum_value)) if with_mask else None
    return r.clamp_(p.minimum_value, p.maximum_value), mask


def compare(x: torch.Tensor, y: torch.Tensor, comparison_type: int, threshold: float) -> torch.Tensor:
    """1.0 where the comparison holds, else 0.0 (equal: ``|x-y| <= threshold``, notEqual:
    ``|x-y| > threshold``; the others ignore ``threshold``)."""
    t = int(comparison_type)
    if t == 0:
        res = (x - y).abs() <= threshold
    elif t == 1:
        res = (x - y).abs() > threshold
    elif t == 2:
        res = x < y
    elif t == 3:
        res = x <= y
    elif t == 4:
        res = x > y
    elif t == 5:
        res = x >= y
    else:
        raise ValueError(f"unknown comparison type {comparison_type!r}")
    return res.to(x.dtype if x.dtype == torch.float64 else torch.float32)


def broadcast_adjoint(t: torch.Tensor, dim: int, m: AxisMap) -> torch.Tensor:
    """Adjoint of the forward read along ``dim``: ``t`` holds one value per region index;
    the result has length ``m.size`` along ``dim`` and holds, at each target coordinate, the
    sum of the values read from it. Returns ``t`` itself when the map is the identity."""
    length = t.shape[dim]
    if m.stride == 0:
        idx = min(max(m.start, 0), m.size - 1) if m.clamp else m.start
        s = t.sum(dim, keepdim=True)
        if m.size == 1 and idx == 0:
            return s
        shape = list(t.shape)
        shape[dim] = m.size
        out = t.new_zeros(shape)
        if 0 <= idx < m.size:
            out.narrow(dim, idx, 1).copy_(s)
        return out
    if m.start == 0 and length == m.size:
        return t
    lo = min(max(-m.start, 0), length)           # region indices [lo, hi) land inside the target
    hi = min(max(m.size - m.start, 0), length)
    shape = list(t.shape)
    shape[dim] = m.size
    out = t.new_zeros(shape)
    if hi > lo:
        out.narrow(dim, m.start + lo, hi - lo).copy_(t.narrow(dim, lo, hi - lo))
    if m.clamp and m.size > 0:
        if lo > 0:
            out.narrow(dim, 0, 1).add_(t.narrow(dim, 0, lo).sum(dim, keepdim=True))
        if hi < length:
            out.narrow(dim, m.size - 1, 1).add_(t.narrow(dim, hi, length - hi).sum(dim, keepdim=True))
    return out


def arithmetic_gradient(
    g: torch.Tensor,
    mask: torch.Tensor | None,
    z: torch.Tensor | None,
    primary_scale: float,
    secondary_scale: float,
    bias: float,
    y_map: AxisMap,
    x_map: AxisMap,
    c_map: AxisMap,
) -> torch.Tensor:
    """The gradient for one forward operand (the target), before it is stored.

    Args:
        g: ``[N, h, w, C]`` incoming gradient over the forward region.
        mask: the forward clamp mask (broadcastable to ``g``) or None (all ones).
        z: the other forward operand as the forward pass read it (broadcastable to ``g``),
            for multiply; None for add / subtract.
        primary_scale, secondary_scale, bias: the gradient kernel's parameters.
        y_map, x_map, c_map: the target's forward read along height, width and channels.

    Returns a new float32 ``[N, y_map.size, x_map.size, c_map.size]`` tensor.
    """
    v = _scaled(_compute(g), primary_scale)
    if z is not None:
        v = v * _scaled(_compute(z), secondary_scale)
    if mask is not None:
        v = torch.where(mask, v, v.new_zeros(()))
    elif v.data_ptr() == g.data_ptr():
        v = v.clone()
    v = broadcast_adjoint(v, 1, y_map)
    v = broadcast_adjoint(v, 2, x_map)
    v = broadcast_adjoint(v, 3, c_map)
    if bias != 0.0:
        v = v + bias
    return v
