"""ONNX's backend conformance suite (``onnx.backend.test.BackendTest``) on mpsnn's ONNX backend
(:mod:`mpsnn.io.onnx.backend`): the *node tests* of every operator mpsnn maps, on the CPU.

Each node test is a one-operator model (or its function expansion, ``*_expanded``) with inputs
and the outputs of ONNX's reference implementation; the runner compares with the test's own
tolerances (rtol 1e-3, atol 1e-7 unless the test says otherwise) and exact dtypes and shapes.

* :data:`OPS` selects the tests of each operator (a regular expression on the test names;
  every selected name matches exactly one operator). The CPU variants run (CI has no GPU);
  the CUDA variants are not selected.
* :data:`EXCLUDE` lists the tests that cannot pass because of a documented limitation of the
  import, with the reason per group (``docs/onnx.md`` shows them per operator).
  :func:`test_exclusion_still_needed` runs every excluded test and checks that it is still
  refused with an :class:`~mpsnn.MPSError` (never silently wrong, and an exclusion that has
  become unnecessary fails here so it gets removed).
* ``scripts/onnx_backend_report.py`` reads both tables and writes the counts to ``docs/onnx.md``.

The suite takes a few seconds: building the runner generates ONNX's node tests (about 5 s on
two cores); the selected tests are tiny.
"""
from __future__ import annotations

import functools
import re
import warnings
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnx.reference")

import onnx  # noqa: E402 - after the importorskips
import onnx.backend.test  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.backend.test.loader import load_model_tests  # noqa: E402
from onnx.backend.test.runner import Runner  # noqa: E402

from mpsnn import MPSError  # noqa: E402
from mpsnn.io.onnx import backend  # noqa: E402

# the runner and ONNX's reference implementation may warn (numpy overflow in the test
# generators, deprecations in onnx); pyproject's filterwarnings=error must not turn those into
# failures, while warnings raised by mpsnn itself still do
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:onnx.*"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning:onnx.*")]

#: the device whose variants run (``<test>_cpu``)
DEVICE = "cpu"

#: operator -> regular expression (``re.search``) on node-test names, device suffix included
OPS: dict[str, str] = {
    # layers with weights
    "Conv": r"^test_(basic_conv|conv_with)_",
    "ConvTranspose": r"^test_convtranspose_",
    "Gemm": r"^test_gemm_",
    "MatMul": r"^test_matmul_",
    "BatchNormalization": r"^test_batchnorm_",
    "InstanceNormalization": r"^test_instancenorm_",
    "GroupNormalization": r"^test_group_normalization_",
    "LRN": r"^test_lrn_",
    "LayerNormalization": r"^test_layer_normalization_",
    "Erf": r"^test_erf_",
    # activations and element-wise
    "Relu": r"^test_relu_",
    "LeakyRelu": r"^test_leakyrelu_",
    "PRelu": r"^test_prelu_",
    "Elu": r"^test_elu_",
    "Sigmoid": r"^test_sigmoid_",
    "HardSigmoid": r"^test_hardsigmoid_",
    "HardSwish": r"^test_hardswish_",
    "Tanh": r"^test_tanh_",
    "Softplus": r"^test_softplus_",
    "Softsign": r"^test_softsign_",
    "Gelu": r"^test_gelu_",
    "Abs": r"^test_abs_",
    "Exp": r"^test_exp_",
    "Log": r"^test_log_",
    "Neg": r"^test_neg_",
    "Sqrt": r"^test_sqrt_",
    "Reciprocal": r"^test_reciprocal_",
    "Pow": r"^test_pow_",
    "Clip": r"^test_clip_",
    "Add": r"^test_add_",
    "Sub": r"^test_sub_",
    "Mul": r"^test_mul_",
    "Div": r"^test_div_",
    "Sum": r"^test_sum_",
    "Softmax": r"^test_softmax_",
    "LogSoftmax": r"^test_logsoftmax_",
    "Dropout": r"^test_(training_)?dropout_",
    "Identity": r"^test_identity_",
    # pooling and reductions
    "MaxPool": r"^test_maxpool_",
    "AveragePool": r"^test_averagepool_",
    "LpPool": r"^test_lppool_",
    "GlobalAveragePool": r"^test_globalaveragepool_",
    "GlobalMaxPool": r"^test_globalmaxpool_",
    "ReduceMean": r"^test_reduce_mean_",
    "ReduceMax": r"^test_reduce_max_",
    "ReduceMin": r"^test_reduce_min_",
    "ReduceSum": r"^test_reduce_sum_(?!square_)",
    "ArgMax": r"^test_argmax_",
    "ArgMin": r"^test_argmin_",
    # data movement
    "Flatten": r"^test_flatten_",
    "Reshape": r"^test_reshape_",
    "Transpose": r"^test_transpose_",
    "Squeeze": r"^test_squeeze_",
    "Unsqueeze": r"^test_unsqueeze_",
    "Concat": r"^test_concat_",
    "DepthToSpace": r"^test_depthtospace_",
    "SpaceToDepth": r"^test_spacetodepth_",
    "Resize": r"^test_resize_",
    "Upsample": r"^test_upsample_",
    "Pad": r"^test_(constant|edge|reflect|wrap)_pad_",
    "Slice": r"^test_slice_",
    "Split": r"^test_split_(?!to_sequence)",
    # folded at load time
    "Constant": r"^test_constant_(?!pad)",
    "ConstantOfShape": r"^test_constantofshape_",
    "Shape": r"^test_shape_",
}

