"""Padding policies and result-size rules (kernel-base.md §6), device-free.

The reference below is re-written from the spec text (§6.2) with its own C division (via
``fractions.Fraction`` and ``math.trunc``); nothing is shared with ``mpsnn.core.padding``.
Taps follow the destination -> source rule of kernel-base.md §2.2.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mpsnn
from mpsnn import MPSImage, MPSImageDescriptor, MPSNNDefaultPadding
from mpsnn import MPSNNPaddingMethod as PM
from mpsnn.core import padding as P

ALIGNS = {"centered": 0, "topLeft": 1, "bottomRight": 2}
REMAINDERS = {"TL": 0, "TR": 4, "BL": 8, "BR": 12}
SIZES = {"valid": 0, "same": 16, "full": 32}
STYLE = {0: -1, 16: 0, 32: 1}


# --------------------------------------------------------------------------------------------
# independent reference (kernel-base.md §6.2)
# --------------------------------------------------------------------------------------------
def c_div(a: int, b: int) -> int:
    return math.trunc(Fraction(a, b))


def ref_dest(src, s, win, style):
    n = src + style * (win - 1)
    return c_div(n + s - 1, s)


def ref_dest_reverse(src, s, win, style):
    return (src - 1) * s + 1 + style * (win - 1)


def ref_r(method, axis):
    rem = method & 0xC
    if axis == "x":
        return 1 if rem in (0, 8) else 0   # TopLeft, BottomLeft
    return 1 if rem in (0, 4) else 0       # TopLeft, TopRight


def ref_left(extra, method, axis):
    align = method & 0x3
    if align == 0:
        return c_div(extra + ref_r(method, axis), 2)
    if align == 1:
        return extra
    return 0


def ref_offset(src, s, win, method, axis):
    style = STYLE[method & 0x7F0]
    dest = ref_dest(src, s, win, style)
    read = (dest - 1) * s + win
    return win // 2 - ref_left(read - src, method, axis)


def ref_reverse_kernel_offset(src, s, win, method, axis):
    style = STYLE[method & 0x7F0]
    dest = ref_dest_reverse(src, s, win, style)
    extra = (dest - 1) + win - ((src - 1) * s + 1)
    return win // 2 - ref_left(extra, method, axis)


def taps(offset, i, s, k, d):
    """Source positions read by destination pixel ``i`` (clip origin 0), §2.2."""
    win = (k - 1) * d + 1
    left = offset + i * s - (win >> 1)
    return [left + p * d for p in range(k)]


# --------------------------------------------------------------------------------------------
# §6.3 worked examples, row by row
# --------------------------------------------------------------------------------------------
TL_SAME = 0x10
BR_SAME = 0x1C
TABLE = [
    # src, k, s, d, method, dest, read, extra, left, offset, taps of dest 0
    (7, 3, 2, 1, TL_SAME, 4, 9, 2, 1, 0, [-1, 0, 1]),
    (7, 3, 2, 1, 0x00, 3, 7, 0, 0, 1, [0, 1, 2]),
    (7, 3, 2, 1, 0x20, 5, 11, 4, 2, -1, [-2, -1, 0]),
    (4, 2, 1, 1, TL_SAME, 4, 5, 1, 1, 0, [-1, 0]),
    (4, 2, 1, 1, BR_SAME, 4, 5, 1, 0, 1, [0, 1]),
    (10, 3, 2, 1, 0x00, 4, 9, -1, 0, 1, [0, 1, 2]),
    (10, 3, 2, 1, 0x0C, 4, 9, -1, 0, 1, [0, 1, 2]),
    (5, 3, 1, 2, TL_SAME, 5, 9, 4, 2, 0, [-2, 0, 2]),
]


@pytest.mark.parametrize("src,k,s,d,method,dest,read,extra,left,offset,tap0", TABLE)
def test_worked_examples(src, k, s, d, method, dest, read, extra, left, offset, tap0):
    win = P.dilated_window(k, d)
    assert win == (k - 1) * d + 1
    style = P.size_style(method)
    assert P.dest_size(src, s, win, style) == dest
    assert (dest - 1) * s + win == read and read - src == extra
    for axis in ("x", "y"):
        assert P.left_pad(extra, method, axis) == left
        assert P.padding_offset(src, s, win, method, axis) == offset
    r = P.apply_padding_method(method, src, src, k, k, s, s, d, d)
    assert (r.width, r.height, r.offset_x, r.offset_y) == (dest, dest, offset, offset)
    assert taps(offset, 0, s, k, d) == tap0
    # the reference agrees with the table too
    assert ref_dest(src, s, win, style) == dest and ref_offset(src, s, win, method, "x") == offset


# --------------------------------------------------------------------------------------------
# exhaustive small ranges against the reference
# --------------------------------------------------------------------------------------------
def test_all_combinations_against_reference():
    bad = []
    for a_name, align in ALIGNS.items():
        for r_name, rem in REMAINDERS.items():
            for s_name, size in SIZES.items():
                method = align | rem | size
                style = STYLE[size]
                for src in range(1, 10):
                    for k in range(1, 6):
                        for s in range(1, 4):
                            for d in (1, 2, 3):
                                win = (k - 1) * d + 1
                                got = (P.dest_size(src, s, win, style), P.padding_offset(src, s, win, method, "x"),
                                       P.padding_offset(src, s, win, method, "y"), P.dest_size_reverse(src, s, win, style),
                                       P.reverse_kernel_offset(src, s, win, method, "x"), P.reverse_kernel_offset(src, s, win, method, "y"))
                                want = (ref_dest(src, s, win, style), ref_offset(src, s, win, method, "x"),
                                        ref_offset(src, s, win, method, "y"), ref_dest_reverse(src, s, win, style),
                                        ref_reverse_kernel_offset(src, s, win, method, "x"), ref_reverse_kernel_offset(src, s, win, method, "y"))
                                if got != want:
                                    bad.append((a_name, r_name, s_name, src, k, s, d, got, want))
    assert not bad, bad[:10]


@pytest.mark.parametrize("rem", list(REMAINDERS.values()), ids=list(REMAINDERS))
def test_remainder_bits_per_axis(rem):
    # src 4, k 2, s 1, same: one extra pixel; it goes left/top when r = 1
    method = rem | 0x10
    r = P.apply_padding_method(method, 4, 4, 2, 2)
    x_left = rem in (0, 8)
    y_top = rem in (0, 4)
    assert r.offset_x == (0 if x_left else 1)
    assert r.offset_y == (0 if y_top else 1)
    assert P.remainder_left(method, "x") == int(x_left) and P.remainder_left(method, "y") == int(y_top)


def test_apply_padding_method_axes_independent():
    # x: src 7, k 3, s 2; y: src 10, k 5, s 1, d 2 — each axis from its own parameters
    for method in (0x00, 0x10, 0x20, 0x1C, 0x14, 0x18, 0x01, 0x12, 0x21):
        r = P.apply_padding_method(method, 7, 10, 3, 5, 2, 1, 1, 2)
        assert (r.width, r.offset_x) == (ref_dest(7, 2, 3, STYLE[method & 0x7F0]), ref_offset(7, 2, 3, method, "x"))
        assert (r.height, r.offset_y) == (ref_dest(10, 1, 9, STYLE[method & 0x7F0]), ref_offset(10, 1, 9, method, "y"))
        assert (r.kernel_offset_x, r.kernel_offset_y) == (0, 0)


def test_reverse_sizes():
    assert [P.dest_size_reverse(4, 2, 3, st_) for st_ in (-1, 0, 1)] == [5, 7, 9]
    assert [P.dest_size_reverse(5, 1, 3, st_) for st_ in (-1, 0, 1)] == [3, 5, 7]
    r = P.apply_padding_method(0x10, 4, 3, 3, 3, 2, 2, is_backwards=True)
    assert (r.width, r.height, r.offset_x, r.offset_y) == (7, 5, 0, 0)
    assert r.kernel_offset_x == ref_reverse_kernel_offset(4, 2, 3, 0x10, "x")
    assert r.kernel_offset_y == ref_reverse_kernel_offset(3, 2, 3, 0x10, "y")
    r = P.apply_padding_method(0x20, 4, 4, 3, 3, 2, 2, is_backwards=True)
    assert (r.width, r.height) == (9, 9)


@given(src=st.integers(1, 200), k=st.integers(1, 9), d=st.integers(1, 4))
def test_reverse_with_inverse_policy_restores_unit_stride_sizes(src, k, d):
    win = (k - 1) * d + 1
    for size in (0, 16, 32):
        fwd = P.dest_size(src, 1, win, STYLE[size])
        if fwd < 1:
            continue
        inv = P.inverse_padding_method(size)
        assert P.dest_size_reverse(fwd, 1, win, P.size_style(inv)) == src


# --------------------------------------------------------------------------------------------
# hypothesis properties
# --------------------------------------------------------------------------------------------
@given(a=st.integers(-10 ** 9, 10 ** 9), b=st.integers(-1000, 1000).filter(lambda v: v != 0))
def test_cdiv_is_c_division(a, b):
    q = P.cdiv(a, b)
    assert q == c_div(a, b)
    assert q * b + (a - q * b) == a and abs(a - q * b) < abs(b)
    assert (a - q * b) == 0 or (a - q * b > 0) == (a > 0)  # remainder takes the dividend's sign


def test_cdiv_examples():
    assert [P.cdiv(-1, 2), P.cdiv(-3, 2), P.cdiv(3, -2), P.cdiv(-3, -2), P.cdiv(7, 2), P.cdiv(0, 5)] == [0, -1, -1, 1, 3, 0]
    assert P.cdiv(-1, 2) != -1 // 2


methods = st.builds(lambda a, r: a | r, st.sampled_from([0, 1, 2]), st.sampled_from([0, 4, 8, 12]))


@given(src=st.integers(1, 500), s=st.integers(1, 8), k=st.integers(1, 9), d=st.integers(1, 4))
def test_same_is_ceil_src_over_stride(src, s, k, d):
    win = (k - 1) * d + 1
    assert P.dest_size(src, s, win, 0) == -(-src // s)
    r = P.apply_padding_method(0x10, src, src, k, k, s, s, d, d)
    assert r.width == r.height == -(-src // s)


@settings(max_examples=300)
@given(src=st.integers(1, 60), s=st.integers(1, 5), k=st.integers(1, 7), d=st.integers(1, 3), m=methods)
def test_valid_only_taps_all_inside(src, s, k, d, m):
    win = (k - 1) * d + 1
    method = m | 0x00
    dest = P.dest_size(src, s, win, -1)
    if dest < 1:
        assert src < win  # no valid position exists
        return
    off = P.padding_offset(src, s, win, method, "x")
    for i in range(dest):
        assert all(0 <= t < src for t in taps(off, i, s, k, d)), (i, taps(off, i, s, k, d))
    # largest such result: dest + 1 windows of stride s do not fit into the source
    assert dest * s + win > src


@settings(max_examples=300)
@given(src=st.integers(1, 60), s=st.integers(1, 5), k=st.integers(1, 7), rem=st.sampled_from([0, 4, 8, 12]))
def test_full_every_pixel_has_a_tap_inside(src, s, k, rem):
    # undilated windows (taps are contiguous); centred alignment as for every default policy
    method = rem | 0x20
    dest = P.dest_size(src, s, k, 1)
    for axis in ("x", "y"):
        off = P.padding_offset(src, s, k, method, axis)
        for i in range(dest):
            assert any(0 <= t < src for t in taps(off, i, s, k, 1)), (axis, i, taps(off, i, s, k, 1))
    # adding one more pixel would not work: no dest + 1 windows of stride s all touch the source
    # (window starts p, p+s, ..., p+dest*s must all lie in [-(k-1), src-1])
    assert dest * s > (src - 1) + (k - 1)


# --------------------------------------------------------------------------------------------
# enum raw values, MPSNNDefaultPadding, inverse, TensorFlow policies
# --------------------------------------------------------------------------------------------
def test_padding_method_raw_values():
    expect = {
        "alignCentered": 0, "alignTopLeft": 1, "alignBottomRight": 2, "align_reserved": 3, "alignMask": 3,
        "addRemainderToTopLeft": 0, "addRemainderToTopRight": 4, "addRemainderToBottomLeft": 8,
        "addRemainderToBottomRight": 12, "addRemainderToMask": 0xC,
        "sizeValidOnly": 0, "sizeSame": 16, "sizeFull": 32, "size_reserved": 48, "sizeMask": 0x7F0,
        "customWhitelistForNodeFusion": 0x2000, "customAllowForNodeFusion": 0x2000, "custom": 0x4000, "excludeEdges": 0x8000,
    }
    for name, v in expect.items():
        assert int(getattr(PM, name)) == v, name
    assert int(PM.alignCentered | PM.addRemainderToTopLeft | PM.sizeSame) == 0x10
    assert int(PM.alignCentered | PM.addRemainderToBottomRight | PM.sizeSame) == 0x1C
    assert P.size_style(PM.sizeValidOnly) == -1 and P.size_style(PM.sizeSame) == 0 and P.size_style(PM.sizeFull) == 1


def test_padding_with_method_is_shared():
    a = MPSNNDefaultPadding.padding_with_method(PM.sizeSame)
    assert MPSNNDefaultPadding.padding_with_method(0x10) is a
    assert int(a.padding_method) == 0x10
    b = MPSNNDefaultPadding.padding_with_method(0x1C)
    assert b is not a and int(b.padding_method) == 0x1C
    for m in (0x00, 0x20, 0x01, 0x2E, 0x8010, 0x2010):
        p = MPSNNDefaultPadding.padding_with_method(m)
        assert int(p.padding_method) == m and MPSNNDefaultPadding.padding_with_method(m) is p
        assert isinstance(p, mpsnn.MPSNNPadding) and isinstance(p.label, str) and p.label


@pytest.mark.parametrize("bad", [0x4010, 0x4000, 0x13, 0x30, 0x40])
def test_padding_with_method_rejects(bad):
    with pytest.raises(mpsnn.MPSValueError):
        MPSNNDefaultPadding.padding_with_method(bad)


def test_inverse_swaps_valid_and_full():
    for align in (0, 1, 2):
        for rem in (0, 4, 8, 12):
            for size, inv in ((0, 32), (32, 0), (16, 16)):
                p = MPSNNDefaultPadding.padding_with_method(align | rem | size)
                q = p.inverse()
                assert int(q.padding_method) == align | rem | inv
                assert q is MPSNNDefaultPadding.padding_with_method(align | rem | inv)
                assert q.inverse() is p
    assert int(MPSNNDefaultPadding.padding_with_method(0x8000).inverse().padding_method) == 0x8020


def test_tensorflow_pooling_policies():
    same = MPSNNDefaultPadding.padding_for_tensorflow_average_pooling()
    valid = MPSNNDefaultPadding.padding_for_tensorflow_average_pooling_valid_only()
    assert int(same.padding_method) == 0x401C
    assert int(valid.padding_method) == 0x4000
    assert int(same.inverse().padding_method) == 0x401C and int(valid.inverse().padding_method) == 0x4020
    for policy in (same, valid, same.inverse(), valid.inverse()):
        k = mpsnn.MPSCNNNeuronReLU("cpu")
        assert k.edge_mode == mpsnn.MPSImageEdgeMode.zero
        d = MPSImageDescriptor(width=3, height=3)
        assert policy.destination_image_descriptor_for_source_images([], None, k, d) is d
        assert k.edge_mode == mpsnn.MPSImageEdgeMode.clamp


def test_tensorflow_hook_runs_in_kernel_pipeline():
    img = _image(7, 5)
    k = mpsnn.MPSCNNNeuronReLU("cpu")
    k.padding = MPSNNDefaultPadding.padding_for_tensorflow_average_pooling()
    d = k.destination_image_descriptor([img])
    assert k.edge_mode == mpsnn.MPSImageEdgeMode.clamp
    assert (d.width, d.height) == (7, 5)
    plain = mpsnn.MPSCNNNeuronReLU("cpu")
    plain.padding = MPSNNDefaultPadding.padding_with_method(0x1C)
    plain.destination_image_descriptor([img])
    assert plain.edge_mode == mpsnn.MPSImageEdgeMode.zero


def test_non_custom_hook_returns_suggested():
    p = MPSNNDefaultPadding.padding_with_method(0x10)
    k = mpsnn.MPSCNNNeuronReLU("cpu")
    d = MPSImageDescriptor()
    assert p.destination_image_descriptor_for_source_images([], None, k, d) is d
    assert k.edge_mode == mpsnn.MPSImageEdgeMode.zero


# --------------------------------------------------------------------------------------------
# kernel-level: destination_image_descriptor sets offset and size from the padding
# --------------------------------------------------------------------------------------------
def _image(w, h, c=4, n=1, fmt=mpsnn.MPSImageFeatureChannelFormat.float16):
    return MPSImage("cpu", image_descriptor=MPSImageDescriptor(channel_format=fmt, width=w, height=h, feature_channels=c, number_of_images=n))


class _Window3x3Stride2(mpsnn.MPSCNNKernel):
    _kernel_width = 3
    _kernel_height = 3
    _stride_x = 2
    _stride_y = 2


class _Dilated3x3(mpsnn.MPSCNNKernel):
    _kernel_width = 3
    _kernel_height = 3
    _dilation_x = 2
    _dilation_y = 2


def test_kernel_default_padding_is_generic_default():
    k = mpsnn.MPSCNNNeuronReLU("cpu")
    assert int(k.padding.padding_method) == 0x10
    assert k.padding is MPSNNDefaultPadding.padding_with_method(0x10)


@pytest.mark.parametrize("method", [0x10, 0x00, 0x20, 0x1C, 0x0C, 0x01, 0x22, 0x8010])
def test_neuron_descriptor_is_source_sized(method):
    img = _image(7, 5, c=9, n=3)
    k = mpsnn.MPSCNNNeuronReLU("cpu")
    k.padding = method  # a bare method is accepted
    k.offset = mpsnn.MPSOffset(3, -2, 1)
    d = k.destination_image_descriptor([img])
    assert (d.width, d.height, d.feature_channels, d.number_of_images) == (7, 5, 9, 3)
    assert d.channel_format == mpsnn.MPSImageFeatureChannelFormat.float16
    assert k.offset == mpsnn.MPSOffset(0, 0, 1)  # x, y from padding; z kept
    assert not img.is_allocated
    k.source_feature_channel_offset = 4
    assert k.destination_image_descriptor(img).feature_channels == 5


# x: src 7 and y: src 10, k 3, s 2 (table rows 1-3, 6, 7; y rows worked out in the comments)
@pytest.mark.parametrize("method,w,ox,h,oy", [
    (0x10, 4, 0, 5, 0),     # same TL; y: 10 -> 5, read 11, extra 1, left (1+1)/2 = 1, offset 0
    (0x00, 3, 1, 4, 1),     # valid TL (rows 2 and 6)
    (0x0C, 3, 1, 4, 1),     # valid BR (row 7 for y)
    (0x20, 5, -1, 6, -1),   # full (row 3); y: 10 -> 6, read 13, extra 3, left (3+1)/2 = 2, offset -1
])
def test_windowed_kernel_descriptor_and_offset(method, w, ox, h, oy):
    img = _image(7, 10)
    k = _Window3x3Stride2("cpu")
    assert (k.kernel_width, k.kernel_height, k.stride_in_pixels_x, k.stride_in_pixels_y) == (3, 3, 2, 2)
    k.padding = MPSNNDefaultPadding.padding_with_method(method)
    d = k.destination_image_descriptor([img])
    want = (ref_dest(7, 2, 3, STYLE[method & 0x7F0]), ref_offset(7, 2, 3, method, "x"),
            ref_dest(10, 2, 3, STYLE[method & 0x7F0]), ref_offset(10, 2, 3, method, "y"))
    assert (d.width, k.offset.x, d.height, k.offset.y) == want == (w, ox, h, oy)


def test_windowed_kernel_tf_same_offsets():
    # TF SAME, x: 7 -> 4, extra 2, left (2+0)/2 = 1, offset 0; y: 10 -> 5, extra 1, left (1+0)/2 = 0, offset 1
    k = _Window3x3Stride2("cpu")
    k.padding = 0x1C
    d = k.destination_image_descriptor([_image(7, 10)])
    assert (d.width, d.height, k.offset.x, k.offset.y) == (4, 5, 0, 1)


def test_dilated_kernel_row():
    k = _Dilated3x3("cpu")
    assert (k.dilation_rate_x, k.dilation_rate_y) == (2, 2)
    d = k.destination_image_descriptor([_image(5, 5)])
    assert (d.width, d.height, k.offset.x, k.offset.y) == (5, 5, 0, 0)
    assert taps(k.offset.x, 0, 1, 3, 2) == [-2, 0, 2]
    k.padding = 0x00
    d = k.destination_image_descriptor([_image(5, 5)])
    assert (d.width, d.height, k.offset.x) == (1, 1, 2)
    assert taps(k.offset.x, 0, 1, 3, 2) == [0, 2, 4]


def test_too_small_source_is_an_error():
    k = _Window3x3Stride2("cpu")
    k.padding = 0x00
    with pytest.raises(mpsnn.MPSValueError, match="_Window3x3Stride2"):
        k.destination_image_descriptor([_image(2, 7)])
    with pytest.raises(mpsnn.MPSValueError):
        k.destination_image_descriptor([])
