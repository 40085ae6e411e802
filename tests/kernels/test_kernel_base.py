"""MPSCNNKernel / MPSCNNGradientKernel geometry, encode forms and errors, exercised through
the neuron kernels (windowless: 1x1, stride 1).

The oracle is ``mpsnn.testing.reference.unary_kernel_reference`` (kernel-base.md §2.2-2.5,
images.md §11, pixel by pixel) and ``unary_gradient_reference`` (the documented gradient
rule: result pixel p reads dy at ``p - forward.offset + forward.clip_rect.origin``, 0 where
the forward pass wrote nothing). Destinations are poisoned first (NaN or 1234) so that both
"written" and "left alone" are checked for every element.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import MPSCNNNeuronType as T
from mpsnn import (
    MPSImage,
    MPSImageDescriptor,
    MPSImageEdgeMode,
    MPSImageFeatureChannelFormat,
    MPSNNNeuronDescriptor,
    MPSOffset,
    MPSTemporaryImage,
    MTLOrigin,
    MTLRegion,
    MTLSize,
)
from mpsnn.testing import reference as ref
from mpsnn.testing.images import finish, image, poisoned, values
from mpsnn.testing.tolerances import assert_close

CUDA = torch.cuda.is_available()
POISON = 1234.0

# -- helpers ------------------------------------------------------------------------------------


def region(origin: tuple[int, int, int], size: tuple[int, int, int]) -> MTLRegion:
    return MTLRegion(MTLOrigin(*origin), MTLSize(*size))


def random(seed: int, shape: tuple[int, ...], lo: float = -2.0, hi: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape)


@dataclass(frozen=True)
class Neuron:
    """A neuron whose result makes geometry mistakes visible."""

    id: str
    type: T
    a: float = 0.0
    b: float = 0.0
    slopes: tuple[float, ...] | None = None

    def descriptor(self) -> MPSNNNeuronDescriptor:
        if self.slopes is not None:
            return MPSNNNeuronDescriptor.cnn_neuron_prelu_descriptor(np.array(self.slopes, np.float32))
        return MPSNNNeuronDescriptor.cnn_neuron_descriptor(self.type, a=self.a, b=self.b)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return ref.neuron_forward(x, self.type, self.a, self.b, slopes=self.slopes)

    def derivative(self, x: np.ndarray) -> np.ndarray:
        return ref.neuron_derivative(x, self.type, self.a, self.b, slopes=self.slopes)

    def kernel(self, device: mpsnn.Device) -> mpsnn.MPSCNNNeuron:
        return mpsnn.MPSCNNNeuron(device, neuron_descriptor=self.descriptor())

    def gradient(self, device: mpsnn.Device) -> mpsnn.MPSCNNNeuronGradient:
        return mpsnn.MPSCNNNeuronGradient(device, neuron_descriptor=self.descriptor())


# linear with b != 0 makes an off-edge zero read visible (f(0) = 0.5); PReLU's distinct
# per-channel slopes make a channel-window mistake visible
LINEAR = Neuron("linear", T.linear, a=2.0, b=0.5)
PRELU = Neuron("pReLU", T.pReLU, slopes=tuple(0.1 * (k + 1) for k in range(12)))
TANH = Neuron("tanH", T.tanH, a=1.5, b=0.75)
NEURONS = [pytest.param(n, id=n.id) for n in (LINEAR, PRELU)]


@dataclass(frozen=True)
class Geometry:
    """One encode: image shapes and every MPSCNNKernel property that moves data."""

    id: str
    src: tuple[int, int, int, int]                    # N, H, W, C
    dst: tuple[int, int, int, int]
    offset: tuple[int, int, int] = (0, 0, 0)
    clip: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
    src_c_off: int = 0
    src_c_max: int | None = None
    dst_c_off: int = 0
    edge: MPSImageEdgeMode = MPSImageEdgeMode.zero

    def configure(self, k: Any) -> None:
        k.offset = MPSOffset(*self.offset)
        if self.clip is not None:
            k.clip_rect = region(*self.clip)
        k.source_feature_channel_offset = self.src_c_off
        if self.src_c_max is not None:
            k.source_feature_channel_max_count = self.src_c_max
        k.destination_feature_channel_offset = self.dst_c_off
        k.edge_mode = self.edge

    def reference(self, x: np.ndarray, dest: np.ndarray, fn: Any) -> np.ndarray:
        return ref.unary_kernel_reference(
            x, dest, offset=self.offset, clip_rect=self.clip, src_c_off=self.src_c_off, src_c_max=self.src_c_max,
            dst_c_off=self.dst_c_off, edge_mode=self.edge, fn=fn)


Z, C = MPSImageEdgeMode.zero, MPSImageEdgeMode.clamp
GEOMETRIES = [
    Geometry("plain_c1", (1, 3, 5, 1), (1, 3, 5, 1)),
    Geometry("plain_c3_batch3", (3, 4, 3, 3), (3, 4, 3, 3)),
    Geometry("1x1_c5", (2, 1, 1, 5), (2, 1, 1, 5)),
    Geometry("1x1_offset_zero", (1, 1, 1, 3), (1, 1, 1, 3), offset=(1, 0, 0)),
    Geometry("1x1_offset_clamp", (1, 1, 1, 3), (1, 2, 3, 3), offset=(-1, -1, 0), edge=C),
    Geometry("neg_offset_zero", (1, 4, 5, 3), (1, 4, 5, 3), offset=(-2, -1, 0), edge=Z),
    Geometry("neg_offset_clamp", (1, 4, 5, 3), (1, 4, 5, 3), offset=(-2, -1, 0), edge=C),
    Geometry("pos_offset_zero", (2, 4, 5, 7), (2, 4, 5, 7), offset=(2, 3, 0), edge=Z),
    Geometry("pos_offset_clamp", (2, 4, 5, 7), (2, 4, 5, 7), offset=(2, 3, 0), edge=C),
    Geometry("smaller_dest_offset", (1, 5, 7, 3), (1, 3, 4, 3), offset=(2, 1, 0)),
    Geometry("clip_inside", (1, 5, 6, 5), (1, 5, 6, 5), clip=((1, 2, 0), (3, 2, 1))),
    Geometry("clip_partly_outside", (1, 5, 6, 5), (1, 5, 6, 5), clip=((3, 1, 0), (10, 10, 1))),
    Geometry("clip_and_offset_zero", (1, 5, 6, 3), (1, 4, 7, 3), offset=(-1, 2, 0), clip=((2, 1, 0), (6, 9, 1)), edge=Z),
    Geometry("clip_and_offset_clamp", (1, 5, 6, 3), (1, 4, 7, 3), offset=(-1, 2, 0), clip=((2, 1, 0), (6, 9, 1)), edge=C),
    Geometry("src_channel_offset", (1, 3, 4, 9), (1, 3, 4, 5), src_c_off=4),
    Geometry("src_channel_max", (1, 3, 4, 7), (1, 3, 4, 3), src_c_max=3),
    Geometry("src_channel_offset_and_max", (1, 3, 4, 11), (1, 3, 4, 5), src_c_off=4, src_c_max=5),
    Geometry("dst_channel_offset_concat", (2, 3, 4, 3), (2, 3, 4, 12), dst_c_off=8),
    Geometry("all_channel_windows", (1, 3, 4, 9), (1, 3, 4, 10), src_c_off=4, src_c_max=2, dst_c_off=8),
    Geometry("batch_offset_z", (3, 2, 3, 5), (2, 2, 3, 5), offset=(0, 0, 1)),
    Geometry("batch_clip_z_depth", (3, 2, 3, 5), (3, 2, 3, 5), offset=(0, 0, 2), clip=((0, 0, 1), (9, 9, 1))),
    Geometry("batch_depth_limits", (4, 2, 3, 3), (4, 2, 3, 3), offset=(0, 0, 1), clip=((0, 0, 0), (9, 9, 2))),
    Geometry("everything", (3, 4, 5, 9), (2, 5, 6, 12), offset=(-1, 1, 1), clip=((1, 1, 1), (9, 3, 1)),
             src_c_off=4, src_c_max=3, dst_c_off=4, edge=C),
]
GEOMETRY_PARAMS = [pytest.param(g, id=g.id) for g in GEOMETRIES]


def test_reference_rule_by_hand() -> None:
    """The coordinate reference itself, on values worked out by hand (kernel-base.md §2.2)."""
    src = np.array([1.0, 2.0, 3.0]).reshape(1, 1, 3, 1)
    dest = np.full((1, 1, 4, 1), -7.0)

    def ident(v):
        return v

    got = ref.unary_kernel_reference(src, dest, offset=(-1, 0, 0), edge_mode="zero", fn=ident)
    assert got.ravel().tolist() == [0.0, 1.0, 2.0, 3.0]
    got = ref.unary_kernel_reference(src, dest, offset=(-1, 0, 0), edge_mode="clamp", fn=ident)
    assert got.ravel().tolist() == [1.0, 1.0, 2.0, 3.0]
    # clip origin x=2, offset x=0: destination x=2 reads source x=0; x=0, 1 untouched
    got = ref.unary_kernel_reference(src, dest, offset=(0, 0, 0), clip_rect=((2, 0, 0), (5, 1, 1)), fn=ident)
    assert got.ravel().tolist() == [-7.0, -7.0, 1.0, 2.0]
    # channel windows: source channels [4, 6) -> destination channels [0, 2)
    src_c = np.arange(8.0).reshape(1, 1, 1, 8)
    got = ref.unary_kernel_reference(src_c, np.full((1, 1, 1, 4), -1.0), src_c_off=4, src_c_max=2, fn=ident)
    assert got.ravel().tolist() == [4.0, 5.0, -1.0, -1.0]
    # gradient: forward offset -1 (dest x reads source x-1); result x reads dy at x+1
    dy = np.array([10.0, 20.0, 30.0, 40.0]).reshape(1, 1, 4, 1)
    x = np.array([-1.0, 1.0, 2.0]).reshape(1, 1, 3, 1)
    got = ref.unary_gradient_reference(dy, x, np.full(x.shape, -7.0), offset=(-1, 0, 0), dfn=lambda v: np.where(v >= 0, 1.0, 0.5))
    assert got.ravel().tolist() == [10.0, 30.0, 40.0]


# -- forward geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("neuron", NEURONS)
@pytest.mark.parametrize("geom", GEOMETRY_PARAMS)
def test_forward_geometry(device, cb, geom: Geometry, neuron: Neuron) -> None:
    seed = sum(map(ord, geom.id))
    x_img, x = image(random(seed, geom.src), device)
    dst, before = poisoned(geom.dst, device, float("nan") if seed % 2 else POISON)
    k = neuron.kernel(device)
    geom.configure(k)
    k.encode(cb, x_img, dst)
    finish(cb)
    expected = geom.reference(x, before, neuron.forward)
    got = values(dst)
    written = ~np.isclose(expected, before, equal_nan=True)
    assert written.any(), "the case must write something"
    assert not np.isclose(got[written], before[written], equal_nan=True).any(), "every written element must change"
    assert_close(got, expected, torch.float32, msg=geom.id)
    assert k.offset == MPSOffset(*geom.offset), "the explicit-destination form must not change offset"


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")])
def test_forward_geometry_low_precision(device, cb, dtype) -> None:
    geom = GEOMETRIES[-1]
    x_img, x = image(random(3, geom.src), device, dtype)
    dst, before = poisoned(geom.dst, device, POISON, dtype)
    k = TANH.kernel(device)
    geom.configure(k)
    k.encode(cb, x_img, dst)
    finish(cb)
    assert_close(values(dst), geom.reference(x, before, TANH.forward), dtype)


def test_off_edge_zero_reads_give_f_of_zero(device, cb) -> None:
    """Edge mode zero: a pixel whose source lies off the image holds f(0), not 0."""
    x_img, _ = image(random(1, (1, 2, 2, 3)), device)
    dst, _ = poisoned((1, 2, 2, 3), device)
    k = LINEAR.kernel(device)
    k.offset = MPSOffset(5, 5, 0)            # every read is off the image
    k.encode(cb, x_img, dst)
    finish(cb)
    assert np.array_equal(values(dst), np.full((1, 2, 2, 3), LINEAR.b))


def test_unorm8_destination_with_clip_and_channel_offset(device, cb) -> None:
    x_img, x = image(random(9, (1, 3, 4, 3), -1.0, 1.0), device)
    desc = MPSImageDescriptor(channel_format=MPSImageFeatureChannelFormat.unorm8, width=4, height=3, feature_channels=8)
    dst = MPSImage(device, image_descriptor=desc)
    dst.write_bytes(np.full((3, 4, 8), 77, np.uint8))
    before = values(dst)
    geom = Geometry("unorm", (1, 3, 4, 3), (1, 3, 4, 8), offset=(1, 0, 0), clip=((1, 1, 0), (9, 9, 1)), dst_c_off=4)
    k = LINEAR.kernel(device)
    geom.configure(k)
    k.encode(cb, x_img, dst)
    finish(cb)
    expected = geom.reference(x, before, lambda v: np.clip(LINEAR.forward(v), 0.0, 1.0))   # unquantised: see tolerances
    assert_close(values(dst), expected, "unorm8")
    raw = dst.read_bytes()
    assert (raw[0, :, :] == 77).all() and (raw[:, :, :4] == 77).all(), "untouched pixels and channels keep their bytes"


def test_concatenation_into_one_destination(device, cb) -> None:
    """Two encodes write channels [0, 3) and [4, 9) of one 12-channel image; channel 3 and
    [9, 12) keep their poison."""
    a_img, a = image(random(1, (2, 3, 4, 3)), device)
    b_img, b = image(random(2, (2, 3, 4, 5)), device)
    dst, before = poisoned((2, 3, 4, 12), device)
    k1, k2 = LINEAR.kernel(device), PRELU.kernel(device)
    k2.destination_feature_channel_offset = 4
    k1.encode(cb, a_img, dst)
    k2.encode(cb, b_img, dst)
    finish(cb)
    expected = before.copy()
    expected[..., 0:3] = LINEAR.forward(a)
    expected[..., 4:9] = PRELU.forward(b)
    assert_close(values(dst), expected, torch.float32)


# -- encode forms -------------------------------------------------------------------------------------


def test_encode_auto_returns_temporary_image_and_sets_offset(device, cb) -> None:
    x_img, x = image(random(4, (2, 3, 5, 5)), device)
    k = TANH.kernel(device)
    k.offset = MPSOffset(2, -1, 0)                 # replaced by the padding policy
    y = k.encode(cb, x_img)
    assert isinstance(y, MPSTemporaryImage) and y.read_count == 1
    assert y.shape == x_img.shape and y.feature_channel_format == MPSImageFeatureChannelFormat.float32
    assert k.offset == MPSOffset(0, 0, 0)
    out, _ = poisoned(x_img.shape, device)
    copy = mpsnn.MPSCNNNeuron(device, neuron_descriptor=MPSNNNeuronDescriptor.cnn_neuron_descriptor(T.none))
    copy.encode(cb, y, out)                        # the host reads a temporary image through a kernel
    assert y.read_count == 0
    finish(cb)
    assert_close(values(out), TANH.forward(x), torch.float32)


def test_encode_auto_with_regular_allocator(device, cb) -> None:
    x_img, x = image(random(5, (1, 4, 3, 7)), device, torch.float16)
    k = TANH.kernel(device)
    k.destination_image_allocator = MPSImage.default_allocator
    y = k.encode(cb, x_img)
    assert type(y) is MPSImage and y.feature_channel_format == MPSImageFeatureChannelFormat.float16
    finish(cb)
    assert_close(values(y), TANH.forward(x), torch.float16)


@pytest.mark.parametrize("temporary", [True, False], ids=["temporary_state", "regular_state"])
def test_encode_returning_image_and_state(device, cb, temporary) -> None:
    x_img, x = image(random(6, (2, 3, 4, 5)), device)
    dy_img, dy = image(random(7, (2, 3, 4, 5)), device)
    k = TANH.kernel(device)
    y, state = k.encode(cb, x_img, destination_state_is_temporary=temporary)
    assert isinstance(state, mpsnn.MPSNNGradientState)
    assert state.is_temporary is temporary
    assert state.read_count == (1 if temporary else 0)
    out, _ = poisoned(x_img.shape, device)
    mpsnn.MPSCNNNeuron(device, neuron_descriptor=MPSNNNeuronDescriptor.cnn_neuron_descriptor(T.none)).encode(cb, y, out)
    g = TANH.gradient(device)
    g.destination_image_allocator = MPSImage.default_allocator
    dx = g.encode(cb, dy_img, x_img, state)
    if temporary:
        assert state.read_count == 0
        with pytest.raises(mpsnn.MPSStateError, match="MPSCNNNeuronGradient.*read_count"):
            g.encode(cb, dy_img, x_img, state)
    else:
        g.encode(cb, dy_img, x_img, state)          # a regular state may be read again
    finish(cb)
    assert dx.shape == x_img.shape
    assert_close(values(out), TANH.forward(x), torch.float32)
    assert_close(values(dx), dy * TANH.derivative(x), torch.float32)


def test_encode_batch_explicit(device, cb) -> None:
    xs = [image(random(10 + i, (1, 3, 4, 5)), device) for i in range(3)]
    dsts = [poisoned((1, 3, 4, 5), device) for _ in range(3)]
    k = PRELU.kernel(device)
    k.offset = MPSOffset(1, -1, 0)
    k.edge_mode = MPSImageEdgeMode.clamp
    states = k.result_state_batch([x for x, _ in xs])
    assert states is not None and len(states) == 3
    k.encode_batch(cb, [x for x, _ in xs], [d for d, _ in dsts], destination_states=states)
    finish(cb)
    geom = Geometry("batch", (1, 3, 4, 5), (1, 3, 4, 5), offset=(1, -1, 0), edge=C)
    for (_, x), (d, before) in zip(xs, dsts):
        assert_close(values(d), geom.reference(x, before, PRELU.forward), torch.float32)
    assert all(s.geometry.offset == MPSOffset(1, -1, 0) for s in states)


@pytest.mark.parametrize("temporary", [None, True, False], ids=["no_state", "temporary_states", "regular_states"])
def test_encode_batch_auto(device, cb, temporary) -> None:
    xs = [image(random(20 + i, (1, 2, 3, 3)), device) for i in range(2)]
    dys = [image(random(30 + i, (1, 2, 3, 3)), device) for i in range(2)]
    k = TANH.kernel(device)
    k.destination_image_allocator = MPSImage.default_allocator
    result = k.encode_batch(cb, [x for x, _ in xs], destination_state_is_temporary=temporary)
    if temporary is None:
        ys = result
    else:
        ys, states = result
        assert len(states) == 2 and all(s.is_temporary is temporary for s in states)
        g = TANH.gradient(device)
        dxs_auto = g.encode_batch(cb, [d for d, _ in dys], [x for x, _ in xs], states)
        assert len(dxs_auto) == 2
        if not temporary:
            dx_explicit = [poisoned((1, 2, 3, 3), device) for _ in range(2)]
            g.encode_batch(cb, [d for d, _ in dys], [x for x, _ in xs], states, [d for d, _ in dx_explicit])
    assert isinstance(ys, list) and len(ys) == 2
    copies = []
    for dx in (dxs_auto if temporary is not None else []):
        out, _ = poisoned((1, 2, 3, 3), device)
        mpsnn.MPSCNNNeuron(device, neuron_descriptor=MPSNNNeuronDescriptor.cnn_neuron_descriptor(T.none)).encode(cb, dx, out)
        copies.append(out)
    finish(cb)
    for (y, (_, x)) in zip(ys, xs):
        assert_close(values(y), TANH.forward(x), torch.float32)
    for out, (_, x), (_, dy) in zip(copies, xs, dys):
        assert_close(values(out), dy * TANH.derivative(x), torch.float32)
    if temporary is False:
        for (d, _), (_, x), (_, dy) in zip(dx_explicit, xs, dys):
            assert_close(values(d), dy * TANH.derivative(x), torch.float32)


def test_batch_read_count_drops_once_per_unique_image(device, cb) -> None:
    desc = MPSImageDescriptor(channel_format=MPSImageFeatureChannelFormat.float32, width=3, height=2, feature_channels=3)
    tmp = MPSTemporaryImage(cb, image_descriptor=desc)
    x_img, x = image(random(40, (1, 2, 3, 3)), device)
    ident = mpsnn.MPSCNNNeuron(device, neuron_descriptor=MPSNNNeuronDescriptor.cnn_neuron_descriptor(T.none))
    ident.encode(cb, x_img, tmp)
    tmp.read_count = 2
    dsts = [poisoned((1, 2, 3, 3), device) for _ in range(2)]
    TANH.kernel(device).encode_batch(cb, [tmp, tmp], [d for d, _ in dsts])
    assert tmp.read_count == 1
    finish(cb)
    for d, _ in dsts:
        assert_close(values(d), TANH.forward(x), torch.float32)


# -- gradient geometry -------------------------------------------------------------------------------

GRAD_GEOMETRIES = [
    Geometry("plain", (2, 3, 4, 5), (2, 3, 4, 5)),
    Geometry("neg_offset", (1, 4, 5, 3), (1, 4, 5, 3), offset=(-1, -2, 0)),
    Geometry("pos_offset_smaller_dest", (1, 5, 6, 3), (1, 3, 4, 3), offset=(1, 2, 0)),
    Geometry("clip_and_offset", (1, 4, 5, 3), (1, 3, 6, 3), offset=(-1, 1, 0), clip=((1, 0, 0), (3, 2, 1))),
    Geometry("clip_partly_outside", (1, 4, 5, 1), (1, 4, 5, 1), clip=((2, 1, 0), (10, 10, 1))),
    Geometry("src_channel_offset", (1, 3, 4, 9), (1, 3, 4, 5), src_c_off=4),
    Geometry("src_channel_max", (1, 3, 4, 7), (1, 3, 4, 3), src_c_max=3),
    Geometry("dst_channel_offset", (1, 3, 4, 3), (1, 3, 4, 8), dst_c_off=4),
    Geometry("dst_channel_offset_wide", (1, 3, 4, 8), (1, 3, 4, 12), src_c_off=4, dst_c_off=4),
    Geometry("batch3_clip_depth3", (3, 2, 3, 3), (3, 2, 3, 3), offset=(1, 0, 0), clip=((0, 1, 0), (9, 9, 3))),
]


@pytest.mark.parametrize("form", ["explicit", "auto"])
@pytest.mark.parametrize("geom", [pytest.param(g, id=g.id) for g in GRAD_GEOMETRIES])
def test_gradient_through_forward_geometry(device, cb, geom: Geometry, form: str) -> None:
    neuron = PRELU
    seed = sum(map(ord, geom.id))
    x_img, x = image(random(seed, geom.src), device)
    dy_img, dy = image(random(seed + 1, geom.dst), device)
    y, _ = poisoned(geom.dst, device)
    k = neuron.kernel(device)
    geom.configure(k)
    state = k.result_state(x_img, destination_image=y)
    k.encode(cb, x_img, y, destination_state=state)
    g = neuron.gradient(device)
    if form == "explicit":
        dx, before = poisoned(geom.src, device)
        g.encode(cb, dy_img, x_img, state, dx)
    else:
        g.destination_image_allocator = MPSImage.default_allocator
        dx = g.encode(cb, dy_img, x_img, state)
        assert dx.shape == x_img.shape, "the result has the forward source's size"
        before = values(dx)  # regular images start zero-filled
    finish(cb)
    expected = ref.unary_gradient_reference(
        dy, x, before, offset=geom.offset, clip_rect=geom.clip, src_c_off=geom.src_c_off, src_c_max=geom.src_c_max,
        dst_c_off=geom.dst_c_off, dfn=neuron.derivative)
    assert_close(values(dx), expected, torch.float32, msg=geom.id)


def test_gradient_auto_result_is_zero_outside_the_forward_channel_window(device, cb) -> None:
    """An auto-allocated gradient result reuses pooled storage; channels the forward pass did
    not read must come back as gradient 0, not as stale pool contents."""
    shape = (1, 3, 4, 8)
    x_img, x = image(random(11, shape), device)
    dy_img, dy = image(random(12, (1, 3, 4, 4)), device)
    # leave poisoned storage of the result's size in the command buffer's pool
    stale = MPSTemporaryImage(cb, _float_desc(4, 3, 8))
    stale.tensor.fill_(POISON)
    stale.read_count = 0
    assert cb.pooled_storage_count() == 1
    k = TANH.kernel(device)
    k.source_feature_channel_offset = 4
    y, _ = poisoned((1, 3, 4, 4), device)
    state = k.result_state(x_img, destination_image=y)
    k.encode(cb, x_img, y, destination_state=state)
    dx = TANH.gradient(device).encode(cb, dy_img, x_img, state)
    assert isinstance(dx, MPSTemporaryImage) and cb.pooled_storage_count() == 0, "the result took the pooled storage"
    out = MPSImage(device, image_descriptor=_float_desc(4, 3, 8))
    mpsnn.MPSCNNNeuron(device, neuron_descriptor=MPSNNNeuronDescriptor.cnn_neuron_descriptor(T.none)).encode(cb, dx, out)
    finish(cb)
    got = values(out)
    np.testing.assert_array_equal(got[..., :4], 0.0)
    expected = dy * ref.neuron_derivative(x[..., 4:], T.tanH, TANH.a, TANH.b, 0.0)
    assert_close(got[..., 4:], expected, torch.float32)


@pytest.mark.parametrize("geom", [
    pytest.param(Geometry("offset_z", (3, 2, 3, 3), (2, 2, 3, 3), offset=(0, 0, 1)), id="offset_z"),
    pytest.param(Geometry("clip_z", (2, 2, 3, 3), (3, 2, 3, 3), clip=((0, 0, 1), (9, 9, 2))), id="clip_origin_z"),
    pytest.param(Geometry("depth", (3, 2, 3, 3), (3, 2, 3, 3), clip=((0, 0, 0), (9, 9, 2))), id="clip_depth"),
])
def test_error_gradient_through_batch_addressing(device, cb, geom: Geometry) -> None:
    """Gradient kernels map result image n to incoming-gradient image n; a forward pass that
    moved images (offset.z, clip_rect.origin.z, a partial clip depth) is refused, not
    answered with a silently wrong result."""
    x_img, _ = image(random(1, geom.src), device)
    dy_img, _ = image(random(2, geom.dst), device)
    y, _ = poisoned(geom.dst, device)
    k = TANH.kernel(device)
    geom.configure(k)
    state = k.result_state(x_img, destination_image=y)
    k.encode(cb, x_img, y, destination_state=state)
    dx, _ = poisoned(geom.src, device)
    with pytest.raises(mpsnn.MPSError, match=r"MPSCNNNeuronGradient.*gradient_state.*offset\.z"):
        TANH.gradient(device).encode(cb, dy_img, x_img, state, dx)
    with pytest.raises(mpsnn.MPSError, match=r"MPSCNNNeuronGradient.*gradient_state"):
        TANH.gradient(device).encode(cb, dy_img, x_img, state)


def test_gradient_is_adjoint_of_forward(device, cb) -> None:
    """<dy, J x_dot> == <J^T dy, x_dot> for a linear neuron with offset and clip (edge zero)."""
    geom = Geometry("adj", (2, 4, 5, 3), (2, 3, 6, 3), offset=(-1, 1, 0), clip=((1, 0, 0), (4, 9, 2)))
    neuron = Neuron("lin0", T.linear, a=1.5, b=0.0)
    xd_img, xd = image(random(50, geom.src), device)
    dy_img, dy = image(random(51, geom.dst), device)
    y, _ = poisoned(geom.dst, device, 0.0)
    k = neuron.kernel(device)
    geom.configure(k)
    state = k.result_state(xd_img, destination_image=y)
    k.encode(cb, xd_img, y, destination_state=state)
    dx, _ = poisoned(geom.src, device)
    neuron.gradient(device).encode(cb, dy_img, xd_img, state, dx)
    finish(cb)
    lhs = float((dy * values(y)).sum())
    rhs = float((values(dx) * xd).sum())
    assert_close(np.array(lhs), np.array(rhs), torch.float32)


# -- errors --------------------------------------------------------------------------------------------


def _float_desc(w: int, h: int, c: int, n: int = 1) -> MPSImageDescriptor:
    return MPSImageDescriptor(channel_format=MPSImageFeatureChannelFormat.float32, width=w, height=h, feature_channels=c, number_of_images=n)


def test_error_destination_too_few_channels(device, cb) -> None:
    x_img, _ = image(random(1, (1, 2, 2, 5)), device)
    dst, _ = poisoned((1, 2, 2, 3), device)
    with pytest.raises(mpsnn.MPSError, match=r"MPSCNNNeuron.*destination_image\.feature_channels"):
        LINEAR.kernel(device).encode(cb, x_img, dst)
    wide, _ = poisoned((1, 2, 2, 8), device)
    k = LINEAR.kernel(device)
    k.destination_feature_channel_offset = 4          # 4 + 5 > 8
    with pytest.raises(mpsnn.MPSError, match=r"MPSCNNNeuron.*destination_image\.feature_channels"):
        k.encode(cb, x_img, wide)


@pytest.mark.parametrize("prop", ["destination_feature_channel_offset", "source_feature_channel_offset"])
@pytest.mark.parametrize("bad", [2, 5, -4])
def test_error_channel_offset_not_multiple_of_4(device, prop, bad) -> None:
    k = mpsnn.MPSCNNNeuronReLU(device, a=0.0)
    with pytest.raises(mpsnn.MPSError, match=rf"MPSCNNNeuronReLU.*`{prop}`.*{bad}.*multiple of 4"):
        setattr(k, prop, bad)


def test_error_source_channel_offset_past_channels(device, cb) -> None:
    x_img, _ = image(random(1, (1, 2, 2, 3)), device)
    dst, _ = poisoned((1, 2, 2, 3), device)
    k = mpsnn.MPSCNNNeuronSigmoid(device)
    k.source_feature_channel_offset = 4
    with pytest.raises(mpsnn.MPSError, match=r"MPSCNNNeuronSigmoid.*source_feature_channel_offset.*4"):
        k.encode(cb, x_img, dst)


def test_error_prelu_too_few_slopes(device, cb) -> None:
    x_img, _ = image(random(1, (1, 2, 2, 3)), device)
    dst, _ = poisoned((1, 2, 2, 3), device)
    k = mpsnn.MPSCNNNeuronPReLU(device, a=np.array([0.1, 0.2], np.float32))
    with pytest.raises(mpsnn.MPSError, match=r"MPSCNNNeuronPReLU.*data.*2.*3"):
        k.encode(cb, x_img, dst)
    desc = MPSNNNeuronDescriptor.cnn_neuron_prelu_descriptor(np.array([0.1, 0.2], np.float32))
    state = LINEAR.kernel(device).result_state(x_img)
    with pytest.raises(mpsnn.MPSError, match=r"MPSCNNNeuronGradient.*data"):
        mpsnn.MPSCNNNeuronGradient(device, neuron_descriptor=desc).encode(cb, x_img, x_img, state, dst)


def test_error_gradient_channel_mismatch(device, cb) -> None:
    x_img, _ = image(random(1, (1, 2, 2, 5)), device)
    dy_img, _ = image(random(2, (1, 2, 2, 3)), device)
    k = LINEAR.kernel(device)
    state = k.result_state(x_img)
    dst, _ = poisoned((1, 2, 2, 5), device)
    with pytest.raises(mpsnn.MPSError, match=r"MPSCNNNeuronGradient.*source_gradient.*3.*5"):
        LINEAR.gradient(device).encode(cb, dy_img, x_img, state, dst)


def test_error_exhausted_temporary_image(device, cb) -> None:
    x_img, _ = image(random(1, (1, 2, 2, 3)), device)
    tmp = MPSTemporaryImage(cb, image_descriptor=_float_desc(2, 2, 3))
    k = LINEAR.kernel(device)
    k.encode(cb, x_img, tmp)                         # writing leaves read_count alone
    assert tmp.read_count == 1
    d1, _ = poisoned((1, 2, 2, 3), device)
    d2, _ = poisoned((1, 2, 2, 3), device)
    k.encode(cb, tmp, d1)
    assert tmp.read_count == 0
    with pytest.raises(mpsnn.MPSStateError, match=r"MPSCNNNeuron.*source_image.*read_count"):
        k.encode(cb, tmp, d2)
    with pytest.raises(mpsnn.MPSStateError, match=r"read_count"):
        tmp.read_count = 3


def test_error_temporary_image_from_another_command_buffer(device, queue, cb) -> None:
    other = queue.make_command_buffer()
    tmp = MPSTemporaryImage(other, image_descriptor=_float_desc(2, 2, 3))
    x_img, _ = image(random(1, (1, 2, 2, 3)), device)
    with pytest.raises(mpsnn.MPSStateError, match=r"MPSCNNNeuron.*destination_image.*another command buffer"):
        LINEAR.kernel(device).encode(cb, x_img, tmp)


def test_error_encode_on_committed_command_buffer(device, cb) -> None:
    x_img, _ = image(random(1, (1, 2, 2, 3)), device)
    dst, _ = poisoned((1, 2, 2, 3), device)
    finish(cb)
    with pytest.raises(mpsnn.MPSStateError, match=r"MPSCNNNeuron.*`command_buffer`.*(committed|completed)"):
        LINEAR.kernel(device).encode(cb, x_img, dst)
    with pytest.raises(mpsnn.MPSStateError, match=r"command_buffer"):
        LINEAR.kernel(device).encode(cb, x_img)


@pytest.mark.skipif(CUDA, reason="CUDA is usable here")
def test_error_cuda_device_without_cuda() -> None:
    with pytest.raises(mpsnn.MPSError, match=r"Device.*`name`.*cuda"):
        mpsnn.Device("cuda")
    with pytest.raises(mpsnn.MPSError, match=r"Device.*`name`.*cuda:1"):
        mpsnn.Device("cuda:1")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_error_mixing_devices() -> None:
    cpu, gpu = mpsnn.Device("cpu"), mpsnn.Device("cuda")
    cb = gpu.make_command_queue().make_command_buffer()
    x_cpu, _ = image(random(1, (1, 2, 2, 3)), cpu)
    x_gpu, _ = image(random(1, (1, 2, 2, 3)), gpu)
    d_gpu, _ = poisoned((1, 2, 2, 3), gpu)
    d_cpu, _ = poisoned((1, 2, 2, 3), cpu)
    k = LINEAR.kernel(gpu)
    with pytest.raises(mpsnn.MPSDeviceError, match=r"MPSCNNNeuron.*source_image"):
        k.encode(cb, x_cpu, d_gpu)
    with pytest.raises(mpsnn.MPSDeviceError, match=r"MPSCNNNeuron.*destination_image"):
        k.encode(cb, x_gpu, d_cpu)
    cpu_cb = cpu.make_command_queue().make_command_buffer()
    with pytest.raises(mpsnn.MPSDeviceError, match=r"MPSCNNNeuron.*command_buffer"):
        k.encode(cpu_cb, x_gpu, d_gpu)


def test_error_descriptor_type_count() -> None:
    with pytest.raises(mpsnn.MPSError, match=r"MPSNNNeuronDescriptor.*neuron_type.*count"):
        MPSNNNeuronDescriptor.cnn_neuron_descriptor(T.count)
    d = MPSNNNeuronDescriptor.cnn_neuron_descriptor(T.reLU)
    with pytest.raises(mpsnn.MPSError, match=r"MPSNNNeuronDescriptor.*neuron_type"):
        d.neuron_type = T.count


def test_error_prelu_through_plain_descriptor_factory() -> None:
    with pytest.raises(mpsnn.MPSError, match=r"MPSNNNeuronDescriptor.*neuron_type.*pReLU"):
        MPSNNNeuronDescriptor.cnn_neuron_descriptor(T.pReLU, a=0.1)


def test_error_batch_addressing(device, cb) -> None:
    x_img, _ = image(random(1, (2, 2, 2, 3)), device)
    dst, _ = poisoned((2, 2, 2, 3), device)
    k = LINEAR.kernel(device)
    k.offset = MPSOffset(0, 0, 2)
    with pytest.raises(mpsnn.MPSError, match=r"MPSCNNNeuron.*offset\.z"):
        k.encode(cb, x_img, dst)
    k.offset = MPSOffset(0, 0, 1)
    k.clip_rect = region((0, 0, 0), (2, 2, 2))      # only one source image left after offset.z
    with pytest.raises(mpsnn.MPSError, match=r"MPSCNNNeuron.*clip_rect"):
        k.encode(cb, x_img, dst)


def test_gradient_without_state_uses_kernel_properties(device, cb) -> None:
    """gradient_state=None: the gradient kernel's own offsets and channel windows apply."""
    x_img, x = image(random(21, (1, 3, 4, 8)), device)
    dy_img, dy = image(random(22, (1, 3, 4, 4)), device)
    g = TANH.gradient(device)
    g.secondary_source_feature_channel_offset = 4
    dx, before = poisoned((1, 3, 4, 4), device)
    g.encode(cb, dy_img, x_img, None, dx)
    finish(cb)
    expected = dy * ref.neuron_derivative(x[..., 4:], T.tanH, TANH.a, TANH.b, 0.0)
    assert_close(values(dx), expected, torch.float32)


