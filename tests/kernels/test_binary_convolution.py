"""MPSCNNBinaryConvolution and MPSCNNBinaryFullyConnected (convolution.md §15) through the public API.

Oracle: ``reference_conv.binary_convolution_forward`` / ``binary_fully_connected_forward``
(float64, validated in tests/null/test_reference_conv.py). Weights are uint32 words
``[Cout][kH][kW][ceil(Cin/32)]``, bit ``t`` of word ``w`` = input channel ``32·w + t``; the
bits past ``Cin`` in the last word are set to 1 here so that a kernel reading them would fail.
Inputs contain exact zeros and values equal to ``−input_bias`` (``x' = 0`` binarises to +1).

Note on β with zero edges and a non-zero input bias: the reference reads the per-pixel image
``A = mean_c |x'|`` with the edge mode (``A = 0`` off-image for zero edges), while the taps
themselves read ``x' = (0 + input_bias)·input_scale`` off-image (convolution.md §15.2, literal).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import mpsnn as m
from mpsnn import MPSCNNBinaryConvolutionFlags as BF
from mpsnn import MPSCNNBinaryConvolutionType as BT
from mpsnn import MPSCNNNeuronType as T
from mpsnn import MPSImageEdgeMode, MPSOffset
from mpsnn.testing import reference_conv as R
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import Tol, assert_close

F32 = torch.float32
#: Per-op override: binaryWeights sums Cin·kH·kW float products (~60 of magnitude <= 2); the
#: binarised types sum small integers exactly, then scale by β (a float32 mean).
BIN_TOL = {"float32": Tol(1e-5, 1e-5)}
TYPES = [pytest.param(t, id=t.name) for t in (BT.binaryWeights, BT.XNOR, BT.AND)]
BETA = [pytest.param(BF.none, id="no_beta"), pytest.param(BF.useBetaScaling, id="beta")]
EDGES = [pytest.param(MPSImageEdgeMode.zero, id="zero"), pytest.param(MPSImageEdgeMode.clamp, id="clamp")]


def rand(seed: int, shape: tuple[int, ...], lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape)


def binary_weights(seed: int, cout: int, kh: int, kw: int, cin: int) -> tuple[np.ndarray, np.ndarray]:
    """Random bits ``[Cout][kH][kW][Cin]`` and their packed words, with every unused bit of the
    last word set (those bits must not contribute)."""
    bits = np.random.default_rng(seed).integers(0, 2, (cout, kh, kw, cin))
    words = R.pack_binary_weights(bits)
    if cin % 32:
        words[..., -1] |= np.uint32((0xFFFFFFFF << (cin % 32)) & 0xFFFFFFFF)
    assert np.array_equal(R.unpack_binary_weights(words, cin), bits)
    return bits, words


def source(seed: int, shape: tuple[int, ...], input_bias: np.ndarray | None = None) -> np.ndarray:
    """Random values with exact zeros and (with an input bias) values equal to −input_bias[f],
    both of which binarise to +1."""
    x = rand(seed, shape).astype(np.float32).astype(np.float64)
    r = np.random.default_rng(seed + 1)
    x[r.random(shape) < 0.1] = 0.0
    if input_bias is not None:
        hit = r.random(shape) < 0.1
        x[hit] = np.broadcast_to(-input_bias, shape)[hit]
    return x


def descriptor(kernel: tuple[int, int], cin: int, cout: int, stride: tuple[int, int] = (1, 1)) -> m.MPSCNNConvolutionDescriptor:
    d = m.MPSCNNConvolutionDescriptor(kernel_width=kernel[0], kernel_height=kernel[1], input_feature_channels=cin, output_feature_channels=cout)
    d.stride_in_pixels_x, d.stride_in_pixels_y = stride
    return d


def f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32)


# -- the two initialisers x three types x beta x edge mode ------------------------------------------------------


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("flags", BETA)
@pytest.mark.parametrize("btype", TYPES)
@pytest.mark.parametrize("cin", [5, 40], ids=["cin5", "cin40_two_words"])
def test_binary_convolution_scale_value(device, cb, cin, btype, flags, edge) -> None:
    """``(device, convolution_data, scale_value, type, flags)``: one output scale, output bias
    from the data source's ``bias_terms``, input bias 0 and scale 1."""
    cout, kernel, stride = 6, (3, 2), (2, 1)
    _, words = binary_weights(cin + int(btype), cout, kernel[1], kernel[0], cin)
    bias = f32(rand(3, (cout,)))
    ds = m.ConvolutionDataSource(descriptor(kernel, cin, cout, stride), words, bias, label="bin")
    assert ds.data_type() == m.MPSDataType.uInt32
    scale = float(np.float32(0.75))
    bc = m.MPSCNNBinaryConvolution(device, ds, scale, type=btype, flags=flags)
    assert (bc.input_feature_channels, bc.output_feature_channels) == (cin, cout) and bc.label == "bin"
    assert ds.load_count == ds.purge_count
    bc.edge_mode = edge
    x_img, x = image(source(7, (2, 5, 6, cin)), device)
    dst, before = poisoned((2, 5, 3, cout), device)
    bc.encode(cb, x_img, dst)                        # offset 0: windows overhang the top/left edges
    finish(cb)
    expected = R.binary_convolution_forward(x, words, kernel=kernel, cin=cin, cout=cout, type=int(btype), flags=int(flags),
                                            output_scale=scale, output_bias=bias, stride=stride, dest=before,
                                            edge_mode="zero" if edge == MPSImageEdgeMode.zero else "clamp")
    assert_close(values(dst), expected, F32, BIN_TOL)


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("flags", BETA)
@pytest.mark.parametrize("btype", TYPES)
def test_binary_convolution_per_channel_arrays(device, cb, btype, flags, edge) -> None:
    """``(device, convolution_data, output_bias_terms, output_scale_terms, input_bias_terms,
    input_scale_terms, type, flags)``; some input scales are negative (they flip the
    binarisation threshold)."""
    cin, cout, kernel = 7, 5, (3, 3)
    _, words = binary_weights(11 + int(btype), cout, 3, 3, cin)
    ob, os_ = f32(rand(12, (cout,))), f32(rand(13, (cout,), 0.5, 2.0))
    ib, is_ = f32(rand(14, (cin,), -0.5, 0.5)), f32(rand(15, (cin,), 0.5, 2.0) * np.where(np.arange(cin) % 3 == 0, -1, 1))
    ds = m.ConvolutionDataSource(descriptor(kernel, cin, cout), words, f32(rand(16, (cout,))))   # bias_terms unused here
    bc = m.MPSCNNBinaryConvolution(device, ds, output_bias_terms=ob, output_scale_terms=os_, input_bias_terms=ib, input_scale_terms=is_,
                                   type=btype, flags=flags)
    bc.edge_mode = edge
    bc.offset = MPSOffset(0, 1, 0)
    x_img, x = image(source(17, (1, 5, 6, cin), ib.astype(np.float64)), device)
    dst, before = poisoned((1, 5, 6, cout + 4), device)
    bc.destination_feature_channel_offset = 4
    bc.encode(cb, x_img, dst)
    finish(cb)
    expected = R.binary_convolution_forward(x, words, kernel=kernel, cin=cin, cout=cout, type=int(btype), flags=int(flags),
                                            output_scale=os_, output_bias=ob, input_scale=is_, input_bias=ib, offset=(0, 1, 0),
                                            edge_mode="zero" if edge == MPSImageEdgeMode.zero else "clamp", dest=before, dst_c_off=4)
    got = values(dst)
    assert np.isnan(got[..., :4]).all(), "channels before destination_feature_channel_offset untouched"
    assert_close(got, expected, F32, BIN_TOL)


