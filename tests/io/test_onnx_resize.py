"""ONNX Resize, Upsample, Pad, Slice and Split imported by :mod:`mpsnn.io.onnx`
(mappers in ``mpsnn/io/onnx/ops/resize.py``).

Single-node models built with ``onnx.helper`` run through ``mpsnn.io.onnx.load(...).predict``
and through ONNX's reference evaluator (``onnx.reference.ReferenceEvaluator``), or through
onnxruntime where the reference has no implementation (Upsample linear, Resize-10,
``tf_half_pixel_for_nn``, negative pads). Criterion: ``max|mpsnn - ref| / max|ref| <= 1e-5``
in float32 (the data movements are exact: checked with 0). Some tests also check which MPS
node a mapping chose (the module docstring's equalities), and that refused attribute
values raise :class:`~mpsnn.MPSError` naming the node before any node is mapped. Last, torch
exports of the patterns that produce these operators, compared with onnxruntime.
"""
from __future__ import annotations

import io
import warnings
from typing import Any, Sequence

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto as T  # noqa: E402 - after the importorskips
from onnx import helper as h  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import mpsnn.io.onnx.ops as onnx_ops  # noqa: E402
from mpsnn import MPSError  # noqa: E402
from mpsnn.io import onnx as mo  # noqa: E402

TOL = 1e-5
RNG = np.random.default_rng(1234)


# -- helpers ------------------------------------------------------------------------------------------
def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def tensor(name: str, values: Sequence[Any], dtype: int = T.INT64) -> Any:
    arr = np.asarray(values)
    return h.make_tensor(name, dtype, list(arr.shape), arr.reshape(-1).tolist())


