"""Layers with weights: Conv, ConvTranspose, Gemm / MatMul (fully connected),
BatchNormalization, InstanceNormalization, GroupNormalization and LRN.

* **Conv** -> ``MPSCNNConvolutionNode`` with an :class:`~mpsnn.io.onnx.padding.ONNXPadding`
  (explicit, asymmetric and ``auto_pad`` pads; strides; dilations). Weights ``(Cout, Cin/g, kH,
  kW)`` become MPS's ``[Cout][kH][kW][Cin/g]``. ``group == Cin`` with one input channel per
  group is a depthwise convolution (``MPSCNNDepthWiseConvolutionDescriptor``, weights
  ``[Cout][kH][kW]``); other groups use the descriptor's ``groups`` when every group has a
  multiple of 4 input and output channels (MPS's rule), else the weights are expanded to one
  dense convolution whose off-group weights are 0 (exact for finite inputs). A 1-D Conv
  (rank-3 input) is a 1 x k convolution on images of height 1.
* **Fusion**: a BatchNormalization (inference) that alone reads a Conv's result is folded into
  the convolution descriptor (``set_batch_normalization_parameters_for_inference``), and a
  following activation that alone reads the result and is one neuron (Relu, LeakyRelu, Clip(0,
  max), Sigmoid, ...) becomes the descriptor's ``fused_neuron_descriptor``.
* **ConvTranspose** -> ``MPSCNNConvolutionTransposeNode`` with an
  :class:`~mpsnn.io.onnx.padding.ONNXTransposePadding` (pads, ``output_padding``,
  ``output_shape``, ``auto_pad``); ONNX's ``(Cin, Cout/g, kH, kW)`` weights are turned 180
  degrees (MPS correlates the zero-inserted source with the weights as given) and stored
  ``[Cout][kH][kW][Cin/g]``.
* **MatMul of a rank-3/4 tensor** by a constant (K, M) matrix -> a 1 x 1 ``MPSCNNConvolutionNode``
  over the image that holds the last dimension on its channels (free after the Transpose
  (0, 2, 3, 1) of channels-last blocks such as ConvNeXt's), with a following constant Add as bias.
* **Gemm / MatMul** -> ``MPSCNNFullyConnectedNode``: ``alpha·B`` (``Bᵀ`` unless ``transB``)
  becomes the weights, ``beta·C`` the bias (C must be one value per output or a scalar;
  ``transA`` is refused). When the input is a Flatten / Reshape of an (N, C, H, W) image the
  flatten is folded into the weights (ONNX's C·H·W order re-indexed to MPS's fully connected
  layout), so no data moves.
* **BatchNormalization** (inference) -> ``MPSCNNBatchNormalizationNode``;
  **InstanceNormalization** -> ``MPSCNNInstanceNormalizationNode``; **GroupNormalization** ->
  ``MPSCNNGroupNormalizationNode`` (opset 18's per-group scale and bias are repeated per
  channel); **LRN** -> ``MPSCNNCrossChannelNormalizationNode`` (alpha, beta, bias = delta; an
  odd ``size`` only: for even sizes ONNX's window reaches one channel further up and MPS's
  one further down).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ....core.enums import MPSCNNNeuronType as NT
from ....core.errors import MPSValueError
from ....graph.nodes.convolution import MPSCNNConvolutionNode, MPSCNNConvolutionTransposeNode, MPSCNNFullyConnectedNode
from ....graph.nodes.normalization import (
    MPSCNNBatchNormalizationNode,
    MPSCNNCrossChannelNormalizationNode,
    MPSCNNGroupNormalizationNode,
    MPSCNNInstanceNormalizationNode,
)
from ....kernels import convolution_data as cd
from ....kernels.batch_normalization import BatchNormalizationDataSource
from ....kernels.instance_group_normalization import GroupNormalizationDataSource, InstanceNormalizationDataSource
from ..importer import describe as _d
from ..layout import Value
from ..padding import ONNXPadding, ONNXTransposePadding
from .elementwise import neuron_descriptor
from .registry import ints, op, string

FUSABLE_ACTIVATIONS = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "Elu", "HardSigmoid", "Softplus", "Softsign", "Abs")


def _geometry(node: Any, a: dict[str, Any], x: Value, kernel_shape: tuple[int, ...]) -> tuple[Any, ...]:
    """(kernel (kH, kW), strides, dilations, pads ((t, b), (l, r)), auto_pad) for 1-D or 2-D."""
    sp = len(kernel_shape)
    if sp not in (1, 2) or x.rank != sp + 2:
        raise MPSValueError(f"{_d(node)}: {sp}-D windows on an input of rank {x.rank}; MPS images take 1-D and 2-D windows "
                            "on (N, C, L) and (N, C, H, W) tensors")
    k = list(kernel_shape)
    s = ints(a, "strides", [1] * sp)
    dl = ints(a, "dilations", [1] * sp)
    p = ints(a, "pads", [0] * (2 * sp))
    auto = string(a, "auto_pad", "NOTSET")
    if sp == 1:
        return (1, k[0]), (1, s[0]), (1, dl[0]), ((0, 0), (p[0], p[1])), auto
    return (k[0], k[1]), (s[0], s[1]), (dl[0], dl[1]), ((p[0], p[2]), (p[1], p[3])), auto


def _dense_groups(w: np.ndarray, group: int) -> np.ndarray:
    """Grouped weights as one dense block-diagonal tensor (group 1). Conv's ``(Cout, Cin/g, ...)``
    and ConvTranspose's ``(Cin, Cout/g, ...)`` have the same form: dimension 0 lists every
    channel of all groups, dimension 1 those of one group."""
    rows, cols_g = w.shape[:2]
    rows_g = rows // group
    out = np.zeros((rows, cols_g * group) + w.shape[2:], w.dtype)
    for g in range(group):
        out[g * rows_g:(g + 1) * rows_g, g * cols_g:(g + 1) * cols_g] = w[g * rows_g:(g + 1) * rows_g]
    return out


def _bn_params(imp: Any, node: Any, a: dict[str, Any]) -> tuple[Any, ...] | None:
    """(gamma, beta, mean, var, eps) of an inference BatchNormalization, or None."""
    if int(a.get("training_mode", 0)) or any(o for o in node.output[1:]):
        return None
    vals = [imp.inp(node, k) for k in range(1, 5)]
    if any(v is None or v.const is None for v in vals):
        return None
    g, b, m, v = (np.asarray(x.const, np.float32).reshape(-1) for x in vals)  # type: ignore[union-attr]
    return g, b, m, v, np.float32(a.get("epsilon", 1e-5))


def _fuse(imp: Any, node: Any, desc: Any, cout: int) -> Any:
    """Fold a following BatchNormalization and activation into ``desc``; returns the ONNX node
    whose output the convolution now produces."""
    last = node
    bn = imp.only_consumer(node.output[0], ("BatchNormalization",))
    if bn is not None and bn.input[0] == node.output[0]:
        from ..importer import attributes
        params = _bn_params(imp, bn, attributes(bn))
        if params is not None and all(p.size == cout for p in params[:4]):
            g, b, m, v, eps = params
            desc.set_batch_normalization_parameters_for_inference(mean=m, variance=v, gamma=g, beta=b, epsilon=float(eps))
            imp.done.add(id(bn))
            last = bn
    return _fuse_activation(imp, last, desc)


def _fuse_activation(imp: Any, node: Any, desc: Any) -> Any:
    """Make an activation that alone reads ``node``'s result and is one neuron the fused neuron
    of ``desc``; returns the ONNX node whose output the layer now produces."""
    act = imp.only_consumer(node.output[0], FUSABLE_ACTIVATIONS)
    if act is None:
        return node
    from ..importer import attributes
    nd = neuron_descriptor(imp, act, attributes(act))
    if nd is None or nd.neuron_type == NT.pReLU:
        return node
    desc.fused_neuron_descriptor = nd
    imp.done.add(id(act))
    return act


def _conv_check(a: dict[str, Any], opset: int) -> str | None:
    auto = string(a, "auto_pad", "NOTSET")
    if auto not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        return f"auto_pad={auto!r}"
    return None


def _window_layer(imp: Any, node: Any, a: dict[str, Any]) -> tuple[Any, ...]:
    """What Conv and ConvTranspose read alike: (x, 4-D weights (a 1-D layer's get height 1),
    bias vector or None, (kH, kW), strides, dilations, pads, auto_pad, spatial rank)."""
    x = imp.inp(node, 0)
    w = np.asarray(imp.const(node, 1, "weights"), np.float32)
    bias = imp.const(node, 2, "bias", optional=True)
    kshape = tuple(int(k) for k in (a.get("kernel_shape") or w.shape[2:]))
    (kh, kw), strides, dil, pads, auto = _geometry(node, a, x, kshape)
    if w.ndim == 3:
        w = w[:, :, None, :]
    b = None if bias is None else np.asarray(bias, np.float32).reshape(-1)
    return x, w, b, (kh, kw), strides, dil, pads, auto, len(kshape)


def _set_window(desc: Any, strides: tuple[int, int], dil: tuple[int, int]) -> None:
    desc.stride_in_pixels_y, desc.stride_in_pixels_x = strides
    desc.dilation_rate_y, desc.dilation_rate_x = dil


@op("Conv", check=_conv_check)
def conv(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x, w, b, (kh, kw), strides, dil, pads, auto, _ = _window_layer(imp, node, a)
    group = int(a.get("group", 1))
    cout, cin_g = w.shape[:2]
    cin = cin_g * group
    if x.shape[1] is not None and x.shape[1] != cin:
        raise MPSValueError(f"{_d(node)}: input has {x.shape[1]} channels but the weights take {cin} ({cin_g} per group x {group})")
    depthwise = group > 1 and group == cin and cin_g == 1
    if group > 1 and not depthwise and ((cin // group) % 4 or (cout // group) % 4):
        w, group = _dense_groups(w, group), 1
    if depthwise:
        desc: Any = cd.MPSCNNDepthWiseConvolutionDescriptor(kw, kh, cin, cout)
        mw = np.ascontiguousarray(w[:, 0])
    else:
        desc = cd.MPSCNNConvolutionDescriptor(kw, kh, cin, cout)
        desc.groups = group
        mw = np.ascontiguousarray(w.transpose(0, 2, 3, 1))
    _set_window(desc, strides, dil)
    last = _fuse(imp, node, desc, cout)
    ds = cd.ConvolutionDataSource(desc, mw, b, label=node.name or None)
    pad = ONNXPadding(_d(node), (kh, kw), strides, dil, pads, auto)
    n = MPSCNNConvolutionNode(imp.image(x, node), ds, padding_policy=pad)
    n.label = node.name or None
    imp.set_image(last, 0, n.result_image, pad.result_shape(x.shape, cout), None, x.dtype)


@op("ConvTranspose", check=_conv_check)
def conv_transpose(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x, w, b, (kh, kw), strides, dil, pads, auto, sp = _window_layer(imp, node, a)
    group = int(a.get("group", 1))
    cin, cout_g = w.shape[:2]
    cout = cout_g * group
    if group > 1 and ((cin // group) % 4 or cout_g % 4):
        w, group = _dense_groups(w, group), 1
        cout_g = cout  # one dense group now: its block holds every output channel
    cin_g = cin // group
    mw = np.zeros((cout, kh, kw, cin_g), np.float32)
    rot = w[:, :, ::-1, ::-1]
    for g in range(group):
        blk = rot[g * cin_g:(g + 1) * cin_g]  # (Cin_g, Cout_g, kH, kW)
        mw[g * cout_g:(g + 1) * cout_g] = blk.transpose(1, 2, 3, 0)
    desc = cd.MPSCNNConvolutionDescriptor(kw, kh, cin, cout)
    desc.groups = group
    _set_window(desc, strides, dil)
    out_pad = ints(a, "output_padding", [0] * sp)
    out_shape = a.get("output_shape")
    if sp == 1:
        out_pad = [0, out_pad[0]]
        if out_shape is not None:
            out_shape = [1, int(out_shape[-1])]
    elif out_shape is not None:
        out_shape = [int(v) for v in out_shape[-2:]]
    pad = ONNXTransposePadding(_d(node), (kh, kw), strides, dil, pads, out_pad, out_shape, auto)
    last = _fuse(imp, node, desc, cout)
    ds = cd.ConvolutionDataSource(desc, np.ascontiguousarray(mw), b, label=node.name or None)
    n = MPSCNNConvolutionTransposeNode(imp.image(x, node), None, ds, padding_policy=pad)
    n.label = node.name or None
    h = x.shape[2] if x.rank == 4 else 1
    wd = x.shape[-1]
    if h is None or wd is None:
        shape: tuple[Any, ...] = (x.shape[0], cout) + (None,) * sp
    else:
        oh, ow = pad.axis(0, h)[1], pad.axis(1, wd)[1]
        shape = (x.shape[0], cout, oh, ow) if sp == 2 else (x.shape[0], cout, ow)
    imp.set_image(last, 0, n.result_image, shape, None, x.dtype)


def _gemm_check(a: dict[str, Any], opset: int) -> str | None:
    if int(a.get("transA", 0)):
        return "transA=1 (the input of a fully connected layer is the image, not its transpose)"
    return None


def _flatten_source(imp: Any, x: Value) -> Value | None:
    """The (N, C, H, W) or (N, C, L) image whose C·H·W flatten ``x`` is, else None."""
    p = x.pending
    if p is None or x.rank != 2:
        return None
    src = p.source
    if src.rank not in (3, 4) or not src.is_standard() or any(d is None for d in src.shape[1:]):
        return None
    from ..importer import _probe
    arr = _probe(src, 1)
    try:
        for fn in p.ops:
            arr = fn(arr, 1)
    except Exception:  # noqa: BLE001 - not a flatten
        return None
    return src if arr.shape == (1, int(np.prod(src.shape[1:]))) and np.array_equal(arr, _probe(src, 1).reshape(1, -1)) else None


def _fully_connected(imp: Any, node: Any, x: Value, wt: np.ndarray, bias: np.ndarray | None) -> None:
    """``x @ wt.T + bias`` with ``wt`` of shape (out, K)."""
    nout, k = wt.shape
    src = _flatten_source(imp, x)
    if src is not None:
        c = src.shape[1]
        h, w = (src.shape[2], src.shape[3]) if src.rank == 4 else (1, src.shape[2])
        w4 = wt.reshape(nout, c, h, w)
        img = src.node
    else:
        if x.rank != 2:
            raise MPSValueError(f"{_d(node)}: input {x.name!r} of shape {x.shape} must be (N, K) (a fully connected layer)")
        if x.shape[1] is not None and x.shape[1] != k:
            raise MPSValueError(f"{_d(node)}: input has {x.shape[1]} features but the weights take {k}")
        c, h, w = k, 1, 1
        w4 = wt.reshape(nout, k, 1, 1)
        img = imp.image(x, node)
    order = (0, 3, 2, 1) if cd.FULLY_CONNECTED_WIDTH_BEFORE_HEIGHT else (0, 2, 3, 1)
    desc = cd.MPSCNNConvolutionDescriptor(w, h, c, nout)
    last = _fuse_activation(imp, node, desc)
    ds = cd.ConvolutionDataSource(desc, np.ascontiguousarray(w4.transpose(order)), bias, label=node.name or None)
    n = MPSCNNFullyConnectedNode(img, ds)
    n.label = node.name or None
    imp.set_image(last, 0, n.result_image, (x.shape[0], nout), None, x.dtype)


@op("Gemm", check=_gemm_check)
def gemm(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    b = np.asarray(imp.const(node, 1, "B"), np.float64)
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    wt = b if int(a.get("transB", 0)) else b.T
    wt = (alpha * wt).astype(np.float32)
    c = imp.const(node, 2, "C", optional=True)
    bias = None
    if c is not None:
        cc = np.asarray(c, np.float64)
        if cc.ndim == 2 and cc.shape[0] != 1:
            raise MPSValueError(f"{_d(node)}: C of shape {cc.shape} must be one value per output (a bias)")
        bias = np.broadcast_to(beta * cc.reshape(-1), (wt.shape[0],)).astype(np.float32)
    _fully_connected(imp, node, x, wt, bias)


@op("MatMul")
def matmul(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    b = np.asarray(imp.const(node, 1, "B (the weights)"), np.float32)
    if b.ndim != 2:
        raise MPSValueError(f"{_d(node)}: B of shape {b.shape} must be a (K, M) matrix (a fully connected layer)")
    if x.rank in (3, 4):
        _pointwise(imp, node, x, np.ascontiguousarray(b.T))
        return
    _fully_connected(imp, node, x, np.ascontiguousarray(b.T), None)


def last_on_channels(rank: int) -> tuple[str, ...]:
    """Axes with the last dimension on the channels: (n, w, c) for rank 3, (n, h, w, c) for 4."""
    return ("n", "w", "c") if rank == 3 else ("n", "h", "w", "c")


def _pointwise(imp: Any, node: Any, x: Value, wt: np.ndarray) -> None:
    """MatMul of a rank-3/4 tensor by a constant (K, M) matrix: a 1 x 1 convolution of the image
    that holds the last dimension on its channels (free after a Transpose (0, 2, 3, 1) of an
    NCHW image: a channels-last Linear). An Add of a constant (M,) vector that alone reads the
    product becomes the convolution's bias."""
    nout, k = wt.shape
    if x.shape[-1] is not None and x.shape[-1] != k:
        raise MPSValueError(f"{_d(node)}: the last dimension of {x.name!r} ({x.shape[-1]}) must be B's {k} rows")
    axes = last_on_channels(x.rank)
    img = imp.image_in_axes(x, node, axes)
    last, bias = node, None
    add = imp.only_consumer(node.output[0], ("Add",))
    if add is not None:
        other = [imp.values.get(n) for n in add.input if n != node.output[0]]
        if len(other) == 1 and other[0] is not None and other[0].const is not None:
            c = np.asarray(other[0].const, np.float32)
            if c.size == nout and c.shape[-1] == nout and c.ndim <= x.rank:
                bias, last = c.reshape(-1).copy(), add
                imp.done.add(id(add))
    desc = cd.MPSCNNConvolutionDescriptor(1, 1, k, nout)
    ds = cd.ConvolutionDataSource(desc, wt.reshape(nout, 1, 1, k), bias, label=node.name or None)
    n = MPSCNNConvolutionNode(img, ds)
    n.label = node.name or None
    imp.set_image(last, 0, n.result_image, tuple(x.shape[:-1]) + (nout,), axes, x.dtype)


def _bn_check(a: dict[str, Any], opset: int) -> str | None:
    if int(a.get("training_mode", 0)):
        return "training_mode=1 (imported graphs run inference)"
    if opset < 9 and int(a.get("spatial", 1)) == 0:
        return "spatial=0"
    return None


@op("BatchNormalization", check=_bn_check)
def batch_norm(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    params = _bn_params(imp, node, a)
    if params is None:
        raise MPSValueError(f"{_d(node)}: scale, B, mean and var must be constants and only the inference output is supported")
    g, b, m, v, eps = params
    ds = BatchNormalizationDataSource(g, b, m, v, epsilon=float(eps), label=node.name or None)
    n = MPSCNNBatchNormalizationNode(imp.image(x, node), ds)
    imp.set_image(node, 0, n.result_image, x.shape, None, x.dtype)


@op("InstanceNormalization")
def instance_norm(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    g = np.asarray(imp.const(node, 1, "scale"), np.float32).reshape(-1)
    b = np.asarray(imp.const(node, 2, "B"), np.float32).reshape(-1)
    ds = InstanceNormalizationDataSource(g, b, epsilon=float(np.float32(a.get("epsilon", 1e-5))), label=node.name or None)
    n = MPSCNNInstanceNormalizationNode(imp.image(x, node), ds)
    imp.set_image(node, 0, n.result_image, x.shape, None, x.dtype)


@op("GroupNormalization")
def group_norm(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    groups = int(a["num_groups"])
    c = x.shape[1]
    g = np.asarray(imp.const(node, 1, "scale"), np.float32).reshape(-1)
    b = np.asarray(imp.const(node, 2, "bias"), np.float32).reshape(-1)
    if c is None:
        raise MPSValueError(f"{_d(node)}: the channel count must be known at load time")
    if g.size == groups and groups != c:  # opset 18: one scale and bias per group
        g, b = np.repeat(g, c // groups), np.repeat(b, c // groups)
    ds = GroupNormalizationDataSource(g, b, number_of_groups=groups, epsilon=float(np.float32(a.get("epsilon", 1e-5))), label=node.name or None)
    n = MPSCNNGroupNormalizationNode(imp.image(x, node), ds)
    imp.set_image(node, 0, n.result_image, x.shape, None, x.dtype)


def _lrn_check(a: dict[str, Any], opset: int) -> str | None:
    size = int(a.get("size", 0))
    if size % 2 == 0:
        return f"size={size} (even windows: ONNX reaches one channel further up, MPS one further down)"
    return None


@op("LRN", check=_lrn_check)
def lrn(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    n = MPSCNNCrossChannelNormalizationNode(imp.image(x, node), int(a["size"]))
    n.alpha = float(a.get("alpha", 1e-4))
    n.beta = float(a.get("beta", 0.75))
    n.delta = float(a.get("bias", 1.0))
    imp.set_image(node, 0, n.result_image, x.shape, None, x.dtype)