def test_binary_kernels_refuse_a_destination_state_without_a_destination(device, queue) -> None:
    """The forms that return the result cannot fill a given state (the unary rule): an
    `MPSValueError`, not a silently ignored argument."""
    k = mpsnn.MPSNNReduceFeatureChannelsAndWeightsSum(device)
    a = mpsnn.MPSImage.from_torch(torch.ones(1, 2, 2, 4, device=device.torch_device))
    b = mpsnn.MPSImage.from_torch(torch.ones(1, 2, 2, 4, device=device.torch_device))
    st = mpsnn.MPSState(device)
    with pytest.raises(mpsnn.MPSValueError, match="destination_state"):
        k.encode(queue.make_command_buffer(), a, b, destination_state=st)


def test_binary_kernels_make_result_state_batches(device) -> None:
    add = mpsnn.MPSCNNAdd(device)
    imgs = [mpsnn.MPSImage.from_torch(torch.ones(1, 2, 3, 4, device=device.torch_device)) for _ in range(3)]
    states = add.result_state_batch(imgs, imgs)
    assert len(states) == 3 and all(isinstance(s, mpsnn.MPSCNNArithmeticGradientState) for s in states)
    assert len({id(s) for s in states}) == 3, "one state per pair"
    assert add.result_state_batch_for_primary_image == add.result_state_batch
