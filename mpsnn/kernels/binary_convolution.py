"""MPSCNNBinaryConvolution and MPSCNNBinaryFullyConnected (convolution.md §15).

Weights are bits: uint32 words ``[Cout][kH][kW][ceil(Cin/32)]``; bit ``t`` of word ``w``
(least significant first) is the weight of input channel ``32·w + t``: 1 means +1, 0 means
−1 (binaryWeights, XNOR) or 0 (AND). Bits past ``Cin`` do not contribute. ``groups`` must be 1.

Per output pixel (window placement as a convolution with dilation 1; off-image reads follow
the edge mode *before* the input transform)::

    x'(f)  = (S̃(f) + input_bias[f]) · input_scale[f]
    bin(v) = v < 0 ? −1 : +1                      (0 binarises to +1)
    binaryWeights: acc(o) = Σ x'(f)·w(o)           XNOR: acc(o) = Σ bin(x'(f))·w(o)
    AND:           acc(o) = Σ [x'(f) >= 0]·bit(o)
    out(o) = acc(o)·scale[o]·β(x, y) + out_bias[o]  ->  the descriptor's neuron, last

``β`` (only with ``useBetaScaling``): ``A = mean_c |x'|`` per source pixel (an image of the
source) and ``β`` = the mean of ``A`` over the kernel window of the output pixel, reading ``A``
with the edge mode (0 off-image for ``zero``; inferred, convolution.md §15.2). The binarised
sums are exact small integers; everything is computed in float32 (products of ±1 and 0/1
through the same convolution engine as :class:`MPSCNNConvolution`).

Initialisers: ``(device, convolution_data, scale_value, type, flags)`` — one output scale for
every channel, output bias from the data source's ``bias_terms`` (None -> 0) — and ``(device,
convolution_data, output_bias_terms, output_scale_terms, input_bias_terms, input_scale_terms,
type, flags)`` (None arrays -> 0 / 1 / 0 / 1). Default padding: ``sizeValidOnly``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..backends import dispatch
from ..backends.convolution import tf32
from ..backends.torch_eager import NeuronParams
from ..core.device import Device, MTLCommandBuffer
from ..core.enums import MPSCNNBinaryConvolutionFlags, MPSCNNBinaryConvolutionType, MPSCNNNeuronType, MPSNNPaddingMethod
from ..core.errors import MPSTypeError, value_error
from ..core.kernel import InputGeometry, MPSCNNKernel, Region
from ..core.regions import read_window
from ..images.image import MPSImage
from ..images.state import MPSState
from .convolution import WholeImageWindow, require_input_channels
from .convolution_data import _float_array, load_weights
from .results import write_result


def unpack_bits(words: np.ndarray, cin: int) -> np.ndarray:
    """uint32 ``[Cout][kH][kW][words]`` -> 0/1 float32 ``[Cout][kH][kW][Cin]`` (LSB first)."""
    w = np.ascontiguousarray(words, dtype="<u4")
    bits = np.unpackbits(w.view(np.uint8).reshape(*w.shape, 4), axis=-1, bitorder="little")
    return bits.reshape(*w.shape[:-1], -1)[..., :cin].astype(np.float32)


class MPSCNNBinaryConvolution(MPSCNNKernel):
    """``MPSCNNBinaryConvolution``: a convolution with one-bit weights and (XNOR, AND) a
    binarised input; see the module docstring for the math.

    Args:
        device: the device (positional, first).
        convolution_data: an ``MPSCNNConvolutionDataSource`` whose ``weights()`` are uint32 words.
        scale_value: one output scale for all channels (first initialiser).
        output_bias_terms, output_scale_terms, input_bias_terms, input_scale_terms: the
            per-channel arrays of the second initialiser.
        type: :class:`MPSCNNBinaryConvolutionType` (default ``binaryWeights``).
        flags: :class:`MPSCNNBinaryConvolutionFlags` (default ``none``).

    Properties: ``input_feature_channels``, ``output_feature_channels``.
    """

    _default_padding = int(MPSNNPaddingMethod.sizeValidOnly)
    _result_state_class = None
    _kind = "binary"

    def __init__(self, device: Device | str, convolution_data: Any = None, scale_value: float | None = None, *,
                 output_bias_terms: Any = None, output_scale_terms: Any = None, input_bias_terms: Any = None,
                 input_scale_terms: Any = None, type: MPSCNNBinaryConvolutionType = MPSCNNBinaryConvolutionType.binaryWeights,
                 flags: MPSCNNBinaryConvolutionFlags = MPSCNNBinaryConvolutionFlags.none) -> None:
        super().__init__(device)
        owner = self.__class__.__name__
        if convolution_data is None:
            raise MPSTypeError(f"{owner}: `convolution_data` (an MPSCNNConvolutionDataSource) is required")
        try:
            self.type = MPSCNNBinaryConvolutionType(type)
            self.flags = MPSCNNBinaryConvolutionFlags(flags)
        except ValueError:
            raise value_error(owner, "type/flags", (type, flags), "be an MPSCNNBinaryConvolutionType and MPSCNNBinaryConvolutionFlags") from None
        loaded, geom = load_weights(owner, convolution_data, "binary")
        if geom.groups != 1:
            raise value_error(owner, "descriptor.groups", geom.groups, "be 1 for binary convolutions")
        if geom.dilation_x != 1 or geom.dilation_y != 1:
            raise value_error(owner, "descriptor.dilation", (geom.dilation_x, geom.dilation_y), "be 1 for binary convolutions")
        self._geom = geom
        self._descriptor = loaded.descriptor
        self._data_source = convolution_data
        if loaded.label is not None:
            self.label = loaded.label
        cin, cout = geom.input_channels, geom.output_channels
        if scale_value is not None and any(a is not None for a in (output_bias_terms, output_scale_terms, input_bias_terms, input_scale_terms)):
            raise MPSTypeError(f"{owner}: give either `scale_value` or the per-channel bias/scale arrays, not both")
        if scale_value is not None or all(a is None for a in (output_bias_terms, output_scale_terms, input_bias_terms, input_scale_terms)):
            out_scale = np.full(cout, np.float32(1.0 if scale_value is None else scale_value), np.float32)
            out_bias = loaded.bias if loaded.bias is not None else np.zeros(cout, np.float32)
            in_bias, in_scale = np.zeros(cin, np.float32), np.ones(cin, np.float32)
        else:
            out_bias = np.zeros(cout, np.float32) if output_bias_terms is None else _float_array(owner, "output_bias_terms", output_bias_terms, cout)
            out_scale = np.ones(cout, np.float32) if output_scale_terms is None else _float_array(owner, "output_scale_terms", output_scale_terms, cout)
            in_bias = np.zeros(cin, np.float32) if input_bias_terms is None else _float_array(owner, "input_bias_terms", input_bias_terms, cin)
            in_scale = np.ones(cin, np.float32) if input_scale_terms is None else _float_array(owner, "input_scale_terms", input_scale_terms, cin)
        bits = unpack_bits(loaded.weights, cin)
        w = bits if self.type == MPSCNNBinaryConvolutionType.AND else 2.0 * bits - 1.0
        dev = self.device.torch_device
        self._w = torch.from_numpy(np.ascontiguousarray(w)).to(dev).permute(0, 3, 1, 2)  # OIHW channels-last
        self._out_bias = torch.from_numpy(out_bias).to(dev)
        self._out_scale = torch.from_numpy(out_scale).to(dev)
        self._in_bias = torch.from_numpy(in_bias).to(dev)
        self._in_scale = torch.from_numpy(in_scale).to(dev)
        self._kernel_width, self._kernel_height = geom.kernel_width, geom.kernel_height
        self._stride_x, self._stride_y = geom.stride_x, geom.stride_y

    @property
    def input_feature_channels(self) -> int:
        return self._geom.input_channels

    @property
    def output_feature_channels(self) -> int:
        return self._geom.output_channels

    def source_channels_used(self, source: MPSImage) -> int:
        return require_input_channels(self, source, self._geom.input_channels)

    def _result_feature_channels(self, source_channels: int) -> int:
        return self._geom.output_channels

    def _window(self, inp: InputGeometry, region: Region) -> tuple[int, int]:
        return inp.window_left, inp.window_top

    def _neuron(self) -> NeuronParams | None:
        nd = self._descriptor.effective_neuron()
        if nd is None:
            return None
        slopes = None
        if nd.neuron_type == MPSCNNNeuronType.pReLU:
            if nd.data is None or nd.data.size < self._geom.output_channels:
                raise value_error(self._name(), "fused_neuron_descriptor.data", None, f"hold {self._geom.output_channels} PReLU slopes")
            slopes = torch.from_numpy(nd.data[: self._geom.output_channels].copy()).to(self.device.torch_device)
        return NeuronParams(nd.neuron_type, nd.a, nd.b, nd.c, slopes)

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        g = self._geom
        left, top = self._window(inp, region)
        span_w = (region.width - 1) * g.stride_x + g.kernel_width
        span_h = (region.height - 1) * g.stride_y + g.kernel_height
        x = src.tensor[inp.n0:inp.n0 + region.count, :, :, inp.c0:inp.c0 + g.input_channels].float()
        xs = read_window(x, left, top, span_w, span_h, inp.edge_mode)
        xp = (xs + self._in_bias) * self._in_scale
        if self.type == MPSCNNBinaryConvolutionType.XNOR:
            xin = torch.where(xp < 0, -1.0, 1.0)
        elif self.type == MPSCNNBinaryConvolutionType.AND:
            xin = (xp >= 0).float()
        else:
            xin = xp
        with tf32(False, xin):  # binaryWeights sums float products: no TF32 on CUDA
            acc = F.conv2d(xin.permute(0, 3, 1, 2), self._w, None, (g.stride_y, g.stride_x))
        if self.flags & MPSCNNBinaryConvolutionFlags.useBetaScaling:
            # A is a per-pixel image of the source; off-image pixels of A follow the edge mode
            a_img = ((x + self._in_bias) * self._in_scale).abs().mean(dim=3, keepdim=True)
            a = read_window(a_img, left, top, span_w, span_h, inp.edge_mode).permute(0, 3, 1, 2)
            beta = F.avg_pool2d(a, (g.kernel_height, g.kernel_width), (g.stride_y, g.stride_x))
            acc = acc * beta
        out = acc * self._out_scale.view(1, -1, 1, 1) + self._out_bias.view(1, -1, 1, 1)
        y = out.permute(0, 2, 3, 1).contiguous()
        p = self._neuron()
        if p is not None:
            dispatch.neuron_forward(y, y, p)
        write_result(dest, region, y.to(dest.dtype) if dest.dtype != y.dtype else y)


class MPSCNNBinaryFullyConnected(WholeImageWindow, MPSCNNBinaryConvolution):
    """``MPSCNNBinaryFullyConnected``: the binary convolution with the window covering the
    whole source and a ``1 x 1 x Cout`` result (``offset`` is not used). The bit layout is
    ``[Cout][kH][kW][ceil(Cin/32)]`` with ``kW``/``kH`` the source width/height."""

    def _window(self, inp: InputGeometry, region: Region) -> tuple[int, int]:
        return 0, 0

    def _encode_region(self, cb, src, inp, dest, region, state):  # type: ignore[no-untyped-def]
        self._check_source_size(src)
        super()._encode_region(cb, src, inp, dest, Region(region.n0, region.count, region.x0, region.y0, 1, 1, region.c0, region.channels), state)
