"""Pooling and reductions: MaxPool, AveragePool, LpPool, the Global* pools, ReduceMean /
Max / Min / Sum and ArgMax / ArgMin.

* **MaxPool** -> ``MPSCNNPoolingMaxNode`` (``MPSCNNDilatedPoolingMaxNode`` with dilations),
  edge mode clamp: a window never reads an off-image tap that is not also an in-image tap
  of the same window, so the pads are ignored as ONNX's -inf padding would be. The ``Indices``
  output is not supported.
* **AveragePool** -> ``MPSCNNPoolingAverageNode`` with edge mode clamp, which divides by the
  taps inside the image. ``count_include_pad=0``: ONNX's pads are offsets only.
  ``count_include_pad=1`` with pads: an ``MPSNNPadNode`` (zeros) adds the pads first and the
  pooling runs without pads, so the divisor counts the pads and, in ceil mode, not the
  pixels past them (as ONNX's reference and onnxruntime do). Dilations are refused (MPS's
  average pooling has none).
* **LpPool** (p = 2 only) -> ``MPSCNNPoolingL2NormNode`` with edge mode zero (pads read 0).
* **GlobalAveragePool / GlobalMaxPool / GlobalLpPool (p = 2)**: one window over the whole
  image when its size is known at load time, else a row then a column reduction (mean, max).
* **Reduce{Mean,Max,Min,Sum}** -> ``MPSNNReduction{Row,Column,FeatureChannels}*Node`` per
  reduced axis (row = over the width, column = over the height); the batch axis cannot be
  reduced. ``keepdims=0`` only drops dimensions (no data moves).
* **ArgMax / ArgMin** over the channel axis -> ``MPSNNReductionFeatureChannelsArgument{Max,Min}Node``
  (ties give the lowest index, ONNX's ``select_last_index=0``; ``select_last_index=1`` reverses
  the channels first and maps the index back); the result is int64.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ....core.enums import MPSCNNNeuronType, MPSImageEdgeMode
from ....core.errors import MPSValueError
from ....core.structs import MPSImageCoordinate
from ....graph.nodes import pooling as pn
from ....graph.nodes import reduction as rn
from ....graph.nodes.neuron import MPSCNNNeuronNode
from ....graph.nodes.resampling import MPSNNPadNode
from ....kernels.neuron import MPSNNNeuronDescriptor
from ..importer import describe as _d
from ..layout import Value, std_axes
from ..nodes import RelayoutNode, channel_gather
from ..padding import ONNXPadding
from .convolution import _geometry
from .registry import ints, op, string


def _pool_check(a: dict[str, Any], opset: int) -> str | None:
    auto = string(a, "auto_pad", "NOTSET")
    if auto not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        return f"auto_pad={auto!r}"
    return None


def _avg_check(a: dict[str, Any], opset: int) -> str | None:
    if any(d != 1 for d in ints(a, "dilations", [])):
        return "dilations (MPS's average pooling has none)"
    return _pool_check(a, opset)


def _lp_check(a: dict[str, Any], opset: int) -> str | None:
    if int(a.get("p", 2)) != 2:
        return f"p={a.get('p')} (MPS pools the L2 norm only)"
    return _pool_check(a, opset)


def _out_shape(x: Value, pad: ONNXPadding) -> tuple[Any, ...]:
    return pad.result_shape(x.shape, x.shape[1])


@op("MaxPool", check=_pool_check)
def max_pool(imp: Any, node: Any, a: dict[str, Any]) -> None:
    if len(node.output) > 1 and node.output[1]:
        raise MPSValueError(f"{_d(node)}: the Indices output is not supported")
    x = imp.inp(node, 0)
    (kh, kw), s, dl, pads, auto = _geometry(node, a, x, tuple(int(k) for k in a["kernel_shape"]))
    pad = ONNXPadding(_d(node), (kh, kw), s, dl, pads, auto, bool(a.get("ceil_mode", 0)), MPSImageEdgeMode.clamp)
    img = imp.image(x, node)
    if dl != (1, 1):
        n: Any = pn.MPSCNNDilatedPoolingMaxNode(img, kernel_width=kw, kernel_height=kh, stride_in_pixels_x=s[1], stride_in_pixels_y=s[0],
                                                dilation_rate_x=dl[1], dilation_rate_y=dl[0], padding_policy=pad)
    else:
        n = pn.MPSCNNPoolingMaxNode(img, kernel_width=kw, kernel_height=kh, stride_in_pixels_x=s[1], stride_in_pixels_y=s[0], padding_policy=pad)
    n.label = node.name or None
    imp.set_image(node, 0, n.result_image, _out_shape(x, pad), None, x.dtype)


@op("AveragePool", check=_avg_check)
def average_pool(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    (kh, kw), s, dl, pads, auto = _geometry(node, a, x, tuple(int(k) for k in a["kernel_shape"]))
    ceil = bool(a.get("ceil_mode", 0))
    img = imp.image(x, node)
    full = ONNXPadding(_d(node), (kh, kw), s, dl, pads, auto, ceil, MPSImageEdgeMode.clamp)
    shape = _out_shape(x, full)
    if int(a.get("count_include_pad", 0)) and (auto in ("SAME_UPPER", "SAME_LOWER") or any(p for pr in pads for p in pr)):
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            h = x.shape[2] if x.rank == 4 else 1
            if h is None or x.shape[-1] is None:
                raise MPSValueError(f"{_d(node)}: count_include_pad=1 with auto_pad={auto} needs the input size at load time")
            (pt, pb, _), (pl, pr, _) = full.result_size(h, x.shape[-1])
            pads = ((pt, pb), (pl, pr))
        padded = MPSNNPadNode(img, MPSImageCoordinate(pads[1][0], pads[0][0], 0), MPSImageCoordinate(pads[1][1], pads[0][1], 0))
        padded.label = f"{node.name or 'AveragePool'}: count_include_pad"
        img = padded.result_image
        pad = ONNXPadding(_d(node), (kh, kw), s, dl, ((0, 0), (0, 0)), "NOTSET", ceil, MPSImageEdgeMode.clamp,
                          trim=(pads[0][1], pads[1][1]))
    else:
        pad = full
    n = pn.MPSCNNPoolingAverageNode(img, kernel_width=kw, kernel_height=kh, stride_in_pixels_x=s[1], stride_in_pixels_y=s[0], padding_policy=pad)
    n.label = node.name or None
    imp.set_image(node, 0, n.result_image, shape, None, x.dtype)


@op("LpPool", check=_lp_check)
def lp_pool(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    (kh, kw), s, dl, pads, auto = _geometry(node, a, x, tuple(int(k) for k in a["kernel_shape"]))
    if dl != (1, 1):
        raise MPSValueError(f"{_d(node)}: dilations are not supported (MPS's L2 pooling has none)")
    pad = ONNXPadding(_d(node), (kh, kw), s, dl, pads, auto, bool(a.get("ceil_mode", 0)), MPSImageEdgeMode.zero)
    n = pn.MPSCNNPoolingL2NormNode(imp.image(x, node), kernel_width=kw, kernel_height=kh, stride_in_pixels_x=s[1], stride_in_pixels_y=s[0], padding_policy=pad)
    n.label = node.name or None
    imp.set_image(node, 0, n.result_image, _out_shape(x, pad), None, x.dtype)


_GLOBAL = {
    "GlobalAveragePool": (pn.MPSCNNPoolingAverageNode, (rn.MPSNNReductionRowMeanNode, rn.MPSNNReductionColumnMeanNode), MPSImageEdgeMode.clamp),
    "GlobalMaxPool": (pn.MPSCNNPoolingMaxNode, (rn.MPSNNReductionRowMaxNode, rn.MPSNNReductionColumnMaxNode), MPSImageEdgeMode.clamp),
    "GlobalLpPool": (pn.MPSCNNPoolingL2NormNode, None, MPSImageEdgeMode.zero),
}


@op("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", check=_lp_check)
def global_pool(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    if x.rank not in (3, 4):
        raise MPSValueError(f"{_d(node)}: input of rank {x.rank}; global pooling takes (N, C, L) or (N, C, H, W)")
    pool, reductions, edge = _GLOBAL[node.op_type]
    img = imp.image(x, node)
    h = x.shape[2] if x.rank == 4 else 1
    w = x.shape[-1]
    out_shape = x.shape[:2] + (1,) * (x.rank - 2)
    if h is not None and w is not None:
        pad = ONNXPadding(_d(node), (h, w), (1, 1), (1, 1), ((0, 0), (0, 0)), "VALID", False, edge)
        n: Any = pool(img, kernel_width=w, kernel_height=h, stride_in_pixels_x=1, stride_in_pixels_y=1, padding_policy=pad)
    elif reductions is not None:
        r = reductions[0](img)
        r.label = f"{node.name or node.op_type}: over the width"
        n = reductions[1](r.result_image)
    else:
        raise MPSValueError(f"{_d(node)}: the image size must be known at load time")
    n.label = node.name or None
    imp.set_image(node, 0, n.result_image, out_shape, None, x.dtype)


_REDUCE = {
    "ReduceMean": {"w": rn.MPSNNReductionRowMeanNode, "h": rn.MPSNNReductionColumnMeanNode, "c": rn.MPSNNReductionFeatureChannelsMeanNode},
    "ReduceMax": {"w": rn.MPSNNReductionRowMaxNode, "h": rn.MPSNNReductionColumnMaxNode, "c": rn.MPSNNReductionFeatureChannelsMaxNode},
    "ReduceMin": {"w": rn.MPSNNReductionRowMinNode, "h": rn.MPSNNReductionColumnMinNode, "c": rn.MPSNNReductionFeatureChannelsMinNode},
    "ReduceSum": {"w": rn.MPSNNReductionRowSumNode, "h": rn.MPSNNReductionColumnSumNode, "c": rn.MPSNNReductionFeatureChannelsSumNode},
}


def _reduce_axes(imp: Any, node: Any, a: dict[str, Any], rank: int) -> list[int] | None:
    if "axes" in a:
        axes = [int(v) for v in a["axes"]]
    else:
        c = imp.const(node, 1, "axes", optional=True) if len(node.input) > 1 else None
        if c is None:
            return None
        axes = [int(v) for v in np.asarray(c).reshape(-1)]
    return sorted({v + rank if v < 0 else v for v in axes})


@op("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum")
def reduce(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    axes = _reduce_axes(imp, node, a, x.rank)
    if axes is None or not axes:
        if int(a.get("noop_with_empty_axes", 0)):
            from .elementwise import _identity
            _identity(imp, node, x)
            return
        axes = list(range(x.rank))
    img, held = imp.image_any_axes(x, node)
    vaxes: tuple[Any, ...] = held if held is not None else std_axes(x.rank)
    current = img
    table = _REDUCE[node.op_type]
    for d in axes:
        ax = vaxes[d]
        if ax is None or x.shape[d] == 1:
            continue  # a dimension of size 1: nothing to reduce
        if ax == "n":
            raise MPSValueError(f"{_d(node)}: axis {d} is the batch; MPS reduces rows, columns and feature channels of each image")
        r = table[ax](current)
        r.label = f"{node.name or node.op_type}: axis {d}"
        current = r.result_image
    keep = int(a.get("keepdims", 1))
    shape = tuple(1 if k in axes else s for k, s in enumerate(x.shape))
    out_axes = list(vaxes)
    if not keep:
        shape = tuple(s for k, s in enumerate(x.shape) if k not in axes)
        out_axes = [ax for k, ax in enumerate(vaxes) if k not in axes]
    else:
        out_axes = [None if k in axes else ax for k, ax in enumerate(vaxes)]
    if current is img:  # every reduced axis had size 1
        from .elementwise import _identity
        _identity(imp, node, Value(x.name, tuple(shape), x.dtype, node=img, axes=tuple(out_axes)))
        return
    imp.set_image(node, 0, current, shape, out_axes, x.dtype)



@op("ArgMax", "ArgMin")
def arg_reduce(imp: Any, node: Any, a: dict[str, Any]) -> None:
    """``select_last_index=1``: the channels are reversed first (a gather), the lowest index of
    the reversed channels is found, and ``C - 1 - index`` (a linear neuron, exact for indices
    below 2**24 in float32) is the highest index of the original channels."""
    x = imp.inp(node, 0)
    axis = int(a.get("axis", 0))
    axis = axis + x.rank if axis < 0 else axis
    img = imp.image(x, node)
    if std_axes(x.rank)[axis] != "c":
        raise MPSValueError(f"{_d(node)}: axis {a.get('axis', 0)} of shape {x.shape} is not the channel axis; MPS's arg "
                            "reductions run over the feature channels")
    last = bool(int(a.get("select_last_index", 0)))
    c = x.shape[axis]
    if last:
        if c is None:
            raise MPSValueError(f"{_d(node)}: select_last_index=1 needs the channel count at load time")
        rev = RelayoutNode(img, channel_gather(np.arange(c)[::-1].copy()), f"{node.name or node.op_type}: reversed channels")
        img = rev.result_image
    cls = rn.MPSNNReductionFeatureChannelsArgumentMaxNode if node.op_type == "ArgMax" else rn.MPSNNReductionFeatureChannelsArgumentMinNode
    n: Any = cls(img)
    n.label = node.name or None
    if last:
        n = MPSCNNNeuronNode(n.result_image, MPSNNNeuronDescriptor(MPSCNNNeuronType.linear, -1.0, float(c - 1)))
        n.label = f"{node.name or node.op_type}: index in the original order"
    std = list(std_axes(x.rank))
    if int(a.get("keepdims", 1)):
        shape = tuple(1 if k == axis else s for k, s in enumerate(x.shape))
        out_axes = [None if k == axis else ax for k, ax in enumerate(std)]
    else:
        shape = tuple(s for k, s in enumerate(x.shape) if k != axis)
        out_axes = [ax for k, ax in enumerate(std) if k != axis]
    imp.set_image(node, 0, n.result_image, shape, out_axes, np.dtype(np.int64))
