"""Neurons: MPSNNNeuronDescriptor, MPSCNNNeuron (+ the 14 typed subclasses), MPSCNNNeuronGradient.

Math (neurons.md §5-6), element-wise on every pixel, channel and image; ``a``, ``b``, ``c``
are float32 parameters, arithmetic is float32 whatever the storage format:

=============  ===========================================  =================================================
type           f(x)                                         f'(x)
=============  ===========================================  =================================================
none           x                                            1
reLU           x >= 0 ? x : a*x                             x >= 0 ? 1 : a   (1 at 0)
linear         a*x + b                                      a
sigmoid        1 / (1 + e^-x)                               s*(1-s)
hardSigmoid    clamp(a*x + b, 0, 1)                         a where 0 <= a*x+b <= 1 (edges inclusive), else 0
tanH           a*tanh(b*x)                                  a*b*(1 - tanh^2(b*x))
absolute       |x|                                          sign(x)   (0 at 0, inferred)
softPlus       a*log(1 + e^(b*x))                           a*b*sigmoid(b*x)
softSign       x / (1 + |x|)                                1 / (1 + |x|)^2
ELU            x >= 0 ? x : a*(e^x - 1)                     x < 0 ? a*e^x : 1
pReLU          x >= 0 ? x : a[ch]*x                         x >= 0 ? 1 : a[ch]
reLUN          min(x >= 0 ? x : a*x, b)                     0 where the clamp is active (p >= b), else 1 / a
power          (a*x + b)^c                                  a*c*(a*x + b)^(c-1)
exponential    c == -1 ? e^(a*x+b) : c^(a*x+b)              a*ln(base)*f(x)
logarithm      c == -1 ? ln(a*x+b) : log_c(a*x+b)           a / (ln(base)*(a*x + b))
geLU           0.5*x*(1 + erf(x/sqrt 2))                    0.5*(1 + erf(x/sqrt 2)) + x*e^(-x^2/2)/sqrt(2 pi)
=============  ===========================================  =================================================

Decisions where Apple's sources conflict or are silent (neurons.md §9): HardSigmoid's
derivative uses the newest header's pre-clamp condition; ReLUN's derivative in the clamp
region is 0 (the header literally says ``b``); GeLU's derivative is the exact one (the
header's formula is twice too large in its second term); parameters a factory does not take
are 0.0; PReLU slope ``i`` applies to the ``i``-th processed channel (counted after
``source_feature_channel_offset``) and there must be at least as many slopes as channels
processed. Off-image reads (only possible with a non-zero ``offset``) see 0 with edge mode
zero, so such pixels hold ``f(0)``.

The legacy subclasses take their parameters as keywords whose defaults are Apple's
documented "default behaviour" values (ReLU a=0; Linear a=1, b=0; HardSigmoid 0.2, 0.5;
TanH 1, 1; SoftPlus 1, 1; ELU a=1; ReLUN a=1, b=6; Power a=1, b=0, c=1; Exponential and
Logarithm a=1, b=0, c=-1, i.e. natural base). ``MPSNNNeuronDescriptor`` factories do not
fill defaults: missing parameters are 0.0, as in Apple's API.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..backends import dispatch
from ..backends.torch_eager import NeuronParams
from ..core.binary_kernel import MPSCNNGradientKernel
from ..core.device import Device, MTLCommandBuffer
from ..core.enums import MPSCNNNeuronType
from ..core.errors import MPSTypeError, value_error
from ..core.host_arrays import float32_array
from ..core.kernel import InputGeometry, MPSCNNKernel, Region
from ..core.regions import read_window
from ..images import formats as fm
from ..images.image import MPSImage
from ..images.state import MPSState

T = MPSCNNNeuronType

#: Apple's documented "default behaviour" parameters, used by the legacy subclasses and the
#: parameterless graph nodes (neurons.md §3, §8).
RECOMMENDED_PARAMETERS: dict[MPSCNNNeuronType, tuple[float, float, float]] = {
    T.none: (0.0, 0.0, 0.0), T.reLU: (0.0, 0.0, 0.0), T.linear: (1.0, 0.0, 0.0), T.sigmoid: (0.0, 0.0, 0.0),
    T.hardSigmoid: (0.2, 0.5, 0.0), T.tanH: (1.0, 1.0, 0.0), T.absolute: (0.0, 0.0, 0.0), T.softPlus: (1.0, 1.0, 0.0),
    T.softSign: (0.0, 0.0, 0.0), T.ELU: (1.0, 0.0, 0.0), T.reLUN: (1.0, 6.0, 0.0), T.power: (1.0, 0.0, 1.0),
    T.exponential: (1.0, 0.0, -1.0), T.logarithm: (1.0, 0.0, -1.0), T.geLU: (0.0, 0.0, 0.0),
}


def _f32(owner: str, name: str, value: Any) -> float:
    try:
        return float(np.float32(value))
    except (TypeError, ValueError):
        raise value_error(owner, name, value, "be a real number") from None


def _slopes_array(owner: str, data: Any, count: int | None = None) -> np.ndarray:
    """PReLU slopes as a float32 NumPy array (bytes are read as native float32); ``count``
    keeps the first ``count`` slopes."""
    arr = float32_array(owner, "data", data, copy=False)  # retained, not copied (noCopy)
    if count is not None:
        if count < 1 or count > arr.size:
            raise value_error(owner, "count", count, f"be in [1, {arr.size}] (the number of slopes given)")
        arr = arr[:count]
    if arr.size == 0:
        raise value_error(owner, "data", "0 slopes", "hold at least one slope")
    return arr


class MPSNNNeuronDescriptor:
    """``MPSNNNeuronDescriptor``: a value object describing one neuron function.

    Make one with :meth:`cnn_neuron_descriptor` (``cnnNeuronDescriptorWithType:a:b:c:``) or
    :meth:`cnn_neuron_prelu_descriptor` (``cnnNeuronPReLUDescriptorWithData:noCopy:``).
    Properties (read-write): ``neuron_type``, ``a``, ``b``, ``c`` (float32, default 0.0),
    ``data`` (PReLU slopes, float32; None otherwise).
    """

    def __init__(self, neuron_type: MPSCNNNeuronType = MPSCNNNeuronType.none, a: float = 0.0, b: float = 0.0, c: float = 0.0, data: Any = None) -> None:
        self.neuron_type = neuron_type
        self.a, self.b, self.c = a, b, c
        self.data = data

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "neuron_type":
            try:
                value = MPSCNNNeuronType(value)
            except ValueError:
                raise value_error("MPSNNNeuronDescriptor", "neuron_type", value, "be an MPSCNNNeuronType") from None
            if value == MPSCNNNeuronType.count:
                raise value_error("MPSNNNeuronDescriptor", "neuron_type", value.name, "be a neuron type, not the `count` sentinel")
        elif name in ("a", "b", "c"):
            value = _f32("MPSNNNeuronDescriptor", name, value)
        elif name == "data" and value is not None:
            value = _slopes_array("MPSNNNeuronDescriptor", value)
        object.__setattr__(self, name, value)

    @classmethod
    def cnn_neuron_descriptor(cls, neuron_type: MPSCNNNeuronType, a: float = 0.0, b: float = 0.0, c: float = 0.0) -> "MPSNNNeuronDescriptor":
        """``cnnNeuronDescriptorWithType:[a:[b:[c:]]]``. Use :meth:`cnn_neuron_prelu_descriptor` for PReLU."""
        if MPSCNNNeuronType(neuron_type) == T.pReLU:
            raise value_error("MPSNNNeuronDescriptor", "neuron_type", "pReLU", "be made with cnn_neuron_prelu_descriptor(data, no_copy), which carries the per-channel slopes")
        return cls(neuron_type, a, b, c)

    cnn_neuron_descriptor_with_type = cnn_neuron_descriptor

    @classmethod
    def cnn_neuron_prelu_descriptor(cls, data: Any, no_copy: bool = False) -> "MPSNNNeuronDescriptor":
        """``cnnNeuronPReLUDescriptorWithData:noCopy:``: one float32 slope per channel.
        ``no_copy`` is a hint only (no numeric effect)."""
        return cls(T.pReLU, data=data)

    cnn_neuron_p_re_lu_descriptor = cnn_neuron_prelu_descriptor
    cnn_neuron_prelu_descriptor_with_data = cnn_neuron_prelu_descriptor

    def copy(self) -> "MPSNNNeuronDescriptor":
        return MPSNNNeuronDescriptor(self.neuron_type, self.a, self.b, self.c, None if self.data is None else self.data.copy())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MPSNNNeuronDescriptor):
            return NotImplemented
        same_data = (self.data is None and other.data is None) or (
            self.data is not None and other.data is not None and np.array_equal(self.data, other.data))
        return (self.neuron_type, self.a, self.b, self.c) == (other.neuron_type, other.a, other.b, other.c) and same_data

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        extra = f", data=<{self.data.size} slopes>" if self.data is not None else ""
        return f"MPSNNNeuronDescriptor({self.neuron_type.name}, a={self.a}, b={self.b}, c={self.c}{extra})"


class _NeuronParameters:
    """Shared by the forward and gradient neuron kernels: the parameters and their checks."""

    def _set_neuron(self, descriptor: Any) -> None:
        owner = type(self).__name__
        if not isinstance(descriptor, MPSNNNeuronDescriptor):
            raise MPSTypeError(f"{owner}: `neuron_descriptor` must be an MPSNNNeuronDescriptor, but got {type(descriptor).__name__}")
        if descriptor.neuron_type == T.pReLU and descriptor.data is None:
            raise value_error(owner, "neuron_descriptor.data", None, "hold the PReLU slopes (one float32 per channel)")
        self._neuron_type = descriptor.neuron_type
        self._a, self._b, self._c = descriptor.a, descriptor.b, descriptor.c
        self._data = None if descriptor.data is None else descriptor.data.copy()
        self._moved_to_device()

    def _moved_to_device(self) -> None:
        self._slopes = None if self._data is None else torch.from_numpy(self._data).to(self.device.torch_device)  # type: ignore[attr-defined]

    neuron_type = property(lambda self: self._neuron_type)
    a = property(lambda self: self._a)
    b = property(lambda self: self._b)
    c = property(lambda self: self._c)
    data = property(lambda self: None if self._data is None else self._data.tobytes())

    @property
    def neuron_descriptor(self) -> MPSNNNeuronDescriptor:
        return MPSNNNeuronDescriptor(self._neuron_type, self._a, self._b, self._c, None if self._data is None else self._data.copy())

    def _params(self, channels: int) -> NeuronParams:
        slopes = None
        if self._neuron_type == T.pReLU:
            assert self._slopes is not None
            if self._slopes.numel() < channels:
                raise value_error(type(self).__name__, "data", f"{self._slopes.numel()} PReLU slopes",
                                  f"hold one slope per processed channel ({channels})")
            slopes = self._slopes[:channels]
        return NeuronParams(self._neuron_type, self._a, self._b, self._c, slopes)


def _quantizer(dest: MPSImage):
    fmt = dest.feature_channel_format
    if fmt in fm.UNORM_MAX:
        return lambda v: fm.quantize_unorm(v, fmt)
    return None


class MPSCNNNeuron(_NeuronParameters, MPSCNNKernel):
    """``MPSCNNNeuron``: applies an activation function element-wise (see the module table).

    Args:
        device: the device (positional, first).
        neuron_descriptor: an :class:`MPSNNNeuronDescriptor` (any type but ``count``).

    Read-only properties: ``neuron_type``, ``a``, ``b``, ``c``, ``data`` (PReLU slopes as
    float32 bytes). Shape: the result has the source's size and the number of channels
    processed. Produces an :class:`~mpsnn.MPSNNGradientState` for
    :class:`MPSCNNNeuronGradient` through the state-returning encode forms.

    Example::

        relu = MPSCNNNeuron(device, neuron_descriptor=MPSNNNeuronDescriptor.cnn_neuron_descriptor(MPSCNNNeuronType.reLU))
        y = relu.encode(command_buffer, x)
    """

    _fixed_type: MPSCNNNeuronType | None = None

    def __init__(self, device: Device | str, neuron_descriptor: MPSNNNeuronDescriptor | None = None) -> None:
        MPSCNNKernel.__init__(self, device)
        if neuron_descriptor is None:
            raise MPSTypeError(f"{type(self).__name__}: `neuron_descriptor` is required (plain init with a device alone is unavailable)")
        if self._fixed_type is not None and isinstance(neuron_descriptor, MPSNNNeuronDescriptor) and neuron_descriptor.neuron_type != self._fixed_type:
            raise value_error(type(self).__name__, "neuron_descriptor.neuron_type", neuron_descriptor.neuron_type.name, f"be {self._fixed_type.name} for this class")
        self._set_neuron(neuron_descriptor)

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        x = read_window(src.tensor[inp.n0:inp.n0 + region.count, :, :, inp.c0:inp.c0 + inp.channels],
                        inp.window_left, inp.window_top, region.width, region.height, inp.edge_mode, inp.stride_x, inp.stride_y)
        out = dest.tensor[region.index()]
        dispatch.neuron_forward(x, out, self._params(inp.channels), _quantizer(dest))


def _typed(name: str, ntype: MPSCNNNeuronType, params: Sequence[str], doc: str) -> type:
    defaults = RECOMMENDED_PARAMETERS[ntype]

    def __init__(self, device, neuron_descriptor=None, **kwargs):  # type: ignore[no-untyped-def]
        if neuron_descriptor is None:
            unknown = set(kwargs) - set(params)
            if unknown:
                raise MPSTypeError(f"{name}: unexpected argument(s) {sorted(unknown)}; this class takes {list(params) or 'no parameters'}")
            values = {"a": 0.0, "b": 0.0, "c": 0.0}
            for k, d in zip("abc", defaults):
                if k in params:
                    values[k] = kwargs.get(k, d)
            neuron_descriptor = MPSNNNeuronDescriptor(ntype, **values)
        elif kwargs:
            raise MPSTypeError(f"{name}: give either `neuron_descriptor` or the parameters {list(params)}, not both")
        MPSCNNNeuron.__init__(self, device, neuron_descriptor)

    sig = ", ".join(f"{p}={d}" for p, d in zip("abc", defaults) if p in params)
    cls = type(name, (MPSCNNNeuron,), {
        "__init__": __init__, "_fixed_type": ntype, "__module__": __name__,
        "__doc__": f"``{name}``: {doc}\n\n    ``{name}(device{', ' + sig if sig else ''})`` or ``{name}(device, neuron_descriptor=desc)``.\n    See :class:`MPSCNNNeuron` for encoding.",
    })
    return cls


MPSCNNNeuronLinear = _typed("MPSCNNNeuronLinear", T.linear, "ab", "f(x) = a*x + b.")
MPSCNNNeuronReLU = _typed("MPSCNNNeuronReLU", T.reLU, "a", "f(x) = x >= 0 ? x : a*x (leaky ReLU; a = 0 is ReLU).")
MPSCNNNeuronSigmoid = _typed("MPSCNNNeuronSigmoid", T.sigmoid, "", "f(x) = 1 / (1 + e^-x).")
MPSCNNNeuronHardSigmoid = _typed("MPSCNNNeuronHardSigmoid", T.hardSigmoid, "ab", "f(x) = clamp(a*x + b, 0, 1).")
MPSCNNNeuronTanH = _typed("MPSCNNNeuronTanH", T.tanH, "ab", "f(x) = a*tanh(b*x).")
MPSCNNNeuronAbsolute = _typed("MPSCNNNeuronAbsolute", T.absolute, "", "f(x) = |x|.")
MPSCNNNeuronSoftPlus = _typed("MPSCNNNeuronSoftPlus", T.softPlus, "ab", "f(x) = a*log(1 + e^(b*x)).")
MPSCNNNeuronSoftSign = _typed("MPSCNNNeuronSoftSign", T.softSign, "", "f(x) = x / (1 + |x|).")
MPSCNNNeuronELU = _typed("MPSCNNNeuronELU", T.ELU, "a", "f(x) = x >= 0 ? x : a*(e^x - 1).")
MPSCNNNeuronReLUN = _typed("MPSCNNNeuronReLUN", T.reLUN, "ab", "f(x) = min(x >= 0 ? x : a*x, b).")
MPSCNNNeuronPower = _typed("MPSCNNNeuronPower", T.power, "abc", "f(x) = (a*x + b)^c.")
MPSCNNNeuronExponential = _typed("MPSCNNNeuronExponential", T.exponential, "abc", "f(x) = c^(a*x + b), base e when c == -1.")
MPSCNNNeuronLogarithm = _typed("MPSCNNNeuronLogarithm", T.logarithm, "abc", "f(x) = log_c(a*x + b), base e when c == -1.")


class MPSCNNNeuronPReLU(MPSCNNNeuron):
    """``MPSCNNNeuronPReLU``: f(x) = x >= 0 ? x : a[ch]*x with one slope per channel.

    ``MPSCNNNeuronPReLU(device, a=slopes, count=n)`` (``initWithDevice:a:count:``; ``count``
    defaults to ``len(a)``) or ``MPSCNNNeuronPReLU(device, neuron_descriptor=desc)``.
    """

    _fixed_type = T.pReLU

    def __init__(self, device: Device | str, neuron_descriptor: MPSNNNeuronDescriptor | None = None, a: Any = None, count: int | None = None) -> None:
        if neuron_descriptor is None:
            if a is None:
                raise MPSTypeError("MPSCNNNeuronPReLU: `a` (the per-channel slopes) is required")
            neuron_descriptor = MPSNNNeuronDescriptor(T.pReLU, data=_slopes_array("MPSCNNNeuronPReLU", a, count))
        elif a is not None or count is not None:
            raise MPSTypeError("MPSCNNNeuronPReLU: give either `neuron_descriptor` or `a`/`count`, not both")
        MPSCNNNeuron.__init__(self, device, neuron_descriptor)


class MPSCNNNeuronGradient(_NeuronParameters, MPSCNNGradientKernel):
    """``MPSCNNNeuronGradient``: dL/dx = dL/dy * f'(x) for any neuron type.

    Args:
        device: the device (positional, first).
        neuron_descriptor: the same descriptor as the forward neuron.

    Encode: ``encode(cb, source_gradient, source_image, gradient_state[, destination_gradient])``
    where ``source_gradient`` is dL/dy, ``source_image`` the forward *input* x and
    ``gradient_state`` the state the forward encode produced. The result has x's size; the
    gradient is 0 at pixels the forward pass did not read. No gradient with respect to
    a, b, c or the PReLU slopes is produced (they are not trainable in MPS).
    """

    def __init__(self, device: Device | str, neuron_descriptor: MPSNNNeuronDescriptor | None = None) -> None:
        MPSCNNGradientKernel.__init__(self, device)
        if neuron_descriptor is None:
            raise MPSTypeError("MPSCNNNeuronGradient: `neuron_descriptor` is required")
        self._set_neuron(neuron_descriptor)

    def _result_feature_channels(self, primary_channels: int, secondary_channels: int) -> int:
        if primary_channels != secondary_channels:
            raise value_error(self._name(), "source_gradient", f"{primary_channels} channels used",
                              f"match the {secondary_channels} channels used of source_image")
        return primary_channels

    def _encode_region(self, cb, prim, pg, sec, sg, dest, region, state):  # type: ignore[no-untyped-def]
        dy = read_window(prim.tensor[pg.n0:pg.n0 + region.count, :, :, pg.c0:pg.c0 + pg.channels],
                         pg.window_left, pg.window_top, region.width, region.height, pg.edge_mode, pg.stride_x, pg.stride_y, pg.bounds)
        x = read_window(sec.tensor[sg.n0:sg.n0 + region.count, :, :, sg.c0:sg.c0 + sg.channels],
                        sg.window_left, sg.window_top, region.width, region.height, sg.edge_mode, sg.stride_x, sg.stride_y, sg.bounds)
        out = dest.tensor[region.index()]
        dispatch.neuron_gradient(dy, x, out, self._params(sg.channels), _quantizer(dest))
