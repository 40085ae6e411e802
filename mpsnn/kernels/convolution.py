"""MPSCNNConvolution, MPSCNNConvolutionGradient, MPSCNNFullyConnected, MPSCNNFullyConnectedGradient.

Forward (convolution.md §1, §3), per written destination pixel ``(x, y)``, image slot ``m``,
output channel ``o``::

    left = offset.x + i·sX − (kWd >> 1) ;  top = offset.y + j·sY − (kHd >> 1)
    acc(o) = Σ_q Σ_p Σ_c W[o][q][p][c] · S̃(n_src, left + p·dX, top + q·dY, cs0 + G(o)·Cin_g + c)
    D[n_dst, x, y, cd0 + o] = store(f((acc(o) + b[o])·I[o] + J[o]))

(``I``, ``J`` from inference batch norm, identity otherwise; ``f`` the fused neuron.)

Gradient (§11.3, the exact adjoint of the forward correlation)::

    dW[o][q][p][c] = Σ_n Σ_i Σ_j E(n,i,j,o) · S̃(n, sX·i + ox + dX·p, sY·j + oy + dY·q, cs0 + G(o)·Cin_g + c)
    db[o]          = Σ_n Σ_i Σ_j E(n,i,j,o)
    dS             = the adjoint of the correlation (off-image taps dropped)

Numerics and decisions:

* The numerics run through cuDNN (CUDA) or oneDNN (CPU) via torch on channels-last views of
  the NHWC images: no per-call layout copies. Weights are read from the data source once
  (float32), kept as a float32 master and converted once per image dtype into the OIHW
  channels-last tensor the convolution consumes (batch norm folded in for inference).
* Arithmetic: products in the image's dtype with float32 accumulation (cuDNN). For float32
  images ``accumulator_precision_option = float`` (the default) forbids TF32, ``half`` allows
  it (``MPSNNConvolutionAccumulatorPrecisionOption``). float16/bfloat16 images always
  accumulate in float32; cuDNN rounds their convolution result to the image dtype before the
  bias is added and before a fused neuron runs (so up to three roundings instead of one, each
  within the format's precision; measured excess over one rounding: 1.2e-3 relative for
  float16, 9.6e-3 for bfloat16).
  On the CPU, 16-bit images are convolved in float32 and rounded once on store
  (:func:`mpsnn.backends.convolution.cpu_float32`: faster there, and one rounding).
* The gradient kernel ignores the fused neuron and batch norm (they are not differentiated,
  §11.3) and uses the unfolded weights. ``E`` is read from the incoming gradient image at the
  forward clip rectangle's origin when that image has the forward destination's size, else
  from (0, 0) (an "unpadded E", §11.4). The result has the forward source's size and ``Cin``
  channels; pixels the forward pass never read get 0.
* Gradients with respect to weights and biases land in the ``MPSCNNConvolutionGradientState``
  (float32, the data source's layout). ``encode`` overwrites them with the sum over the images
  of that encode; ``encode_batch`` sums over the whole batch (the state is shared,
  ``is_result_state_reused_across_batch`` is True).
* Fully connected: the weight order is the FC documentation's ``[Cout][W][H][Cin]``
  (CONFLICT §14.1, switch in ``convolution_data``); it runs as one matrix product.
"""
from __future__ import annotations

import operator
import weakref
from typing import Any, Sequence

import torch

from ..backends import convolution as conv_backend
from ..backends import dispatch
from ..backends.optimizers import note_equal
from ..backends.torch_eager import NeuronParams
from ..core.binary_kernel import MPSCNNGradientKernel
from ..core.device import Device, MTLCommandBuffer
from ..core.enums import (
    MPSCNNConvolutionGradientOption,
    MPSCNNNeuronType,
    MPSNNConvolutionAccumulatorPrecisionOption,
    MPSNNPaddingMethod,
)
from ..core.errors import MPSTypeError, MPSValueError, value_error
from ..core.kernel import InputGeometry, MPSCNNKernel, Region, _consume
from ..images import formats as fm
from ..images.image import MPSImage, MPSImageDescriptor
from ..images.state import ForwardGeometry, MPSState
from . import convolution_data
from .convolution_data import (
    ConvolutionDataSource,
    ConvolutionGeometry,
    MPSCNNConvolutionDataSource,
    MPSCNNConvolutionGradientState,
    MPSCNNConvolutionWeightsAndBiasesState,
    fold_batch_norm,
    load_weights,
    weight_shape,
)
from .neuron import MPSNNNeuronDescriptor
from .results import write_result


def require_input_channels(kernel: Any, source: MPSImage, input_channels: int) -> int:
    """``Nin`` for kernels with a fixed input channel count: the source must supply at least
    ``input_channels`` channels from ``source_feature_channel_offset``."""
    n = MPSCNNKernel.source_channels_used(kernel, source)
    if n < input_channels:
        raise value_error(kernel._name(), "source_image.feature_channels", source.feature_channels,
                          f"supply input_feature_channels={input_channels} channels from source_feature_channel_offset={kernel.source_feature_channel_offset}",
                          f"{n} channels")
    return input_channels


class WholeImageWindow:
    """Mixin of the fully-connected kinds: the window is the whole source image (its size must
    equal the kernel size) and the result is 1 x 1."""

    _geom: ConvolutionGeometry

    def _check_source_size(self, src: MPSImage) -> None:
        g = self._geom
        if (src.width, src.height) != (g.kernel_width, g.kernel_height):
            raise value_error(self._name(), "source_image", f"{src.width}x{src.height}",  # type: ignore[attr-defined]
                              f"match the kernel size {g.kernel_width}x{g.kernel_height} (kernel_width x kernel_height)")

    def destination_image_descriptor(self, source_images, source_states=None):  # type: ignore[no-untyped-def]
        imgs = [source_images] if isinstance(source_images, MPSImage) else source_images
        self._check_source_size(imgs[0])
        desc = super().destination_image_descriptor(imgs, source_states)  # type: ignore[misc]
        desc.width, desc.height = 1, 1
        return desc


