"""MPSImageDescriptor, MPSImage (formats, sizes, byte I/O, views) and the image-batch helpers.

Spec: images.md §1-5, §7. Byte placement is checked against offsets computed here by hand
from the addressing rule of images.md §5.3, in buffers poisoned outside the addressed bytes.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import (
    MPSDataLayout,
    MPSImage,
    MPSImageDescriptor,
    MPSImageReadWriteParams,
    MTLPixelFormat,
    MTLTextureType,
    NSRange,
)
from mpsnn import MPSImageFeatureChannelFormat as F

HWC = MPSDataLayout.HeightxWidthxFeatureChannels
CHW = MPSDataLayout.FeatureChannelsxHeightxWidth
LAYOUTS = [pytest.param(HWC, id="HWC"), pytest.param(CHW, id="CHW")]
FORMATS = [F.float32, F.float16, F.bfloat16, F.unorm8, F.unorm16]
CHANNELS = [1, 2, 3, 4, 5, 9]

#: element type of the host buffers (images.md §5.2; bfloat16 travels as float32)
HOST = {F.float32: np.float32, F.float16: np.float16, F.bfloat16: np.float32, F.unorm8: np.uint8, F.unorm16: np.uint16}
UNORM_MAX = {F.unorm8: 255, F.unorm16: 65535}
#: a raw value that random data never produces in the tests' blocks by accident often enough to matter
POISON_RAW = {F.float32: -7.25, F.float16: -7.25, F.bfloat16: -7.25, F.unorm8: 77, F.unorm16: 4242}


def make_image(device, fmt, width, height, channels, n=1) -> MPSImage:
    desc = MPSImageDescriptor(channel_format=fmt, width=width, height=height, feature_channels=channels, number_of_images=n)
    return MPSImage(device, image_descriptor=desc)


def rand_raw(fmt, shape, rng) -> np.ndarray:
    """Random raw host elements of ``fmt`` (values exactly representable in the format)."""
    if fmt == F.float32:
        return rng.standard_normal(shape).astype(np.float32)
    if fmt == F.float16:
        return (rng.standard_normal(shape) * 100).astype(np.float16)
    if fmt == F.bfloat16:
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 100).bfloat16().float().numpy()
    return rng.integers(0, UNORM_MAX[fmt] + 1, size=shape, dtype=HOST[fmt])


def real_of_raw(fmt, raw) -> torch.Tensor:
    """The real value an image holds for raw host elements (unorm: k / max)."""
    t = torch.from_numpy(np.ascontiguousarray(raw).astype(np.float32))
    return t / float(UNORM_MAX[fmt]) if fmt in UNORM_MAX else t


def poison(img: MPSImage) -> None:
    fmt = img.feature_channel_format
    raw = POISON_RAW[fmt]
    img.tensor.fill_(raw / UNORM_MAX[fmt] if fmt in UNORM_MAX else raw)


def stored(img: MPSImage) -> torch.Tensor:
    return img.to_torch().detach().float().cpu()


# --------------------------------------------------------------------------------------------
# MPSImageDescriptor
# --------------------------------------------------------------------------------------------
def test_descriptor_defaults():
    d = MPSImageDescriptor()
    assert (d.width, d.height, d.feature_channels, d.number_of_images) == (1, 1, 1, 1)
    assert d.channel_format == F.none
    assert d.usage == int(mpsnn.MTLTextureUsage.shaderRead | mpsnn.MTLTextureUsage.shaderWrite) == 3


def test_descriptor_factory_and_copy():
    d = MPSImageDescriptor.image_descriptor(F.float16, 7, 5, 9)
    assert (d.channel_format, d.width, d.height, d.feature_channels, d.number_of_images, d.usage) == (F.float16, 7, 5, 9, 1, 3)
    d2 = MPSImageDescriptor.image_descriptor(F.unorm8, 2, 3, 4, number_of_images=6, usage=1)
    assert (d2.number_of_images, d2.usage) == (6, 1)
    c = d.copy()
    assert c == d and c is not d
    c.width = 8
    assert d.width == 7 and c != d


@pytest.mark.parametrize("name", ["width", "height", "feature_channels", "number_of_images"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_descriptor_rejects_bad_sizes(name, bad):
    with pytest.raises(mpsnn.MPSValueError) as ei:
        MPSImageDescriptor(**{name: bad})
    assert "MPSImageDescriptor" in str(ei.value) and f"`{name}`" in str(ei.value)
    d = MPSImageDescriptor()
    with pytest.raises(mpsnn.MPSError, match=f"`{name}`"):
        setattr(d, name, bad)
    assert getattr(d, name) == 1


@pytest.mark.parametrize("bad", [7, 99, -1, F.count])
def test_descriptor_rejects_bad_channel_format(bad):
    with pytest.raises(mpsnn.MPSValueError, match="MPSImageDescriptor: `channel_format`"):
        MPSImageDescriptor(channel_format=bad)


def test_descriptor_accepts_numpy_integers():
    d = MPSImageDescriptor(width=np.int64(5), height=np.int32(2))
    assert d.width == 5 and type(d.width) is int and d.height == 2


PIXEL_FORMATS = {  # images.md §2.1: 1, 2, >= 3 channels
    F.unorm8: (MTLPixelFormat.r8Unorm, MTLPixelFormat.rg8Unorm, MTLPixelFormat.rgba8Unorm),
    F.unorm16: (MTLPixelFormat.r16Unorm, MTLPixelFormat.rg16Unorm, MTLPixelFormat.rgba16Unorm),
    F.float16: (MTLPixelFormat.r16Float, MTLPixelFormat.rg16Float, MTLPixelFormat.rgba16Float),
    F.float32: (MTLPixelFormat.r32Float, MTLPixelFormat.rg32Float, MTLPixelFormat.rgba32Float),
}


def test_metal_pixel_format_raw_values():
    raw = {"r8Unorm": 10, "r16Unorm": 20, "r16Float": 25, "rg8Unorm": 30, "r32Float": 55, "rg16Unorm": 60,
           "rg16Float": 65, "rgba8Unorm": 70, "rg32Float": 105, "rgba16Unorm": 110, "rgba16Float": 115, "rgba32Float": 125}
    for name, v in raw.items():
        assert int(getattr(MTLPixelFormat, name)) == v, name
    assert int(MTLTextureType.type2D) == 2 and int(MTLTextureType.type2DArray) == 3


@pytest.mark.parametrize("fmt", list(PIXEL_FORMATS))
@pytest.mark.parametrize("channels", CHANNELS)
def test_pixel_format_per_format_and_channels(fmt, channels):
    expected = PIXEL_FORMATS[fmt][min(channels, 3) - 1]
    d = MPSImageDescriptor(channel_format=fmt, feature_channels=channels)
    assert d.pixel_format == expected
    img = MPSImage("cpu", image_descriptor=d)
    assert img.pixel_format == expected
    assert not img.is_allocated


def test_pixel_format_follows_descriptor_edits():
    d = MPSImageDescriptor(channel_format=F.float16, feature_channels=1)
    assert d.pixel_format == MTLPixelFormat.r16Float
    d.feature_channels = 2
    assert d.pixel_format == MTLPixelFormat.rg16Float
    d.channel_format = F.unorm8
    assert d.pixel_format == MTLPixelFormat.rg8Unorm


ELEMENT = {F.float32: 4, F.float16: 2, F.bfloat16: 2, F.unorm8: 1, F.unorm16: 2}
PRECISION = {F.float32: 24, F.float16: 11, F.unorm8: 8, F.unorm16: 16, F.bfloat16: 8}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("channels", CHANNELS)
def test_precision_pixel_size_texture_type(fmt, channels):
    img = make_image("cpu", fmt, 3, 2, channels)
    assert img.feature_channel_format == fmt
    assert img.precision == PRECISION[fmt]
    components = {1: 1, 2: 2}.get(channels, 4)  # 3-channel pixels carry one padding component
    assert img.pixel_size == components * ELEMENT[fmt]
    assert img.texture_type == (MTLTextureType.type2D if channels <= 4 else MTLTextureType.type2DArray)
    multi = make_image("cpu", fmt, 3, 2, channels, n=2)
    assert multi.texture_type == MTLTextureType.type2DArray
    assert not img.is_allocated and not multi.is_allocated


def test_none_channel_format_resolves_to_float32():
    # inferred (spec: "MPS picks"); the code's docstring says float32
    img = MPSImage("cpu", image_descriptor=MPSImageDescriptor(width=2, height=2, feature_channels=3))
    assert img.feature_channel_format == F.float32
    assert img.precision == 24 and img.pixel_format == MTLPixelFormat.rgba32Float


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("w,h,c,n", [(3, 2, 9, 1), (3, 2, 9, 5), (7, 1, 1, 2), (1, 4, 2, 3), (5, 5, 3, 1), (2, 3, 8, 5)])
def test_resource_size_formula_does_not_allocate(device, fmt, w, h, c, n):
    img = make_image(device, fmt, w, h, c, n)
    slices = (c + 3) // 4
    components = {1: 1, 2: 2}.get(c, 4)
    assert img.resource_size() == n * slices * h * w * components * ELEMENT[fmt]
    assert not img.is_allocated
    # worked example of images.md §2: 9 channels = 3 slices; an 8-channel batch of 5 = 10 slices
    assert img.slices_per_image == slices
    assert img.set_purgeable_state(mpsnn.MPSPurgeableState.volatile) == mpsnn.MPSPurgeableState.allocationDeferred
    assert not img.is_allocated
    img.tensor  # noqa: B018  forces allocation
    assert img.is_allocated
    assert img.set_purgeable_state(mpsnn.MPSPurgeableState.volatile) != mpsnn.MPSPurgeableState.allocationDeferred


def test_resource_size_known_value():
    # 2 images x 3 slices x 2 x 3 pixels x 16 bytes (rgba32Float)
    assert make_image("cpu", F.float32, 3, 2, 9, 2).resource_size() == 576
    assert make_image("cpu", F.unorm8, 4, 4, 1).resource_size() == 16


def test_resource_size_is_zero_for_views_and_wrapped(device):
    img = make_image(device, F.float32, 3, 2, 9, 2)
    assert [v.resource_size() for v in img.batch_representation()] == [0, 0]
    assert img.sub_image_with_feature_channel_range((4, 4)).resource_size() == 0
    assert not img.is_allocated
    wrapped = MPSImage.from_torch(torch.zeros(2, 3, 4, 5, device=device.torch_device))
    assert wrapped.resource_size() == 0 and wrapped.is_allocated


def test_new_image_is_zero_filled(device):
    img = make_image(device, F.float16, 4, 3, 5, 2)
    assert img.tensor.shape == (2, 3, 4, 5) and img.tensor.dtype == torch.float16
    assert img.tensor.device == device.torch_device
    assert torch.count_nonzero(img.tensor).item() == 0


def test_image_rejects_bad_arguments():
    with pytest.raises(mpsnn.MPSTypeError, match="MPSImage: `image_descriptor`"):
        MPSImage("cpu", image_descriptor="desc")
    with pytest.raises(mpsnn.MPSError, match="`device`"):
        MPSImage(3.5, image_descriptor=MPSImageDescriptor())


# --------------------------------------------------------------------------------------------
# write_bytes / read_bytes round trips
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("channels", CHANNELS)
def test_round_trip_full_image(device, fmt, layout, channels):
    rng = np.random.default_rng(channels * 10 + int(fmt) + 100 * int(layout))
    w, h, n = 5, 3, 3
    img = make_image(device, fmt, w, h, channels, n)
    poison(img)
    shape = (h, w, channels) if layout == HWC else (channels, h, w)
    raw = rand_raw(fmt, shape, rng)
    img.write_bytes(raw, data_layout=layout, image_index=1)
    back = img.read_bytes(data_layout=layout, image_index=1)
    assert back.dtype == HOST[fmt] and back.shape == shape
    np.testing.assert_array_equal(back, raw)
    # the stored real values: NHWC, unorm k -> k/max; other images untouched
    hwc = raw if layout == HWC else raw.transpose(1, 2, 0)
    t = stored(img)
    assert torch.equal(t[1], real_of_raw(fmt, hwc))
    expected_poison = stored(img)[0, 0, 0, 0].item()
    assert torch.all(t[0] == expected_poison) and torch.all(t[2] == expected_poison)
    # the other layout reads the same data transposed
    other = img.read_bytes(data_layout=CHW if layout == HWC else HWC, image_index=1)
    np.testing.assert_array_equal(other, raw.transpose(2, 0, 1) if layout == HWC else raw.transpose(1, 2, 0))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_write_accepts_flat_array_and_bytes(fmt):
    rng = np.random.default_rng(3)
    img = make_image("cpu", fmt, 4, 2, 3)
    raw = rand_raw(fmt, (2, 4, 3), rng)
    img.write_bytes(raw.reshape(-1), HWC)
    np.testing.assert_array_equal(img.read_bytes(HWC), raw)
    raw2 = rand_raw(fmt, (3, 2, 4), rng)
    img.write_bytes(raw2.tobytes(), CHW)
    np.testing.assert_array_equal(img.read_bytes(CHW), raw2)


def test_unorm_stores_real_values(device):
    img = make_image(device, F.unorm8, 2, 1, 2)
    img.write_bytes(np.array([[[0, 255], [51, 128]]], np.uint8), HWC)
    assert torch.allclose(stored(img)[0], torch.tensor([[[0.0, 1.0], [0.2, 128 / 255]]]), atol=0, rtol=1e-7)
    img16 = make_image(device, F.unorm16, 1, 1, 1)
    img16.write_bytes(np.array([[[65535]]], np.uint16), HWC)
    assert stored(img16).item() == 1.0


def test_from_numpy_into_unorm_quantises():
    arr = np.array([[[-0.5, 0.0, 0.3, 1.7]]], np.float32)
    img = MPSImage.from_numpy(arr, feature_channel_format=F.unorm8)
    np.testing.assert_array_equal(img.read_bytes(HWC), np.array([[[0, 0, round(0.3 * 255), 255]]], np.uint8))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", [F.float32, F.float16, F.unorm8], ids=lambda f: f.name)
def test_region_round_trip_across_images(device, fmt, layout):
    rng = np.random.default_rng(11)
    w, h, c, n = 5, 4, 5, 4
    img = make_image(device, fmt, w, h, c, n)
    poison(img)
    before = stored(img)
    rx, ry, rw, rh, rd = 1, 2, 3, 2, 2
    region = mpsnn.MTLRegionMake3D(rx, ry, 0, rw, rh, rd)
    shape = (rd, rh, rw, c) if layout == HWC else (rd, c, rh, rw)
    raw = rand_raw(fmt, shape, rng)
    img.write_bytes(raw, layout, image_index=1, region=region)
    back = img.read_bytes(layout, image_index=1, region=region)
    assert back.shape == shape
    np.testing.assert_array_equal(back, raw)
    hwc = raw if layout == HWC else raw.transpose(0, 2, 3, 1)
    expect = before.clone()
    expect[1:3, ry:ry + rh, rx:rx + rw, :] = real_of_raw(fmt, hwc)
    assert torch.equal(stored(img), expect)
    # a depth-1 region reads without the image axis; image_index picks the image
    one = img.read_bytes(layout, image_index=2, region=mpsnn.MTLRegionMake2D(rx, ry, rw, rh))
    np.testing.assert_array_equal(one, raw[1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_feature_channel_info_window(device, layout):
    rng = np.random.default_rng(5)
    img = make_image(device, F.float32, 3, 2, 9)
    poison(img)
    before = stored(img)
    params = MPSImageReadWriteParams(feature_channel_offset=4, number_of_feature_channels_to_read_write=4)
    shape = (2, 3, 4) if layout == HWC else (4, 2, 3)
    raw = rand_raw(F.float32, shape, rng)
    img.write_bytes(raw, layout, feature_channel_info=params)
    np.testing.assert_array_equal(img.read_bytes(layout, feature_channel_info=params), raw)
    expect = before.clone()
    expect[0, :, :, 4:8] = torch.from_numpy(raw if layout == HWC else raw.transpose(1, 2, 0))
    assert torch.equal(stored(img), expect)
    # offset 0 allows any count (here 3 and 9), offset 0 count 8 too
    for k in (3, 9, 8, 1):
        got = img.read_bytes(layout, feature_channel_info=MPSImageReadWriteParams(0, k))
        full = stored(img)[0, :, :, :k].numpy()
        np.testing.assert_array_equal(got, full if layout == HWC else full.transpose(2, 0, 1))


@pytest.mark.parametrize("offset,count", [(2, 4), (4, 3), (4, 0), (0, 0), (8, 4), (4, 8), (1, 1), (12, 4)])
def test_feature_channel_info_errors(offset, count):
    img = make_image("cpu", F.float32, 3, 2, 9)
    params = MPSImageReadWriteParams(offset, count)
    with pytest.raises(mpsnn.MPSValueError, match=r"MPSImage: `feature_channel_info"):
        img.read_bytes(HWC, feature_channel_info=params)
    with pytest.raises(mpsnn.MPSValueError, match=r"MPSImage: `feature_channel_info"):
        img.write_bytes(np.zeros(max(count, 1) * 6, np.float32), HWC, feature_channel_info=params)


def _byte_offset(layout, m, y, x, k, e, bpr, bpi, bpc, rh):
    """images.md §5.3, written out by hand."""
    if layout == HWC:
        return m * bpi + y * bpr + x * bpc + k * e
    return m * bpi + k * (rh * bpr) + y * bpr + x * bpc


def _padded_strides(layout, rw, rh, k, e, pad_col):
    if layout == HWC:
        bpc = k * e + pad_col * e
        bpr = rw * bpc + 3 * e
        bpi = rh * bpr + 5 * e
    else:
        bpc = e + pad_col * e
        bpr = rw * bpc + 3 * e
        bpi = k * rh * bpr + 5 * e
    return bpc, bpr, bpi


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("pad_col", [0, 1])
def test_read_bytes_exact_byte_placement(device, fmt, layout, pad_col):
    rng = np.random.default_rng(21)
    w, h, c, n = 5, 4, 9, 3
    img = make_image(device, fmt, w, h, c, n)
    full = rand_raw(fmt, (n, h, w, c), rng)
    for i in range(n):
        img.write_bytes(full[i], HWC, image_index=i)
    host = np.dtype(HOST[fmt])
    e = host.itemsize
    rx, ry, rw, rh, rd, c0, k, i0 = 1, 1, 3, 2, 2, 4, 4, 1
    bpc, bpr, bpi = _padded_strides(layout, rw, rh, k, e, pad_col)
    total = rd * bpi + 7
    out = np.full(total, 0xAB, np.uint8)
    ret = img.read_bytes(layout, image_index=i0, region=mpsnn.MTLRegionMake3D(rx, ry, 0, rw, rh, rd),
                         feature_channel_info=MPSImageReadWriteParams(c0, k), bytes_per_row=bpr, bytes_per_image=bpi,
                         bytes_per_column=bpc if pad_col else None, out=out)
    assert ret is out
    touched = np.zeros(total, bool)
    for m in range(rd):
        for y in range(rh):
            for x in range(rw):
                for kk in range(k):
                    off = _byte_offset(layout, m, y, x, kk, e, bpr, bpi, bpc, rh)
                    assert not touched[off:off + e].any()
                    touched[off:off + e] = True
                    got = out[off:off + e].view(host)[0]
                    assert got == full[i0 + m, ry + y, rx + x, c0 + kk], (m, y, x, kk)
    assert np.all(out[~touched] == 0xAB), "bytes outside the addressed elements were written"
    # without `out` a new uint8 buffer just large enough comes back, same placement
    buf = img.read_bytes(layout, image_index=i0, region=mpsnn.MTLRegionMake3D(rx, ry, 0, rw, rh, rd),
                         feature_channel_info=MPSImageReadWriteParams(c0, k), bytes_per_row=bpr, bytes_per_image=bpi,
                         bytes_per_column=bpc if pad_col else None)
    assert buf.dtype == np.uint8
    last = int(np.nonzero(touched)[0][-1]) + 1
    assert buf.nbytes >= last
    np.testing.assert_array_equal(buf[:last][touched[:last]], out[:last][touched[:last]])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("pad_col", [0, 1])
def test_write_bytes_exact_byte_placement(device, fmt, layout, pad_col):
    rng = np.random.default_rng(22)
    w, h, c, n = 5, 4, 9, 3
    img = make_image(device, fmt, w, h, c, n)
    poison(img)
    before = stored(img)
    host = np.dtype(HOST[fmt])
    e = host.itemsize
    rx, ry, rw, rh, rd, c0, k, i0 = 2, 1, 3, 3, 2, 4, 4, 1
    bpc, bpr, bpi = _padded_strides(layout, rw, rh, k, e, pad_col)
    # gaps hold 0xFF bytes: NaN for float formats, the maximum for unorm ones
    buf = np.full(rd * bpi, 0xFF, np.uint8)
    vals = rand_raw(fmt, (rd, rh, rw, k), rng)
    for m in range(rd):
        for y in range(rh):
            for x in range(rw):
                for kk in range(k):
                    off = _byte_offset(layout, m, y, x, kk, e, bpr, bpi, bpc, rh)
                    buf[off:off + e] = np.array([vals[m, y, x, kk]], host).view(np.uint8)
    img.write_bytes(buf.tobytes(), layout, image_index=i0, region=mpsnn.MTLRegionMake3D(rx, ry, 0, rw, rh, rd),
                    feature_channel_info=MPSImageReadWriteParams(c0, k), bytes_per_row=bpr, bytes_per_image=bpi,
                    bytes_per_column=bpc if pad_col else None)
    expect = before.clone()
    expect[i0:i0 + rd, ry:ry + rh, rx:rx + rw, c0:c0 + k] = real_of_raw(fmt, vals)
    assert torch.equal(stored(img), expect)


def test_minimal_strides_equal_tight_layout():
    rng = np.random.default_rng(2)
    img = make_image("cpu", F.float16, 4, 3, 6, 2)
    raw = rand_raw(F.float16, (2, 3, 4, 6), rng)
    e = 2
    img.write_bytes(raw.tobytes(), HWC, region=mpsnn.MTLRegionMake3D(0, 0, 0, 4, 3, 2), bytes_per_row=4 * 6 * e, bytes_per_image=3 * 4 * 6 * e)
    np.testing.assert_array_equal(img.read_bytes(HWC, region=mpsnn.MTLRegionMake3D(0, 0, 0, 4, 3, 2)), raw)


# --------------------------------------------------------------------------------------------
# byte I/O errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("region,name", [
    (mpsnn.MTLRegionMake2D(4, 0, 3, 1), "`region`"),
    (mpsnn.MTLRegionMake2D(0, 3, 1, 2), "`region`"),
    (mpsnn.MTLRegionMake2D(0, 0, 0, 1), "`region`"),
    (mpsnn.MTLRegionMake2D(0, 0, 1, 0), "`region`"),
    (mpsnn.MTLRegionMake2D(-1, 0, 2, 1), "`region`"),
    (mpsnn.MTLRegionMake3D(0, 0, 0, 1, 1, 0), "`region`"),
    (mpsnn.MTLRegionMake3D(0, 0, 1, 1, 1, 1), "`region.origin.z`"),
    (mpsnn.MTLRegionMake3D(0, 0, 0, 1, 1, 4), "`image_index`"),
])
def test_bad_regions(region, name):
    img = make_image("cpu", F.float32, 5, 4, 2, 3)
    with pytest.raises(mpsnn.MPSValueError, match=f"MPSImage: {name}"):
        img.read_bytes(HWC, region=region)
    with pytest.raises(mpsnn.MPSValueError, match=f"MPSImage: {name}"):
        img.write_bytes(b"\0" * 4096, HWC, region=region)


@pytest.mark.parametrize("index,depth", [(3, 1), (-1, 1), (2, 2)])
def test_bad_image_index(index, depth):
    img = make_image("cpu", F.float32, 2, 2, 1, 3)
    region = mpsnn.MTLRegionMake3D(0, 0, 0, 2, 2, depth)
    with pytest.raises(mpsnn.MPSValueError, match="MPSImage: `image_index`"):
        img.read_bytes(HWC, image_index=index, region=region)
    with pytest.raises(mpsnn.MPSValueError, match="MPSImage: `image_index`"):
        img.write_bytes(np.zeros((depth, 2, 2, 1), np.float32), HWC, image_index=index, region=region)


def test_too_small_buffers():
    img = make_image("cpu", F.float32, 3, 2, 5)
    need = 3 * 2 * 5 * 4
    with pytest.raises(mpsnn.MPSValueError, match="MPSImage: `data`"):
        img.write_bytes(b"\0" * (need - 1), HWC)
    img.write_bytes(b"\0" * need, HWC)  # exactly enough is fine
    with pytest.raises(mpsnn.MPSValueError, match="MPSImage: `data`"):
        img.write_bytes(b"\0" * (need + 40 - 1), HWC, bytes_per_row=3 * 5 * 4 + 40)
    with pytest.raises(mpsnn.MPSValueError, match="MPSImage: `out`"):
        img.read_bytes(HWC, out=np.zeros(need - 1, np.uint8))
    with pytest.raises(mpsnn.MPSValueError, match="bytes_per_row"):
        img.read_bytes(HWC, bytes_per_row=3 * 5 * 4 - 4)
    with pytest.raises(mpsnn.MPSValueError, match="bytes_per_row"):
        img.write_bytes(b"\0" * 4096, CHW, bytes_per_row=2 * 4)


def test_wrong_shape_and_float_into_unorm():
    img = make_image("cpu", F.float32, 3, 2, 5)
    with pytest.raises(mpsnn.MPSValueError, match="MPSImage: `data`"):
        img.write_bytes(np.zeros((2, 3, 4), np.float32), HWC)
    with pytest.raises(mpsnn.MPSValueError, match="MPSImage: `data`"):
        img.write_bytes(np.zeros((2, 3, 5), np.float32), CHW)
    for fmt in (F.unorm8, F.unorm16):
        u = make_image("cpu", fmt, 3, 2, 1)
        with pytest.raises(mpsnn.MPSValueError, match=r"MPSImage: `data.dtype`"):
            u.write_bytes(np.full((2, 3, 1), 0.5, np.float32), HWC)
        with pytest.raises(mpsnn.MPSValueError):
            u.write_bytes(np.full((2, 3, 1), 0.5, np.float64), HWC)
        assert torch.count_nonzero(u.tensor).item() == 0


def test_bad_data_layout_and_data_type():
    img = make_image("cpu", F.float32, 2, 2, 1)
    with pytest.raises(mpsnn.MPSValueError, match="MPSImage: `data_layout`"):
        img.read_bytes(2)
    with pytest.raises(mpsnn.MPSTypeError, match="`data`"):
        img.write_bytes(12345, HWC, bytes_per_row=8)
    with pytest.raises(mpsnn.MPSTypeError, match="`out`"):
        img.read_bytes(HWC, out=bytes(64))


# --------------------------------------------------------------------------------------------
# torch / numpy interop
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,fmt", [(torch.float32, F.float32), (torch.float16, F.float16), (torch.bfloat16, F.bfloat16)])
def test_from_torch_is_zero_copy_both_ways(device, dtype, fmt):
    t = torch.zeros(2, 3, 4, 5, dtype=dtype, device=device.torch_device)
    img = MPSImage.from_torch(t)
    assert img.device == device and img.feature_channel_format == fmt
    assert img.shape == (2, 3, 4, 5) and (img.width, img.height, img.feature_channels, img.number_of_images) == (4, 3, 5, 2)
    assert img.to_torch().data_ptr() == t.data_ptr() and img.parent is None
    t[1, 2, 3, 4] = 1.5
    assert img.read_bytes(HWC, image_index=1)[2, 3, 4] == 1.5
    img.write_bytes(np.full((3, 4, 5), 2.0, HOST[fmt]), HWC, image_index=0)
    assert torch.all(t[0] == 2.0)
    img.to_torch()[1, 0, 0, 0] = -3.0
    assert t[1, 0, 0, 0].item() == -3.0


def test_from_torch_three_dims_and_errors(device):
    t = torch.arange(24, dtype=torch.float32, device=device.torch_device).reshape(2, 3, 4)
    img = MPSImage.from_torch(t)
    assert img.shape == (1, 2, 3, 4)
    assert img.to_torch().data_ptr() == t.data_ptr()
    with pytest.raises(mpsnn.MPSValueError, match="`tensor.dtype`"):
        MPSImage.from_torch(torch.zeros(1, 2, 2, 1, dtype=torch.int32))
    with pytest.raises(mpsnn.MPSValueError, match="`tensor`"):
        MPSImage.from_torch(torch.zeros(2, 2))
    with pytest.raises(mpsnn.MPSValueError, match="`feature_channel_format`"):
        MPSImage.from_torch(torch.zeros(1, 2, 2, 1), feature_channel_format=F.float16)
    with pytest.raises(mpsnn.MPSTypeError, match="`tensor`"):
        MPSImage.from_torch(np.zeros((1, 2, 2, 1), np.float32))


def test_from_torch_device_mismatch():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA to mismatch devices")
    with pytest.raises(mpsnn.MPSValueError, match="`device`"):
        MPSImage.from_torch(torch.zeros(1, 2, 2, 1, device="cuda"), device="cpu")


def test_from_numpy_to_numpy(device):
    rng = np.random.default_rng(8)
    arr = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    img = MPSImage.from_numpy(arr, device=device)
    assert img.device == device and img.feature_channel_format == F.float32 and img.shape == (2, 3, 4, 5)
    out = img.to_numpy()
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, arr)
    out[:] = 0  # a copy: the image is unaffected
    np.testing.assert_array_equal(img.to_numpy(), arr)
    arr[:] = 0  # and the input was copied too
    assert np.count_nonzero(img.to_numpy()) > 0
    h = MPSImage.from_numpy(rng.standard_normal((3, 4, 5)), device=device, feature_channel_format=F.float16)
    assert h.shape == (1, 3, 4, 5) and h.tensor.dtype == torch.float16
    with pytest.raises(mpsnn.MPSValueError, match="`array`"):
        MPSImage.from_numpy(np.zeros((2, 2)))


# --------------------------------------------------------------------------------------------
# views: batch_representation, sub_image_with_feature_channel_range
# --------------------------------------------------------------------------------------------
def test_batch_representation_aliases(device):
    rng = np.random.default_rng(9)
    img = make_image(device, F.float32, 3, 2, 6, 4)
    views = img.batch_representation()
    assert len(views) == 4
    for v in views:
        assert v.parent is img and v.number_of_images == 1 and v.feature_channels == 6
        assert (v.width, v.height, v.feature_channel_format) == (3, 2, F.float32)
        assert isinstance(v, MPSImage) and not v.is_temporary
    assert not img.is_allocated
    # view -> parent
    raw = rand_raw(F.float32, (2, 3, 6), rng)
    views[2].write_bytes(raw, HWC)
    assert img.is_allocated
    np.testing.assert_array_equal(img.read_bytes(HWC, image_index=2), raw)
    assert np.count_nonzero(img.read_bytes(HWC, image_index=1)) == 0
    # parent -> view
    raw2 = rand_raw(F.float32, (6, 2, 3), rng)
    img.write_bytes(raw2, CHW, image_index=3)
    np.testing.assert_array_equal(views[3].read_bytes(CHW), raw2)
    assert views[3].to_torch().data_ptr() == img.to_torch()[3].data_ptr()


@pytest.mark.parametrize("rng_arg", [NSRange(1, 2), range(1, 3), (1, 2)])
def test_batch_representation_with_sub_range(rng_arg):
    img = make_image("cpu", F.float16, 2, 2, 3, 4)
    img.tensor[:, :, :, :] = torch.arange(4, dtype=torch.float16).view(4, 1, 1, 1)
    views = img.batch_representation_with_sub_range(rng_arg)
    assert len(views) == 2
    assert [v.tensor[0, 0, 0, 0].item() for v in views] == [1.0, 2.0]
    assert all(v.parent is img for v in views)


@pytest.mark.parametrize("bad", [NSRange(3, 2), NSRange(0, 5), (-1, 1), range(0, 4, 2)])
def test_batch_representation_bad_range(bad):
    img = make_image("cpu", F.float32, 2, 2, 3, 4)
    with pytest.raises(mpsnn.MPSValueError, match="MPSImage: `sub_range`"):
        img.batch_representation_with_sub_range(bad)


def test_sub_image_feature_channel_range(device):
    img = make_image(device, F.float32, 3, 2, 9, 2)
    sub = img.sub_image_with_feature_channel_range(NSRange(4, 4))
    assert sub.parent is img and sub.feature_channels == 4 and sub.number_of_images == 2
    raw = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) + 1
    sub.write_bytes(raw, HWC, image_index=1)
    t = stored(img)
    assert torch.equal(t[1, :, :, 4:8], torch.from_numpy(raw))
    assert torch.count_nonzero(t[1, :, :, :4]) == 0 and torch.count_nonzero(t[1, :, :, 8:]) == 0
    assert torch.count_nonzero(t[0]) == 0
    img.write_bytes(np.full((4, 2, 3), 5.0, np.float32), CHW, image_index=0, feature_channel_info=MPSImageReadWriteParams(4, 4))
    assert np.all(sub.read_bytes(HWC, image_index=0) == 5.0)
    # over-long range is shortened to fit: channels 4..8
    tail = img.sub_image_with_feature_channel_range((4, 100))
    assert tail.feature_channels == 5
    assert torch.equal(stored(tail)[1, :, :, :4], torch.from_numpy(raw))
    whole = img.sub_image_with_feature_channel_range((0, 12))
    assert whole.feature_channels == 9
    # views of views chain to the same storage
    per_image = sub.batch_representation()
    assert per_image[1].parent is sub
    np.testing.assert_array_equal(per_image[1].read_bytes(HWC), raw)


@pytest.mark.parametrize("bad", [(2, 4), (4, 3), (0, 0), (0, 6), (12, 4), (1, 8)])
def test_sub_image_rejects_bad_ranges(bad):
    img = make_image("cpu", F.float32, 3, 2, 9)
    with pytest.raises(mpsnn.MPSValueError, match="MPSImage: `feature_channel_range"):
        img.sub_image_with_feature_channel_range(bad)


def test_view_of_view_resource_and_allocation():
    img = make_image("cpu", F.float32, 2, 2, 8, 2)
    v = img.batch_representation()[0].sub_image_with_feature_channel_range((4, 4))
    assert v.resource_size() == 0 and not v.is_allocated and not img.is_allocated
    v.tensor.fill_(3.0)
    assert img.is_allocated and v.is_allocated
    t = stored(img)
    assert torch.all(t[0, :, :, 4:] == 3.0) and torch.count_nonzero(t[0, :, :, :4]) == 0 and torch.count_nonzero(t[1]) == 0


# --------------------------------------------------------------------------------------------
# MPSImageBatch helpers (images.md §7)
# --------------------------------------------------------------------------------------------
def _temp(cb, n=1):
    return mpsnn.MPSTemporaryImage(cb, image_descriptor=MPSImageDescriptor(channel_format=F.float32, width=2, height=2, feature_channels=1, number_of_images=n))


def test_increment_read_count_unique(cb):
    a, b = _temp(cb), _temp(cb)
    plain = make_image(cb.device, F.float32, 2, 2, 1)
    batch = [a, a, b, plain, a, plain]
    assert mpsnn.MPSImageBatchIncrementReadCount(batch, 2) == 3
    assert a.read_count == 3 and b.read_count == 3
    assert mpsnn.MPSImageBatchIncrementReadCount(batch, -1) == 3
    assert a.read_count == 2 and b.read_count == 2
    assert mpsnn.MPSImageBatchIncrementReadCount([], 5) == 0
    # an image already at 0 is skipped, not an error
    b.read_count = 0
    assert mpsnn.MPSImageBatchIncrementReadCount([a, b, b], 1) == 2
    assert a.read_count == 3 and b.read_count == 0
    # going to 0 through the helper releases the storage
    a.tensor  # noqa: B018
    assert mpsnn.MPSImageBatchIncrementReadCount([a, a], -3) == 1
    assert a.read_count == 0 and not a.is_allocated
    assert cb.pooled_storage_count() == 1


class _CountingImage(MPSImage):
    calls: ClassVar[list] = []

    def synchronize_on_command_buffer(self, command_buffer):
        _CountingImage.calls.append((self, command_buffer))


def test_batch_synchronize_and_resource_size(cb):
    _CountingImage.calls = []
    desc = MPSImageDescriptor(channel_format=F.float16, width=3, height=2, feature_channels=5)
    a = _CountingImage(cb.device, image_descriptor=desc)
    b = _CountingImage(cb.device, image_descriptor=desc)
    batch = [a, b, a, a, b]
    mpsnn.MPSImageBatchSynchronize(batch, cb)
    assert [c[0] for c in _CountingImage.calls] == [a, b]
    assert all(c[1] is cb for c in _CountingImage.calls)
    assert mpsnn.MPSImageBatchResourceSize(batch) == 2 * a.resource_size() == 2 * (2 * 3 * 2 * 8)
    assert mpsnn.MPSImageBatchResourceSize([]) == 0
    big = make_image(cb.device, F.float32, 3, 2, 5, 2)
    views = big.batch_representation()
    assert mpsnn.MPSImageBatchResourceSize(views + [big, big]) == big.resource_size()
    assert not a.is_allocated and not big.is_allocated


def test_batch_iterate():
    imgs = [make_image("cpu", F.float32, 1, 1, 1) for _ in range(3)]
    a, b, c = imgs
    batch = [a, b, a, c, b]
    seen = []

    def visit(img, index):
        seen.append((img, index))
        return mpsnn.NSIntegerMin

    assert mpsnn.NSIntegerMin == -(2 ** 63)
    assert mpsnn.MPSImageBatchIterate(batch, visit) == mpsnn.NSIntegerMin
    assert seen == [(a, 0), (b, 1), (c, 3)]
    seen.clear()

    def stop_at_b(img, index):
        seen.append((img, index))
        return 17 if img is b else mpsnn.NSIntegerMin

    assert mpsnn.MPSImageBatchIterate(batch, stop_at_b) == 17
    assert seen == [(a, 0), (b, 1)]
    seen.clear()
    # any value above NSIntegerMin stops, even a negative one
    assert mpsnn.MPSImageBatchIterate(batch, lambda img, i: seen.append(i) or -5) == -5
    assert seen == [0]
    assert mpsnn.MPSImageBatchIterate([], stop_at_b) == mpsnn.NSIntegerMin


def test_batch_aliases_are_lists():
    assert mpsnn.MPSImageBatch is list and mpsnn.MPSStateBatch is list


def test_numpy_zero_copy_on_cpu():
    arr = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    img = MPSImage.from_numpy(arr, "cpu", copy=False)
    arr[1, 2, 3, 4] = -5.0
    assert img.to_torch()[1, 2, 3, 4].item() == -5.0, "from_numpy(copy=False) must alias the array"
    view = img.to_numpy(copy=False)
    view[0, 0, 0, 0] = 42.0
    assert arr[0, 0, 0, 0] == 42.0, "to_numpy(copy=False) must alias the storage"
    copied = img.to_numpy()
    copied[0, 0, 0, 1] = 99.0
    assert arr[0, 0, 0, 1] == 1.0, "to_numpy() must copy"


@pytest.mark.parametrize("bad", ["float64", "strided", "unorm8"])
def test_numpy_zero_copy_refused_when_impossible(bad):
    arr = np.zeros((1, 2, 3, 4), np.float64 if bad == "float64" else np.float32)
    if bad == "strided":
        arr = arr[:, :, ::2, :]
    fmt = F.unorm8 if bad == "unorm8" else F.float32
    with pytest.raises(mpsnn.MPSError, match=r"MPSImage: `copy`"):
        MPSImage.from_numpy(arr, "cpu", feature_channel_format=fmt, copy=False)


def test_to_numpy_view_refused_for_half_images(device):
    img = MPSImage.from_numpy(np.zeros((1, 2, 2, 3), np.float32), device, feature_channel_format=F.float16)
    with pytest.raises(mpsnn.MPSError, match=r"`copy`"):
        img.to_numpy(copy=False)