def make(op: str, opset: int, x_shape: Sequence[Any], inputs: Sequence[str] = ("x",), attrs: dict[str, Any] | None = None,
         inits: Sequence[Any] = (), outputs: Sequence[str] = ("y",), out_rank: int | None = None, name: str = "the_node") -> Any:
    """A model of one ``op`` node reading graph input ``x`` (``x_shape``) and initializers."""
    node = h.make_node(op, list(inputs), list(outputs), name=name, **(attrs or {}))
    r = len(x_shape) if out_rank is None else out_rank
    outs = [h.make_tensor_value_info(o, T.FLOAT, [f"{o}_{k}" for k in range(r)]) for o in outputs if o]
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", T.FLOAT, list(x_shape))], outs, initializer=list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=10 if opset <= 21 else 11)


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def run_mpsnn(model: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return mo.load(model, device="cpu").predict(feeds)


def run_reference(model: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in model.graph.output]
    return dict(zip(names, ReferenceEvaluator(model).run(None, feeds)))


def run_ort(model: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def check(model: Any, x: np.ndarray, ref: str = "reference", tol: float = TOL) -> dict[str, np.ndarray]:
    feeds = {"x": x}
    want = run_reference(model, feeds) if ref == "reference" else run_ort(model, feeds)
    got = run_mpsnn(model, feeds)
    assert sorted(got) == sorted(want)
    for k in want:
        assert rel_err(got[k], want[k]) <= tol, (k, rel_err(got[k], want[k]))
    return got


def producer(model: Any, output: int = 0) -> str:
    """The class name of the MPS node that makes graph output ``output``."""
    _, imported = mo.import_model(model, "cpu")
    return type(imported.outputs[output][1].node.producer).__name__


def resize(opset: int, x_shape: Sequence[int], scales: Sequence[float] | None = None, sizes: Sequence[int] | None = None,
           **attrs: Any) -> Any:
    inits = []
    if opset < 11:
        inputs = ["x", "scales"]
    else:
        inputs = ["x", "", "scales" if scales is not None else "", "sizes" if sizes is not None else ""]
    if scales is not None:
        inits.append(tensor("scales", scales, T.FLOAT))
    if sizes is not None:
        inits.append(tensor("sizes", sizes))
    return make("Resize", opset, x_shape, inputs, attrs, inits)


# -- Resize: every coordinate mode, nearest mode and scale against the reference ----------------------------
COORDS = ["half_pixel", "pytorch_half_pixel", "asymmetric", "align_corners", "half_pixel_symmetric"]
NEAREST = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
SCALES = [(2.0, 2.0), (3.0, 2.0), (1.5, 2.5), (0.6, 0.75), (1.0, 3.0), (1.0, 1.0)]


def ambiguous_align_corners(ctm: str, scales: Sequence[float], lengths: Sequence[int], linear: bool) -> bool:
    """align_corners with a scale whose ``s·L`` is not an integer (for linear: up to float32
    rounding): refused (the reference divides by ``s·L - 1``, onnxruntime and PyTorch by the
    integer output length minus 1)."""
    products = [float(np.float32(s)) * n for s, n in zip(scales, lengths)]
    slack = [1e-6 * max(p, 1.0) if linear else 0.0 for p in products]
    return ctm == "align_corners" and any(abs(p - round(p)) > e for p, e in zip(products, slack))


@pytest.mark.parametrize("scales", SCALES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("nearest_mode", NEAREST)
@pytest.mark.parametrize("ctm", COORDS)
def test_resize_nearest_scales(ctm: str, nearest_mode: str, scales: tuple[float, float]) -> None:
    x = rand(2, 3, 4, 5)
    m = resize(19, x.shape, [1, 1, *scales], mode="nearest", coordinate_transformation_mode=ctm, nearest_mode=nearest_mode)
    if ambiguous_align_corners(ctm, scales, x.shape[2:], linear=False):
        with pytest.raises(MPSError, match="'the_node'.*align_corners.*not an integer"):
            mo.load(m, device="cpu")
        return
    check(m, x, tol=0.0)


@pytest.mark.parametrize("scales", SCALES + [(0.5, 0.4), (2.4, 1.25), (0.25, 1.6)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("ctm", COORDS)
def test_resize_linear_scales(ctm: str, scales: tuple[float, float]) -> None:
    x = rand(2, 3, 4, 5)
    m = resize(19, x.shape, [1, 1, *scales], mode="linear", coordinate_transformation_mode=ctm)
    if ambiguous_align_corners(ctm, scales, x.shape[2:], linear=True):
        with pytest.raises(MPSError, match="'the_node'.*align_corners.*not an integer"):
            mo.load(m, device="cpu")
        return
    check(m, x)


def test_resize_output_length_precision_refused() -> None:
    """floor(1.4·5) is 6 in float64 (the reference) and 7 in float32 (onnxruntime): refused."""
    x = rand(1, 2, 5, 5)
    m = resize(13, x.shape, [1, 1, 1.4, 2.0], mode="nearest")
    with pytest.raises(MPSError, match="'the_node'.*float64.*float32"):
        mo.load(m, device="cpu")
    m = make("Upsample", 9, x.shape, ["x", "scales"], {"mode": "linear"}, [tensor("scales", [1, 1, 1.4, 2.0], T.FLOAT)])
    check(m, x, ref="ort")  # Upsample has onnxruntime's float32 rule only


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("ctm", COORDS)
@pytest.mark.parametrize("size", [(8, 10), (7, 13), (3, 2), (1, 1), (1, 6)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_resize_sizes(size: tuple[int, int], ctm: str, mode: str) -> None:
    """``sizes`` (scale = O / L), also to one pixel (align_corners / pytorch_half_pixel special cases)."""
    x = rand(2, 2, 4, 5)
    m = resize(13 if ctm != "half_pixel_symmetric" else 19, x.shape, sizes=[2, 2, *size], mode=mode, coordinate_transformation_mode=ctm)
    check(m, x, tol=0.0 if mode == "nearest" else TOL)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("policy", ["stretch", "not_larger", "not_smaller"])
def test_resize_axes_and_aspect_ratio_policy(policy: str, mode: str) -> None:
    """Opset 18: ``axes`` lists the resized axes, ``keep_aspect_ratio_policy`` fits one scale."""
    x = rand(2, 3, 4, 6)
    m = resize(18, x.shape, sizes=[9, 7], mode=mode, axes=[2, 3], keep_aspect_ratio_policy=policy)
    check(m, x)
    m = resize(18, x.shape, [2.5, 1.5], mode=mode, axes=[3, 2])
    check(m, x)
    m = resize(18, x.shape, [2.5, 1.5], mode=mode, axes=[-1, -2])
    check(m, x, ref="ort")  # the reference does not take negative axes


def test_resize_half_pixel_symmetric_fractional_size() -> None:
    """half_pixel_symmetric differs from half_pixel when ``s·L`` is not an integer."""
    x = rand(1, 2, 5, 7)
    for mode in ("nearest", "linear"):
        m = resize(19, x.shape, [1, 1, 1.7, 0.7], mode=mode, coordinate_transformation_mode="half_pixel_symmetric")
        check(m, x)


def test_resize_exclude_outside_linear() -> None:
    """exclude_outside=1 does not change a linear resize (accepted)."""
    x = rand(1, 2, 4, 5)
    for scales in ([1, 1, 2.0, 3.0], [1, 1, 0.5, 0.6], [1, 1, 1.5, 2.5]):
        check(resize(13, x.shape, scales, mode="linear", exclude_outside=1), x)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_rank3(mode: str) -> None:
    x = rand(2, 3, 6)
    check(resize(13, x.shape, [1, 1, 2.5], mode=mode), x)
    check(resize(13, x.shape, sizes=[2, 3, 4], mode=mode, coordinate_transformation_mode="align_corners"), x)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_tf_half_pixel_for_nn(mode: str) -> None:
    """tf_half_pixel_for_nn: the reference lacks it; onnxruntime has it."""
    x = rand(1, 2, 4, 5)
    for scales, nm in (([1, 1, 2.0, 3.0], "floor"), ([1, 1, 2.5, 1.5], "round_prefer_floor"), ([1, 1, 0.6, 2.0], "ceil")):
        m = resize(13, x.shape, scales, mode=mode, coordinate_transformation_mode="tf_half_pixel_for_nn", nearest_mode=nm)
        check(m, x, ref="ort")


@pytest.mark.parametrize("opset", [10, 9])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scale", [2.0, 3.0, 2.5, 1.5, 0.6])
def test_upsample_and_resize10(opset: int, mode: str, scale: float) -> None:
    """Upsample (opset 9) and Resize-10: asymmetric coordinates; nearest rounds as onnxruntime
    does (floor, ceil when down-scaling). onnxruntime refuses Upsample scales below 1."""
    if opset == 9 and scale < 1:
        pytest.skip("Upsample needs scales >= 1")
    x = rand(2, 3, 4, 5)
    op = "Upsample" if opset == 9 else "Resize"
    m = make(op, opset, x.shape, ["x", "scales"], {"mode": mode}, [tensor("scales", [1, 1, scale, 2.0], T.FLOAT)])
    check(m, x, ref="ort", tol=0.0 if mode == "nearest" else TOL)
    if op == "Upsample" and mode == "nearest" and scale == int(scale):
        check(m, x)  # the reference's Upsample: integer nearest only


# -- which MPS node a Resize becomes --------------------------------------------------------------------------
@pytest.mark.parametrize("ctm, nearest_mode, scales, want", [
    ("asymmetric", "floor", (2, 3), "MPSCNNUpsamplingNearestNode"),
    ("asymmetric", "floor", (4, 1), "MPSCNNUpsamplingNearestNode"),
    ("asymmetric", "round_prefer_floor", (2, 2), "MPSCNNUpsamplingNearestNode"),
    ("asymmetric", "round_prefer_floor", (3, 3), "RelayoutNode"),
    ("asymmetric", "ceil", (2, 2), "RelayoutNode"),
    ("half_pixel", "round_prefer_floor", (3, 5), "MPSCNNUpsamplingNearestNode"),
    ("half_pixel", "round_prefer_ceil", (2, 4), "MPSCNNUpsamplingNearestNode"),
    ("pytorch_half_pixel", "round_prefer_ceil", (3, 2), "MPSCNNUpsamplingNearestNode"),
    ("half_pixel", "floor", (2, 2), "RelayoutNode"),
    ("half_pixel", "ceil", (2, 2), "RelayoutNode"),
    ("align_corners", "round_prefer_floor", (2, 2), "MPSCNNUpsamplingNearestNode"),
    ("align_corners", "floor", (2, 2), "RelayoutNode"),
    ("half_pixel", "round_prefer_floor", (1.5, 2), "RelayoutNode"),
    ("half_pixel", "round_prefer_floor", (0.5, 0.5), "RelayoutNode"),
])
def test_resize_nearest_mapping(ctm: str, nearest_mode: str, scales: tuple[float, float], want: str) -> None:
    x = rand(1, 2, 6, 5)
    m = resize(13, x.shape, [1, 1, *scales], mode="nearest", coordinate_transformation_mode=ctm, nearest_mode=nearest_mode)
    m.graph.node.append(h.make_node("Relu", ["y0"], ["y"], name="relu"))  # the resize is not the graph output
    m.graph.node[0].output[0] = "y0"
    _, imported = mo.import_model(m, "cpu")
    relu = imported.outputs[0][1].node.producer
    assert type(relu.source_images[0].producer).__name__ == want
    check(m, x, tol=0.0)


@pytest.mark.parametrize("ctm, scales, want", [
    ("asymmetric", (2, 3), "MPSCNNUpsamplingBilinearNode"),
    ("align_corners", (2, 2), "MPSCNNUpsamplingBilinearNode"),
    ("align_corners", (1, 4), "MPSCNNUpsamplingBilinearNode"),
    ("pytorch_half_pixel", (2, 2), "MPSNNBilinearScaleNode"),
    ("half_pixel", (3, 3), "MPSNNBilinearScaleNode"),
    ("asymmetric", (2.5, 2), "MPSNNBilinearScaleNode"),
    ("align_corners", (0.75, 1.0), "MPSNNBilinearScaleNode"),
])
def test_resize_linear_mapping(ctm: str, scales: tuple[float, float], want: str) -> None:
    x = rand(1, 2, 4, 5)
    m = resize(13, x.shape, [1, 1, *scales], mode="linear", coordinate_transformation_mode=ctm)
    assert producer(m) == want
    _, imported = mo.import_model(m, "cpu")
    node = imported.outputs[0][1].node.producer
    if want == "MPSCNNUpsamplingBilinearNode":
        assert node.align_corners == (ctm == "align_corners")
        assert (node.scale_factor_y, node.scale_factor_x) == scales
    check(m, x)


# -- Resize refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attrs, words", [
    ({"mode": "cubic"}, "cubic"),
    ({"mode": "linear", "antialias": 1}, "antialias"),
    ({"mode": "nearest", "exclude_outside": 1}, "exclude_outside"),
    ({"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"}, "tf_crop_and_resize"),
    ({"mode": "area"}, "area"),
    ({"mode": "nearest", "nearest_mode": "stochastic"}, "stochastic"),
    ({"mode": "linear", "coordinate_transformation_mode": "diagonal"}, "diagonal"),
])
def test_resize_refused_before_any_work(attrs: dict[str, Any], words: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attribute refusals come from the check: the Relu before the Resize is never mapped."""
    mapped: list[str] = []
    relu = onnx_ops.MAPPERS["Relu"]
    monkeypatch.setitem(onnx_ops.MAPPERS, "Relu", lambda imp, node, a: (mapped.append(node.name), relu(imp, node, a)))
    x_shape = (1, 2, 4, 4)
    m = resize(19, x_shape, [1, 1, 2.0, 2.0], **attrs)
    m.graph.node.insert(0, h.make_node("Relu", ["x"], ["r"], name="first"))
    m.graph.node[1].input[0] = "r"
    with pytest.raises(MPSError, match=f"'the_node'.*{words}"):
        mo.load(m, device="cpu")
    assert mapped == []


@pytest.mark.parametrize("case", ["channel_scale", "batch_scale", "computed_scales"])
def test_resize_refused_at_mapping(case: str) -> None:
    x_shape = (1, 2, 4, 4)
    if case == "computed_scales":
        node = h.make_node("Resize", ["x", "", "s"], ["y"], name="the_node", mode="nearest")
        g = h.make_graph([node], "g", [h.make_tensor_value_info("x", T.FLOAT, list(x_shape)), h.make_tensor_value_info("s", T.FLOAT, [4])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["a", "b", "c", "d"])])
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=10)
        words = "constant"
    else:
        scales = [1, 2.0, 2, 2] if case == "channel_scale" else [2.0, 1, 2, 2]
        m = resize(13, x_shape, scales, mode="nearest")
        words = "N and C"
    with pytest.raises(MPSError, match=f"'the_node'.*{words}"):
        mo.load(m, device="cpu")


# -- Pad ---------------------------------------------------------------------------------------------------------
PADS = {
    "hw": [0, 0, 1, 2, 0, 0, 3, 1],
    "c": [0, 2, 0, 0, 0, 3, 0, 0],
    "chw": [0, 1, 2, 0, 0, 2, 1, 3],
    "big": [0, 0, 6, 7, 0, 0, 9, 5],  # reflect: more than L - 1 (repeated reflection)
}


@pytest.mark.parametrize("pads", list(PADS), ids=str)
@pytest.mark.parametrize("mode, value", [("constant", 0.0), ("constant", 1.5), ("reflect", None), ("edge", None), ("wrap", None)])
@pytest.mark.parametrize("opset", [9, 13, 19])
def test_pad(opset: int, mode: str, value: float | None, pads: str) -> None:
    if mode == "wrap" and opset < 19:
        pytest.skip("wrap is opset 19")
    x = rand(2, 3, 4, 5)
    p = PADS[pads]
    if opset < 11:
        attrs: dict[str, Any] = {"mode": mode, "pads": p}
        if value is not None:
            attrs["value"] = value
        m = make("Pad", opset, x.shape, ["x"], attrs)
    else:
        inits = [tensor("pads", p)]
        inputs = ["x", "pads"]
        if value is not None:
            inits.append(tensor("cv", np.float32(value), T.FLOAT))
            inputs.append("cv")
        m = make("Pad", opset, x.shape, inputs, {"mode": mode}, inits)
    check(m, x, tol=0.0)
    if mode != "wrap":
        assert producer(m) == "MPSNNPadNode"


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_axes_opset18_and_rank3(mode: str) -> None:
    x = rand(2, 3, 4, 5)
    m = make("Pad", 19, x.shape, ["x", "pads", "", "axes"], {"mode": mode}, [tensor("pads", [2, 1, 0, 3]), tensor("axes", [-1, 1])])
    check(m, x, tol=0.0)
    x3 = rand(2, 3, 6)
    m = make("Pad", 18 if mode != "wrap" else 19, x3.shape, ["x", "pads"], {"mode": mode}, [tensor("pads", [0, 1, 2, 0, 2, 3])])
    check(m, x3, tol=0.0)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("pads", [[0, 0, -1, 0, 0, 0, 0, -2], [0, -1, 0, -1, 0, 0, 2, 3], [0, 0, -1, 2, 0, 0, 2, -1]])
def test_pad_negative(mode: str, pads: list[int]) -> None:
    """Negative pads crop first (onnxruntime's order; the reference has no negative pads)."""
    x = rand(2, 3, 4, 6)
    m = make("Pad", 19, x.shape, ["x", "pads"], {"mode": mode}, [tensor("pads", pads)])
    check(m, x, ref="ort", tol=0.0)


def test_pad_refusals() -> None:
    x_shape = (2, 3, 4, 5)
    m = make("Pad", 13, x_shape, ["x", "pads"], {"mode": "constant"}, [tensor("pads", [1, 0, 0, 0, 0, 0, 0, 0])])
    with pytest.raises(MPSError, match="'the_node'.*batch"):
        mo.load(m, device="cpu")
    m = make("Pad", 13, x_shape, ["x", "pads"], {"mode": "symmetric"}, [tensor("pads", [0, 0, 1, 0, 0, 0, 0, 0])])
    with pytest.raises(MPSError, match="'the_node'.*symmetric"):
        mo.load(m, device="cpu")


# -- Slice / Split ------------------------------------------------------------------------------------------------
INT_MAX = 2**63 - 1


@pytest.mark.parametrize("starts, ends, axes, steps", [
    ([2], [5], [1], None),
    ([1, 0], [-1, 3], [2, 3], None),
    ([0, 4, -1], [INT_MAX, 0, -INT_MAX], [1, 2, 3], [2, -1, -2]),
    ([-3], [100], [-1], [1]),
    ([0, 1], [INT_MAX, 5], [0, 1], None),  # a whole-range slice of the batch is accepted
    ([5, 1], [1, 4], [3, 2], [-2, 2]),
])
@pytest.mark.parametrize("opset", [9, 13])
def test_slice(opset: int, starts: list[int], ends: list[int], axes: list[int], steps: list[int] | None) -> None:
    if opset < 10 and steps is not None:
        pytest.skip("Slice-1 has no steps")
    x = rand(2, 6, 5, 7)
    if opset < 10:
        m = make("Slice", opset, x.shape, ["x"], {"starts": starts, "ends": ends, "axes": axes})
    else:
        inits = [tensor("starts", starts), tensor("ends", ends), tensor("axes", axes)]
        inputs = ["x", "starts", "ends", "axes"]
        if steps is not None:
            inits.append(tensor("steps", steps))
            inputs.append("steps")
        m = make("Slice", opset, x.shape, inputs, {}, inits)
    check(m, x, tol=0.0)


def test_slice_refusals() -> None:
    x_shape = (2, 6, 5, 7)
    m = make("Slice", 13, x_shape, ["x", "s", "e", "a"], {}, [tensor("s", [1]), tensor("e", [2]), tensor("a", [0])])
    with pytest.raises(MPSError, match="'the_node'.*batch"):
        mo.load(m, device="cpu")
    m = make("Slice", 13, x_shape, ["x", "s", "e", "a"], {}, [tensor("s", [3]), tensor("e", [3]), tensor("a", [1])])
    with pytest.raises(MPSError, match="'the_node'.*empty"):
        mo.load(m, device="cpu")


def _split_model(opset: int, x_shape: Sequence[int], axis: int, outputs: int, split: list[int] | None, num_outputs: bool = False) -> Any:
    names = [f"y{k}" for k in range(outputs)]
    attrs: dict[str, Any] = {"axis": axis}
    inputs, inits = ["x"], []
    if split is not None:
        if opset < 13:
            attrs["split"] = split
        else:
            inputs.append("split")
            inits.append(tensor("split", split))
    if num_outputs:
        attrs["num_outputs"] = outputs
    return make("Split", opset, x_shape, inputs, attrs, inits, outputs=names)


@pytest.mark.parametrize("axis, outputs, split, num_outputs", [
    (1, 2, None, False),
    (1, 3, [1, 3, 2], False),
    (-1, 2, [3, 4], False),
    (2, 5, None, False),
    (1, 4, None, True),  # 6 channels in 4: the reference's ceil rule gives 2, 2, 2, 0 (an empty part: refused)
    (3, 3, None, True),  # 7 = 3 + 3 + 1
])
@pytest.mark.parametrize("opset", [9, 13, 18])
def test_split(opset: int, axis: int, outputs: int, split: list[int] | None, num_outputs: bool) -> None:
    if num_outputs and opset < 18:
        pytest.skip("num_outputs is opset 18")
    if opset >= 18 and split is None and not num_outputs:
        pytest.skip("opset 18 needs split or num_outputs")
    x = rand(2, 6, 5, 7)
    m = _split_model(opset, x.shape, axis, outputs, split, num_outputs)
    try:
        want = run_reference(m, {"x": x})
    except Exception:  # noqa: BLE001 - a split the reference cannot make
        with pytest.raises(MPSError, match="'the_node'"):
            mo.load(m, device="cpu")
        return
    if any(v.size == 0 for v in want.values()):
        with pytest.raises(MPSError, match="'the_node'"):
            mo.load(m, device="cpu")
        return
    got = run_mpsnn(m, {"x": x})
    assert sorted(got) == sorted(want)
    for k in want:
        assert rel_err(got[k], want[k]) == 0.0, k


def test_split_feeds_consumers() -> None:
    """Split outputs read by later nodes (a pending gather per output), one output unused."""
    x = rand(2, 8, 3, 3)
    split = h.make_node("Split", ["x", "split"], ["a", "b", ""], name="the_node", axis=1)
    add = h.make_node("Add", ["a", "b"], ["s"], name="add")
    relu = h.make_node("Relu", ["s"], ["y"], name="relu")
    g = h.make_graph([split, add, relu], "g", [h.make_tensor_value_info("x", T.FLOAT, list(x.shape))],
                     [h.make_tensor_value_info("y", T.FLOAT, ["a", "b", "c", "d"])], initializer=[tensor("split", [3, 3, 2])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=10)
    check(m, x)


def test_chain_of_pending_movements() -> None:
    """Slice -> Resize (nearest, MPS node: the pending slice is made first) -> Pad -> Split on H
    -> Add of the parts; and Transpose -> Slice -> Transpose kept pending until the Relu."""
    x = rand(2, 6, 3, 4)
    nodes = [
        h.make_node("Slice", ["x", "s0", "e0", "a0"], ["s"], name="slice"),
        h.make_node("Resize", ["s", "", "scales"], ["r"], name="resize", mode="nearest", coordinate_transformation_mode="asymmetric",
                    nearest_mode="floor"),
        h.make_node("Pad", ["r", "pads"], ["p"], name="pad", mode="reflect"),
        h.make_node("Split", ["p", "split"], ["p0", "p1"], name="split", axis=2),
        h.make_node("Add", ["p0", "p1"], ["y"], name="add"),
        h.make_node("Transpose", ["x"], ["t"], name="t1", perm=[0, 2, 3, 1]),
        h.make_node("Slice", ["t", "s1", "e1", "a1"], ["ts"], name="slice2"),
        h.make_node("Transpose", ["ts"], ["tt"], name="t2", perm=[0, 3, 1, 2]),
        h.make_node("Relu", ["tt"], ["z"], name="relu"),
    ]
    inits = [tensor("s0", [1]), tensor("e0", [5]), tensor("a0", [1]), tensor("scales", [1, 1, 2, 3], T.FLOAT),
             tensor("pads", [0, 0, 1, 2, 0, 0, 1, 1]), tensor("split", [4, 4]),
             tensor("s1", [1, 0]), tensor("e1", [3, 5]), tensor("a1", [1, 3])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [None, 6, 3, 4])],
                     [h.make_tensor_value_info(n, T.FLOAT, ["a", "b", "c", "d"]) for n in ("y", "z")], initializer=inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=10)
    check(m, x)
    check(m, rand(3, 6, 3, 4))


def test_split_batch_refused() -> None:
    m = _split_model(13, (2, 6, 5, 7), 0, 2, None)
    with pytest.raises(MPSError, match="'the_node'.*batch"):
        mo.load(m, device="cpu")


# -- torch exports ------------------------------------------------------------------------------------------------
def export(model: nn.Module, x: torch.Tensor, opset: int, dynamic: bool = False) -> bytes:
    f = io.BytesIO()
    axes = {"x": {0: "N"}, "y": {0: "N"}} if dynamic else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), f, dynamo=False, opset_version=opset, input_names=["x"], output_names=["y"],
                          dynamic_axes=axes)
    return f.getvalue()


class Fn(nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> Any:
        return self.fn(x)


def _cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parts in reverse order (so that a wrong split shows)."""
    return F.relu(torch.cat(list(parts)[::-1], dim=1))


def _rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows 1-2 of the first part times the second part (a Split along H, then a Slice)."""
    return a[:, :, 1:] * b


#: name -> (module factory, lowest opset the TorchScript exporter can write it in)
TORCH_CASES: dict[str, tuple[Any, int]] = {
    "upsample_nearest2": (lambda: nn.Upsample(scale_factor=2, mode="nearest"), 9),
    "upsample_nearest3": (lambda: nn.Upsample(scale_factor=(3, 2), mode="nearest"), 9),
    "upsample_bilinear": (lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), 9),
    "upsample_bilinear_ac": (lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), 11),
    "interpolate_size": (lambda: Fn(lambda x: F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=False)), 9),
    "interpolate_size_ac": (lambda: Fn(lambda x: F.interpolate(x, size=(3, 8), mode="bilinear", align_corners=True)), 11),
    "interpolate_nearest_1.5": (lambda: Fn(lambda x: F.interpolate(x, scale_factor=1.5, mode="nearest")), 9),
    "interpolate_down": (lambda: Fn(lambda x: F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)), 11),
    "pad_reflect": (lambda: Fn(lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect")), 9),
    "pad_replicate": (lambda: Fn(lambda x: F.pad(x, (2, 0, 1, 3), mode="replicate")), 9),
    "pad_constant": (lambda: Fn(lambda x: F.pad(x, (1, 1, 0, 2, 1, 0), value=0.25)), 9),
    "chunk": (lambda: Fn(lambda x: _cat(torch.chunk(x, 2, dim=1))), 9),
    "split": (lambda: Fn(lambda x: _cat(torch.split(x, [1, 3, 2], dim=1))), 9),
    "split_h": (lambda: Fn(lambda x: _rows(*torch.split(x, [3, 2], dim=2))), 9),
    "slice": (lambda: Fn(lambda x: F.relu(x[:, 2:5])), 9),
    "slice_hw": (lambda: Fn(lambda x: x[:, :, 1:-1, ::2]), 11),
}


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_torch_exports(case: str, opset: int) -> None:
    factory, lowest = TORCH_CASES[case]
    if opset < lowest:
        pytest.skip(f"the TorchScript exporter cannot write {case} in opset {opset}")
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 6)
    dynamic = opset >= 11
    data = export(factory(), x, opset, dynamic)
    ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
    assert ops & {"Resize", "Upsample", "Pad", "Slice", "Split"}, ops
    feeds = {"x": x.numpy()}
    want = run_ort(data, feeds)["y"]
    got = mo.load(data, device="cpu").predict(feeds)["y"]
    assert rel_err(got, want) <= TOL
    if dynamic:  # another batch than the exported one
        x3 = torch.randn(3, 6, 5, 6).numpy()
        assert rel_err(mo.load(data, device="cpu").predict({"x": x3})["y"], run_ort(data, {"x": x3})["y"]) <= TOL


def test_torch_align_corners_fractional_scale_refused() -> None:
    """F.interpolate(scale_factor=0.5, align_corners=True) of 5 rows exports scales with
    s·L = 2.5: refused (module docstring), with the node named."""
    data = export(Fn(lambda x: F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=True)), torch.randn(1, 2, 5, 6), 13)
    name = next(n.name for n in onnx.load_from_string(data).graph.node if n.op_type == "Resize")
    with pytest.raises(MPSError, match=f"{name}.*align_corners"):
        mo.load(data, device="cpu")


@pytest.mark.parametrize("case", ["slice_rows", "resize_1x1"])
def test_prefix_gather_batch_one(case: str) -> None:
    x = rand(1, 3, 4, 5)
    if case == "slice_rows":
        m = make("Slice", 13, x.shape, ["x", "s", "e", "a"], {}, [tensor("s", [0]), tensor("e", [2]), tensor("a", [2])])
    else:
        m = resize(13, x.shape, sizes=[1, 3, 1, 1], mode="nearest", coordinate_transformation_mode="asymmetric")
    check(m, x, tol=0.0)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("opset", [7, 8])
def test_upsample_with_scales_attribute_matches_onnxruntime(mode: str, opset: int) -> None:
    """Upsample-7 / -8 give the scales as an attribute (Upsample-9 reads input 1)."""
    x = rand(2, 3, 4, 5)
    node = h.make_node("Upsample", ["x"], ["y"], mode=mode, scales=[1.0, 1.0, 2.0, 3.0])
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", T.FLOAT, x.shape)],
                          [h.make_tensor_value_info("y", T.FLOAT, (2, 3, 8, 15))])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 7
    data = m.SerializeToString()
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = mo.load(data, device="cpu").predict({"x": x})["y"]
    assert got.shape == ref.shape == (2, 3, 8, 15)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
