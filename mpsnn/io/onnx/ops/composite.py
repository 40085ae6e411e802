"""Operators made of several MPS nodes: LayerNormalization, and GELU written out with Erf.

* **LayerNormalization** (opset 17) over one dimension (the others of ``axis`` .. last must
  have size 1): the image that holds that dimension on its channels (free for the last
  dimension after a Transpose (0, 2, 3, 1) of an NCHW image), then
  ``mean = MPSNNReductionFeatureChannelsMeanNode(x)``, ``d = x - mean`` (an
  ``MPSNNSubtractionNode`` with the mean broadcast over the channels by a channel stride of 0),
  ``var = FeatureChannelsMean(d · d)``, ``r = (var + epsilon)^-0.5`` (a power neuron),
  ``y = d · r`` and the scale and bias as constant images (``MPSNNMultiplicationNode``,
  ``MPSNNAdditionNode``). The variance is the biased one, as ONNX's. The Mean and InvStdDev
  outputs are not supported.
* **Erf** is mapped only inside GELU as exporters write it before opset 20,
  ``(x · (erf(x / √2) + 1)) · 0.5`` (the two products in either order, ``x · 1/√2`` for the
  division): the whole pattern becomes one ``MPSCNNNeuronNode`` of type ``geLU`` (the exact erf
  form) and the nodes of the pattern are skipped. An Erf anywhere else is refused.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ....core.enums import MPSCNNNeuronType as NT
from ....core.errors import MPSValueError
from ....graph.nodes import arithmetic as ar
from ....graph.nodes import reduction as rn
from ....graph.nodes.neuron import MPSCNNNeuronNode
from ....kernels.neuron import MPSNNNeuronDescriptor
from ..importer import describe as _d
from ..layout import onnx_to_nhwc, standard_axes
from .registry import op

_REDUCE_MEAN = {"c": rn.MPSNNReductionFeatureChannelsMeanNode, "w": rn.MPSNNReductionRowMeanNode, "h": rn.MPSNNReductionColumnMeanNode}
_STRIDE = {"c": "secondary_stride_in_feature_channels", "w": "secondary_stride_in_pixels_x", "h": "secondary_stride_in_pixels_y"}


def _mean_over(img: Any, image_axes: list[str], label: str) -> Any:
    for ax in image_axes:
        n = _REDUCE_MEAN[ax](img)
        n.label = label
        img = n.result_image
    return img


def _broadcast(n: Any, image_axes: list[str]) -> Any:
    for ax in image_axes:
        setattr(n, _STRIDE[ax], 0)
    return n


@op("LayerNormalization")
def layer_norm(imp: Any, node: Any, a: dict[str, Any]) -> None:
    """Normalizes dimensions ``axis`` .. last of every image: the means are reductions over the
    image axes that hold those dimensions (feature channels, rows, columns; a mean of equal-size
    means is the mean), the differences and products broadcast them with strides 0."""
    from .convolution import last_on_channels
    x = imp.inp(node, 0)
    r = x.rank
    axis = int(a.get("axis", -1))
    axis = axis + r if axis < 0 else axis
    normalized = list(range(axis, r))
    if axis == 0 or r not in (2, 3, 4):
        raise MPSValueError(f"{_d(node)}: axis={a.get('axis', -1)} of a rank-{r} tensor; mpsnn normalizes within each image "
                            "(axis >= 1) of tensors of rank 2 to 4")
    if any(x.shape[k] is None for k in normalized):
        raise MPSValueError(f"{_d(node)}: the normalized dimensions {normalized} of {x.shape} must be known at load time")
    big = [k for k in normalized if x.shape[k] != 1]
    axes = last_on_channels(r) if big == [r - 1] and r >= 3 else standard_axes(r)
    assert axes is not None
    img = imp.image_in_axes(x, node, axes)
    over = [axes[k] for k in big]
    eps = float(a.get("epsilon", 1e-5))
    label = node.name or "LayerNormalization"
    mean = _mean_over(img, over, f"{label}: mean")
    d = _broadcast(ar.MPSNNSubtractionNode(img, mean), over)
    sq = ar.MPSNNMultiplicationNode(d.result_image, d.result_image)
    var = _mean_over(sq.result_image, over, f"{label}: variance")
    rstd = MPSCNNNeuronNode(var, MPSNNNeuronDescriptor(NT.power, 1.0, eps, -0.5))
    y: Any = _broadcast(ar.MPSNNMultiplicationNode(d.result_image, rstd.result_image), over)
    for n, what in ((d, "centre"), (sq, "square"), (rstd, "rsqrt"), (y, "normalize")):
        n.label = f"{label}: {what}"
    for k, cls, what in ((1, ar.MPSNNMultiplicationNode, "scale"), (2, ar.MPSNNAdditionNode, "bias")):
        p = imp.const(node, k, what, optional=k == 2)
        if p is None:
            continue
        arr = np.asarray(p, np.float32)
        aligned = arr.reshape((1,) * (r - arr.ndim) + arr.shape) if arr.ndim <= r else arr
        try:
            np.broadcast_to(aligned, (1,) * axis + tuple(x.shape[axis:]))
        except ValueError:
            raise MPSValueError(f"{_d(node)}: {what} of shape {arr.shape} does not broadcast to the normalized shape "
                                f"{tuple(x.shape[axis:])}") from None
        keep = [k for k in range(r) if aligned.shape[k] != 1]
        small = np.ascontiguousarray(aligned)
        const = imp.constant_image(onnx_to_nhwc(small, axes), img, node)
        y = _broadcast(cls(y.result_image, const), [ax for ax in ("h", "w", "c") if ax in axes and axes.index(ax) not in keep])
        y.label = f"{label}: {what}"
    imp.set_image(node, 0, y.result_image, x.shape, axes, x.dtype)
    stat_shape = tuple(1 if k >= axis else s for k, s in enumerate(x.shape))
    stat_axes = tuple(None if k >= axis else ax for k, ax in enumerate(axes))
    for k, stat in ((1, mean), (2, rstd.result_image)):
        if len(node.output) > k and node.output[k]:
            if stat is img:  # nothing was reduced (every normalized dimension has size 1)
                raise MPSValueError(f"{_d(node)}: output {k} of a normalization over size-1 dimensions is not supported")
            imp.set_image(node, k, stat, stat_shape, stat_axes, np.dtype(np.float32))


def _bad(node: Any, what: str, p: Any, c: int) -> Any:
    raise MPSValueError(f"{_d(node)}: {what} of shape {np.shape(p)} must hold one value or {c} (one per normalized element)")


def _const_value(imp: Any, name: str) -> float | None:
    v = imp.values.get(name)
    if v is None or v.const is None or np.size(v.const) != 1:
        return None
    return float(np.asarray(v.const).reshape(()))


def _other(node: Any, name: str) -> str | None:
    rest = [n for n in node.input if n != name]
    return rest[0] if len(rest) == 1 else None


@op("Erf")
def erf(imp: Any, node: Any, a: dict[str, Any]) -> None:
    """GELU's Erf (module docstring); anything else is refused."""
    src = imp.producers.get(node.input[0])
    x_name = None
    if src is not None and src.op_type in ("Div", "Mul") and len(src.input) == 2:
        for k in (0, 1):
            c = _const_value(imp, src.input[1 - k])
            if c is not None and k == 0 and abs(c - (np.sqrt(2.0) if src.op_type == "Div" else 1 / np.sqrt(2.0))) < 1e-6:
                x_name = src.input[0]
            elif c is not None and k == 1 and src.op_type == "Mul" and abs(c - 1 / np.sqrt(2.0)) < 1e-6:
                x_name = src.input[1]
    add = imp.only_consumer(node.output[0], ("Add",))
    m1 = m2 = None
    if x_name is not None and add is not None and _const_value(imp, _other(add, node.output[0]) or "") == 1.0:
        m1 = imp.only_consumer(add.output[0], ("Mul",))
        m2 = None if m1 is None else imp.only_consumer(m1.output[0], ("Mul",))
    if m1 is not None and m2 is not None:
        o1, o2 = _other(m1, add.output[0]), _other(m2, m1.output[0])  # type: ignore[union-attr]
        halves = [_const_value(imp, o or "") for o in (o1, o2)]
        if 0.5 in halves and (o1 == x_name) != (o2 == x_name):
            x = imp.values[x_name]
            img, axes = imp.image_any_axes(x, node)
            n = MPSCNNNeuronNode(img, MPSNNNeuronDescriptor(NT.geLU))
            n.label = f"{node.name or 'Erf'}: GELU"
            for done in (add, m1, m2):
                imp.done.add(id(done))
            imp.set_image(m2, 0, n.result_image, x.shape, axes, x.dtype)
            return
    raise MPSValueError(f"{_d(node)}: Erf is supported only inside GELU written as (x · (erf(x / √2) + 1)) · 0.5; "
                        "MPS has no erf neuron")

