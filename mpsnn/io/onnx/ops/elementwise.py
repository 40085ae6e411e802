"""Element-wise operators: activations as neuron nodes, Add/Sub/Mul/Div/Sum as arithmetic
nodes with MPS's broadcasting strides, Clip, Softmax/LogSoftmax over the channels, Dropout
and Identity.

Activations (``MPSCNNNeuronType`` with its a, b, c):

==============  ====================================================================
Relu            reLU a=0              LeakyRelu   reLU a=alpha (default 0.01)
Sigmoid         sigmoid               HardSigmoid hardSigmoid a=alpha (0.2), b=beta (0.5)
Tanh            tanH a=1 b=1          Softplus    softPlus a=1 b=1
Softsign        softSign              Abs         absolute
Elu             ELU a=alpha (1.0)     Exp / Log   exponential / logarithm a=1 b=0 c=-1 (base e)
Pow (constant   power a=1 b=0 c=p     Neg         linear a=-1 b=0
scalar p)
Sqrt            power c=0.5           Reciprocal  power c=-1
PRelu           pReLU with one slope per channel (a scalar slope: reLU a=slope)
Gelu            geLU (approximate="none" only)
Clip(0, max)    reLUN a=0 b=max       Clip(0, -)  reLU a=0
HardSwish       x · hardSigmoid(x) with a=1/6, b=0.5 (a neuron node and a multiplication)
==============  ====================================================================

Any other Clip is a multiplication by a constant 1 with the arithmetic kernel's
``minimum_value`` / ``maximum_value`` clamp (exact: x·1 = x).

Binary operators: the two operands are images in the same axes (a constant becomes a small
constant image); an operand of size 1 along an image axis where the result is larger gets
stride 0 there (``*_stride_in_pixels_x/_y``, ``*_stride_in_feature_channels``). MPS never
broadcasts the batch: a computed operand of batch 1 against a larger batch is refused (a
constant is repeated over the batch instead).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ....core.enums import MPSCNNNeuronType as NT
from ....core.errors import MPSValueError
from ....graph.nodes import arithmetic as ar
from ....graph.nodes.neuron import MPSCNNNeuronNode, MPSCNNNeuronPReLUNode
from ....graph.nodes.softmax import MPSCNNLogSoftMaxNode, MPSCNNSoftMaxNode
from ....kernels.neuron import MPSNNNeuronDescriptor
from ..importer import Pending
from ..importer import describe as _d
from ..layout import Value, broadcast_shapes, onnx_to_nhwc, standard_axes
from .registry import op

_SIMPLE = {
    "Relu": (NT.reLU, 0.0, 0.0, 0.0),
    "Sigmoid": (NT.sigmoid, 0.0, 0.0, 0.0),
    "Tanh": (NT.tanH, 1.0, 1.0, 0.0),
    "Softplus": (NT.softPlus, 1.0, 1.0, 0.0),
    "Softsign": (NT.softSign, 0.0, 0.0, 0.0),
    "Abs": (NT.absolute, 0.0, 0.0, 0.0),
    "Exp": (NT.exponential, 1.0, 0.0, -1.0),
    "Log": (NT.logarithm, 1.0, 0.0, -1.0),
    "Neg": (NT.linear, -1.0, 0.0, 0.0),
    "Sqrt": (NT.power, 1.0, 0.0, 0.5),
    "Reciprocal": (NT.power, 1.0, 0.0, -1.0),
}


def neuron_descriptor(imp: Any, node: Any, a: dict[str, Any]) -> MPSNNNeuronDescriptor | None:
    """The neuron of an activation node, or None when it is not one neuron (PReLU with
    per-channel slopes, HardSwish, a Clip with bounds other than (0, max))."""
    t = node.op_type
    if t in _SIMPLE:
        nt, pa, pb, pc = _SIMPLE[t]
        return MPSNNNeuronDescriptor(nt, pa, pb, pc)
    if t == "LeakyRelu":
        return MPSNNNeuronDescriptor(NT.reLU, float(a.get("alpha", 0.01)))
    if t == "Elu":
        return MPSNNNeuronDescriptor(NT.ELU, float(a.get("alpha", 1.0)))
    if t == "HardSigmoid":
        return MPSNNNeuronDescriptor(NT.hardSigmoid, float(a.get("alpha", 0.2)), float(a.get("beta", 0.5)))
    if t == "Gelu":
        return MPSNNNeuronDescriptor(NT.geLU)
    if t == "Pow":
        p = imp.inp(node, 1)
        if p is None or p.const is None or p.const.size != 1:
            return None
        return MPSNNNeuronDescriptor(NT.power, 1.0, 0.0, float(p.const.reshape(())))
    if t == "Clip":
        lo, hi = clip_bounds(imp, node, a)
        if lo == 0.0 and hi is None:
            return MPSNNNeuronDescriptor(NT.reLU, 0.0)
        if lo == 0.0 and hi is not None and hi >= 0:
            return MPSNNNeuronDescriptor(NT.reLUN, 0.0, hi)
        return None
    return None


def clip_bounds(imp: Any, node: Any, a: dict[str, Any]) -> tuple[float | None, float | None]:
    if imp.opset < 11:
        lo, hi = a.get("min"), a.get("max")
        return _ordered(None if lo is None else float(lo), None if hi is None else float(hi))
    out = []
    for k, what in ((1, "min"), (2, "max")):
        v = imp.const(node, k, what, optional=True)
        out.append(None if v is None else float(np.asarray(v).reshape(())))
    return _ordered(out[0], out[1])


def _ordered(lo: float | None, hi: float | None) -> tuple[float | None, float | None]:
    """ONNX's Clip with min > max gives max everywhere (operator text, opset 11 on): the
    bounds become (max, max), which every clamp below reproduces exactly (the arithmetic
    kernel refuses minimum_value > maximum_value)."""
    if lo is not None and hi is not None and lo > hi:
        return hi, hi
    return lo, hi


def _gelu_check(a: dict[str, Any], opset: int) -> str | None:
    approx = a.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    return None if approx == "none" else f"approximate={approx!r} (only the exact erf form maps to MPS's geLU)"


@op(*_SIMPLE, "LeakyRelu", "Elu", "HardSigmoid")
def activation(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    _neuron(imp, node, x, neuron_descriptor(imp, node, a))


op("Gelu", check=_gelu_check)(activation)


def _neuron(imp: Any, node: Any, x: Value, desc: MPSNNNeuronDescriptor | None) -> None:
    assert desc is not None
    img, axes = imp.image_any_axes(x, node)  # element-wise: any axes
    n = MPSCNNNeuronNode(img, desc)
    imp.set_image(node, 0, n.result_image, x.shape, axes, x.dtype)


@op("Pow")
def power(imp: Any, node: Any, a: dict[str, Any]) -> None:
    desc = neuron_descriptor(imp, node, a)
    if desc is None:
        raise MPSValueError(f"{_d(node)}: the exponent must be a constant scalar (it becomes MPS's power neuron)")
    _neuron(imp, node, imp.inp(node, 0), desc)


@op("PRelu")
def prelu(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    slope = imp.const(node, 1, "slope")
    s = np.asarray(slope, np.float32)
    if s.size == 1:
        _neuron(imp, node, x, MPSNNNeuronDescriptor(NT.reLU, float(s.reshape(()))))
        return
    c = x.shape[1] if x.rank >= 2 else None
    # per-channel: slope broadcast to X is constant over every dimension but 1
    aligned = s.reshape((1,) * (x.rank - s.ndim) + s.shape)
    if x.rank < 2 or c is None or aligned.shape[1] != c or any(d != 1 for k, d in enumerate(aligned.shape) if k != 1):
        raise MPSValueError(f"{_d(node)}: slope of shape {s.shape} for an input of shape {x.shape} must be a scalar or one "
                            "value per channel (MPS's PReLU neuron)")
    n = MPSCNNNeuronPReLUNode(imp.image(x, node), aligned.reshape(-1).copy())
    imp.set_image(node, 0, n.result_image, x.shape, None, x.dtype)


@op("HardSwish")
def hard_swish(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    img = imp.image(x, node)
    hs = MPSCNNNeuronNode(img, MPSNNNeuronDescriptor(NT.hardSigmoid, 1.0 / 6.0, 0.5))
    m = ar.MPSNNMultiplicationNode(img, hs.result_image)
    hs.label = f"{node.name or 'HardSwish'}: hard sigmoid"
    imp.set_image(node, 0, m.result_image, x.shape, None, x.dtype)


@op("Clip")
def clip(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    desc = neuron_descriptor(imp, node, a)
    if desc is not None:
        _neuron(imp, node, x, desc)
        return
    lo, hi = clip_bounds(imp, node, a)
    img = imp.image(x, node)
    one = imp.constant_image(np.ones((1, 1, 1, 1), np.float32), img, node)
    m: Any = ar.MPSNNMultiplicationNode(img, one)
    m.secondary_stride_in_pixels_x = m.secondary_stride_in_pixels_y = m.secondary_stride_in_feature_channels = 0
    if lo is not None:
        m.minimum_value = lo
    if hi is not None:
        m.maximum_value = hi
    imp.set_image(node, 0, m.result_image, x.shape, None, x.dtype)


_ARITH = {"Add": ar.MPSNNAdditionNode, "Sub": ar.MPSNNSubtractionNode, "Mul": ar.MPSNNMultiplicationNode, "Div": ar.MPSNNDivisionNode}


def _broadcast_check(a: dict[str, Any], opset: int) -> str | None:
    if opset < 7 and a.get("broadcast", 0) and "axis" in a:
        return "the legacy `axis` broadcast (opset < 7)"
    return None


def _merged_axes(values: list[Value], shape: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Axes that hold every operand as it is: per dimension the one image axis the operands use
    (an operand with None there has size 1 and is broadcast), no image axis used twice, every
    dimension of the result larger than 1 on an axis. None when the operands disagree."""
    merged: list[Any] = []
    for d in range(len(shape)):
        used = {v.axes[d] for v in values if v.axes is not None and v.axes[d] is not None}
        if len(used) > 1 or (not used and shape[d] != 1):
            return None
        merged.append(used.pop() if used else None)
    letters = [a for a in merged if a is not None]
    return tuple(merged) if len(letters) == len(set(letters)) else None