def test_binary_convolution_arrays_default_to_identity(device, cb) -> None:
    """None arrays mean output bias 0, output scale 1, input bias 0, input scale 1; the data
    source's bias_terms belong to the scale_value form only."""
    cin, cout = 4, 3
    _, words = binary_weights(21, cout, 3, 3, cin)
    ds = m.ConvolutionDataSource(descriptor((3, 3), cin, cout), words, f32(rand(22, (cout,))))
    scale = f32(np.ones(cout))
    bc = m.MPSCNNBinaryConvolution(device, ds, output_scale_terms=scale, type=BT.XNOR)
    x_img, x = image(source(23, (1, 4, 5, cin)), device)
    y = bc.encode(cb, x_img)
    finish(cb)
    assert y.shape == (1, 2, 3, cout), "default padding sizeValidOnly"
    assert bc.offset == MPSOffset(1, 1, 0)
    expected = R.binary_convolution_forward(x, words, kernel=(3, 3), cin=cin, cout=cout, type="XNOR", offset=(1, 1, 0), dest_shape=y.shape)
    assert_close(values(y), expected, F32, BIN_TOL)


def test_binary_convolution_neuron_and_geometry(device, cb) -> None:
    """The descriptor's neuron is applied last; clip rectangle, source channel offset and a
    multi-image source with offset.z."""
    cin, cout = 3, 4
    desc = descriptor((2, 3), cin, cout)
    desc.fused_neuron_descriptor = m.MPSNNNeuronDescriptor.cnn_neuron_descriptor(T.reLU, a=0.1)
    _, words = binary_weights(31, cout, 3, 2, cin)
    bias = f32(rand(32, (cout,), -3.0, 0.0))
    bc = m.MPSCNNBinaryConvolution(device, m.ConvolutionDataSource(desc, words, bias), 0.5, type=BT.binaryWeights, flags=BF.useBetaScaling)
    bc.offset = MPSOffset(1, 0, 1)
    bc.clip_rect = m.MTLRegion(m.MTLOrigin(1, 1, 0), m.MTLSize(3, 2, 1))
    bc.source_feature_channel_offset = 4
    bc.edge_mode = MPSImageEdgeMode.clamp
    x_img, x = image(source(33, (2, 4, 5, 8)), device)
    dst, before = poisoned((1, 4, 5, cout), device)
    bc.encode(cb, x_img, dst)
    finish(cb)
    expected = R.binary_convolution_forward(x, words, kernel=(2, 3), cin=cin, cout=cout, type="binaryWeights", flags=1, output_scale=0.5,
                                            output_bias=bias, offset=(1, 0, 1), edge_mode="clamp", neuron=(T.reLU, 0.1), dest=before,
                                            clip_rect=((1, 1, 0), (3, 2, 1)), src_c_off=4)
    got = values(dst)
    assert (expected[~np.isnan(expected)] < 0).any(), "the leaky ReLU acts on some outputs"
    assert_close(got, expected, F32, BIN_TOL)


