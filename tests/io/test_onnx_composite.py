"""Operators made of several MPS nodes (mpsnn/io/onnx/ops/composite.py) and the channels-last
MatMul (ops/convolution.py): LayerNormalization, GELU written out with Erf, MatMul of rank-3/4
tensors; checked against onnxruntime (torch exports) and ONNX's reference evaluator.

A ConvNeXt block (depthwise 7x7, permute to channels-last, LayerNorm, Linear, GELU, Linear,
permute back, layer scale, residual) is the architecture these serve; its permutes must cost no
data movement (no RelayoutNode in the graph).
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto as T  # noqa: E402 - after the importorskips
from onnx import helper as h  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from mpsnn import MPSError  # noqa: E402
from mpsnn.io import onnx as mo  # noqa: E402
from mpsnn.io.onnx.nodes import RelayoutNode  # noqa: E402


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def export(model: nn.Module, x: torch.Tensor, opset: int, dynamic: bool) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), x, f, dynamo=False, opset_version=opset, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic else None)
    return f.getvalue()


def ort_run(data: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


class LayerNorm2d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.ln = nn.LayerNorm(c, eps=1e-6)
        self.fc1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * c, c)
        self.scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.ln(y)))).permute(0, 3, 1, 2)
        return x + self.scale * y


class ConvNeXtish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, 4), LayerNorm2d(8))
        self.stage1 = Block(8)
        self.down = nn.Sequential(LayerNorm2d(8), nn.Conv2d(8, 16, 2, 2))
        self.stage2 = Block(16)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), LayerNorm2d(16), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.down(self.stage1(self.stem(x)))))


@pytest.mark.parametrize("opset,dynamic", [(13, True), (17, False), (17, True)])
def test_convnext_block_matches_onnxruntime_without_data_movement(opset: int, dynamic: bool) -> None:
    torch.manual_seed(0)
    model = ConvNeXtish()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    data = export(model, torch.from_numpy(x), opset, dynamic)
    types = {n.op_type for n in onnx.load_from_string(data).graph.node}
    assert {"Erf", "MatMul", "Transpose"} <= types
    assert ("LayerNormalization" in types) == (opset >= 17)
    g = mo.load(data, device="cpu")
    assert not any(isinstance(st.node, RelayoutNode) for st in g.plan.steps), g.debug_description
    for batch in ([2, 3] if dynamic else [2]):
        xb = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        ref = ort_run(data, {"x": xb})[0]
        assert rel_err(g.predict({"x": xb})["y"], ref) <= 1e-4


class ChannelsLastLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_channels_last_linear_is_one_convolution_with_its_bias() -> None:
    torch.manual_seed(1)
    model = ChannelsLastLinear()
    x = np.random.default_rng(1).standard_normal((2, 6, 3, 4)).astype(np.float32)
    data = export(model, torch.from_numpy(x), 17, True)
    g = mo.load(data, device="cpu")
    assert len(g.plan.steps) == 1, g.debug_description  # MatMul + Add fused, both permutes free
    assert rel_err(g.predict({"x": x})["y"], ort_run(data, {"x": x})[0]) <= 1e-5


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any] = (), opset: int = 17) -> Any:
    g = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=10)


@pytest.mark.parametrize("shape,axis,scale_shape", [
    ((2, 5, 3, 4), -1, (4,)),
    ((2, 5, 3, 4), 1, (5, 3, 4)),
    ((2, 5, 3, 4), 2, (1, 4)),
    ((2, 6, 7), 1, (6, 7)),
    ((3, 9), 1, (9,)),
    ((2, 5, 1, 4), 2, (1, 4)),
])
def test_layer_normalization_matches_the_reference(shape: tuple[int, ...], axis: int, scale_shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    scale = rng.standard_normal(scale_shape).astype(np.float32)
    bias = rng.standard_normal(scale_shape).astype(np.float32)
    node = h.make_node("LayerNormalization", ["x", "s", "b"], ["y", "mean", "rstd"], axis=axis, epsilon=1e-3)
    stat = tuple(1 if k >= (axis % len(shape)) else d for k, d in enumerate(shape))
    m = _model([node], [h.make_tensor_value_info("x", T.FLOAT, shape)],
               [h.make_tensor_value_info("y", T.FLOAT, shape), h.make_tensor_value_info("mean", T.FLOAT, stat),
                h.make_tensor_value_info("rstd", T.FLOAT, stat)],
               [onnx.numpy_helper.from_array(scale, "s"), onnx.numpy_helper.from_array(bias, "b")])
    ref = ReferenceEvaluator(m).run(None, {"x": x})
    got = mo.load(m, device="cpu").predict({"x": x})
    for name, r in zip(("y", "mean", "rstd"), ref):
        assert got[name].shape == r.shape
        assert rel_err(got[name], r) <= 1e-5, name


def test_layer_normalization_over_the_batch_is_refused() -> None:
    node = h.make_node("LayerNormalization", ["x", "s"], ["y"], axis=0)
    m = _model([node], [h.make_tensor_value_info("x", T.FLOAT, (2, 3))], [h.make_tensor_value_info("y", T.FLOAT, (2, 3))],
               [onnx.numpy_helper.from_array(np.ones((2, 3), np.float32), "s")])
    with pytest.raises(MPSError, match="within each image"):
        mo.load(m, device="cpu")


def _gelu_nodes(order: str) -> list[Any]:
    c = [h.make_node("Constant", [], [n], value=onnx.numpy_helper.from_array(np.array(v, np.float32), n))
         for n, v in (("r2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5), ("ir2", 1 / np.sqrt(2.0)))]
    first = h.make_node("Div", ["x", "r2"], ["d"]) if order != "mul" else h.make_node("Mul", ["ir2", "x"], ["d"])
    tail = ([h.make_node("Mul", ["x", "e1"], ["m"]), h.make_node("Mul", ["m", "half"], ["y"])] if order != "half_first" else
            [h.make_node("Mul", ["half", "e1"], ["m"]), h.make_node("Mul", ["x", "m"], ["y"])])
    return c + [first, h.make_node("Erf", ["d"], ["e"]), h.make_node("Add", ["e", "one"], ["e1"]), *tail]


@pytest.mark.parametrize("order", ["div", "mul", "half_first"])
def test_gelu_written_with_erf_is_one_neuron(order: str) -> None:
    x = np.linspace(-4, 4, 2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    m = _model(_gelu_nodes(order), [h.make_tensor_value_info("x", T.FLOAT, x.shape)], [h.make_tensor_value_info("y", T.FLOAT, x.shape)])
    g = mo.load(m, device="cpu")
    assert [type(st.node).__name__ for st in g.plan.steps] == ["MPSCNNNeuronGeLUNode"]
    assert rel_err(g.predict({"x": x})["y"], ReferenceEvaluator(m).run(None, {"x": x})[0]) <= 1e-6


def test_erf_outside_gelu_is_refused_naming_the_node() -> None:
    node = h.make_node("Erf", ["x"], ["y"], name="lonely")
    m = _model([node], [h.make_tensor_value_info("x", T.FLOAT, (2, 3))], [h.make_tensor_value_info("y", T.FLOAT, (2, 3))])
    with pytest.raises(MPSError, match="lonely.*only inside GELU"):
        mo.load(m, device="cpu")