#: excluded test-name pattern (``re.search``) -> the documented limitation it runs into
EXCLUDE: dict[str, str] = {
    # -- layouts: an ONNX tensor lives in one NHWC image (mpsnn/io/onnx/layout.py) --
    r"^test_(averagepool|maxpool|lppool|convtranspose)_3d_":
        "rank-5 tensors (3-D windows): images hold tensors of rank 1 to 4",
    r"^test_unsqueeze_(two_axes|three_axes|unsorted_axes|negative_axes)_":
        "the result has rank 5 or 6: images hold tensors of rank 1 to 4",
    r"^test_(reduce_max_empty_set|reduce_min_empty_set|reduce_sum_empty_set|reshape_allowzero_reordered|split_zero_size_splits|"
    r"slice_start_out_of_bounds)":
        "zero-size tensors: an image has at least one element along every axis",
    r"^test_identity_(sequence|opt)_":
        "sequence / optional values: only tensors are imported",
    # -- the batch (dimension 0) is the image count; MPS never mixes images --
    r"^test_(add|sub|mul|div)_bcast_":
        "a computed operand broadcast over the batch ((5,) against (3, 4, 5)): MPS arithmetic never broadcasts the image count",
    r"^test_reduce_(max|mean|min|sum)_default_axes_keepdims?_":
        "reduces dimension 0 (the batch): MPS reduces rows, columns and feature channels of each image",
    r"^test_(log)?softmax_axis_0_expanded":
        "the expansion's ReduceMax runs over dimension 0 (the batch)",
    r"^test_concat_(2d_axis_0|2d_axis_negative_2|3d_axis_0|3d_axis_negative_3|3d_axis_2|3d_axis_negative_1)_":
        "Concat along the batch or a spatial axis: MPS concatenates feature channels (axis 1)",
    r"^test_slice_(cpu|default_axes|default_steps|neg_steps|negative_axes)":
        "Slice of dimension 0 (the batch): MPS moves data within images",
    # -- the operator has no MPS kernel for this variant --
    r"^test_arg(max|min)_(default_axis_(example|random)|negative_axis_keepdims_random)_":
        "ArgMax / ArgMin over dimension 0 or the last axis of a rank-3 tensor: MPS's arg reductions run over the feature channels",
    r"^test_(log)?softmax_(axis_0|axis_2|default_axis|negative_axis)_(cpu|cuda)$":
        "Softmax / LogSoftmax over an axis other than the channels (axis 1)",
    r"^test_averagepool_2d_dilations_":
        "AveragePool with dilations: MPS's average pooling has none",
    r"^test_lppool_2d_dilations_":
        "LpPool with dilations: MPS's L2-norm pooling has none",
    r"^test_lppool_(1d_default|2d_default|2d_pads|2d_same_lower)_":
        "LpPool with p = 3 or 4: MPS pools the L2 norm only",
    r"^test_maxpool_with_argmax_":
        "MaxPool's Indices output",
    r"^test_batchnorm_.*_training_mode_":
        "BatchNormalization with training_mode=1 (batch statistics): imported graphs run inference",
    r"^test_training_dropout":
        "Dropout with training_mode=True (a random mask): imported graphs run inference",
    r"^test_gemm_(transposeA|all_attributes)_":
        "Gemm with transA=1: the input of a fully connected layer is the image itself",
    r"^test_gemm_default_matrix_bias_":
        "Gemm with a (M, N) matrix C: the bias of a fully connected layer is one value per output",
    r"^test_matmul_(1d_1d|1d_3d|3d|4d|4d_1d|bcast)_":
        "MatMul of 1-D tensors or by a B that is not one constant (K, M) matrix: MatMul maps to a fully connected layer or a 1 x 1 convolution",
    r"^test_prelu_(example|broadcast)_(cpu|cuda)$":
        "PRelu slopes that vary along axes other than the channels: MPS's PReLU has one slope per channel",
    r"^test_pow_(cpu|example|bcast_array|types_)":
        "Pow with an exponent that is not one scalar: Pow maps to MPS's power neuron",
    r"^test_gelu_tanh_(1|2)_(cpu|cuda)$":
        "Gelu approximate='tanh': MPS's geLU neuron is the exact erf form",
    r"^test_div_(u?int(8|16|32|64)|int32_trunc)_":
        "integer Div truncates; images hold real numbers (refused at load time)",
    # -- function expansions that compute with operators mpsnn folds only on constants --
    r"^test_(clip_(?!default_(int8_)?inbounds_)|elu_|leakyrelu_|prelu_|hardsigmoid_|relu_).*expanded":
        "the expansion computes Less / Where / Max / Min on the input: mpsnn folds those only on constants",
    r"^test_erf_(cpu|cuda)$":
        "Erf on its own: mpsnn maps Erf only inside the GELU pattern (MPS has no erf neuron)",
    r"^test_layer_normalization_.*_expanded":
        "the expansion computes Cast on the input: mpsnn folds Cast only on constants",
    r"^test_layer_normalization_(2d_axis0|2d_axis_negative_2|3d_axis0_epsilon|3d_axis_negative_3_epsilon|4d_axis0|4d_axis_negative_4)_(cpu|cuda)$":
        "LayerNormalization from dimension 0 (the batch): mpsnn normalizes within each image",
    r"^test_group_normalization_.*_expanded":
        "the expansion computes Cast on the input (and reshapes the batch): mpsnn folds Cast only on constants",
    r"^test_gelu_default_(1|2)_expanded":
        "the expansion uses Erf, which mpsnn does not map",
    # -- Resize (mpsnn/io/onnx/ops/resize.py) --
    r"^test_resize_.*cubic":
        "Resize mode='cubic': MPS has no bicubic resampling",
    r"^test_resize_.*_antialias_":
        "Resize antialias=1: MPS's bilinear resampling has no prefilter",
    r"^test_resize_tf_crop_and_resize":
        "Resize coordinate_transformation_mode='tf_crop_and_resize'",
    r"^test_resize_downsample_scales_linear_align_corners_":
        "Resize align_corners with scales where s·L is not an integer: ONNX's reference and onnxruntime disagree (refused; give sizes)",
}


