"""MPSNNOptimizer: the abstract base of the optimizers and the encode-form dispatcher
(spec/optimizers.md §4, §5, §9).

Python has no overloading, so each optimizer has ONE ``encode(command_buffer, **keywords)``
that recognises Apple's forms by the snake_case labels present:

==========================  =====================================================================
form                        keywords (besides the optimizer's state operands)
==========================  =====================================================================
vectors                     ``input_gradient_vector, input_values_vector, result_values_vector``
matrices                    ``input_gradient_matrix, input_values_matrix, result_values_matrix``
convolution states          ``convolution_gradient_state, convolution_source_state, result_state``
batch-norm state            ``batch_normalization_state, result_state``
batch-norm gradient states  ``batch_normalization_gradient_state, batch_normalization_source_state, result_state``
==========================  =====================================================================

The state operands are ``<prefix>_vector`` / ``<prefix>_matrix`` in the first two forms and
``<prefix>_vectors`` (a list: index 0 weights/gamma, index 1 biases/beta) in the state forms,
e.g. ``input_momentum_vector``, ``input_sum_of_squares_vectors``, ``maximum_velocity_matrix``.
Any other combination raises :class:`~mpsnn.MPSTypeError` listing the accepted forms.

Operands: an :class:`~mpsnn.MPSVector` / :class:`~mpsnn.MPSMatrix` (all ``vectors x length``
or ``matrices x rows x columns`` elements are updated), or as mpsnn conveniences a float32
torch tensor or NumPy array (updated in place; NumPy only for a CPU optimizer). All operands
of one parameter hold the same number of elements, float32, on the optimizer's device.

Decisions where the spec is silent (all ``(inferred)``):

* Operand arrays: count 0 -> :class:`~mpsnn.MPSValueError`; count 1 -> only weights/gamma are
  updated and the result's biases/beta are left untouched; count > 2 -> error; the arrays of
  one encode must have equal counts. Nil arrays update both parameters.
* A convolution source state without biases updates weights only; a source with biases and a
  result without -> :class:`~mpsnn.MPSValueError`. ``number_of_weights`` is ``weights.numel()``
  and must agree between source, result and ``gradient_for_weights``.
* A batch-norm state whose ``gradient_for_gamma`` is None (no gradient ran) ->
  :class:`~mpsnn.MPSStateError`.
* Optimizer encodes do not decrement read counts of temporary states (spec §11: the data
  source's update method decrements them); they refuse a released temporary state or one of
  another command buffer.
* Optimizers are MPSKernels: ``device`` first, ``copy(device)``, ``label``, ``options``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..backends import dispatch
from ..backends.optimizers import Preprocess
from ..core.device import Device, MTLCommandBuffer
from ..core.errors import MPSDeviceError, MPSStateError, MPSTypeError, MPSValueError, value_error
from ..core.kernel import MPSKernel
from ..images.state import MPSState
from ..images.vector import MPSMatrix, MPSVector
from .descriptor import MPSNNOptimizerDescriptor, MPSNNRegularizationType, f32

__all__ = ["MPSNNOptimizer"]

#: base keywords of each encode form
_FORMS: dict[str, tuple[str, ...]] = {
    "vector": ("input_gradient_vector", "input_values_vector", "result_values_vector"),
    "matrix": ("input_gradient_matrix", "input_values_matrix", "result_values_matrix"),
    "convolution": ("convolution_gradient_state", "convolution_source_state", "result_state"),
    "batch_normalization": ("batch_normalization_state", "result_state"),
    "batch_normalization_gradient": ("batch_normalization_gradient_state", "batch_normalization_source_state", "result_state"),
}
_SUFFIX = {"vector": "_vector", "matrix": "_matrix"}


@dataclass
class Update:
    """The operands of one encode call, one list entry per parameter updated."""

    values: list[torch.Tensor] = field(default_factory=list)
    gradients: list[torch.Tensor] = field(default_factory=list)
    results: list[torch.Tensor] = field(default_factory=list)
    #: role -> one tensor per parameter, or None when the operand (array) was nil
    roles: dict[str, list[torch.Tensor] | None] = field(default_factory=dict)


def _launch(tri: Any, kind: str, clip: bool, regularization: int, items: list[list[Any]]) -> None:
    """Launch the queued encodes (each a list of engine entries) as one multi-tensor update;
    each Adam encode's entries get the step offset of that encode among its optimizer's."""
    seen: dict[int, int] = {}
    flat = []
    for entries in items:
        step = entries[0].step
        if step is not None:
            k = seen[step.data_ptr()] = seen.get(step.data_ptr(), 0) + 1
            for e in entries:
                e.offset = k
        flat.extend(entries)
    tri.launch(kind, flat, clip, regularization)


class MPSNNOptimizer(MPSKernel):
    """``MPSNNOptimizer``: abstract base of the optimizers (use a subclass; direct
    instantiation raises :class:`~mpsnn.MPSTypeError`).

    Properties (from the :class:`~mpsnn.MPSNNOptimizerDescriptor`, fixed at init):
    ``learning_rate`` (read-only; change it with :meth:`set_learning_rate`, effective for
    later encodes), ``gradient_rescale``, ``apply_gradient_clipping`` (read-write),
    ``gradient_clip_max``, ``gradient_clip_min``, ``regularization_type``,
    ``regularization_scale``.

    Pre-processing of every gradient element before the update (§5; clip before rescale as
    the header says, regularisation after both, with the value before the update)::

        g1 = clamp(g, gradient_clip_min, gradient_clip_max)  if apply_gradient_clipping else g
        g2 = gradient_rescale * g1
        g3 = g2 + regularization_scale * sign(v)   (L1, sign(0) = 0)
           = g2 + regularization_scale * v         (L2)
    """

    #: (role, keyword prefix, required in the vector/matrix forms)
    _roles: tuple[tuple[str, str, bool], ...] = ()

    def __init__(self, device: Device | str, optimizer_descriptor: MPSNNOptimizerDescriptor | None = None,
                 learning_rate: float | None = None) -> None:
        if type(self) is MPSNNOptimizer:
            raise MPSTypeError("MPSNNOptimizer: is abstract and cannot be made directly; use MPSNNOptimizerStochasticGradientDescent, "
                               "MPSNNOptimizerRMSProp or MPSNNOptimizerAdam")
        super().__init__(device)
        name = type(self).__name__
        if optimizer_descriptor is not None and learning_rate is not None:
            raise MPSTypeError(f"{name}: give `learning_rate` or `optimizer_descriptor`, not both (they are separate init forms)")
        if optimizer_descriptor is None:
            optimizer_descriptor = MPSNNOptimizerDescriptor(0.001 if learning_rate is None else learning_rate)
        if not isinstance(optimizer_descriptor, MPSNNOptimizerDescriptor):
            raise MPSTypeError(f"{name}: `optimizer_descriptor` must be an MPSNNOptimizerDescriptor, but got {type(optimizer_descriptor).__name__}")
        d = optimizer_descriptor
        self._learning_rate = d.learning_rate
        self._gradient_rescale = d.gradient_rescale
        self._apply_gradient_clipping = d.apply_gradient_clipping
        self._gradient_clip_max = d.gradient_clip_max
        self._gradient_clip_min = d.gradient_clip_min
        self._regularization_type = d.regularization_type
        self._regularization_scale = d.regularization_scale

    # -- properties ---------------------------------------------------------------------------
    learning_rate = property(lambda self: self._learning_rate)
    gradient_rescale = property(lambda self: self._gradient_rescale)
    gradient_clip_max = property(lambda self: self._gradient_clip_max)
    gradient_clip_min = property(lambda self: self._gradient_clip_min)
    regularization_type = property(lambda self: self._regularization_type)
    regularization_scale = property(lambda self: self._regularization_scale)

    @property
    def apply_gradient_clipping(self) -> bool:
        return self._apply_gradient_clipping

    @apply_gradient_clipping.setter
    def apply_gradient_clipping(self, value: bool) -> None:
        if not isinstance(value, (bool, np.bool_)):
            raise MPSTypeError(f"{self._name()}: `apply_gradient_clipping` must be a bool, but got {type(value).__name__}")
        self._apply_gradient_clipping = bool(value)

    def set_learning_rate(self, new_learning_rate: float) -> None:
        """``setLearningRate:``: the learning rate of encodes issued after this call."""
        self._learning_rate = f32(self._name(), "new_learning_rate", new_learning_rate)

    def _preprocess(self) -> Preprocess:
        reg = self._regularization_type
        return Preprocess(clip=self._apply_gradient_clipping, clip_min=self._gradient_clip_min, clip_max=self._gradient_clip_max,
                          rescale=self._gradient_rescale, regularization=int(reg) if reg != MPSNNRegularizationType.none else 0,
                          regularization_scale=self._regularization_scale)

    # -- encode ----------------------------------------------------------------------------------
    def _forms_text(self) -> str:
        lines = []
        for kind, base in _FORMS.items():
            keys = list(base)
            for _role, prefix, required in self._roles:
                name = prefix + _SUFFIX.get(kind, "_vectors")
                keys.append(name if required and kind in _SUFFIX else name + "?")
            lines.append("(" + ", ".join(keys) + ")")
        return "; ".join(lines)

    def _match(self, keywords: dict[str, Any]) -> str:
        given = set(keywords)
        for kind, base in _FORMS.items():
            suffix = _SUFFIX.get(kind, "_vectors")
            role_keys = {prefix + suffix for _r, prefix, _q in self._roles}
            required = set(base) | {prefix + suffix for _r, prefix, req in self._roles if req and kind in _SUFFIX}
            if required <= given <= set(base) | role_keys:
                for k in sorted(required):
                    if keywords[k] is None:
                        raise value_error(self._name(), k, None, f"not be None in the {kind} form")
                return kind
        raise MPSTypeError(f"{self._name()}: `encode` got the keywords ({', '.join(sorted(given)) or 'none'}), which match no encode form; "
                           f"accepted (after command_buffer; ? = optional): {self._forms_text()}")

    def encode(self, command_buffer: MTLCommandBuffer, *args: Any, **keywords: Any) -> None:
        """Encode one update (see the module docstring for the forms); the result values and
        the optimizer's state operands are written in place on ``command_buffer``'s stream."""
        if args:
            raise MPSTypeError(f"{self._name()}: `encode` takes the command buffer positionally and every operand by its "
                               f"keyword (Apple's label), but got {len(args)} more positional arguments")
        cb = self._check_command_buffer(command_buffer)
        kind = self._match(keywords)
        update = self._resolve(kind, keywords, cb)
        self._encode_update(cb, update)

    def _encode_update(self, cb: MTLCommandBuffer, update: Update) -> None:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def _run(self, cb: MTLCommandBuffer, update: Update, kind: str, states: Sequence[list[torch.Tensor] | None],
             fallback: Callable[[], None], *, a: float = 0.0, b: float = 0.0, eps: float = 0.0,
             step: torch.Tensor | None = None) -> None:
        """Run one encode's update: on CUDA with the Triton engine it is queued on the command
        buffer (:meth:`~mpsnn.MTLCommandBuffer.defer`) and launched with the optimizer updates
        encoded after it as ONE multi-tensor kernel (``mpsnn.backends.triton.optimizers``);
        otherwise ``fallback`` (the torch path) runs now. ``states``: the per-parameter lists of
        the optimizer-state operands the ``kind`` uses, in the engine's order."""
        tri = self._engine(update, states)
        if tri is not None and not all(tri.usable(t) for t in (*update.values, *update.gradients)):
            # values and gradients are only read: a contiguous copy (one pass) keeps the
            # one-launch update where the torch path would take a dozen passes
            with cb.encoding(self._name()):
                update.values = [v if tri.usable(v) else v.contiguous() for v in update.values]
                update.gradients = [g if tri.usable(g) else g.contiguous() for g in update.gradients]
        if tri is None:
            with cb.encoding(self._name()):
                fallback()
            return
        pre = self._preprocess()
        entries = []
        for i, (v, g, r) in enumerate(zip(update.values, update.gradients, update.results)):
            ops = [None if st is None else st[i] for st in states] + [None] * (3 - len(states))
            entries.append(tri.Entry(v, g, r, ops[0], ops[1], ops[2], step, self._learning_rate, a, b, eps, 0,
                                     pre.clip_min if pre.clip else -math.inf, pre.clip_max if pre.clip else math.inf,
                                     pre.rescale, pre.regularization_scale))
        reads = {t.untyped_storage().data_ptr() for t in (*update.values, *update.gradients)}
        writes = {t.untyped_storage().data_ptr() for t in update.results}
        writes.update(t.untyped_storage().data_ptr() for st in states if st is not None for t in st)
        cb.defer(self._name(), ("optimizer", kind, pre.clip, pre.regularization), entries,
                 functools.partial(_launch, tri, kind, pre.clip, pre.regularization), reads, writes)

    def _engine(self, update: Update, states: Sequence[list[torch.Tensor] | None]) -> Any:
        if not update.values:
            return None
        written = [*update.results, *(t for st in states if st is not None for t in st)]
        tri = dispatch.triton_engine("optimizers", *written)
        if tri is None or not all(tri.usable(t) for t in written):
            return None
        # a value or gradient the engine cannot address is copied (see `_run`): any float32
        # layout will do
        read = (*update.values, *update.gradients)
        return tri if all(t.dtype == torch.float32 and t.device == written[0].device for t in read) else None

    # -- operand resolution -----------------------------------------------------------------------
    def _tensor(self, name: str, obj: Any, kind: str) -> torch.Tensor:
        wrapper = MPSMatrix if kind == "matrix" else MPSVector
        if isinstance(obj, (MPSVector, MPSMatrix)):
            if not isinstance(obj, wrapper):
                raise MPSTypeError(f"{self._name()}: `{name}` must be an {wrapper.__name__} in the {kind} form, but got {type(obj).__name__}")
            t = obj.tensor
        elif isinstance(obj, np.ndarray):
            if self.device.is_cuda:
                raise MPSDeviceError(f"{self._name()}: `{name}` is a NumPy array, which a CUDA optimizer cannot update in place; "
                                     f"pass an {wrapper.__name__} or a torch tensor on {self.device}")
            if obj.dtype != np.float32:
                raise MPSTypeError(f"{self._name()}: `{name}` must hold float32 values, but the NumPy array has dtype {obj.dtype}")
            if not obj.flags.writeable:
                raise value_error(self._name(), name, "a read-only array", "be writable (operands are updated in place)")
            t = torch.from_numpy(obj)
        elif isinstance(obj, torch.Tensor):
            t = obj
        else:
            raise MPSTypeError(f"{self._name()}: `{name}` must be an {wrapper.__name__} (or a float32 torch tensor / NumPy array), "
                               f"but got {type(obj).__name__}")
        if t.dtype != torch.float32:
            raise MPSTypeError(f"{self._name()}: `{name}` must hold float32 values, but got {t.dtype}")
        if t.device != self.device.torch_device:
            raise MPSDeviceError(f"{self._name()}: `{name}` must be on the optimizer's device {self.device}, but it is on {t.device}")
        return t

    def _group(self, names: Sequence[str], tensors: list[torch.Tensor], what: str) -> list[torch.Tensor]:
        """Check that the operands of one parameter hold equally many elements; bring them to
        one shape (flat views when their shapes differ)."""
        n = tensors[0].numel()
        for name, t in zip(names[1:], tensors[1:]):
            if t.numel() != n:
                raise value_error(self._name(), name, f"{t.numel()} elements", f"hold as many elements as `{names[0]}` ({n}) for {what}")
        if all(t.shape == tensors[0].shape for t in tensors):
            return tensors
        out = []
        for name, t in zip(names, tensors):
            try:
                out.append(t.view(-1))
            except RuntimeError:
                raise value_error(self._name(), name, f"a tensor of shape {tuple(t.shape)}",
                                  "be viewable as a flat vector when its shape differs from the other operands'") from None
        return out

    def _check_operand_state(self, name: str, state: Any, cls: type, cb: MTLCommandBuffer) -> Any:
        if not isinstance(state, cls):
            raise MPSTypeError(f"{self._name()}: `{name}` must be an {cls.__name__}, but got {type(state).__name__}")
        if isinstance(state, MPSState):
            state.check_usable(self._name(), cb)
        return state

    def _resolve(self, kind: str, kw: dict[str, Any], cb: MTLCommandBuffer) -> Update:
        if kind in _SUFFIX:
            base = _FORMS[kind]
            names = [base[1], base[0], base[2]]
            role_names = [(role, prefix + _SUFFIX[kind]) for role, prefix, _q in self._roles]
            present = [(role, n) for role, n in role_names if kw.get(n) is not None]
            all_names = names + [n for _r, n in present]
            tensors = self._group(all_names, [self._tensor(n, kw[n], kind) for n in all_names], "this update")
            u = Update([tensors[0]], [tensors[1]], [tensors[2]])
            for role, n in role_names:
                u.roles[role] = [tensors[all_names.index(n)]] if kw.get(n) is not None else None
            return u
        params = self._state_parameters(kind, kw, cb)      # [(label, value, gradient, result|None)]
        arrays: dict[str, list[Any] | None] = {}
        counts = set()
        for role, prefix, _q in self._roles:
            name = prefix + "_vectors"
            arr = kw.get(name)
            if arr is not None:
                if isinstance(arr, (MPSVector, torch.Tensor, np.ndarray)) or not isinstance(arr, (list, tuple)):
                    raise MPSTypeError(f"{self._name()}: `{name}` must be a list of MPSVector ([weights/gamma, biases/beta]), "
                                       f"but got {type(arr).__name__}")
                if not 1 <= len(arr) <= 2:
                    raise value_error(self._name(), name, f"a list of {len(arr)}", "hold 1 or 2 vectors (index 0 weights/gamma, 1 biases/beta)")
                counts.add(len(arr))
            arrays[role] = None if arr is None else list(arr)
        if len(counts) > 1:
            raise MPSValueError(f"{self._name()}: the operand arrays of one encode must hold equally many vectors, but got counts {sorted(counts)}")
        count = counts.pop() if counts else 2
        u = Update(roles={role: (None if arrays[role] is None else []) for role, _p, _q in self._roles})
        for i, (label, value, gradient, result) in enumerate(params[:count]):
            if value is None:
                continue
            if result is None:
                raise value_error(self._name(), "result_state", f"no {label}", f"hold {label} since the source state has them")
            names = [f"source {label}", f"gradient for {label}", f"result {label}"]
            ts = [value, gradient, result]
            for role, prefix, _q in self._roles:
                arr = arrays[role]
                if arr is not None:
                    names.append(f"{prefix}_vectors[{i}]")
                    ts.append(self._tensor(names[-1], arr[i], "vector"))
            for n, t in zip(names, ts):
                if t.dtype != torch.float32 or t.device != self.device.torch_device:
                    raise MPSTypeError(f"{self._name()}: {n} must be float32 on {self.device}, but got {t.dtype} on {t.device}")
            ts = self._group(names, ts, label)
            u.values.append(ts[0])
            u.gradients.append(ts[1])
            u.results.append(ts[2])
            j = 3
            for role, _p, _q in self._roles:
                lst = u.roles[role]
                if lst is not None:
                    lst.append(ts[j])
                    j += 1
        return u

    def _state_parameters(self, kind: str, kw: dict[str, Any], cb: MTLCommandBuffer) -> list[tuple[str, Any, Any, Any]]:
        from ..kernels.batch_normalization import MPSCNNBatchNormalizationState, MPSCNNNormalizationGammaAndBetaState
        from ..kernels.convolution_data import MPSCNNConvolutionGradientState, MPSCNNConvolutionWeightsAndBiasesState

        if kind == "convolution":
            gs = self._check_operand_state("convolution_gradient_state", kw["convolution_gradient_state"], MPSCNNConvolutionGradientState, cb)
            src = self._check_operand_state("convolution_source_state", kw["convolution_source_state"], MPSCNNConvolutionWeightsAndBiasesState, cb)
            res = self._check_operand_state("result_state", kw["result_state"], MPSCNNConvolutionWeightsAndBiasesState, cb)
            n = src.weights.numel()
            if res.weights.numel() != n:
                raise value_error(self._name(), "result_state.number_of_weights", res.weights.numel(),
                                  f"equal convolution_source_state.number_of_weights ({n})")
            gw, gb = gs.gradient_for_weights, gs.gradient_for_biases
            if gw.numel() != n:
                raise value_error(self._name(), "convolution_gradient_state.gradient_for_weights", f"{gw.numel()} values",
                                  f"match convolution_source_state.number_of_weights ({n})")
            return [("weights", src.weights, gw, res.weights), ("biases", src.biases, gb, res.biases)]
        if kind == "batch_normalization":
            st = self._check_operand_state("batch_normalization_state", kw["batch_normalization_state"], MPSCNNBatchNormalizationState, cb)
            gst = src_st = st
            gname = "batch_normalization_state"
        else:
            gst = self._check_operand_state("batch_normalization_gradient_state", kw["batch_normalization_gradient_state"],
                                    MPSCNNBatchNormalizationState, cb)
            src_st = self._check_operand_state("batch_normalization_source_state", kw["batch_normalization_source_state"],
                                       MPSCNNBatchNormalizationState, cb)
            gname = "batch_normalization_gradient_state"
        res = self._check_operand_state("result_state", kw["result_state"], MPSCNNNormalizationGammaAndBetaState, cb)
        dg, db = gst.gradient_for_gamma, gst.gradient_for_beta
        if dg is None or db is None:
            raise MPSStateError(f"{self._name()}: `{gname}` has no gradient_for_gamma/gradient_for_beta yet; "
                                "encode MPSCNNBatchNormalizationGradient on it first")
        c = src_st.number_of_feature_channels
        if res.number_of_feature_channels != c or dg.numel() != c:
            raise value_error(self._name(), "result_state.number_of_feature_channels", res.number_of_feature_channels,
                              f"equal the batch-normalization state's {c} channels (gradients: {dg.numel()})")
        return [("gamma", src_st.gamma, dg, res.gamma), ("beta", src_st.beta, db, res.beta)]
