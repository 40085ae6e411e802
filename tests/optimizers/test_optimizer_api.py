"""Optimizer API surface: MPSNNRegularizationType, MPSNNOptimizerDescriptor, the optimizers'
init forms and properties, MPSVector / MPSMatrix and their descriptors, encode-form dispatch
and its errors (spec/optimizers.md §2-4, §9)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import (
    MPSDataType,
    MPSMatrix,
    MPSMatrixDescriptor,
    MPSNNOptimizer,
    MPSNNOptimizerAdam,
    MPSNNOptimizerDescriptor,
    MPSNNOptimizerRMSProp,
    MPSNNOptimizerStochasticGradientDescent,
    MPSNNRegularizationType,
    MPSVector,
    MPSVectorDescriptor,
)
from mpsnn.core.errors import MPSDeviceError, MPSError, MPSTypeError, MPSValueError

SGD, RMS, ADAM = MPSNNOptimizerStochasticGradientDescent, MPSNNOptimizerRMSProp, MPSNNOptimizerAdam
F32 = float(np.float32(0.1))


def test_regularization_type_cases() -> None:
    R = MPSNNRegularizationType
    assert (int(R.none), int(R.L1), int(R.L2)) == (0, 1, 2)
    assert R["None"] is R.none and getattr(R, "None") is R.none and R(0) is R.none
    assert len(list(R)) == 3
    assert mpsnn.MPSNNRegularizationType is R


def test_descriptor_defaults_and_forms() -> None:
    d = MPSNNOptimizerDescriptor()
    assert (d.learning_rate, d.gradient_rescale, d.apply_gradient_clipping) == (float(np.float32(0.001)), 1.0, False)
    assert (d.gradient_clip_max, d.gradient_clip_min) == (math.inf, -math.inf)
    assert (d.regularization_type, d.regularization_scale) == (MPSNNRegularizationType.none, 0.0)
    d4 = MPSNNOptimizerDescriptor(learning_rate=0.1, gradient_rescale=0.5, regularization_type=MPSNNRegularizationType.L2,
                                  regularization_scale=0.01)
    assert (d4.learning_rate, d4.gradient_rescale, d4.regularization_type) == (F32, 0.5, MPSNNRegularizationType.L2)
    assert d4.apply_gradient_clipping is False
    d7 = MPSNNOptimizerDescriptor.optimizer_descriptor_with_learning_rate(0.1, 2.0, apply_gradient_clipping=True, gradient_clip_max=1.0,
                                                                         gradient_clip_min=-0.5, regularization_type=1, regularization_scale=0.25)
    assert (d7.apply_gradient_clipping, d7.gradient_clip_max, d7.gradient_clip_min) == (True, 1.0, -0.5)
    assert d7.regularization_type is MPSNNRegularizationType.L1 and d7.regularization_scale == 0.25
    d7.learning_rate = 0.5                                   # read-write properties
    d7.regularization_type = "None"
    assert d7.learning_rate == 0.5 and d7.regularization_type is MPSNNRegularizationType.none


@pytest.mark.parametrize("kw, err", [({"learning_rate": "a"}, MPSTypeError), ({"apply_gradient_clipping": 1}, MPSTypeError),
                                     ({"regularization_type": 7}, MPSValueError), ({"gradient_rescale": None}, MPSTypeError)])
def test_descriptor_bad_values(kw, err) -> None:
    with pytest.raises(err, match="MPSNNOptimizerDescriptor"):
        MPSNNOptimizerDescriptor(**kw)
    with pytest.raises(AttributeError):
        MPSNNOptimizerDescriptor().learningRate = 1.0  # type: ignore[attr-defined]


def test_base_is_abstract() -> None:
    with pytest.raises(MPSTypeError, match="MPSNNOptimizer: is abstract"):
        MPSNNOptimizer("cpu")
    assert issubclass(SGD, MPSNNOptimizer) and issubclass(SGD, mpsnn.MPSKernel)


def test_optimizer_defaults_and_init_forms() -> None:
    s = SGD("cpu", learning_rate=0.1)
    assert (s.learning_rate, s.momentum_scale, s.use_nestrov_momentum, s.gradient_rescale) == (F32, 0.0, False, 1.0)
    assert (s.regularization_type, s.regularization_scale, s.apply_gradient_clipping) == (MPSNNRegularizationType.none, 0.0, False)
    desc = MPSNNOptimizerDescriptor(0.2, 0.5, apply_gradient_clipping=True, gradient_clip_max=3.0, gradient_clip_min=-2.0,
                                    regularization_type=MPSNNRegularizationType.L1, regularization_scale=0.1)
    s2 = SGD("cpu", momentum_scale=0.9, use_nestrov_momentum=True, optimizer_descriptor=desc)
    assert (s2.momentum_scale, s2.use_nestrov_momentum, s2.use_nesterov_momentum) == (float(np.float32(0.9)), True, True)
    assert (s2.learning_rate, s2.gradient_rescale, s2.gradient_clip_max, s2.gradient_clip_min) == (float(np.float32(0.2)), 0.5, 3.0, -2.0)
    assert s2.regularization_type is MPSNNRegularizationType.L1 and s2.regularization_scale == F32
    desc.learning_rate = 9.0                                 # hyper-parameters are copied at init
    assert s2.learning_rate == float(np.float32(0.2))
    r = RMS("cpu", learning_rate=0.01)
    assert (r.decay, r.epsilon) == (0.9, float(np.float32(1e-8)))
    r2 = RMS("cpu", decay=0.5, epsilon=1e-3, optimizer_descriptor=desc)
    assert (r2.decay, r2.epsilon, r2.apply_gradient_clipping) == (0.5, float(np.float32(1e-3)), True)
    a = ADAM("cpu", learning_rate=0.01)
    assert (a.beta1, a.beta2, a.epsilon, a.time_step) == (0.9, 0.999, float(np.float32(1e-8)), 0)
    a2 = ADAM("cpu", beta1=0.8, beta2=0.99, epsilon=1e-6, time_step=5, optimizer_descriptor=desc)
    assert (a2.beta1, a2.beta2, a2.time_step, a2.learning_rate) == (0.8, 0.99, 5, 9.0)
    assert SGD("cpu").learning_rate == float(np.float32(0.001))   # no lr, no descriptor: descriptor defaults


def test_optimizer_property_access_and_errors() -> None:
    s = SGD("cpu", learning_rate=0.1)
    s.set_learning_rate(0.25)
    assert s.learning_rate == 0.25
    s.apply_gradient_clipping = True
    assert s.apply_gradient_clipping is True
    with pytest.raises(AttributeError):
        s.learning_rate = 0.3  # read-only: use set_learning_rate
    with pytest.raises(AttributeError):
        s.momentum_scale = 0.3
    with pytest.raises(MPSTypeError, match="apply_gradient_clipping"):
        s.apply_gradient_clipping = "yes"
    with pytest.raises(MPSTypeError, match="not both"):
        SGD("cpu", learning_rate=0.1, optimizer_descriptor=MPSNNOptimizerDescriptor())
    with pytest.raises(MPSTypeError, match="optimizer_descriptor"):
        RMS("cpu", optimizer_descriptor={"learning_rate": 1})
    a = ADAM("cpu", learning_rate=0.1)
    a.time_step = 7
    assert a.time_step == 7
    for bad in (-1, 1.5, True):
        with pytest.raises(MPSValueError, match="time_step"):
            a.time_step = bad
    c = a.copy()
    assert isinstance(c, ADAM) and c.time_step == 7 and c.beta1 == a.beta1


# -- MPSVector / MPSMatrix ---------------------------------------------------------------------------

def test_vector_descriptor() -> None:
    d = MPSVectorDescriptor.vector_descriptor_with_length(5, MPSDataType.float32)
    assert (d.length, d.vectors, d.vector_bytes, d.data_type) == (5, 1, 20, MPSDataType.float32)
    d2 = MPSVectorDescriptor.vector_descriptor_with_length(3, 2, 16, MPSDataType.float32)
    assert (d2.length, d2.vectors, d2.vector_bytes) == (3, 2, 16)
    assert MPSVectorDescriptor.vector_bytes_for_length(7, MPSDataType.float32) == 28
    with pytest.raises(MPSValueError, match="data_type"):
        MPSVectorDescriptor(length=4, data_type=MPSDataType.float16)
    with pytest.raises(MPSValueError, match="vector_bytes"):
        MPSVectorDescriptor(length=4, vector_bytes=8)
    with pytest.raises(MPSValueError, match="length"):
        MPSVectorDescriptor(length=0)


def test_vector_wraps_and_allocates() -> None:
    buf = torch.arange(10, dtype=torch.float32)
    v = MPSVector(buf, descriptor=MPSVectorDescriptor(length=3, vectors=2, vector_bytes=16), offset=4)
    assert v.data is buf and v.offset == 4 and v.device == mpsnn.Device("cpu") and v.resource_size() == 40
    assert v.tensor.tolist() == [[1, 2, 3], [5, 6, 7]]
    v.tensor.add_(100)                                      # a view: writes reach the buffer
    assert buf[1].item() == 101 and buf[4].item() == 4
    arr = np.zeros(4, np.float32)
    va = MPSVector(arr)
    va.tensor.fill_(2.0)
    assert arr.tolist() == [2.0] * 4 and va.length == 4 and va.vectors == 1
    z = MPSVector("cpu", descriptor=MPSVectorDescriptor(length=6))
    assert z.tensor.shape == (6,) and float(z.tensor.abs().sum()) == 0.0 and z.to_numpy().dtype == np.float32
    with pytest.raises(MPSTypeError, match="float32"):
        MPSVector(np.zeros(4))
    with pytest.raises(MPSValueError, match="buffer"):
        MPSVector(torch.zeros(5), descriptor=MPSVectorDescriptor(length=4), offset=8)
    with pytest.raises(MPSTypeError, match="descriptor"):
        MPSVector("cpu")


def test_matrix_descriptor_and_matrix() -> None:
    d = MPSMatrixDescriptor.matrix_descriptor_with_rows(2, 3, 16, MPSDataType.float32)
    assert (d.rows, d.columns, d.matrices, d.row_bytes, d.matrix_bytes) == (2, 3, 1, 16, 32)
    d6 = MPSMatrixDescriptor.matrix_descriptor_with_rows(2, 3, 2, 12, 32, MPSDataType.float32)
    assert (d6.matrices, d6.matrix_bytes) == (2, 32)
    assert MPSMatrixDescriptor.row_bytes_for_columns(5, MPSDataType.float32) == 20
    buf = torch.arange(8, dtype=torch.float32)
    m = MPSMatrix(buf, descriptor=d)
    assert m.tensor.tolist() == [[0, 1, 2], [4, 5, 6]] and (m.rows, m.columns, m.row_bytes) == (2, 3, 16)
    m3 = MPSMatrix(torch.zeros(2, 2, 3))
    assert m3.tensor.shape == (2, 2, 3) and m3.matrices == 2
    with pytest.raises(MPSValueError, match="row_bytes"):
        MPSMatrixDescriptor(rows=2, columns=3, row_bytes=8)
    with pytest.raises(MPSValueError, match="buffer"):
        MPSMatrix(torch.zeros(6), descriptor=d)


# -- encode dispatch ----------------------------------------------------------------------------------

def _vec(values, device="cpu"):
    return MPSVector(torch.tensor(values, dtype=torch.float32, device=mpsnn.Device(device).torch_device))


@pytest.mark.parametrize("opt", [SGD, RMS, ADAM])
def test_unknown_form_lists_the_accepted_ones(opt) -> None:
    o = opt("cpu", learning_rate=0.1)
    cb = mpsnn.Device("cpu").make_command_queue().make_command_buffer()
    with pytest.raises(MPSTypeError, match="match no encode form.*input_gradient_vector.*convolution_gradient_state.*batch_normalization_gradient_state"):
        o.encode(cb, input_gradient_vector=_vec([1.0]), result_values_vector=_vec([0.0]))
    with pytest.raises(MPSTypeError, match="positionally"):
        o.encode(cb, _vec([1.0]), _vec([1.0]), _vec([1.0]))
    roles = {SGD: ("input_momentum_vector",), RMS: ("input_sum_of_squares_vector",), ADAM: ("input_momentum_vector", "input_velocity_vector")}
    with pytest.raises(MPSValueError, match="`input_gradient_vector` .*not be None"):
        o.encode(cb, input_gradient_vector=None, input_values_vector=_vec([1.0]), result_values_vector=_vec([1.0]),
                 **{k: _vec([0.0]) for k in roles[opt]})


def test_required_state_operands_of_vector_forms() -> None:
    cb = mpsnn.Device("cpu").make_command_queue().make_command_buffer()
    g, v = _vec([1.0, 2.0]), _vec([0.5, 0.5])
    with pytest.raises(MPSTypeError, match="input_sum_of_squares_vector"):
        RMS("cpu", learning_rate=0.1).encode(cb, input_gradient_vector=g, input_values_vector=v, result_values_vector=v)
    with pytest.raises(MPSTypeError, match="input_velocity_vector"):
        ADAM("cpu", learning_rate=0.1).encode(cb, input_gradient_vector=g, input_values_vector=v, input_momentum_vector=_vec([0.0, 0.0]),
                                              result_values_vector=v)


def test_operand_errors() -> None:
    cb = mpsnn.Device("cpu").make_command_queue().make_command_buffer()
    s = SGD("cpu", learning_rate=0.1)
    with pytest.raises(MPSValueError, match="input_gradient_vector.*3 elements.*2"):
        s.encode(cb, input_gradient_vector=_vec([1.0, 2.0, 3.0]), input_values_vector=_vec([1.0, 2.0]), result_values_vector=_vec([0.0, 0.0]))
    with pytest.raises(MPSTypeError, match="float32"):
        s.encode(cb, input_gradient_vector=torch.ones(2, dtype=torch.float64), input_values_vector=_vec([1.0, 2.0]),
                 result_values_vector=_vec([0.0, 0.0]))
    with pytest.raises(MPSTypeError, match="float32"):
        s.encode(cb, input_gradient_vector=np.ones(2), input_values_vector=_vec([1.0, 2.0]), result_values_vector=_vec([0.0, 0.0]))
    with pytest.raises(MPSTypeError, match="MPSMatrix in the matrix form"):
        s.encode(cb, input_gradient_matrix=_vec([1.0]), input_values_matrix=_vec([1.0]), result_values_matrix=_vec([1.0]))
    with pytest.raises(MPSTypeError, match="MPSVector"):
        s.encode(cb, input_gradient_vector=[1.0], input_values_vector=_vec([1.0]), result_values_vector=_vec([1.0]))
    with pytest.raises(MPSTypeError, match="command_buffer"):
        s.encode(None, input_gradient_vector=_vec([1.0]), input_values_vector=_vec([1.0]), result_values_vector=_vec([1.0]))
    cb.commit()
    with pytest.raises(MPSError, match="committed"):
        s.encode(cb, input_gradient_vector=_vec([1.0]), input_values_vector=_vec([1.0]), result_values_vector=_vec([1.0]))


def test_device_mismatch(device) -> None:
    if not device.is_cuda:
        pytest.skip("needs a CUDA optimizer to mix devices")
    cb = device.make_command_queue().make_command_buffer()
    s = SGD(device, learning_rate=0.1)
    with pytest.raises(MPSDeviceError, match="device"):
        s.encode(cb, input_gradient_vector=_vec([1.0]), input_values_vector=_vec([1.0], device), result_values_vector=_vec([1.0], device))
    with pytest.raises(MPSDeviceError, match="NumPy"):
        s.encode(cb, input_gradient_vector=np.ones(1, np.float32), input_values_vector=_vec([1.0], device),
                 result_values_vector=_vec([1.0], device))
