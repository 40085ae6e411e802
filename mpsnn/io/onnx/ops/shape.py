"""Data movement: Reshape, Flatten, Transpose, Squeeze, Unsqueeze, DepthToSpace, SpaceToDepth
(kept pending on their source; see :mod:`mpsnn.io.onnx.importer`) and Concat along the
channels.

A Transpose of an image is free in every case: the result is the same image with its axes
permuted (:mod:`mpsnn.io.onnx.layout`). Element-wise operators, reductions, Softmax over the
dimension now on the channels, MatMul and LayerNormalization over the last dimension read such
an image as it is (a channels-last block: Transpose (0, 2, 3, 1) -> LayerNorm -> Linear -> GELU
-> Linear -> Transpose (0, 3, 1, 2) moves no data); an operator that needs the standard axes
gets one gather.

A pending movement costs nothing where its consumer can absorb it: a Flatten or Reshape of
an (N, C, H, W) image before Gemm / MatMul folds into the fully connected weights, a reshape
that keeps the NHWC element order is free ((N, C, 1, 1) <-> (N, C)) or an ``MPSNNReshapeNode``.
Any other movement is one gather (a ``RelayoutNode``): channel shuffles
(Reshape -> Transpose -> Reshape), DepthToSpace / SpaceToDepth (DCR and CRD), a flatten whose
result is not read by a fully connected layer. The batch is dimension 0 of every image
tensor: a movement that needs a particular batch runs only for the batch the model declares.

**Concat** along the channel axis -> ``MPSNNConcatenationNode``; when a source's channel
count is not a multiple of 4, MPS leaves padding slots between the sources (each starts at a
multiple of 4), so a channel gather then packs the channels as ONNX has them. Concat along
the batch or spatial axes is refused.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ....core.errors import MPSValueError
from ....graph.nodes.concatenation import MPSNNConcatenationNode
from ....kernels.reshape import concatenation_offsets
from ..importer import describe as _d
from ..layout import Value, std_axes
from ..nodes import RelayoutNode, channel_gather
from .registry import ints, op, string


def _resolve_reshape(target: np.ndarray, shape: tuple[int, ...], allowzero: bool, declared: Any) -> list[int]:
    """ONNX Reshape's target with 0 (copy) and -1 (infer) resolved for an array of ``shape``;
    dimension 0 given as the declared batch (or the load-time batch stand-in) follows the
    actual batch."""
    from ..importer import BATCH_SENTINEL
    dims = [int(v) for v in target]
    for k, v in enumerate(dims):
        if v == 0 and not allowzero:
            dims[k] = shape[k]
    if dims and (dims[0] == BATCH_SENTINEL or (declared is not None and dims[0] == declared)):
        dims[0] = shape[0]
    if any(v == BATCH_SENTINEL or (v % BATCH_SENTINEL == 0 and v > 0 and v >= BATCH_SENTINEL) for v in dims):
        raise ValueError(f"reshape target {list(target)} mixes the batch into another dimension")
    return dims


@op("Reshape")
def reshape(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    target = np.asarray(imp.const(node, 1, "shape")).reshape(-1)
    allowzero = bool(a.get("allowzero", 0))
    declared = x.shape[0] if x.rank else None
    if x.pending is not None:
        declared = x.pending.source.shape[0] if x.pending.source.rank else None

    def fn(arr: np.ndarray, batch: int) -> np.ndarray:
        return arr.reshape(_resolve_reshape(target, arr.shape, allowzero, declared))

    probe_shape = tuple(2 if d is None else d for d in x.shape)
    try:
        out = np.empty(probe_shape, np.int8).reshape(_resolve_reshape(target, probe_shape, allowzero, declared))
    except ValueError as exc:
        raise MPSValueError(f"{_d(node)}: cannot reshape {x.shape} to {list(target)}: {exc}") from exc
    shape = tuple(None if (k == 0 and x.shape and x.shape[0] is None) else s for k, s in enumerate(out.shape))
    imp.set_pending(node, x, fn, shape, f"Reshape to {list(target)}")


@op("Flatten")
def flatten(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    axis = int(a.get("axis", 1))
    axis = axis + x.rank if axis < 0 else axis

    def fn(arr: np.ndarray, batch: int) -> np.ndarray:
        lead = int(np.prod(arr.shape[:axis])) if axis else 1
        return arr.reshape(lead, -1)

    if axis == 1:
        rest = x.shape[1:]
        shape = (x.shape[0], None if None in rest else int(np.prod(rest)))
    else:
        if None in x.shape:
            raise MPSValueError(f"{_d(node)}: Flatten(axis={axis}) of {x.shape} needs every dimension at load time")
        shape = (int(np.prod(x.shape[:axis])) if axis else 1, int(np.prod(x.shape[axis:])))
    imp.set_pending(node, x, fn, shape, f"Flatten(axis={axis})")


@op("Transpose")
def transpose(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    perm = ints(a, "perm", list(range(x.rank))[::-1])

    shape = tuple(x.shape[p] for p in perm)
    if x.node is not None and x.pending is None and x.axes is not None:
        # an image: the same image with its axes permuted (no data moves); consumers that need
        # other axes move the data then
        imp.values[node.output[0]] = Value(node.output[0], shape, x.dtype, node=x.node, axes=tuple(x.axes[p] for p in perm))
        return

    def fn(arr: np.ndarray, batch: int) -> np.ndarray:
        return np.transpose(arr, perm)

    imp.set_pending(node, x, fn, shape, f"Transpose{tuple(perm)}", perm=perm)


def _axes_input(imp: Any, node: Any, a: dict[str, Any]) -> list[int] | None:
    if "axes" in a:
        return [int(v) for v in a["axes"]]
    c = imp.const(node, 1, "axes", optional=True) if len(node.input) > 1 else None
    return None if c is None else [int(v) for v in np.asarray(c).reshape(-1)]


@op("Squeeze")
def squeeze(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    axes = _axes_input(imp, node, a)
    if axes is None:
        axes = [k for k, s in enumerate(x.shape) if s == 1]
    axes = sorted(v + x.rank if v < 0 else v for v in axes)
    if any(x.shape[k] not in (1, None) for k in axes):
        raise MPSValueError(f"{_d(node)}: cannot squeeze axes {axes} of {x.shape}")

    def fn(arr: np.ndarray, batch: int) -> np.ndarray:
        return np.squeeze(arr, axis=tuple(axes))

    imp.set_pending(node, x, fn, tuple(s for k, s in enumerate(x.shape) if k not in axes), f"Squeeze{tuple(axes)}")


@op("Unsqueeze")
def unsqueeze(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    axes = _axes_input(imp, node, a) or []
    r = x.rank + len(axes)
    axes = sorted(v + r if v < 0 else v for v in axes)
    shape = list(x.shape)
    for v in axes:
        shape.insert(v, 1)

    def fn(arr: np.ndarray, batch: int) -> np.ndarray:
        return np.expand_dims(arr, tuple(axes))

    imp.set_pending(node, x, fn, tuple(shape), f"Unsqueeze{tuple(axes)}")


def _block_check(a: dict[str, Any], opset: int) -> str | None:
    mode = string(a, "mode", "DCR")
    return None if mode in ("DCR", "CRD") else f"mode={mode!r}"


@op("DepthToSpace", check=_block_check)
def depth_to_space(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    b = int(a["blocksize"])
    crd = string(a, "mode", "DCR") == "CRD"
    if x.rank != 4 or x.shape[1] is None or x.shape[1] % (b * b):
        raise MPSValueError(f"{_d(node)}: input {x.shape} must be (N, C, H, W) with C a multiple of blocksize^2 = {b * b}")

    def fn(arr: np.ndarray, batch: int) -> np.ndarray:
        n, c, h, w = arr.shape
        if crd:
            t = arr.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
        else:
            t = arr.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
        return t.reshape(n, c // (b * b), h * b, w * b)

    hw = tuple(None if s is None else s * b for s in x.shape[2:])
    imp.set_pending(node, x, fn, (x.shape[0], x.shape[1] // (b * b)) + hw, f"DepthToSpace({b}, {'CRD' if crd else 'DCR'})")


@op("SpaceToDepth", check=_block_check)
def space_to_depth(imp: Any, node: Any, a: dict[str, Any]) -> None:
    x = imp.inp(node, 0)
    b = int(a["blocksize"])
    # opset 28 adds DepthToSpace's `mode`: DCR (the default, the only order before) puts the
    # block offset before the channel, CRD after it (each the inverse of DepthToSpace's mode)
    crd = string(a, "mode", "DCR") == "CRD"
    if x.rank != 4 or any(s is not None and s % b for s in x.shape[2:]):
        raise MPSValueError(f"{_d(node)}: input {x.shape} must be (N, C, H, W) with H and W multiples of blocksize {b}")

    def fn(arr: np.ndarray, batch: int) -> np.ndarray:
        n, c, h, w = arr.shape
        t = arr.reshape(n, c, h // b, b, w // b, b).transpose((0, 1, 3, 5, 2, 4) if crd else (0, 3, 5, 1, 2, 4))
        return t.reshape(n, c * b * b, h // b, w // b)

    hw = tuple(None if s is None else s // b for s in x.shape[2:])
    imp.set_pending(node, x, fn, (x.shape[0], None if x.shape[1] is None else x.shape[1] * b * b) + hw,
                    f"SpaceToDepth({b}, {'CRD' if crd else 'DCR'})")


@op("Concat")
def concat(imp: Any, node: Any, a: dict[str, Any]) -> None:
    vals = [imp.inp(node, k) for k in range(len(node.input)) if node.input[k]]
    rank = vals[0].rank
    axis = int(a["axis"])
    axis = axis + rank if axis < 0 else axis
    # the channel axis is dimension 1, or dimension 0 of a rank-1 tensor (standard axes ("c",))
    caxis = 0 if rank == 1 else 1
    if axis != caxis:
        raise MPSValueError(f"{_d(node)}: Concat along axis {a['axis']} of rank-{rank} tensors; MPS concatenates feature channels "
                            f"(axis {caxis})")
    vals = [v for v in vals if v.shape[caxis] != 0]
    channels = [v.shape[caxis] for v in vals]
    if any(c is None for c in channels):
        raise MPSValueError(f"{_d(node)}: every source's channel count must be known at load time")
    anchor = next((imp.image(v, node) for v in vals if v.const is None), None)
    imgs = [imp.image(v, node, anchor) for v in vals]
    shape = tuple(vals[0].shape[:caxis]) + (sum(channels),) + tuple(vals[0].shape[caxis + 1:])
    if len(imgs) == 1:
        imp.values[node.output[0]] = Value(node.output[0], shape, vals[0].dtype, node=imgs[0], axes=std_axes(rank))
        return
    n = MPSNNConcatenationNode(imgs)
    n.label = node.name or None
    out = n.result_image
    offsets = concatenation_offsets(channels)
    total = sum(channels)
    if any(c % 4 for c in channels):
        idx = np.concatenate([np.arange(o, o + c) for o, c in zip(offsets, channels)])
        r = RelayoutNode(out, channel_gather(idx), f"{node.name or 'Concat'}: pack channels")
        out = r.result_image
    assert total == shape[caxis]
    imp.set_image(node, 0, out, shape, None, np.result_type(*[v.dtype for v in vals]))