def device_pattern(pattern: str) -> str:
    """``pattern`` restricted to the :data:`DEVICE` variants."""
    return f"(?=.*_{DEVICE}$)(?:{pattern})"


def op_of(name: str) -> str | None:
    """The operator a node-test name (device suffix included) belongs to, else None."""
    hits = [op for op, p in OPS.items() if re.search(p, name)]
    if len(hits) > 1:
        raise AssertionError(f"{name} matches the patterns of {hits}")
    return hits[0] if hits else None


def selected(name: str) -> bool:
    return name.endswith(f"_{DEVICE}") and op_of(name) is not None


def exclusion(name: str) -> str | None:
    """The reason ``name`` is excluded, else None."""
    for p, why in EXCLUDE.items():
        if re.search(p, name):
            return why
    return None


def build_backend_test(parent_module: str | None) -> Any:
    """The runner with the selection and the exclusions applied (generating ONNX's node tests
    emits numpy warnings from the test generators: silenced here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt = onnx.backend.test.BackendTest(backend, parent_module)
    for p in OPS.values():
        bt.include(device_pattern(p))
    # excluded groups: the reasons are the values of EXCLUDE (grouped by limitation above)
    for p in EXCLUDE:
        bt.exclude(p)
    return bt


@functools.lru_cache(maxsize=1)
def node_cases() -> dict[str, Any]:
    """ONNX's node test cases by name (the list the runner was built from; cached by onnx)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {t.name: t for t in load_model_tests(kind="node")}