class _ConvolutionWeights:
    """Weight handling shared by every convolution-family kernel: load from the data source,
    float32 master tensors, per-dtype compute tensors, reload and export.

    The float32 master is OHWI (depthwise ``[O][H][W][1]``), except for the fully-connected
    kinds, whose master keeps the data source's own layout (``[Cout][W][H][Cin]`` while
    ``FULLY_CONNECTED_WIDTH_BEFORE_HEIGHT``): every weight transfer of a training step (export,
    reload into the forward and the gradient kernel, the weight gradient) is then a plain
    copy or is written in place, and the kernels reorder the source image instead
    (``x.transpose(1, 2)``, ``N·H·W·Cin`` values per encode, 1/Cout of the product's work)
    rather than the ``Cout·H·W·Cin`` weights several times per step.

    Two private forms serve mpsnn's graph update (``MPSCNNConvolutionGradientNode``), where a
    copy of the weights per step would be pure overhead:

    * :meth:`_export_shared`: an export whose tensors view the master, made a snapshot by
      copy on write (the next in-place write of the master first gives the views that are
      still referenced their own copies; none are made when nobody kept them).
    * :meth:`_borrow_master`: a gradient kernel reads its forward kernel's master instead of
      reloading a copy of the same weights (the graph always reloads both from one state).
      The forward kernel keeps writing the master in place (its address stays fixed, which a
      captured CUDA graph relies on); a borrowing kernel that is reloaded itself takes its
      own master again instead of writing the shared one."""

    _kind = "regular"
    _geom: ConvolutionGeometry
    label: str | None

    def _init_weights(self, weights: Any, kind: str) -> None:
        self._data_source = weights
        loaded, geom = load_weights(type(self).__name__, weights, kind)
        self._geom = geom
        self._descriptor = loaded.descriptor
        self._set_master(torch.from_numpy(loaded.weights), None if loaded.bias is None else torch.from_numpy(loaded.bias))
        if loaded.label is not None:
            self.label = loaded.label  # the data source's label (§6)

    def _set_master(self, w_internal: torch.Tensor, bias: torch.Tensor | None) -> None:
        dev = self.device.torch_device  # type: ignore[attr-defined]
        self._w32 = w_internal.to(dev, torch.float32).contiguous()
        self._b32 = None if bias is None else bias.to(dev, torch.float32).contiguous()
        self._compute: dict[tuple[torch.dtype, bool], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._neuron: tuple[NeuronParams | None] | None = None
        #: recorded encode plans (forward: _ForwardPlan, gradient: _GradientPlan); see _encode_checked
        self._plans: dict[Any, Any] = {}
        self._recording: Any = None
        #: views of the master handed out by _export_shared (weak): copied before an in-place write
        self._exports: list[weakref.ref[torch.Tensor]] = []
        #: whether the master tensors are another kernel's (_borrow_master)
        self._borrowed = False

    def _moved_to_device(self) -> None:
        borrowed = self._borrowed
        self._set_master(self._w32.clone() if borrowed else self._w32, self._b32.clone() if borrowed and self._b32 is not None else self._b32)
        super()._moved_to_device()  # type: ignore[misc]

    # -- layouts ----------------------------------------------------------------------------------
    def _to_layout(self, w_internal: torch.Tensor) -> torch.Tensor:
        """The master (class docstring) -> the data source's layout (a view)."""
        if self._geom.kind == "depthwise":
            return w_internal[..., 0]
        return w_internal

    def _from_layout(self, w_layout: torch.Tensor) -> torch.Tensor:
        """The data source's layout -> the master's (a view)."""
        w = w_layout.reshape(weight_shape(self._geom))
        return w.unsqueeze(-1) if self._geom.kind == "depthwise" else w

    @staticmethod
    def _in_master_order(x: torch.Tensor) -> torch.Tensor:
        """A fully-connected kernel's NHWC source in its master's image-axis order (a view)."""
        return x.transpose(1, 2) if convolution_data.FULLY_CONNECTED_WIDTH_BEFORE_HEIGHT else x

    def _compute_weights(self, dtype: torch.dtype, fold: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """OIHW channels-last weights (and bias) in ``dtype``; converted once per dtype."""
        key = (dtype, fold)
        if key not in self._compute:
            w, b = (fold_batch_norm(self._w32, self._b32, self._descriptor) if fold else (self._w32, self._b32))
            self._compute[key] = (w.permute(0, 3, 1, 2).to(dtype), None if b is None else b.to(dtype))
        return self._compute[key]

    # -- Apple's weight management --------------------------------------------------------------------
    @property
    def data_source(self) -> MPSCNNConvolutionDataSource:
        return self._data_source

    @property
    def input_feature_channels(self) -> int:
        return self._geom.input_channels

    @property
    def output_feature_channels(self) -> int:
        return self._geom.output_channels

    @property
    def groups(self) -> int:
        return self._geom.groups

    @property
    def channel_multiplier(self) -> int:
        return self._geom.channel_multiplier

    def reload_weights_and_biases_from_data_source(self) -> None:
        """Re-read weights and biases (and the descriptor's batch norm) from the data source."""
        loaded, geom = load_weights(type(self).__name__, self._data_source, self._kind)
        if geom != self._geom:
            raise value_error(type(self).__name__, "data source descriptor", geom, f"keep the kernel's geometry {self._geom}")
        self._descriptor = loaded.descriptor
        self._set_master(torch.from_numpy(loaded.weights), None if loaded.bias is None else torch.from_numpy(loaded.bias))

    def reload_weights_and_biases_with_data_source(self, data_source: Any = None) -> None:
        """Deprecated form: the argument is ignored, as in Apple's API."""
        self.reload_weights_and_biases_from_data_source()

    def reload_weights_and_biases_with_command_buffer(self, command_buffer: MTLCommandBuffer, state: MPSCNNConvolutionWeightsAndBiasesState) -> None:
        """Take float32 weights (the data source's layout) and biases from ``state`` as part
        of ``command_buffer``; decrements the state's read count."""
        cb = self._check_command_buffer(command_buffer)  # type: ignore[attr-defined]
        if not isinstance(state, MPSCNNConvolutionWeightsAndBiasesState):
            raise MPSTypeError(f"{type(self).__name__}: `state` must be an MPSCNNConvolutionWeightsAndBiasesState, but got {type(state).__name__}")
        state.check_usable(type(self).__name__, cb)
        n = self._w32.numel()
        if state.weights.numel() != n:
            raise value_error(type(self).__name__, "state.weights", f"{state.weights.numel()} values", f"hold {n} weights {list(weight_shape(self._geom))}")
        with cb.encoding(type(self).__name__):
            if self._views_master(state):
                # the state's tensors are this master (an in-place update of an _export_shared
                # state): it holds the new weights already
                self._compute.clear()
                self._plans.clear()
                state.consume_read()
                return
            if self._borrowed:
                # the master is another kernel's (_borrow_master): take an own one (the weights
                # are written in full below), leave that one be
                self._set_master(torch.empty_like(self._w32), None if self._b32 is None else self._b32.clone())
            self._detach_exports()
            self._w32.copy_(self._from_layout(state.weights))
            # the state now holds the master's values: the next update, whose source is an
            # export of this master and whose result is likely this state again, skips its
            # copy of the values while neither is written (CPU; see note_equal)
            note_equal(state.weights, self._to_layout(self._w32))
            if state.biases is not None:
                if self._b32 is None:
                    self._b32 = torch.zeros(self._geom.output_channels, dtype=torch.float32, device=self._w32.device)
                self._b32.copy_(state.biases.reshape(-1))
                note_equal(state.biases, self._b32)
            self._compute.clear()
            self._plans.clear()
        state.consume_read()

    #: Swift's ``reloadWeightsAndBiases(with:state:)``
    reload_weights_and_biases = reload_weights_and_biases_with_command_buffer

    def export_weights_and_biases(self, command_buffer: MTLCommandBuffer, result_state_can_be_temporary: bool = False) -> MPSCNNConvolutionWeightsAndBiasesState:
        """The current float32 weights (the data source's layout) and biases in a new state."""
        cb = self._check_command_buffer(command_buffer)  # type: ignore[attr-defined]
        with cb.encoding(type(self).__name__):
            w = self._to_layout(self._w32).clone()
            b = self._b32.clone() if self._b32 is not None else torch.zeros(self._geom.output_channels, dtype=torch.float32, device=self._w32.device)
        if result_state_can_be_temporary:
            st = MPSCNNConvolutionWeightsAndBiasesState(w, b)
            st.is_temporary, st.command_buffer, st._read_count = True, cb, 1
            return st
        return MPSCNNConvolutionWeightsAndBiasesState(w, b)

    export_weights_and_biases_with_command_buffer = export_weights_and_biases

    def _export_shared(self, command_buffer: MTLCommandBuffer) -> MPSCNNConvolutionWeightsAndBiasesState:
        """:meth:`export_weights_and_biases` without the copy (non-temporary): the state's
        tensors are views of the master, registered for copy on write. Before the master is
        next written in place (:meth:`reload_weights_and_biases_with_command_buffer`), every
        such tensor that is still referenced (by the state or on its own) is re-pointed at a
        copy of its values (``Tensor.set_``), so whoever kept the state keeps a snapshot; when
        nobody did (a data source's ``update`` reads it during the call) nothing is copied.
        One set of such views is live at a time (a new export first detaches the older ones),
        so a holder that writes through its state (an optimizer's in-place form) changes the
        master, which a reload from that state then finds up to date, and no other holder's
        snapshot. Views a holder derives from those tensors are not tracked (the graph, the
        one caller, hands the state to the data source's ``update``)."""
        cb = self._check_command_buffer(command_buffer)  # type: ignore[attr-defined]
        with cb.encoding(type(self).__name__):
            self._detach_exports()
            w = self._to_layout(self._w32)
            w = w.view_as(w)
            views = [w]
            if self._b32 is not None:
                b = self._b32.view_as(self._b32)
                views.append(b)
            else:
                b = torch.zeros(self._geom.output_channels, dtype=torch.float32, device=self._w32.device)
        self._exports[:] = [weakref.ref(t) for t in views]
        return MPSCNNConvolutionWeightsAndBiasesState(w, b)

    def _views_master(self, state: MPSCNNConvolutionWeightsAndBiasesState) -> bool:
        """Whether ``state``'s weights (and biases, where it has them) are exactly this
        kernel's master tensors in the data source's layout."""
        def same(t: torch.Tensor, u: torch.Tensor | None) -> bool:
            return u is not None and t.data_ptr() == u.data_ptr() and t.shape == u.shape and t.stride() == u.stride()
        return same(state.weights, self._to_layout(self._w32)) and (state.biases is None or same(state.biases.reshape(-1), self._b32))

    def _detach_exports(self) -> None:
        """Copy on write of :meth:`_export_shared`: give each view still referenced its own copy."""
        for ref in self._exports:
            t = ref()
            if t is not None:
                t.set_(t.clone())  # type: ignore[call-overload]
        self._exports.clear()

    def _borrow_master(self, owner: "_ConvolutionWeights") -> bool:
        """Read ``owner``'s float32 master (weights, biases and their export registry) from now
        on instead of a copy of it: the graph's gradient kernel after the forward kernel was
        reloaded from the state both would read (class docstring). Clears what a reload
        clears. False, and nothing done, unless both kernels have one geometry (so one master
        layout), one device and agree on having biases."""
        if owner is self or owner._borrowed or owner._geom != self._geom or owner._w32.device != self._w32.device \
                or (owner._b32 is None) != (self._b32 is None):
            return False
        self._w32, self._b32, self._exports = owner._w32, owner._b32, owner._exports
        self._borrowed = True
        self._compute.clear()
        self._plans.clear()
        return True

    def _allow_tf32(self) -> bool:
        return getattr(self, "accumulator_precision_option", MPSNNConvolutionAccumulatorPrecisionOption.float) == MPSNNConvolutionAccumulatorPrecisionOption.half

    def _neuron_params(self) -> NeuronParams | None:
        """The fused neuron's parameters (PReLU slopes on the device), built once per weights load."""
        if self._neuron is None:
            self._neuron = (self._make_neuron_params(),)
        return self._neuron[0]

    def _make_neuron_params(self) -> NeuronParams | None:
        nd = self._descriptor.effective_neuron()
        if nd is None:
            return None
        slopes = None
        if nd.neuron_type == MPSCNNNeuronType.pReLU:
            if nd.data is None or nd.data.size < self._geom.output_channels:
                raise value_error(type(self).__name__, "fused_neuron_descriptor.data", None if nd.data is None else f"{nd.data.size} slopes",
                                  f"hold one PReLU slope per output channel ({self._geom.output_channels})")
            slopes = torch.from_numpy(nd.data[: self._geom.output_channels].copy()).to(self._w32.device)
        return NeuronParams(nd.neuron_type, nd.a, nd.b, nd.c, slopes)


def _legacy_data_source(owner: str, weights: Any, convolution_descriptor: Any, kernel_weights: Any, bias_terms: Any, flags: int) -> Any:
    if weights is not None:
        if convolution_descriptor is not None or kernel_weights is not None:
            raise MPSTypeError(f"{owner}: give either `weights` (a data source) or `convolution_descriptor` + `kernel_weights`, not both")
        return weights
    if convolution_descriptor is None or kernel_weights is None:
        raise MPSTypeError(f"{owner}: `weights` (an MPSCNNConvolutionDataSource) is required")
    if int(flags) != 0:
        raise value_error(owner, "flags", flags, "be MPSCNNConvolutionFlags.none")
    return ConvolutionDataSource(convolution_descriptor, weights=torch.as_tensor(kernel_weights, dtype=torch.float32).numpy(), bias_terms=bias_terms)


class MPSCNNConvolution(_ConvolutionWeights, MPSCNNKernel):
    """``MPSCNNConvolution``: 2-D convolution (regular, grouped, dilated, depthwise, sub-pixel)
    with fused bias, inference batch norm and neuron (see the module docstring for the math).

    Args:
        device: the device (positional, first).
        weights: an :class:`MPSCNNConvolutionDataSource` (``initWithDevice:weights:``).
        convolution_descriptor, kernel_weights, bias_terms, flags: the deprecated
            ``initWithDevice:convolutionDescriptor:kernelWeights:biasTerms:flags:`` form
            (float32 OHWI weights).

    Properties: ``input_feature_channels``, ``output_feature_channels``, ``groups``,
    ``data_source``, ``sub_pixel_scale_factor``, ``channel_multiplier`` (0 unless depthwise),
    ``fused_neuron_descriptor``, ``accumulator_precision_option`` (rw, default ``float``),
    deprecated ``neuron_type`` / ``neuron_parameter_a/_b/_c``; the kernel-base properties.

    Shape: ``[N, H, W, Cin] -> [N, H', W', Cout]`` (sub-pixel: ``Cout/r²`` channels, r times
    larger); with the default padding ``H' = ceil(H/sY)``, ``W' = ceil(W/sX)``.
    """

    _kind = "regular"

    def __init__(self, device: Device | str, weights: MPSCNNConvolutionDataSource | None = None, *, convolution_descriptor: Any = None,
                 kernel_weights: Any = None, bias_terms: Any = None, flags: int = 0) -> None:
        MPSCNNKernel.__init__(self, device)
        ds = _legacy_data_source(type(self).__name__, weights, convolution_descriptor, kernel_weights, bias_terms, flags)
        self._init_weights(ds, self._kind)
        g = self._geom
        self._kernel_width, self._kernel_height = g.kernel_width, g.kernel_height
        self._stride_x, self._stride_y = g.stride_x, g.stride_y
        self._dilation_x, self._dilation_y = g.dilation_x, g.dilation_y
        self.accumulator_precision_option = MPSNNConvolutionAccumulatorPrecisionOption.float

    @property
    def sub_pixel_scale_factor(self) -> int:
        return self._geom.sub_pixel

    @property
    def fused_neuron_descriptor(self) -> MPSNNNeuronDescriptor | None:
        return self._descriptor.effective_neuron()

    @property
    def neuron_type(self) -> MPSCNNNeuronType:
        n = self._descriptor.effective_neuron()
        return MPSCNNNeuronType.none if n is None else n.neuron_type

    @property
    def neuron_parameter_a(self) -> float:
        n = self._descriptor.effective_neuron()
        return 1.0 if n is None else n.a

    @property
    def neuron_parameter_b(self) -> float:
        n = self._descriptor.effective_neuron()
        return 1.0 if n is None else n.b

    @property
    def neuron_parameter_c(self) -> float:
        n = self._descriptor.effective_neuron()
        return 1.0 if n is None else n.c

    def is_result_state_reused_across_batch(self) -> bool:
        return True

    def source_channels_used(self, source: MPSImage) -> int:
        return require_input_channels(self, source, self._geom.input_channels)

    def _result_feature_channels(self, source_channels: int) -> int:
        return self._geom.output_channels // (self._geom.sub_pixel ** 2)

    def _customize_descriptor(self, desc: MPSImageDescriptor, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None) -> MPSImageDescriptor:
        r = self._geom.sub_pixel
        if r > 1:
            desc = desc.copy()
            desc.width, desc.height = desc.width * r, desc.height * r
        return desc

    def _make_state(self, source: MPSImage, dest: MPSImage | None, command_buffer: MTLCommandBuffer | None) -> MPSState | None:
        return MPSCNNConvolutionGradientState(self._geometry(source, dest), self.device, command_buffer, self)

    # -- encode --------------------------------------------------------------------------------------
    #: the kernel properties a forward plan depends on (besides the weights, which clear the plans)
    _plan_properties = operator.attrgetter("_offset", "_clip_rect", "_dst_c_off", "_src_c_off", "_src_c_max", "_edge_mode",
                                           "accumulator_precision_option")
    #: whether encodes may be replayed from a plan (subclasses with their own numerics say False)
    _use_plans = True
    #: a graph's fused epilogue for the current encode (mpsnn; see :class:`_Epilogue`)
    _epilogue: "_Epilogue | None" = None

    def _encode_checked(self, cb: MTLCommandBuffer, src: MPSImage, dest: Any, state: MPSState | None) -> None:
        """Repeated encodes of one geometry replay a plan recorded by the first one (see
        :class:`_ForwardPlan`); anything else takes the general path."""
        if state is not None or not self._use_plans or src.parent is not None or not isinstance(dest, MPSImage) or dest.parent is not None:
            MPSCNNKernel._encode_checked(self, cb, src, dest, state)
            return
        dest = self._check_image("destination_image", dest, cb)
        xt = src.tensor
        key = (xt.shape, xt.stride(), xt.dtype, *_layout(dest), dest.feature_channel_format, self._plan_properties(self))
        plan = self._plans.get(key)
        if plan is None:
            self._recording = key
            try:
                MPSCNNKernel._encode_checked(self, cb, src, dest, state)
            finally:
                self._recording = None
            return
        self._check_no_alias(dest, src)
        with cb.encoding(self._name()):
            plan.encode(xt, dest, self._epilogue)

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        g = self._geom
        xt = src.tensor
        whole_x = inp.n0 == 0 and region.count == xt.shape[0] and inp.c0 == 0 and g.input_channels == xt.shape[3]
        x_index = None if whole_x else (slice(inp.n0, inp.n0 + region.count), slice(None), slice(None), slice(inp.c0, inp.c0 + g.input_channels))
        x = xt if x_index is None else xt[x_index]
        w, b = self._compute_weights(x.dtype if x.dtype != torch.float64 else torch.float32, fold=True)
        cast = x.dtype != w.dtype
        if cast:
            x = x.to(w.dtype)
        r = g.sub_pixel
        ow, oh = (region.width + r - 1) // r, (region.height + r - 1) // r
        p = self._neuron_params()
        ep = self._epilogue
        if ep is not None and (p is not None or r > 1 or (ep.z is not None and tuple(ep.z.shape) != tuple(dest.shape))):
            raise MPSValueError(f"{self._name()}: a graph epilogue needs a convolution without fused neuron or sub-pixel "
                                "scaling whose residual has the destination's shape")
        if r == 1 and dest.dtype == w.dtype and dest.feature_channel_format not in fm.UNORM_MAX:
            # the result fills a region of a destination in the compute dtype: write it in place
            out_index = None if region.covers(dest) else region.index()
            if out_index is None and not dest.is_allocated:
                out = torch.empty(dest.shape, dtype=dest.dtype, device="meta")     # planned against, not allocated yet
            else:
                out = dest.tensor if out_index is None else dest.tensor[out_index]
            conv = conv_backend.plan_conv2d(x, w, stride=(g.stride_x, g.stride_y), dilation=(g.dilation_x, g.dilation_y),
                                            groups=g.torch_groups, left=inp.window_left, top=inp.window_top, out_w=ow, out_h=oh,
                                            edge_mode=inp.edge_mode, allow_tf32=self._allow_tf32(), out=out)
            if conv is not None:
                plan = _ForwardPlan(conv, x_index, out_index, w, b, p)
                if cast:
                    plan.finish(x, dest.tensor if out_index is None else dest.tensor[out_index], ep)
                else:
                    plan.encode(xt, dest, ep)
                    if self._recording is not None:
                        self._plans[self._recording] = plan
                return
        y = conv_backend.conv2d_nhwc(x, w, b if ep is None else ep.bias, stride=(g.stride_x, g.stride_y),
                                     dilation=(g.dilation_x, g.dilation_y), groups=g.torch_groups, left=inp.window_left,
                                     top=inp.window_top, out_w=ow, out_h=oh, edge_mode=inp.edge_mode, allow_tf32=self._allow_tf32())
        if ep is not None:
            if ep.z is not None:
                y = y + ep.z[region.index()].to(y.dtype)
            if ep.relu:
                p = _RELU
        if r > 1:
            if p is not None:
                y = y.contiguous()
                dispatch.neuron_forward(y, y, p)
                p = None
            y = conv_backend.depth_to_space_dcr(y, r, region.width, region.height)
        if p is not None:
            if not y.is_contiguous():
                y = y.contiguous()
            dispatch.neuron_forward(y, y, p)
        write_result(dest, region, y)


class _ForwardPlan:
    """One forward convolution's work for a fixed geometry, kept by the kernel so that
    repeated encodes of that geometry (every training step, every inference) skip the
    geometry, padding and validation work of the general path.

    A plan is recorded by an encode that ran the planned path (:func:`plan_conv2d` found a
    single-call form and the source needs no dtype conversion) and keyed by everything the
    path depends on: the source's and destination's tensor shapes, strides and dtypes, the
    destination's channel format and the kernel's geometry properties. Reloading weights
    clears the plans. Per encode it slices the source and destination (batch and channel
    windows), runs the convolution into the destination and applies the fused neuron.
    """

    __slots__ = ("conv", "x_index", "out_index", "w", "b", "neuron", "relu")

    def __init__(self, conv: conv_backend.Conv2dPlan, x_index: tuple[slice, ...] | None, out_index: tuple[slice, ...] | None,
                 w: torch.Tensor, b: torch.Tensor | None, neuron: NeuronParams | None) -> None:
        self.conv, self.x_index, self.out_index, self.w, self.b, self.neuron = conv, x_index, out_index, w, b, neuron
        #: the fused neuron is a plain ReLU (a = 0), which cuDNN can apply in the convolution's epilogue
        self.relu = neuron is not None and neuron.neuron_type == MPSCNNNeuronType.reLU and neuron.a == 0.0 and neuron.slopes is None

    def encode(self, xt: torch.Tensor, dest: MPSImage, ep: "_Epilogue | None" = None) -> None:
        """Run the convolution of ``xt`` into ``dest`` with the fused neuron, or with a graph
        epilogue ``ep`` instead (bias, residual, ReLU). With ``FUSED_CUDNN_RELU`` on, a ReLU
        result that fills a destination without storage yet comes from one fused cuDNN call
        whose output becomes the destination's storage (no bias or neuron pass)."""
        x = xt if self.x_index is None else xt[self.x_index]
        relu, bias, z = (self.relu, self.b, None) if ep is None else (ep.relu, ep.bias, ep.z)
        if relu and FUSED_CUDNN_RELU and self.out_index is None and not dest.is_allocated:
            y = self.conv.fused(x, self.w, bias, z)
            if y is not None:
                write_result(dest, Region(0, dest.number_of_images, 0, 0, dest.width, dest.height, 0, dest.feature_channels), y)
                return
        if ep is None and self.neuron is None and self.out_index is None and not self.conv.direct and not dest.is_allocated:
            # the CPU path (and CUDA without cuDNN's out= form) computes a fresh tensor anyway:
            # a destination without storage adopts it instead of receiving a copy
            y = self.conv.run(x, self.w, self.b, None)
            assert y is not None
            write_result(dest, Region(0, dest.number_of_images, 0, 0, dest.width, dest.height, 0, dest.feature_channels), y)
            return
        yt = dest.tensor
        self.finish(x, yt if self.out_index is None else yt[self.out_index], ep)

    def finish(self, x: torch.Tensor, out: torch.Tensor, ep: "_Epilogue | None" = None) -> None:
        if ep is not None:
            self.conv.run(x, self.w, None, out)
            if ep.z is not None:
                out.add_(ep.z)
            if ep.relu:
                dispatch.neuron_forward(out, out, _RELU, bias=ep.bias)
            elif ep.bias is not None:
                out.add_(ep.bias)
            return
        if self.neuron is None:
            self.conv.run(x, self.w, self.b, out)
            return
        # the bias goes into the neuron's pass (one pass over the result, not two, and one
        # rounding of the biased value instead of two)
        self.conv.run(x, self.w, None, out)
        dispatch.neuron_forward(out, out, self.neuron, bias=self.b)


#: let a convolution whose fused neuron is a plain ReLU (or a graph's residual epilogue) run as
#: one fused cuDNN call on CUDA (mpsnn). cuDNN's ReLU is ``max(v, 0)``; see :class:`_Epilogue`.
FUSED_CUDNN_RELU = True
_RELU = NeuronParams(MPSCNNNeuronType.reLU)


class _Epilogue:
    """What :class:`~mpsnn.MPSNNGraph` asks of one encode of a convolution without a fused
    neuron (mpsnn graph fusion): ``bias`` replaces the kernel's bias (None: no bias), ``z``
    (an NHWC tensor of the destination's shape, or None) is added, then ``relu`` applies a
    ReLU. The graph sets it on the kernel around that one encode. On CUDA the whole
    ``relu(conv + bias + z)`` is one cuDNN call (``FUSED_CUDNN_RELU``); cuDNN rounds once
    (the unfused path rounds after the convolution and after the addition too), and its
    ReLU is ``max(v, 0)`` where MPS's is ``v >= 0 ? v : 0·v``: NaN propagates in both
    (checked on an H200), and they differ only for a sum of -inf (0 against NaN), which no
    finite input and weights produce."""

    __slots__ = ("z", "bias", "relu")

    def __init__(self, z: torch.Tensor | None, bias: torch.Tensor | None, relu: bool) -> None:
        self.z, self.bias, self.relu = z, bias, relu


def _layout(image: MPSImage) -> tuple[Any, Any]:
    """An image's tensor shape and strides, without allocating its storage (a fresh image's
    storage will be contiguous)."""
    if image.is_allocated:
        t = image.tensor
        return t.shape, t.stride()
    shape = torch.Size(image.shape)
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= d
    return shape, tuple(reversed(stride))


class ConvolutionGradientBase(_ConvolutionWeights, MPSCNNGradientKernel):
    """What the convolution-family gradient kernels share: the weights, the forward geometry
    from the gradient state, the channel rules, the incoming-gradient window and storing dW/db
    into the state (overwritten by ``encode``, summed over the batch by ``encode_batch``)."""

    _kind = "regular"
    _state_class: type = MPSCNNConvolutionGradientState
    _forward_name = "convolution"

    def __init__(self, device: Device | str, weights: MPSCNNConvolutionDataSource | None = None) -> None:
        MPSCNNGradientKernel.__init__(self, device)
        if weights is None:
            raise MPSTypeError(f"{type(self).__name__}: `weights` (the forward {self._forward_name}'s data source) is required")
        self._init_weights(weights, self._kind)
        self.gradient_option = MPSCNNConvolutionGradientOption.all
        self.accumulator_precision_option = MPSNNConvolutionAccumulatorPrecisionOption.float
        self._is_state_modified = True
        self._accumulating: set[int] | None = None

    @property
    def source_gradient_feature_channels(self) -> int:
        return self._geom.output_channels

    @property
    def source_image_feature_channels(self) -> int:
        return self._geom.input_channels

    def apply_forward_geometry(self, g: ForwardGeometry) -> None:
        self._forward = g
        self._p_c_off, self._p_c_max = g.destination_feature_channel_offset, self._geom.output_channels
        self._s_c_off, self._s_c_max = g.source_feature_channel_offset, self._geom.input_channels
        self._dst_c_off = 0

    def _result_feature_channels(self, primary_channels: int, secondary_channels: int) -> int:
        g = self._geom
        if primary_channels < g.output_channels:
            raise value_error(self._name(), "source_gradient.feature_channels", primary_channels, f"supply output_feature_channels={g.output_channels} channels")
        if secondary_channels < g.input_channels:
            raise value_error(self._name(), "source_image.feature_channels", secondary_channels, f"supply input_feature_channels={g.input_channels} channels")
        return g.input_channels

    _gradient_states_required = "the forward encode's states carry its geometry and receive dW and db"

    def _check_gradient_state(self, name: str, state: Any) -> None:
        if not isinstance(state, self._state_class):
            raise MPSTypeError(f"{self._name()}: `{name}` must be the {self._state_class.__name__} of the forward encode, but got {type(state).__name__}")

    def encode_batch(self, command_buffer, source_gradients, source_images, gradient_states, destination_gradients=None):  # type: ignore[no-untyped-def, override]
        self._accumulating = set()
        try:
            return super().encode_batch(command_buffer, source_gradients, source_images, gradient_states, destination_gradients)
        finally:
            self._accumulating = None

    def _prepare_new_destination(self, cb, prim, sec, dest):  # type: ignore[no-untyped-def]
        """Nothing to do: the result is written in full (zeros where the forward pass read nothing)."""

    def _checked_forward(self, dest: MPSImage, sec: MPSImage) -> tuple[ForwardGeometry, MPSCNNConvolutionGradientState]:
        f, st = self._forward, self._gradient_state
        if f is None or not isinstance(st, self._state_class):
            raise MPSValueError(f"{self._name()}: `gradient_state` must come from the forward {self._forward_name}'s encode")
        if (dest.width, dest.height) != (sec.width, sec.height):
            raise value_error(self._name(), "destination_gradient", f"{dest.width}x{dest.height}",
                              f"have the forward source's size {sec.width}x{sec.height}")
        return f, st  # type: ignore[return-value]

    def _incoming_gradient(self, prim: MPSImage, pg: InputGeometry, count: int, f: ForwardGeometry) -> tuple[torch.Tensor, int, int]:
        """``E``: the incoming gradient over the forward output region, read at the forward clip
        origin when ``prim`` has the forward destination's size, else from (0, 0) (an
        "unpadded E", convolution.md §11.4). Also returns the region's origin in the forward
        destination."""
        clip = f.clip_rect
        fx0, fy0 = min(clip.origin.x, f.destination_width), min(clip.origin.y, f.destination_height)
        ew = max(0, min(clip.origin.x + clip.size.width, f.destination_width) - fx0)
        eh = max(0, min(clip.origin.y + clip.size.height, f.destination_height) - fy0)
        ex, ey = (fx0, fy0) if (prim.width, prim.height) == (f.destination_width, f.destination_height) else (0, 0)
        if ex + ew > prim.width or ey + eh > prim.height:
            raise value_error(self._name(), "source_gradient", f"{prim.width}x{prim.height}",
                              f"cover the forward output region {ew}x{eh} at ({ex}, {ey})")
        return prim.tensor[pg.n0:pg.n0 + count, ey:ey + eh, ex:ex + ew, pg.c0:pg.c0 + self._geom.output_channels], fx0, fy0

    def _needs(self) -> tuple[bool, bool]:
        opt = MPSCNNConvolutionGradientOption(self.gradient_option)
        return bool(opt & MPSCNNConvolutionGradientOption.gradientWithData), bool(opt & MPSCNNConvolutionGradientOption.gradientWithWeightsAndBias)

    def _store_weight_gradients(self, st: MPSCNNConvolutionGradientState, dw_oihw: torch.Tensor, e: torch.Tensor) -> None:
        """Store ``dW`` and the bias gradient ``db[o] = Σ e[..., o]`` of the incoming gradient
        ``e`` (NHWC) into the state's float32 buffers: overwritten by the first encode into a
        state, added by the rest of an ``encode_batch``. ``copy_`` / ``add_`` convert dW in
        the same kernel; the column sum writes ``db`` into its buffer directly."""
        gw, gb, first = self._gradient_buffers(st)
        dw = self._to_layout(dw_oihw.permute(0, 2, 3, 1))
        if first:
            gw.copy_(dw.reshape(gw.shape))
        else:
            gw.add_(dw.reshape(gw.shape))
        dispatch.column_sum(e, out=gb, accumulate=not first)

    def _gradient_buffers(self, st: MPSCNNConvolutionGradientState) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The state's float32 dW and db buffers, and whether this encode overwrites them (the
        first encode into the state) rather than adds to them (the rest of an ``encode_batch``)."""
        first = self._accumulating is None or id(st) not in self._accumulating
        gw, gb = st._buffers(overwritten=first)
        if first and self._accumulating is not None:
            self._accumulating.add(id(st))
        return gw, gb, first


class MPSCNNConvolutionGradient(ConvolutionGradientBase):
    """``MPSCNNConvolutionGradient``: gradients of a convolution with respect to its source
    (the result image) and to its weights and biases (written into the gradient state).

    Args:
        device: the device (positional, first).
        weights: the forward convolution's data source.

    Properties: ``gradient_option`` (rw, default ``all``), ``source_gradient_feature_channels``
    (= Cout), ``source_image_feature_channels`` (= Cin), ``groups``, ``channel_multiplier``,
    ``data_source``, ``serialize_weights_and_biases`` (deprecated, no effect).

    Encode: ``encode(cb, source_gradient, source_image, gradient_state[, destination_gradient])``
    with the forward ``MPSCNNConvolutionGradientState``; ``encode_batch`` sums the weight and
    bias gradients over the batch.
    """

    _kind = "regular"

    def __init__(self, device: Device | str, weights: MPSCNNConvolutionDataSource | None = None) -> None:
        super().__init__(device, weights)
        if self._geom.sub_pixel > 1:
            raise value_error(type(self).__name__, "descriptor.sub_pixel_scale_factor", self._geom.sub_pixel, "be 1: sub-pixel convolutions have no gradient")
        g = self._geom
        self._primary_kernel = (1, 1)
        self._secondary_kernel = (g.kernel_width, g.kernel_height)
        self._secondary_dilation = (g.dilation_x, g.dilation_y)
        self._s_stride = [g.stride_x, g.stride_y]
        self.serialize_weights_and_biases = False

    def _gradient_inputs(self, prim: MPSImage, sec: MPSImage, region: Region, pg: InputGeometry, sg: InputGeometry,
                         f: ForwardGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        e, _, _ = self._incoming_gradient(prim, pg, region.count, f)
        x = sec.tensor[sg.n0:sg.n0 + region.count, :, :, sg.c0:sg.c0 + self._geom.input_channels]
        return e, x

    #: the gradient-kernel properties a gradient plan depends on (the forward geometry comes from the state)
    _plan_properties = operator.attrgetter("_clip_rect", "_p_offset", "_s_offset", "_s_edge", "gradient_option", "accumulator_precision_option")
    #: whether encodes may be replayed from a plan (subclasses with their own numerics say False)
    _use_plans = True
    #: a graph's fused epilogue for the current encode (mpsnn; see :class:`_Epilogue`)
    _epilogue: "_Epilogue | None" = None

    def encode(self, command_buffer, source_gradient, source_image, gradient_state, destination_gradient=None):  # type: ignore[no-untyped-def]
        """As :meth:`MPSCNNGradientKernel.encode`. Repeated encodes of one geometry replay a
        plan recorded by the first (see :class:`_GradientPlan`); with an explicit destination
        the replay also skips the state and descriptor handling of the general path."""
        self._check_gradient_state("gradient_state", gradient_state)
        general = super().encode
        if destination_gradient is None or not self._use_plans:
            return general(command_buffer, source_gradient, source_image, gradient_state, destination_gradient)
        cb = self._check_command_buffer(command_buffer)
        prim = self._check_image("source_gradient", source_gradient, cb)
        sec = self._check_image("source_image", source_image, cb)
        st = self._check_state("gradient_state", gradient_state, cb)
        dest = self._check_image("destination_image", destination_gradient, cb)
        plan = self._plans.get(self._plan_key(prim, sec, dest, st)) if prim.parent is None and sec.parent is None and dest.parent is None else None
        if plan is None:
            return general(cb, prim, sec, st, dest)
        self._forward, self._gradient_state = st.geometry, st
        self._replay(cb, plan, prim, sec, dest, st)
        _consume([prim, sec, st])
        return None

    def _plan_key(self, prim: MPSImage, sec: MPSImage, dest: MPSImage, st: Any) -> tuple:
        """What a gradient plan depends on: the tensors' shapes, strides and dtypes, the
        destination's channel format, the forward geometry and the kernel's properties."""
        et, xt = prim.tensor, sec.tensor
        return (et.shape, et.stride(), et.dtype, xt.shape, xt.stride(), xt.dtype, dest.shape, dest.dtype, dest.feature_channel_format,
                st.geometry, self._plan_properties(self))

    def _replay(self, cb: MTLCommandBuffer, plan: "_GradientPlan", prim: MPSImage, sec: MPSImage, dest: MPSImage, st: Any) -> None:
        self._check_no_alias(dest, prim, sec)
        with cb.encoding(self._name()):
            _run_gradient_plan(self, plan.conv, prim.tensor, sec.tensor, plan.w, dest, plan.region, st)

    def _encode_checked(self, cb, prim, sec, dest, state):  # type: ignore[no-untyped-def]
        """Every encode form ends here once its destination exists (the auto-sized forms after
        the descriptor pipeline allocated it): replay a recorded plan, else take the general
        path, recording a plan where :meth:`_encode_region` finds one."""
        st = self._gradient_state
        if (state is not None or not self._use_plans or not isinstance(dest, MPSImage) or not isinstance(st, self._state_class)
                or prim.parent is not None or sec.parent is not None or dest.parent is not None):
            return super()._encode_checked(cb, prim, sec, dest, state)
        key = self._plan_key(prim, sec, dest, st)
        plan = self._plans.get(key)
        if plan is not None:
            self._replay(cb, plan, prim, sec, dest, st)
            return None
        self._recording = key
        try:
            return super()._encode_checked(cb, prim, sec, dest, state)
        finally:
            self._recording = None

    def _encode_region(self, cb, prim, pg, sec, sg, dest, region, state):  # type: ignore[no-untyped-def]
        f, st = self._checked_forward(dest, sec)
        g = self._geom
        e, x = self._gradient_inputs(prim, sec, region, pg, sg, f)
        w, _ = self._compute_weights(x.dtype if x.dtype != torch.float64 else torch.float32, fold=False)
        if x.dtype != w.dtype:
            x = x.to(w.dtype)
        if e.dtype != w.dtype:
            e = e.to(w.dtype)
        need_data, need_w = self._needs()
        kwd = (g.kernel_width - 1) * g.dilation_x + 1
        khd = (g.kernel_height - 1) * g.dilation_y + 1
        left, top = f.offset.x - (kwd >> 1), f.offset.y - (khd >> 1)
        planned = None
        if (self._use_plans and region.covers(dest) and dest.dtype == w.dtype and dest.feature_channel_format not in fm.UNORM_MAX
                and e.data_ptr() == prim.tensor.data_ptr() and e.shape == prim.tensor.shape
                and x.data_ptr() == sec.tensor.data_ptr() and x.shape == sec.tensor.shape):
            # whole images in, the whole destination out: a plan can replay this encode
            planned = conv_backend.plan_conv2d_backward(
                e, x, w, stride=(g.stride_x, g.stride_y), dilation=(g.dilation_x, g.dilation_y), groups=g.torch_groups, left=left, top=top,
                edge_mode=f.edge_mode, allow_tf32=self._allow_tf32(), need_data=need_data, need_weights=need_w, need_bias=False)
        if planned is not None:
            if self._recording is not None:
                self._plans[self._recording] = _GradientPlan(planned, w, region)
            _run_gradient_plan(self, planned, e, x, w, dest, region, st)
            return
        dx = self._backward_into(st, e, x, w, left, top, f.edge_mode, need_data, need_w)
        if need_data:
            assert dx is not None
            write_result(dest, region, dx)

    def _backward_into(self, st, e, x, w, left, top, edge_mode, need_data, need_w):  # type: ignore[no-untyped-def]
        """The general path's numerics: returns the data gradient (None unless ``need_data``)
        and stores dW and db into the gradient state ``st`` (when ``need_w``)."""
        dx, dw = self._backward(e, x, w, left, top, edge_mode, need_data, need_w)
        if need_w:
            assert dw is not None
            self._store_weight_gradients(st, dw, e)
        return dx

    def _backward(self, e, x, w, left, top, edge_mode, need_data, need_w):  # type: ignore[no-untyped-def]
        g = self._geom
        return conv_backend.conv2d_backward_nhwc(e, x, w, stride=(g.stride_x, g.stride_y), dilation=(g.dilation_x, g.dilation_y),
                                                 groups=g.torch_groups, left=left, top=top, edge_mode=edge_mode, allow_tf32=self._allow_tf32(),
                                                 need_data=need_data, need_weights=need_w, need_bias=False)[:2]


def _run_gradient_plan(kernel: "ConvolutionGradientBase", plan: conv_backend.Conv2dBackwardPlan, e: torch.Tensor, x: torch.Tensor,
                       w: torch.Tensor, dest: MPSImage, region: Region, st: Any) -> None:
    """Run a gradient plan: the data gradient straight into ``dest`` where the plan can,
    else stored with :func:`write_result`; dW and db into the gradient state."""
    dx_out = None
    if plan.writes_data_directly:
        dx_out = dest.tensor
        if not dx_out.is_contiguous():
            dx_out = None
    dx, dw, _ = plan.run(e, x, w, dx_out)
    if dw is not None:  # weights and bias gradients come together (gradient_option)
        kernel._store_weight_gradients(st, dw, e)
    if dx is not None and dx is not dx_out:
        write_result(dest, region, dx)


class _GradientPlan:
    """A recorded gradient encode (the counterpart of :class:`_ForwardPlan`): the backend's
    :class:`~mpsnn.backends.convolution.Conv2dBackwardPlan`, the weights it ran with and the
    destination region (the whole image). Keyed by the input tensors' shapes, strides and
    dtypes, the destination's shape, dtype and channel format, the forward geometry of the
    gradient state and the gradient kernel's properties; used for whole-image encodes into
    an explicit destination. The data gradient is stored with :func:`write_result`: a
    destination without storage yet adopts cuDNN's result, an allocated one receives a copy."""

    __slots__ = ("conv", "w", "region")

    def __init__(self, conv: conv_backend.Conv2dBackwardPlan, w: torch.Tensor, region: Region) -> None:
        self.conv, self.w, self.region = conv, w, region


class MPSCNNFullyConnected(WholeImageWindow, MPSCNNConvolution):
    """``MPSCNNFullyConnected``: every value of each whole source image connects to every
    output channel; the result is ``1 x 1 x Cout`` per image.

    The descriptor's ``kernel_width``/``kernel_height`` must equal the source's width/height;
    strides and groups 1; ``offset`` is ignored. Weights ``[Cout][sourceWidth][sourceHeight][Cin]``
    (see the module docstring). Default padding: ``sizeValidOnly``.
    """

    _kind = "fully_connected"
    _default_padding = int(MPSNNPaddingMethod.sizeValidOnly)
    _use_plans = False

    def __init__(self, device: Device | str, weights: MPSCNNConvolutionDataSource | None = None, **legacy: Any) -> None:
        super().__init__(device, weights, **legacy)
        g = self._geom
        if g.stride_x != 1 or g.stride_y != 1 or g.groups != 1 or g.dilation_x != 1 or g.dilation_y != 1:
            raise value_error(type(self).__name__, "descriptor", g, "have strides, dilation and groups of 1")

    def _encode_region(self, cb, src, inp, dest, region, state):  # type: ignore[no-untyped-def]
        self._check_source_size(src)
        g = self._geom
        x = src.tensor[inp.n0:inp.n0 + region.count, :, :, inp.c0:inp.c0 + g.input_channels]
        w, b = self._compute_weights(x.dtype if x.dtype != torch.float64 else torch.float32, fold=True)
        x = x.to(w.dtype) if x.dtype != w.dtype else x
        # the master is in the data source's layout (see _ConvolutionWeights): the source is reordered to match
        y = conv_backend.fully_connected_nhwc(self._in_master_order(x), w.permute(0, 2, 3, 1), b, self._allow_tf32())
        p = self._neuron_params()
        if p is not None:
            y = y.contiguous()
            dispatch.neuron_forward(y, y, p)
        write_result(dest, Region(region.n0, region.count, region.x0, region.y0, 1, 1, region.c0, region.channels), y)


class MPSCNNFullyConnectedGradient(MPSCNNConvolutionGradient):
    """``MPSCNNFullyConnectedGradient``: ``dS = Σ_o E(n,o)·W[o]``, ``dW[o] = Σ_n E(n,o)·S(n)``,
    ``db[o] = Σ_n E(n,o)`` with the FC weight layout (convolution.md §14.2)."""

    _kind = "fully_connected"
    _use_plans = False

    def _gradient_inputs(self, prim, sec, region, pg, sg, f):  # type: ignore[no-untyped-def]
        e = prim.tensor[pg.n0:pg.n0 + region.count, 0:1, 0:1, pg.c0:pg.c0 + self._geom.output_channels]
        x = sec.tensor[sg.n0:sg.n0 + region.count, :, :, sg.c0:sg.c0 + self._geom.input_channels]
        if (sec.width, sec.height) != (self._geom.kernel_width, self._geom.kernel_height):
            raise value_error(self._name(), "source_image", f"{sec.width}x{sec.height}", f"match the kernel size {self._geom.kernel_width}x{self._geom.kernel_height}")
        return e, x

    def _backward_into(self, st, e, x, w, left, top, edge_mode, need_data, need_w):  # type: ignore[no-untyped-def]
        """One matrix product per result: the source reordered to the master's (and the
        state's) layout, so dW is written into the state's buffer by its product (added to it
        in the rest of an ``encode_batch``) and dx comes back in that order (a view)."""
        gw = gb = None
        first = True
        if need_w:
            gw, gb, first = self._gradient_buffers(st)
        dx, _, _ = conv_backend.fully_connected_backward_nhwc(e, self._in_master_order(x), w.permute(0, 2, 3, 1), self._allow_tf32(), need_data,
                                                              need_w, False, dw_out=gw, accumulate=not first)
        if need_w:
            dispatch.column_sum(e, out=gb, accumulate=not first)
        return None if dx is None else self._in_master_order(dx)