def binary(imp: Any, node: Any, cls: type, x: Value, y: Value, out_name_index: int = 0) -> Any:
    """``cls`` (an arithmetic node class) over x and y with ONNX broadcasting; returns the node."""
    shape = broadcast_shapes(_d(node), x.shape, y.shape)
    rank = len(shape)
    # computed operands held with the same (non-standard) axes, e.g. both transposed to
    # channels-last, are used as they are: no data moves; otherwise the standard axes
    computed = [v for v in (x, y) if v.const is None]
    shared = _merged_axes(computed, shape) if all(v.node is not None and v.pending is None and v.rank == rank for v in computed) else None
    axes = shared if shared is not None else standard_axes(rank)
    if axes is None:
        raise MPSValueError(f"{_d(node)}: result of rank {rank} has no image layout")
    imgs, strides = [], []
    anchor = None
    for v in computed:
        anchor = v.node if shared is not None else imp.image(v, node)
    for v in (x, y):
        vshape = (1,) * (rank - v.rank) + tuple(v.shape)
        if v.const is not None:
            arr = np.asarray(v.const, np.float32).reshape(vshape)
            imgs.append(imp.constant_image(onnx_to_nhwc(arr, axes), anchor, node))
        else:
            if v.rank != rank:
                # a computed operand of lower rank: it must broadcast only over missing leading dims
                raise MPSValueError(f"{_d(node)}: operand {v.name!r} of shape {v.shape} must have the result's rank {rank} "
                                    "(MPS images broadcast by strides within one layout)")
            imgs.append(v.node if shared is not None else imp.image(v, node))
        st = {}
        for d, ax in enumerate(axes):
            if ax is not None and vshape[d] == 1 and shape[d] != 1:
                if ax == "n" and v.const is None:
                    raise MPSValueError(f"{_d(node)}: operand {v.name!r} has batch 1 against a batch of {shape[d]}; "
                                        "MPS arithmetic never broadcasts the batch")
                st[ax] = 0
        strides.append(st)
    n = cls(imgs[0], imgs[1])
    for prefix, st in zip(("primary", "secondary"), strides):
        if st.get("w") == 0:
            setattr(n, f"{prefix}_stride_in_pixels_x", 0)
        if st.get("h") == 0:
            setattr(n, f"{prefix}_stride_in_pixels_y", 0)
        if st.get("c") == 0:
            setattr(n, f"{prefix}_stride_in_feature_channels", 0)
    imp.set_image(node, out_name_index, n.result_image, shape, shared, np.result_type(x.dtype, y.dtype))
    return n