def run_case(case: Any, device: str = "CPU") -> None:
    """One node test the way the runner runs it (prepare, run every data set, compare)."""
    rep = backend.prepare(case.model, device)
    for inputs, outputs in case.data_sets:
        ins = [numpy_helper.to_array(t) if isinstance(t, onnx.TensorProto) else t for t in inputs]
        refs = [numpy_helper.to_array(t) if isinstance(t, onnx.TensorProto) else t for t in outputs]
        Runner.assert_similar_outputs(refs, list(rep.run(ins)), rtol=case.rtol, atol=case.atol)


# -- the node tests -----------------------------------------------------------------------------------------
backend_test = build_backend_test(__name__)
# the node tests only, and only the selected ones (the runner would report every other ONNX test
# as skipped); the class is bound to this one module name so that pytest collects it once
globals().update({k: v for k, v in backend_test.test_cases.items() if k == "OnnxBackendNodeModelTest"})
for _name in [n for n in vars(OnnxBackendNodeModelTest) if n.startswith("test_") and not selected(n)]:  # noqa: F821
    delattr(OnnxBackendNodeModelTest, _name)  # noqa: F821

SELECTED = sorted(n for n in vars(OnnxBackendNodeModelTest) if n.startswith("test_"))  # noqa: F821
EXCLUDED = [n for n in SELECTED if exclusion(n) is not None]


# -- the selection itself -------------------------------------------------------------------------------------
def test_selection_covers_every_operator() -> None:
    from mpsnn.io.onnx.ops import FOLDABLE_ONLY, MAPPERS
    assert set(OPS) <= set(MAPPERS) | set(FOLDABLE_ONLY), sorted(set(OPS) - set(MAPPERS) - set(FOLDABLE_ONLY))
    empty = [op for op in OPS if not any(op_of(n) == op for n in SELECTED)]
    assert not empty, empty
    # every mapped operator that ONNX has node tests for is selected (GlobalLpPool has none)
    cases = node_cases()
    tested = {c.model.graph.node[0].op_type for c in cases.values() if len(c.model.graph.node) == 1}
    unselected = sorted((set(MAPPERS) - set(OPS)) & tested)
    assert not unselected, f"mapped operators with node tests but no pattern in OPS: {unselected}"
    # every selected test's model uses its operator (or is that operator's function expansion)
    for name in SELECTED:
        model = cases[name[: -len(DEVICE) - 1]].model
        assert op_of(name) in {n.op_type for n in model.graph.node} or "_expanded" in name, name


def test_every_exclusion_pattern_is_used() -> None:
    unused = [p for p in EXCLUDE if not any(re.search(p, n) for n in SELECTED)]
    assert not unused, unused


def test_most_selected_tests_run() -> None:
    assert len(SELECTED) > 400 and len(SELECTED) - len(EXCLUDED) > 300, (len(SELECTED), len(EXCLUDED))