def test_binary_convolution_encode_batch_auto_same_padding(device, cb) -> None:
    cin, cout = 6, 4
    _, words = binary_weights(41, cout, 3, 3, cin)
    bc = m.MPSCNNBinaryConvolution(device, m.ConvolutionDataSource(descriptor((3, 3), cin, cout, (2, 2)), words), 1.5, type=BT.AND,
                                   flags=BF.useBetaScaling)
    bc.padding = int(m.MPSNNPaddingMethod.sizeSame)
    xs = [image(source(42 + k, (1, 5, 5, cin)), device) for k in range(2)]
    ys = bc.encode_batch(cb, [i for i, _ in xs])
    finish(cb)
    assert bc.offset == MPSOffset(0, 0, 0)
    for (_, x), y in zip(xs, ys):
        assert y.shape == (1, 3, 3, cout)
        expected = R.binary_convolution_forward(x, words, kernel=(3, 3), cin=cin, cout=cout, type="AND", flags=1, output_scale=1.5,
                                                stride=(2, 2), dest_shape=y.shape)
        assert_close(values(y), expected, F32, BIN_TOL)


# -- binary fully connected -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", BETA)
@pytest.mark.parametrize("btype", TYPES)
def test_binary_fully_connected(device, cb, btype, flags) -> None:
    """Bits ``[Cout][kH][kW][words]`` (H before W, §15.3) with ``kW = Ws != kH = Hs``."""
    n, hs, ws, cin, cout = 2, 2, 3, 37, 5
    bits, words = binary_weights(51 + int(btype), cout, hs, ws, cin)
    bias = f32(rand(52, (cout,)))
    ds = m.ConvolutionDataSource(descriptor((ws, hs), cin, cout), words, bias)
    fc = m.MPSCNNBinaryFullyConnected(device, ds, 0.25, type=btype, flags=flags)
    assert int(fc.padding.padding_method) == int(m.MPSNNPaddingMethod.sizeValidOnly)
    x_img, x = image(source(53, (n, hs, ws, cin)), device)
    y = fc.encode(cb, x_img)
    finish(cb)
    assert y.shape == (n, 1, 1, cout)
    expected = R.binary_fully_connected_forward(x, words, cin=cin, cout=cout, type=int(btype), flags=int(flags), output_scale=0.25, output_bias=bias)
    assert_close(values(y), expected, F32, BIN_TOL)
    # the same words read W before H would give another result: the order is tested
    misread = R.pack_binary_weights(bits.reshape(cout, ws, hs, cin).transpose(0, 2, 1, 3))
    assert not np.allclose(expected, R.binary_fully_connected_forward(x, misread, cin=cin, cout=cout, type=int(btype), flags=int(flags),
                                                                      output_scale=0.25, output_bias=bias))