@op("Add", "Sub", "Mul", "Div", check=_broadcast_check)
def arithmetic(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x, y = imp.inp(node, 0), imp.inp(node, 1)
    if node.op_type == "Div" and x.dtype.kind in "iub" and y.dtype.kind in "iub":
        # images hold real numbers: the quotient would be rounded to the nearest integer when
        # cast back, where ONNX's integer Div truncates; refused rather than approximated
        raise MPSValueError(f"{_d(node)}: integer Div ({x.dtype} / {y.dtype}) truncates; MPS divides real numbers")
    binary(imp, node, _ARITH[node.op_type], x, y)


@op("Sum")
def total(imp: Any, node: Any, a: dict[str, Any]) -> None:
    vals = [imp.inp(node, k) for k in range(len(node.input))]
    if len(vals) == 1:
        _identity(imp, node, vals[0])
        return
    acc = vals[0]
    for k, v in enumerate(vals[1:], 1):
        last = k == len(vals) - 1
        name = node.output[0] if last else f"{node.output[0]}:partial{k}"
        fake = _Renamed(node, name)
        binary(imp, fake, ar.MPSNNAdditionNode, acc, v)
        acc = imp.values[name]


class _Renamed:
    """A view of an ONNX node with another output name (partial sums of Sum)."""

    def __init__(self, node: Any, name: str) -> None:
        self.name, self.op_type, self.output, self.input = node.name, node.op_type, [name], node.input


@op("Softmax", "LogSoftmax")
def softmax(imp: Any, node: Any, a: dict[str, Any]) -> None:
    """Over the channels only: axis 1 of a standard image (with every later dimension of size 1
    when the opset < 13 coerces to 2-D: all dimensions from ``axis`` on are one row), or the
    dimension that a pending chain of Transposes took from the source's channel axis (torch's
    exports of ``softmax(dim=1)`` before opset 13: Transpose -> Softmax(axis=-1) -> Transpose);
    the softmax then runs on the source and the Transposes stay pending on its result."""
    x = imp.inp(node, 0)
    r = x.rank
    axis = int(a.get("axis", 1 if imp.opset < 13 else -1))
    axis = axis + r if axis < 0 else axis
    dims = list(range(axis, r)) if imp.opset < 13 else [axis]
    big = [d for d in dims if x.shape[d] != 1]
    cls = MPSCNNSoftMaxNode if node.op_type == "Softmax" else MPSCNNLogSoftMaxNode
    p = x.pending
    if p is not None and p.perm is not None and p.source.is_standard() and p.source.rank >= 2 and \
            [p.perm[d] for d in big] == [1]:
        src = p.source
        n = cls(src.node)
        n.label = node.name or None
        moved = Value(f"{node.output[0]}:before transposes", src.shape, src.dtype, node=n.result_image, axes=src.axes)
        imp.values[node.output[0]] = Value(node.output[0], x.shape, x.dtype, pending=Pending(moved, list(p.ops), list(p.what), p.perm))
        return
    if x.node is not None and x.pending is None and r >= 2 and [x.axes[d] for d in big] in (["c"], []) and \
            (x.axes[axis] == "c" or big == []) and axis > 0 and not x.is_standard():
        n = cls(x.node)  # the softmax dimension is already the image's channels (e.g. after a Transpose)
        n.label = node.name or None
        imp.set_image(node, 0, n.result_image, x.shape, x.axes, x.dtype)
        return
    if not (r >= 2 and axis == 1 and big in ([1], [])):
        raise MPSValueError(f"{_d(node)}: axis={a.get('axis')} over shape {x.shape} is not the channel axis; MPS's "
                            "softmax runs over the feature channels of each pixel" + (" (opset < 13 flattens every dimension from axis on)" if imp.opset < 13 else ""))
    n = cls(imp.image(x, node))
    imp.set_image(node, 0, n.result_image, x.shape, None, x.dtype)


@op("Dropout", "Identity")
def dropout(imp: Any, node: Any, a: dict[str, Any]) -> None:
    """Dropout is the identity at inference (its optional mask output is all ones)."""
    x = imp.inp(node, 0)
    training = imp.const(node, 2, "training_mode", optional=True) if node.op_type == "Dropout" else None
    if training is not None and bool(np.asarray(training).reshape(())):
        raise MPSValueError(f"{_d(node)}: training_mode=True; an imported graph runs inference, where Dropout is the identity")
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
        if x.const is None and None in x.shape:
            raise MPSValueError(f"{_d(node)}: the mask output needs a shape known at load time")
        imp.set_const(node.output[1], np.ones(x.shape, dtype=bool))
    _identity(imp, node, x)


def _identity(imp: Any, node: Any, x: Value) -> None:
    v = Value(node.output[0], x.shape, x.dtype, node=x.node, axes=x.axes, const=x.const, pending=x.pending)
    imp.values[node.output[0]] = v