@pytest.mark.parametrize("name", EXCLUDED)
def test_exclusion_still_needed(name: str) -> None:
    """An excluded test is refused with an MPSError: a limitation, not a silently wrong result;
    and an exclusion that is no longer needed shows up here."""
    case = node_cases()[name[: -len(DEVICE) - 1]]
    with pytest.raises(MPSError):
        run_case(case)


# -- the backend itself ----------------------------------------------------------------------------------------
def _conv_model(w_as_input: bool) -> Any:
    w = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3) / 50.0
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])]
    inits = []
    if w_as_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3, 3, 3]))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    inputs.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, [1]))
    g = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 5, 5])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), w


def _reference(model: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator
    return ReferenceEvaluator(model).run(None, feeds)


def test_device_strings() -> None:
    import torch
    assert backend.mps_device("CPU") == "cpu"
    assert backend.mps_device("CUDA") == "cuda" and backend.mps_device("CUDA:1") == "cuda:1"
    assert backend.supports_device("CPU")
    assert backend.supports_device("CUDA") == torch.cuda.is_available()
    assert not backend.supports_device("TPU")
    with pytest.raises(MPSError):
        backend.mps_device("TPU")


def test_run_node_is_not_supported() -> None:
    with pytest.raises(NotImplementedError):
        backend.run_node(helper.make_node("Relu", ["x"], ["y"]), [np.zeros((1, 2), np.float32)])


def test_prepare_imports_models_without_parameter_inputs() -> None:
    """Initializer weights: imported in prepare; inputs by list (graph-input order) or dict; a
    graph input the graph does not read is ignored."""
    model, w = _conv_model(w_as_input=False)
    rep = backend.prepare(model, "CPU")
    assert rep.bound == [] and b"" in rep._cache
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32)
    (ref,) = _reference(model, {"x": x, "unused": np.zeros(1, np.float32)})
    (y,) = rep.run([x, np.zeros(1, np.float32)])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    (y2,) = backend.run_model(model, {"x": x})
    np.testing.assert_allclose(y2, ref, rtol=1e-5, atol=1e-5)


def test_parameter_inputs_are_bound_per_value() -> None:
    model, w = _conv_model(w_as_input=True)
    rep = backend.prepare(model, "CPU")
    assert rep.bound == ["w"] and not rep._cache
    x = np.random.default_rng(1).standard_normal((1, 3, 5, 5)).astype(np.float32)
    for scale in (1.0, -2.0, 1.0):
        feeds = {"x": x, "w": w * np.float32(scale), "unused": np.zeros(1, np.float32)}
        (y,) = rep.run([feeds["x"], feeds["w"], feeds["unused"]])
        np.testing.assert_allclose(y, _reference(model, feeds)[0], rtol=1e-5, atol=1e-5)
    assert len(rep._cache) == 2  # one import per distinct weight value
    with pytest.raises(MPSError):
        rep.run([x])  # the weights are missing


def test_an_input_read_as_data_is_never_bound() -> None:
    """x is both the data of Mul and Pow's exponent: it stays an image, so the import refuses
    the computed exponent (binding it would fold the whole graph with ONNX's evaluator)."""
    nodes = [helper.make_node("Pow", ["x", "x"], ["y"])]
    vi = helper.make_tensor_value_info
    g = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [2, 3])], [vi("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    assert backend.parameter_inputs(model) == []
    with pytest.raises(MPSError):
        backend.prepare(model, "CPU")


def test_constant_outputs_need_no_graph() -> None:
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Constant", [], ["c"], value_float=2.5)]
    g = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [2, 3, 4])], [vi("s", TensorProto.INT64, [3]), vi("c", TensorProto.FLOAT, [])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    rep = backend.prepare(model, "CPU")
    graph, consts = rep._cache[b""]
    assert graph is None
    s, c = rep.run([np.zeros((2, 3, 4), np.float32)])
    assert s.dtype == np.int64 and s.tolist() == [2, 3, 4] and c.dtype == np.float32 and float(c) == 2.5