def test_binary_fully_connected_per_channel_arrays(device, cb) -> None:
    hs, ws, cin, cout = 3, 2, 4, 3
    _, words = binary_weights(61, cout, hs, ws, cin)
    ib, is_ = f32(rand(62, (cin,), -0.3, 0.3)), f32(rand(63, (cin,), 0.5, 1.5))
    os_, ob = f32(rand(64, (cout,), 0.5, 1.5)), f32(rand(65, (cout,)))
    fc = m.MPSCNNBinaryFullyConnected(device, m.ConvolutionDataSource(descriptor((ws, hs), cin, cout), words), output_bias_terms=ob,
                                      output_scale_terms=os_, input_bias_terms=ib, input_scale_terms=is_, type=BT.XNOR, flags=BF.useBetaScaling)
    x_img, x = image(source(66, (2, hs, ws, cin), ib.astype(np.float64)), device)
    dst, before = poisoned((2, 1, 1, cout), device)
    fc.encode(cb, x_img, dst)
    finish(cb)
    expected = R.binary_fully_connected_forward(x, words, cin=cin, cout=cout, type="XNOR", flags=1, output_scale=os_, output_bias=ob,
                                                input_scale=is_, input_bias=ib)
    assert_close(values(dst), expected, F32, BIN_TOL)


# -- errors -------------------------------------------------------------------------------------------------------


def _words(cout: int, kh: int, kw: int, cin: int) -> Any:
    return np.zeros((cout, kh, kw, (cin + 31) // 32), np.uint32)


def test_error_binary_groups_and_dilation(device) -> None:
    d = descriptor((3, 3), 8, 8)
    d.groups = 2
    with pytest.raises(m.MPSError, match=r"MPSCNNBinaryConvolution.*groups"):
        m.MPSCNNBinaryConvolution(device, m.ConvolutionDataSource(d, np.zeros((8, 3, 3, 1), np.uint32)), 1.0)
    d = descriptor((3, 3), 4, 4)
    d.dilation_rate_x = 2
    with pytest.raises(m.MPSError, match=r"MPSCNNBinaryConvolution.*dilation"):
        m.MPSCNNBinaryConvolution(device, m.ConvolutionDataSource(d, _words(4, 3, 3, 4)), 1.0)


def test_error_binary_arrays_and_channels(device, cb) -> None:
    ds = m.ConvolutionDataSource(descriptor((3, 3), 4, 3), _words(3, 3, 3, 4))
    with pytest.raises(m.MPSError, match=r"MPSCNNBinaryConvolution.*input_bias_terms"):
        m.MPSCNNBinaryConvolution(device, ds, input_bias_terms=np.zeros(3, np.float32))
    with pytest.raises(m.MPSError, match=r"MPSCNNBinaryConvolution.*weights"):
        m.MPSCNNBinaryConvolution(device, m.ConvolutionDataSource(descriptor((3, 3), 4, 3), np.zeros((3, 3, 3, 2), np.uint32)), 1.0)
    bc = m.MPSCNNBinaryConvolution(device, ds, 1.0)
    x3, _ = image(rand(1, (1, 4, 4, 3)), device)
    with pytest.raises(m.MPSError, match=r"MPSCNNBinaryConvolution.*source_image\.feature_channels"):
        bc.encode(cb, x3)
    x4, _ = image(rand(2, (1, 4, 4, 4)), device)
    with pytest.raises(m.MPSError, match=r"MPSCNNBinaryConvolution.*destination_image\.feature_channels"):
        bc.encode(cb, x4, poisoned((1, 2, 2, 2), device)[0])
    fc = m.MPSCNNBinaryFullyConnected(device, ds, 1.0)
    with pytest.raises(m.MPSError, match=r"MPSCNNBinaryFullyConnected.*source_image"):
        fc.encode(cb, x4)                             # 4x4 source, 3x3 kernel
