"""Device-free rules of the ONNX importer: how ONNX tensors live in NHWC images
(mpsnn/io/onnx/layout.py) and ONNX's window sizes and pads (mpsnn/io/onnx/padding.py).

References are independent: the image layout is checked element by element against the axis
map written out by hand, the window rule against torch's own pooling output sizes and a
brute-force enumeration of where ONNX's windows start, and ``auto_pad`` against the ONNX
operator text (out = ceil(L / s), the odd pad at the end for SAME_UPPER).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpsnn.core.enums import MPSImageEdgeMode
from mpsnn.core.errors import MPSValueError
from mpsnn.core.structs import MPSOffset
from mpsnn.io.onnx.layout import broadcast_shapes, nhwc_to_onnx, onnx_to_nhwc, standard_axes
from mpsnn.io.onnx.padding import ONNXPadding, ONNXTransposePadding, axis_pads

AXES = ["n", "h", "w", "c"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.permutations(AXES), st.data())
def test_onnx_to_nhwc_places_every_element_by_its_axis(dims, order, data):
    axes = tuple(order[: len(dims)])
    arr = np.arange(int(np.prod(dims)), dtype=np.float32).reshape(dims)
    img = onnx_to_nhwc(arr, axes)
    assert img.shape == tuple(dims[axes.index(a)] if a in axes else 1 for a in AXES)
    idx = tuple(data.draw(st.integers(0, d - 1)) for d in dims)
    pos = [0, 0, 0, 0]
    for d, a in zip(idx, axes):
        pos[AXES.index(a)] = d
    assert img[tuple(pos)] == arr[idx]
    back = nhwc_to_onnx(img, axes, dims)
    np.testing.assert_array_equal(back, arr)


def test_standard_axes_and_size_one_dimensions():
    assert standard_axes(4) == ("n", "c", "h", "w")
    assert standard_axes(3) == ("n", "c", "w")
    assert standard_axes(2) == ("n", "c")
    assert standard_axes(5) is None
    arr = np.arange(6, dtype=np.float32).reshape(2, 1, 3)
    img = onnx_to_nhwc(arr, ("n", None, "c"))
    assert img.shape == (2, 1, 1, 3)
    np.testing.assert_array_equal(nhwc_to_onnx(img, ("n", None, "c"), (2, 1, 3)), arr)
    with pytest.raises(ValueError):
        onnx_to_nhwc(np.zeros((2, 2, 3)), ("n", None, "c"))  # a dimension of size 2 must be stored


def test_batch_may_differ_but_other_dimensions_may_not():
    img = np.zeros((5, 2, 3, 4), np.float32)
    assert nhwc_to_onnx(img, standard_axes(4), (1, 4, 2, 3)).shape == (5, 4, 2, 3)
    with pytest.raises(ValueError):
        nhwc_to_onnx(img, standard_axes(4), (5, 4, 2, 7))


def test_broadcast_shapes_follows_numpy_and_keeps_unknown_dimensions():
    assert broadcast_shapes("t", (2, 3, 1, 5), (3, 4, 1)) == np.broadcast_shapes((2, 3, 1, 5), (3, 4, 1))
    assert broadcast_shapes("t", (None, 3, 4), (1, 3, 1)) == (None, 3, 4)
    with pytest.raises(ValueError):
        broadcast_shapes("t", (2, 3), (4, 3))


def _onnx_window_count(length, k, s, d, pb, pe, ceil):
    """Enumeration of ONNX's windows (they start at -pb + i*s): floor mode keeps those that
    fit in the padded input; ceil mode adds the one partial window that starts less than a
    stride after the last full one, unless, as the operator text says, it starts in the right
    padded region ("sliding windows that start in the right padded region are ignored")."""
    extent = (k - 1) * d + 1
    starts = list(range(-pb, length + pe, s))
    if ceil:
        return max(1, sum(1 for a in starts if a < length + pe - extent + s and a < length))
    return sum(1 for a in starts if a + extent <= length + pe)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20), st.integers(1, 5), st.integers(1, 4), st.integers(1, 3), st.integers(0, 3), st.integers(0, 3), st.booleans())
def test_explicit_pads_give_onnx_sizes(length, k, s, d, pb, pe, ceil):
    extent = (k - 1) * d + 1
    if length + pb + pe < extent:
        with pytest.raises(MPSValueError):
            axis_pads("t", length, k, s, d, "NOTSET", (pb, pe), ceil)
        return
    _, _, out = axis_pads("t", length, k, s, d, "NOTSET", (pb, pe), ceil)
    assert out == _onnx_window_count(length, k, s, d, pb, pe, ceil)
    if pb == pe and 2 * pb <= extent:  # torch's own rule for symmetric pads
        x = torch.zeros(1, 1, 1, length)
        y = torch.nn.functional.max_pool2d(x, (1, k), (1, s), (0, pb), (1, d), ceil_mode=ceil) if 2 * pb <= k else None
        if y is not None and pb <= k // 2:
            assert y.shape[-1] == out


@pytest.mark.parametrize("auto", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("length,k,s", [(7, 3, 2), (8, 4, 2), (5, 2, 1), (1, 3, 3), (9, 1, 4)])
def test_auto_pad_same(auto, length, k, s):
    pb, pe, out = axis_pads("t", length, k, s, 1, auto, (0, 0), False)
    assert out == math.ceil(length / s)
    total = max((out - 1) * s + k - length, 0)
    assert pb + pe == total
    assert pe - pb == (total % 2 if auto == "SAME_UPPER" else -(total % 2))


def test_valid_ignores_the_pads_attribute():
    assert axis_pads("t", 10, 3, 2, 1, "VALID", (5, 5), False) == (0, 0, 4)


def test_trim_moves_the_ceil_mode_limit_by_the_explicit_end_pad():
    # L = 5, pads (1, 1), k = 2, s = 2, ceil: ONNX gives 3 windows (the 4th would start in the end pad)
    assert axis_pads("t", 5, 2, 2, 1, "NOTSET", (1, 1), True)[2] == 3
    # the same after the pads were made explicit (L = 7, pads 0): trim = end pad keeps it 3
    assert axis_pads("t", 7, 2, 2, 1, "NOTSET", (0, 0), True, trim=1)[2] == 3
    assert axis_pads("t", 7, 2, 2, 1, "NOTSET", (0, 0), True)[2] == 4


class _Kernel:
    def __init__(self):
        self.offset = MPSOffset(0, 0, 3)
        self.edge_mode = MPSImageEdgeMode.zero
        self.kernel_offset_x = self.kernel_offset_y = 0


class _Img:
    def __init__(self, w, h):
        self.width, self.height = w, h


class _Desc:
    width = height = 0


def test_padding_policy_sets_offset_size_and_edge_mode():
    pol = ONNXPadding("t", (3, 4), (2, 1), (1, 2), ((1, 0), (2, 3)), "NOTSET", False, MPSImageEdgeMode.clamp)
    k = _Kernel()
    d = pol.destination_image_descriptor_for_source_images([_Img(10, 9)], None, k, _Desc())
    # H: k=3 s=2 pads (1,0): (9+1-3)//2+1 = 4 ; W: k=4 d=2 (extent 7) s=1 pads (2,3): 10+5-7+1 = 9
    assert (d.height, d.width) == (4, 9)
    # first tap of pixel 0 is -pad_begin: offset - (extent >> 1) = -pad_begin
    assert k.offset == MPSOffset((7 >> 1) - 2, (3 >> 1) - 1, 3)
    assert k.edge_mode == MPSImageEdgeMode.clamp
    assert pol.padding_method & 0x4000  # the custom bit: the kernel calls the hook


def test_transpose_padding_matches_torch_output_sizes():
    for (length, k, s, d, pb, pe, op) in [(5, 3, 2, 1, 1, 1, 1), (4, 4, 2, 1, 1, 1, 0), (3, 3, 3, 2, 0, 2, 2), (6, 1, 1, 1, 0, 0, 0)]:
        pol = ONNXTransposePadding("t", (1, k), (1, s), (1, d), ((0, 0), (pb, pe)), (0, op), None)
        if pb != pe:
            continue
        ref = torch.nn.functional.conv_transpose1d(torch.zeros(1, 1, length), torch.zeros(1, 1, k), stride=s, padding=pb,
                                                   output_padding=op, dilation=d).shape[-1]
        assert pol.axis(1, length)[1] == ref
    # output_shape: total pad split with the odd pixel at the beginning unless SAME_UPPER
    pol = ONNXTransposePadding("t", (3, 3), (2, 2), (1, 1), ((0, 0), (0, 0)), (0, 0), (9, 10))
    assert pol.axis(0, 5) == (1, 9)   # full 11, total 2
    assert pol.axis(1, 5) == (1, 10)  # total 1: begin gets it
    up = ONNXTransposePadding("t", (3, 3), (2, 2), (1, 1), ((0, 0), (0, 0)), (0, 0), (9, 10), "SAME_UPPER")
    assert up.axis(1, 5) == (0, 10)
    with pytest.raises(MPSValueError):
        ONNXTransposePadding("t", (3, 3), (2, 2), (1, 1), ((0, 0), (0, 0)), (0, 0), (30, 30)).axis(0, 5)
