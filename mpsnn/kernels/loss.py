"""Loss kernels: MPSCNNLoss (loss + gradient in one pass), MPSNNForwardLoss, MPSNNLossGradient
and MPSNNInitialGradient (spec/loss.md §7-12). The enums, descriptors and labels live in
:mod:`mpsnn.kernels.loss_labels` and are re-exported here. Numerics:
:mod:`mpsnn.backends.loss` (the per-type table, label smoothing, reductions).

Per element ``e`` (prediction ``y``, label ``t`` after smoothing, effective weight
``w_e = weight * W_e`` with ``W_e`` the weights image or 1)::

    gradient image   g_e = w_e * dl/dy (y_e, t_e)          -- every reduction type
    loss, none       v_e = w_e * l(y_e, t_e)               -- per-element loss image
    loss, sum        S = sum_R v_e          mean: S / (W H C)  (softMaxCrossEntropy: S / (W H))
    sumByNonZeroWeights: S / #{e in R: w_e != 0}  (0 when the count is 0; counted on the device)
    cosineDistance (sum only): weight * (1 - sum_R W_e y_e t_e)

Decisions (CONFLICT readings follow the spec's recommendations; ``(inferred)`` where silent):

* MPSCNNLoss's destination is ALWAYS the gradient (CONFLICT §7); losses go to
  ``labels.loss_image()``: the reduced scalar when it is ``{1,1,1}``, else the per-element
  ``v_e`` (then it must have the source's width, height and channels used). Reduction
  ``none`` with a ``{1,1,1}`` loss image, and cosineDistance with a per-element one, raise
  :class:`~mpsnn.MPSValueError`.
* The gradient does not depend on ``reduction_type`` or ``reduce_across_batch`` (§9; Apple's
  sample scales with ``weight = 1/batch``).
* Hinge: ``s = 2t - 1``, loss ``max(1 - s y, 0)``, gradient ``-s`` where ``1 - s y > 0``,
  else 0 (0 exactly at the hinge point). Huber: standard (``0.5 a^2`` / ``delta (|a| -
  delta/2)``, gradient ``a`` / ``delta sign(a)``; at ``|a| = delta`` the gradient is exactly
  ``a``). KL: gradient ``-t`` (not the documented ``-t/y``), ``t log t = 0`` at ``t = 0``.
  MAE: gradient 0 at ``y = t``. softMaxCrossEntropy: gradient ``softmax(y) - t'``.
* cosineDistance with any reduction but ``sum`` is refused at init (MPSCNNLoss,
  MPSNNForwardLoss) with :class:`~mpsnn.MPSValueError`.
* Coordinates (MPSCNNLoss): the region written is the clipped destination rectangle; the
  source is read by the kernel rule (``offset``, 1x1 window, ``edge_mode``); labels,
  weights and a per-element loss image are indexed in SOURCE coordinates (the element a
  label belongs to) and must cover the pixels read; label channel ``c`` pairs with source
  channel ``source_feature_channel_offset + c``. One labels object covers one image, so an
  encode processes one image per labels object (a multi-image source needs ``clip_rect`` /
  ``offset.z`` selecting one image, or ``encode_batch``).
* reduceAcrossBatch (reduction != none): the batch total (and count / element count) goes
  to entry 0's ``{1,1,1}`` loss image, every other entry's ``{1,1,1}`` loss image is set to 0;
  per-element loss images are unaffected. Mean divides by the elements of the whole batch
  (softMaxCrossEntropy: pixels ``W H N``).
* sumByNonZeroWeights counts elements (pixels x channels) whose effective weight is
  non-zero, also for softMaxCrossEntropy; without a weights image every element counts while
  ``weight != 0``.
* MPSNNForwardLoss / MPSNNLossGradient refuse a non-default ``offset`` / ``clip_rect``
  (Apple: undefined results) and process whole images; their results are float32 (forward
  loss) and the source image's format (gradient). Label gradients (``compute_label_gradients``)
  are the analytic ``dl/dt`` times ``dt'/dt`` (module :mod:`mpsnn.backends.loss`).
* Numerics: float32 arithmetic and reductions for every storage format; the gradient is
  rounded once to the destination's format; loss images are float32. No host sync.
"""
from __future__ import annotations

import operator
from typing import Any, NamedTuple, Sequence

import torch

from ..backends import loss as B
from ..core.binary_kernel import MPSCNNGradientKernel
from ..core.device import Device, MTLCommandBuffer
from ..core.enums import MPSImageFeatureChannelFormat
from ..core.errors import MPSTypeError, MPSValueError, value_error
from ..core.kernel import InputGeometry, MPSCNNKernel, Region, _consume, _root
from ..core.regions import read_window
from ..core.structs import MPSOffset, MPSRectNoClip
from ..images.image import MPSImage, MPSImageDescriptor, MPSTemporaryImage
from ..images.state import ForwardGeometry, MPSNNGradientState, MPSState
from . import loss_labels as _labels
from .loss_labels import (
    MPSCNNLossDataDescriptor,
    MPSCNNLossDescriptor,
    MPSCNNLossLabels,
    MPSCNNLossLabelsBatch,
    MPSCNNLossType,
    MPSCNNReductionType,
    check_delta,
    check_epsilon,
    check_label_smoothing,
    real_value,
)
from .results import write_result

__all__ = [
    *_labels.__all__,
    "MPSCNNLoss",
    "MPSNNForwardLoss",
    "MPSNNInitialGradient",
    "MPSNNLossGradient",
]

# re-exported names (kept referenced for linters)
_REEXPORTED = (MPSCNNLossDataDescriptor, MPSCNNLossLabelsBatch)
_T = MPSCNNLossType
_R = MPSCNNReductionType


def _descriptor(owner: str, d: Any) -> MPSCNNLossDescriptor:
    if not isinstance(d, MPSCNNLossDescriptor):
        raise MPSTypeError(f"{owner}: `loss_descriptor` must be an MPSCNNLossDescriptor, but got {type(d).__name__}")
    return d


def _check_cosine(owner: str, d: MPSCNNLossDescriptor) -> None:
    if d.loss_type == _T.cosineDistance and d.reduction_type != _R.sum:
        raise value_error(owner, "loss_descriptor.reduction_type", d.reduction_type.name, "be sum for cosineDistance (documented as valid only with sum)")


class _LossParameters:
    """The descriptor fields a loss kernel copies at init."""

    def _take(self, d: MPSCNNLossDescriptor) -> None:
        self._loss_type = d.loss_type
        self._reduction_type = d.reduction_type
        self._reduce_across_batch = d.reduce_across_batch
        self._weight = d.weight
        self._label_smoothing = d.label_smoothing
        self._number_of_classes = d.number_of_classes
        self._epsilon = d.epsilon
        self._delta = d.delta

    loss_type = property(lambda self: self._loss_type)
    reduction_type = property(lambda self: self._reduction_type)
    reduce_across_batch = property(lambda self: self._reduce_across_batch)
    number_of_classes = property(lambda self: self._number_of_classes)

    def _values(self, state: Any = None) -> tuple[float, float, float, float]:
        """(weight, label_smoothing, epsilon, delta): the state's when it carries them."""
        if isinstance(state, _LossGradientState):
            return state.weight, state.label_smoothing, state.epsilon, state.delta
        return self._weight, self._label_smoothing, self._epsilon, self._delta


def _smoothed(kind: Any, t: torch.Tensor, ls: float) -> torch.Tensor:
    return B.smooth_labels(int(kind._loss_type), t, ls, kind._number_of_classes)


class _Labelled(NamedTuple):
    """One region's loss inputs (see :meth:`_LabelledLossKernel._read_labelled`)."""

    labels: MPSCNNLossLabels
    y: torch.Tensor                 # predictions [1, h, w, n]
    t: torch.Tensor                 # labels
    wt: torch.Tensor | None         # per-element weights, or None
    loss_view: torch.Tensor | None  # the per-element loss image region, None for a scalar loss image
    scalar: bool                    # the loss image is 1x1x1
    n: int
    w: int
    h: int



def _stacked_parent(images: Sequence[MPSImage]) -> MPSImage | None:
    """The image whose consecutive one-image views (every channel) ``images`` are, in order,
    covering all of it; None otherwise."""
    parent = images[0].parent
    if parent is None or parent.parent is not None or parent.number_of_images != len(images):
        return None
    for k, img in enumerate(images):
        if img.parent is not parent or img._view != (k, k + 1, 0, parent.feature_channels):
            return None
    return parent


def _same_labels(labels: Sequence[MPSCNNLossLabels]) -> bool:
    """Every labels object has entry 0's labels, weights and loss image shapes."""
    def shape(lab: MPSCNNLossLabels) -> tuple[Any, ...]:
        w = lab.weights_image()
        return (tuple(lab.labels_image().tensor.shape), None if w is None else tuple(w.tensor.shape), lab.loss_image_size)
    first = shape(labels[0])
    return all(shape(lab) == first for lab in labels[1:])


def _stack_tensors(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` of equal ``[1, ...]`` slices, without a copy when they are consecutive
    slices of one tensor."""
    base = parts[0]
    step = base.stride(0)
    if all(p.shape == base.shape and p.stride() == base.stride() and p.data_ptr() == base.data_ptr() + k * step * p.element_size()
           for k, p in enumerate(parts)):
        return base.as_strided((len(parts), *base.shape[1:]), base.stride())
    return torch.cat(parts)


class _LabelledLossKernel(MPSCNNKernel):
    """What :class:`MPSCNNLoss` and :class:`~mpsnn.MPSCNNYOLOLoss` share: the four encode forms
    with an :class:`MPSCNNLossLabels` per source image, the reading of a region's predictions,
    labels and weights with the loss-image size rules, and the write of a batch total.
    Subclasses implement ``_encode_region`` (calling :meth:`_read_labelled`) and ``_finish``
    (the reduced losses of the batch, from ``self._pending``); ``_check_source`` may refuse
    a source before anything is encoded."""

    _result_state_class = None
    _reduction_type: MPSCNNReductionType

    def encode(  # type: ignore[override]
        self, command_buffer: MTLCommandBuffer, source_image: MPSImage, labels: MPSCNNLossLabels, destination_image: MPSImage | None = None,
    ) -> MPSImage | None:
        """``encode(commandBuffer:sourceImage:labels:[destinationImage:])``."""
        out = self.encode_batch(command_buffer, [source_image], [labels], None if destination_image is None else [destination_image])
        return None if out is None else out[0]

    def encode_batch(  # type: ignore[override]
        self, command_buffer: MTLCommandBuffer, source_images: Sequence[MPSImage], labels: Sequence[MPSCNNLossLabels],
        destination_images: Sequence[MPSImage] | None = None,
    ) -> list[MPSImage] | None:
        """``encodeBatch(commandBuffer:sourceImages:labels:[destinationImages:])``."""
        cb = self._check_command_buffer(command_buffer)
        srcs = [self._check_image(f"source_images[{k}]", s, cb) for k, s in enumerate(source_images)]
        labs = [self._check_state(f"labels[{k}]", s, cb, MPSCNNLossLabels) for k, s in enumerate(labels)]
        if len(labs) != len(srcs):
            raise value_error(self._name(), "labels", f"{len(labs)} labels", f"match the {len(srcs)} source images")
        for k, s in enumerate(srcs):
            self._check_source(f"source_images[{k}]", s)
        allocate = destination_images is None
        if allocate:
            dests = []
            for k, s in enumerate(srcs):
                if s.number_of_images != 1:
                    raise value_error(self._name(), f"source_images[{k}].number_of_images", s.number_of_images, "be 1 in the forms that return images")
                dests.append(self._allocator.image_for_command_buffer(cb, self.destination_image_descriptor([s]), self))
        else:
            dests = list(destination_images)  # type: ignore[arg-type]
            if len(dests) != len(srcs):
                raise value_error(self._name(), "destination_images", f"{len(dests)} images", f"match the {len(srcs)} source images")
            # each destination against every source: one root per distinct source storage
            # (a graph hands the loss one-image views of one image)
            roots = list({id(r): r for r in map(_root, srcs)}.values())
            for d in dests:
                self._check_no_alias(self._check_image("destination_image", d, cb), *roots)
        stack = self._stackable(srcs, dests, labs)
        # one pass over the whole batch when it is stacked: entry 0's geometry is every entry's
        entries = [(srcs[0], dests[0], labs[0])] if stack is not None else zip(srcs, dests, labs)
        self._encode_entries(cb, stack, entries, labs)
        _consume([*srcs, *labs])
        return dests if allocate else None

    def _encode_entries(self, cb: MTLCommandBuffer, stack: tuple[MPSImage, MPSImage] | None, entries: Any,
                        labs: list[MPSCNNLossLabels]) -> None:
        """Encode ``entries`` (source, destination, labels), then write the batch's reduced
        losses. With ``stack`` (the source and destination images the entries are one-image
        views of) the one entry given stands for the whole batch (one pass)."""
        self._pending: list[Any] = []
        try:
            self._stack = None if stack is None else (*stack, labs)
            for s, d, lab in entries:
                self._encode_checked(cb, s, d, lab)
            if labs:
                with cb.encoding(self._name()):
                    self._finish(labs)
        finally:
            self._pending = []
            self._stack = None

    def _encode_stacked(self, command_buffer: MTLCommandBuffer, source: MPSImage, labels: list[MPSCNNLossLabels],
                        destination: MPSImage) -> bool:
        """The graph's form of :meth:`encode_batch` over the one-image views of ``source``
        (``labels[n]`` for image ``n``) into those of ``destination``, without making the
        views: one pass over the batch, as ``encode_batch`` takes a stacked batch. The two
        images and every label are checked as there (the per-image views share the parents'
        format and size, so entry 0's view stands for all of them). False, nothing encoded,
        where ``encode_batch`` would not take one pass either (a per-image kernel, one image,
        ``offset.z`` not 0, labels of different shapes): the caller then makes the views.
        Read counts: one read of ``source`` and of each labels object, as the views' encode
        plus the graph's own read of the stacked image would (net), none of ``destination``."""
        cb = self._check_command_buffer(command_buffer)
        n = source.number_of_images
        if not self._batched or n < 2 or len(labels) != n or destination.number_of_images != n or self._offset.z != 0:
            return False
        src = self._check_image("source_images", source, cb)
        dest = self._check_image("destination_images", destination, cb)
        memo = self._labels_memo
        if memo is not None and len(memo[0]) == n and all(map(operator.is_, labels, memo[0])):
            labs = memo[0]          # the same labels objects as the last encode: checked then
        else:
            labs = [self._check_state(f"labels[{k}]", s, cb, MPSCNNLossLabels) for k, s in enumerate(labels)]
            if not _same_labels(labs):
                return False
            lasting = not any(lab.is_temporary or any(isinstance(img, MPSTemporaryImage) for img in
                                                      (lab.labels_image(), lab.weights_image(), lab.loss_image())) for lab in labs)
            self._labels_memo = (labs, {}) if lasting else None
        self._check_source("source_images[0]", src)
        self._check_no_alias(dest, _root(src))
        s0 = src._make_view(0, 1, 0, src.feature_channels)
        d0 = dest._make_view(0, 1, 0, dest.feature_channels)
        try:
            self._encode_entries(cb, (src, dest), [(s0, d0, labs[0])], labs)
        finally:
            for v in (s0, d0):
                if isinstance(v, MPSTemporaryImage) and v.read_count > 0:
                    v.read_count = 0      # give the views' holds on their parents back
        _consume([src] if self._labels_memo is not None and self._labels_memo[0] is labs else [src, *labs])
        return True

    #: the labels of the last :meth:`_encode_stacked` when none of them (nor their images) is
    #: temporary, with tensors made from them (stacked labels and weights per region, the
    #: loss images' one-value views): a training loop hands the graph the same labels objects
    #: every step (refilled in place), and the per-label work of building these (about 200
    #: property reads and slices at batch 64) then runs once. The labels are kept (strong
    #: references), so no later object can take their identities
    _labels_memo: tuple[list[MPSCNNLossLabels], dict[Any, Any]] | None = None

    def _memo(self, labs: list[MPSCNNLossLabels], key: Any, make: Any) -> Any:
        """``make()``, remembered under ``key`` while ``labs`` are the memoised labels."""
        memo = self._labels_memo
        if memo is None or memo[0] is not labs:
            return make()
        if key not in memo[1]:
            memo[1][key] = make()
        return memo[1][key]

    #: whether the kernel can encode a batch of one-image views of one image in one pass
    _batched = False
    _stack: tuple[MPSImage, MPSImage, list[MPSCNNLossLabels]] | None = None

    def _stackable(self, srcs: list[MPSImage], dests: list[MPSImage], labs: list[MPSCNNLossLabels]) -> tuple[MPSImage, MPSImage] | None:
        """(source parent, destination parent) when the batch can be encoded in one pass:
        sources and destinations are consecutive one-image views of one image each, the
        labels agree in shapes, and ``offset.z`` is 0 (the batch is what the graph hands a
        loss node). The numbers are the per-entry encodes' (mpsnn decision)."""
        if not self._batched or len(srcs) < 2 or self._offset.z != 0 or not _same_labels(labs):
            return None
        p, q = _stacked_parent(srcs), _stacked_parent(dests)
        return None if p is None or q is None else (p, q)

    def _check_source(self, name: str, src: MPSImage) -> None:
        """Refuse a source image before any encode (nothing to check here)."""

    def _finish(self, labels: list[MPSCNNLossLabels]) -> None:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def _read_labelled(self, src: MPSImage, inp: InputGeometry, region: Region, state: MPSState | None) -> _Labelled:
        """The region's predictions, labels and weights (labels and weights indexed in source
        coordinates) and which loss image the labels carry, after the size rules."""
        labels = state
        assert isinstance(labels, MPSCNNLossLabels)
        owner = self._name()
        if region.count != 1:
            raise value_error(owner, "clip_rect.size.depth", region.count,
                              "select one image per MPSCNNLossLabels (a labels object describes one batch image; use encode_batch for more)")
        n, w, h = inp.channels, region.width, region.height
        sx, sy = inp.window_left, inp.window_top
        y = read_window(src.tensor[inp.n0:inp.n0 + 1, :, :, inp.c0:inp.c0 + n], sx, sy, w, h, inp.edge_mode)
        lab_img, wt_img = labels.labels_image(), labels.weights_image()
        if sx < 0 or sy < 0 or sx + w > lab_img.width or sy + h > lab_img.height or n > lab_img.feature_channels:
            raise value_error(owner, "labels", f"labels image {lab_img.width}x{lab_img.height}x{lab_img.feature_channels}",
                              f"cover the source pixels read, x in [{sx}, {sx + w}), y in [{sy}, {sy + h}), and the {n} channels used")
        t = lab_img.tensor[:, sy:sy + h, sx:sx + w, :n]
        wt = None if wt_img is None else wt_img.tensor[:, sy:sy + h, sx:sx + w, :n]
        size = labels.loss_image_size
        scalar = (size.width, size.height, size.depth) == (1, 1, 1)
        per_element = (size.width, size.height, size.depth) == (src.width, src.height, n)
        if not scalar and not per_element:
            raise value_error(owner, "labels.loss_image_size", f"{size.width}x{size.height}x{size.depth}",
                              f"be 1x1x1 or the source size with the channels used, {src.width}x{src.height}x{n}")
        if self._reduction_type == _R.none and not per_element:
            raise value_error(owner, "labels.loss_image_size", "1x1x1",
                              f"be the source size {src.width}x{src.height}x{n} for reduction none (per-element losses)")
        loss_view = labels.loss_image().tensor[:, sy:sy + h, sx:sx + w, :n] if per_element else None
        return _Labelled(labels, y, t, wt, loss_view, scalar, n, w, h)

    def _read_labelled_batch(self, src: MPSImage, inp: InputGeometry, region: Region, state: MPSState | None) -> tuple[_Labelled, list[MPSCNNLossLabels]]:
        """:meth:`_read_labelled` for the whole batch of ``self._stack`` (entry 0's geometry,
        checked by reading entry 0): predictions, labels and weights ``[N, h, w, n]``."""
        r = self._read_labelled(src, inp, region, state)
        parent, _, labs = self._stack  # type: ignore[misc]
        sx, sy = inp.window_left, inp.window_top
        n, w, h = r.n, r.w, r.h
        y = read_window(parent.tensor[:, :, :, inp.c0:inp.c0 + n], sx, sy, w, h, inp.edge_mode)
        t = self._memo(labs, ("labels", sx, sy, w, h, n),
                       lambda: _stack_tensors([lab.labels_image().tensor[:, sy:sy + h, sx:sx + w, :n] for lab in labs]))
        wt = None if r.wt is None else self._memo(labs, ("weights", sx, sy, w, h, n), lambda: _stack_tensors(
            [lab.weights_image().tensor[:, sy:sy + h, sx:sx + w, :n] for lab in labs]))  # type: ignore[union-attr]
        return _Labelled(r.labels, y, t, wt, r.loss_view, r.scalar, n, w, h), labs

    @staticmethod
    def _write_batch_total(labels: list[MPSCNNLossLabels], value: torch.Tensor) -> None:
        """reduceAcrossBatch: the total into entry 0's scalar loss image, 0 into the others'."""
        for lab in labels[1:]:
            if lab.loss_image_size == _ONE:
                lab.loss_image().tensor.zero_()
        if labels[0].loss_image_size == _ONE:
            labels[0].loss_image().tensor.copy_(value.reshape(1, 1, 1, 1))


class MPSCNNLoss(_LossParameters, _LabelledLossKernel):
    """``MPSCNNLoss``: loss value and loss gradient in one pass (spec §7-9).

    Args:
        device: the device (positional, first).
        loss_descriptor: an :class:`MPSCNNLossDescriptor`; its fields are copied.

    Read-only properties (copied at init): ``loss_type``, ``reduction_type``,
    ``reduce_across_batch``, ``weight``, ``label_smoothing``, ``number_of_classes``,
    ``epsilon``, ``delta``; plus those of :class:`~mpsnn.MPSCNNKernel` (offset, clip_rect,
    channel offsets, edge_mode, padding, destination_image_allocator).

    Encode forms:

    * ``encode(cb, source_image, labels, destination_image)``: gradient into
      ``destination_image``, loss into ``labels.loss_image()``.
    * ``encode(cb, source_image, labels) -> MPSImage``: the gradient image is allocated
      (source size, channels used, the source's format; sets ``offset``).
    * ``encode_batch(cb, source_images, labels[, destination_images])``: ``labels[k]`` pairs
      with ``source_images[k]``; returns the gradient batch when no destinations are given.

    Shape: gradient = the source's width, height and channels used. Math and every decision
    (CONFLICT readings, coordinates, reduceAcrossBatch): module docstring. Temporary labels
    have their ``read_count`` decremented by each encode.

    Example::

        d = MPSCNNLossDescriptor.cnn_loss_descriptor(MPSCNNLossType.softMaxCrossEntropy, MPSCNNReductionType.sum)
        grad = MPSCNNLoss(device, loss_descriptor=d).encode(cb, logits, labels)
        loss = labels.loss_image()
    """

    weight = property(lambda self: self._weight)
    label_smoothing = property(lambda self: self._label_smoothing)
    epsilon = property(lambda self: self._epsilon)
    delta = property(lambda self: self._delta)

    def __init__(self, device: Device | str, loss_descriptor: MPSCNNLossDescriptor) -> None:
        super().__init__(device)
        d = _descriptor(type(self).__name__, loss_descriptor)
        _check_cosine(type(self).__name__, d)
        self._take(d)
        self._pending: list[tuple[Any, torch.Tensor, torch.Tensor, int]] = []

    _batched = True

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        if self._stack is not None:
            self._encode_batch_region(inp, region, state)
            return
        r = self._read_labelled(src, inp, region, state)
        grad, lval, we = self._terms(r)
        write_result(dest, region, grad)
        if r.loss_view is not None:
            r.loss_view.copy_(lval * we)
        else:
            elements = r.w * r.h * (1 if self._loss_type == _T.softMaxCrossEntropy else r.n)
            self._pending.append((r.labels, B.sum_weighted(lval, we), B.nonzero_count(we, lval), elements))

    def _terms(self, r: _Labelled) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
        """(weighted gradient, element losses, effective weights) of what ``r`` read."""
        if self._loss_type == _T.cosineDistance and not r.scalar:
            size = r.labels.loss_image_size
            raise value_error(self._name(), "labels.loss_image_size", f"{size.width}x{size.height}x{size.depth}", "be 1x1x1 for cosineDistance (one value per image)")
        kind = int(self._loss_type)
        ts = _smoothed(self, r.t, self._label_smoothing)
        we = B.effective_weights(self._weight, r.wt)
        return (B.loss_gradient(kind, r.y, ts, self._epsilon, self._delta) * we, B.loss_elementwise(kind, r.y, ts, self._epsilon, self._delta),
                we)

    def _encode_batch_region(self, inp: InputGeometry, region: Region, state: MPSState | None) -> None:
        """The region of every entry of ``self._stack`` in one pass (the per-entry math on
        ``[N, h, w, n]`` tensors; per-entry sums are reductions over the last three axes)."""
        _, dest, _ = self._stack  # type: ignore[misc]
        r, labs = self._read_labelled_batch(self._stack[0], inp, region, state)  # type: ignore[index]
        grad, lval, we = self._terms(r)
        write_result(dest, Region(0, len(labs), region.x0, region.y0, region.width, region.height, region.c0, region.channels), grad)
        if not r.scalar:
            sx, sy = inp.window_left, inp.window_top
            views = [lab.loss_image().tensor[:, sy:sy + r.h, sx:sx + r.w, :r.n] for lab in labs]
            torch._foreach_copy_(views, list((lval * we).to(torch.float32).split(1)))
            return
        elements = r.w * r.h * (1 if self._loss_type == _T.softMaxCrossEntropy else r.n)
        totals, counts = B.sum_weighted(lval, we), B.nonzero_count(we, lval)
        self._pending.append((labs, totals, counts, elements))

    def _finish(self, labels: list[MPSCNNLossLabels]) -> None:
        """Write the reduced losses of the batch just encoded (spec §9)."""
        red, kind = int(self._reduction_type), int(self._loss_type)
        if not self._pending:
            return
        if isinstance(self._pending[0][0], list):       # one pass over the batch: [N] sums
            labs, totals, counts, elements = self._pending[0]
            if self._reduce_across_batch and self._reduction_type != _R.none:
                self._write_batch_total(labels, B.finish_reduction(red, kind, totals.sum(), counts.sum(), elements * len(labs),
                                                                   self._weight, len(labs)))
                return
            values = B.finish_reduction(red, kind, totals, counts, elements, self._weight).to(torch.float32)
            views = self._memo(labs, "loss", lambda: [lab.loss_image().tensor.view(1) for lab in labs])
            torch._foreach_copy_(views, list(values.split(1)))
            return
        if self._reduce_across_batch and self._reduction_type != _R.none:
            total = torch.stack([p[1] for p in self._pending]).sum()
            count = torch.stack([p[2] for p in self._pending]).sum()
            elements = sum(p[3] for p in self._pending)
            self._write_batch_total(labels, B.finish_reduction(red, kind, total, count, elements, self._weight, len(self._pending)))
            return
        for lab, total, count, elements in self._pending:
            lab.loss_image().tensor.copy_(B.finish_reduction(red, kind, total, count, elements, self._weight).reshape(1, 1, 1, 1))


_ONE = _labels.MTLSize(1, 1, 1)


class _LossGradientState(MPSNNGradientState):
    """The gradient state of :class:`MPSNNForwardLoss` (an :class:`~mpsnn.MPSNNGradientState`):
    ``weight``, ``label_smoothing``, ``epsilon``, ``delta`` as they were when the forward
    encode ran (spec §10); :class:`MPSNNLossGradient` uses them instead of its own."""

    def __init__(self, geometry: ForwardGeometry, device: Device, command_buffer: MTLCommandBuffer | None = None) -> None:
        super().__init__(geometry, device, command_buffer)
        self.weight = 1.0
        self.label_smoothing = 0.0
        self.epsilon = 1e-7
        self.delta = 1.0


class _DynamicParameters(_LossParameters):
    """weight, label_smoothing, epsilon, delta: read-write ("dynamically adjustable")."""

    @property
    def weight(self) -> float:
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = real_value(self._name(), "weight", value)  # type: ignore[attr-defined]

    @property
    def label_smoothing(self) -> float:
        return self._label_smoothing

    @label_smoothing.setter
    def label_smoothing(self, value: float) -> None:
        self._label_smoothing = check_label_smoothing(self._name(), value)  # type: ignore[attr-defined]

    @property
    def epsilon(self) -> float:
        return self._epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._epsilon = check_epsilon(self._name(), value)  # type: ignore[attr-defined]

    @property
    def delta(self) -> float:
        return self._delta

    @delta.setter
    def delta(self, value: float) -> None:
        self._delta = check_delta(self._name(), value)  # type: ignore[attr-defined]


def _batch_image(owner: str, kernel: Any, name: str, image: Any, cb: MTLCommandBuffer, n: int, w: int, h: int, c: int) -> MPSImage:
    """A labels/weights image for a source of ``n`` images of ``w x h`` with ``c`` channels used."""
    img = kernel._check_image(name, image, cb)
    if img.number_of_images != n or img.width < w or img.height < h or img.feature_channels < c:
        raise value_error(owner, name, f"{img.number_of_images}x{img.height}x{img.width}x{img.feature_channels} (NxHxWxC)",
                          f"have {n} images of at least {w}x{h} pixels and {c} channels (the source's)")
    return img


def _list(owner: str, name: str, items: Any, n: int) -> list[Any] | None:
    if items is None:
        return None
    items = list(items)
    if len(items) != n:
        raise value_error(owner, name, f"{len(items)} entries", f"match the {n} source images")
    return items


class MPSNNForwardLoss(_DynamicParameters, MPSCNNKernel):
    """``MPSNNForwardLoss``: loss values only, with labels and weights as images (spec §10).

    Args:
        device: the device (positional, first).
        loss_descriptor: an :class:`MPSCNNLossDescriptor` (copied).

    Properties: ``loss_type``, ``reduction_type``, ``reduce_across_batch``,
    ``number_of_classes`` (read-only); ``weight``, ``label_smoothing``, ``epsilon``, ``delta``
    (read-write, validated like the descriptor's); ``source_feature_channel_offset`` /
    ``_max_count`` select the channels used; ``destination_feature_channel_offset`` the
    channel written. ``offset`` and ``clip_rect`` must stay at their defaults (Apple:
    undefined results otherwise; mpsnn raises :class:`~mpsnn.MPSValueError`).

    Encode forms:

    * ``encode_batch(cb, source_images, labels, weights=None, destination_states=None,
      destination_images=...)`` -> None.
    * ``encode_batch(cb, source_images, labels, weights=None)`` -> the loss images;
      with ``destination_state_is_temporary=flag`` -> ``(images, states)``.
    * ``encode(cb, source_image, labels, weights=None, destination_state=None,
      destination_image=None)``: the same for one entry (Python convenience).

    ``labels[k]`` / ``weights[k]`` are images with ``source_images[k].number_of_images``
    images, at least the source's width, height and channels used (labels channel ``c`` pairs
    with source channel ``source_feature_channel_offset + c``). Results (float32): one value
    per image (``1x1x1``) for a reduction, the per-element ``w_e l_e`` (source size) for
    ``none``; reduceAcrossBatch puts the batch total in image 0 of entry 0 and 0 elsewhere.
    States (from ``result_state_batch`` / ``temporary_result_state_batch``) record the
    dynamic values for :class:`MPSNNLossGradient`. Math: module docstring.
    """

    _result_state_class = _LossGradientState

    def __init__(self, device: Device | str, loss_descriptor: MPSCNNLossDescriptor) -> None:
        super().__init__(device)
        d = _descriptor(type(self).__name__, loss_descriptor)
        _check_cosine(type(self).__name__, d)
        self._take(d)

    def _make_state(self, source: MPSImage, dest: MPSImage | None, command_buffer: MTLCommandBuffer | None) -> MPSState | None:
        st = _LossGradientState(self._geometry(source, dest), self.device, command_buffer)
        self._fill_state(st)
        return st

    def _fill_state(self, st: _LossGradientState) -> None:
        st.weight, st.label_smoothing, st.epsilon, st.delta = self._weight, self._label_smoothing, self._epsilon, self._delta

    def destination_image_descriptor(self, source_images: Sequence[MPSImage], source_states: Sequence[MPSState] | None = None) -> MPSImageDescriptor:
        """float32; ``1x1x1`` per image for a reduction, the source size (channels used) for none."""
        if isinstance(source_images, MPSImage):
            source_images = [source_images]
        src = source_images[0]
        nin = self.source_channels_used(src)
        if self._reduction_type == _R.none:
            return MPSImageDescriptor(channel_format=MPSImageFeatureChannelFormat.float32, width=src.width, height=src.height,
                                      feature_channels=nin, number_of_images=src.number_of_images)
        return MPSImageDescriptor(channel_format=MPSImageFeatureChannelFormat.float32, number_of_images=src.number_of_images)

    def encode(  # type: ignore[override]
        self, command_buffer: MTLCommandBuffer, source_image: MPSImage, labels: MPSImage, weights: MPSImage | None = None,
        destination_state: MPSState | None = None, destination_image: MPSImage | None = None,
    ) -> MPSImage | None:
        """One-entry form of :meth:`encode_batch` (Python convenience)."""
        out = self.encode_batch(command_buffer, [source_image], [labels], None if weights is None else [weights],
                                None if destination_state is None else [destination_state],
                                None if destination_image is None else [destination_image])
        return None if out is None else out[0]

    def encode_batch(  # type: ignore[override]
        self, command_buffer: MTLCommandBuffer, source_images: Sequence[MPSImage], labels: Sequence[MPSImage],
        weights: Sequence[MPSImage] | None = None, destination_states: Sequence[MPSState] | None = None,
        destination_images: Sequence[MPSImage] | None = None, *, destination_state_is_temporary: bool | None = None,
    ) -> Any:
        """``encodeBatch(commandBuffer:sourceImages:labels:weights:destinationStates:[destinationImages:|destinationStateIsTemporary:])``."""
        owner = self._name()
        cb = self._check_command_buffer(command_buffer)
        if self._offset != MPSOffset(0, 0, 0) or self._clip_rect != MPSRectNoClip:
            raise value_error(owner, "offset/clip_rect", f"{self._offset}/{self._clip_rect}", "keep their defaults (Apple: other values give undefined results)")
        srcs = [self._check_image(f"source_images[{k}]", s, cb) for k, s in enumerate(source_images)]
        n = len(srcs)
        labs, wts = _list(owner, "labels", labels, n), _list(owner, "weights", weights, n)
        if labs is None:
            raise MPSTypeError(f"{owner}: `labels` are required")
        states = _list(owner, "destination_states", destination_states, n)
        for k, st in enumerate(states or []):
            self._check_state(f"destination_states[{k}]", st, cb, _LossGradientState)
        allocate = destination_images is None
        if not allocate and destination_state_is_temporary is not None:
            raise MPSValueError(f"{owner}: `destination_state_is_temporary` goes with the forms that return the result, not with `destination_images`")
        dests = _list(owner, "destination_images", destination_images, n)
        if allocate:
            dests = [self._allocator.image_for_command_buffer(cb, self.destination_image_descriptor([s]), self) for s in srcs]
            if destination_state_is_temporary is not None:
                states = [self._make_state(s, d, cb if destination_state_is_temporary else None) for s, d in zip(srcs, dests)]  # type: ignore[misc]
        assert dests is not None
        totals: list[torch.Tensor] = []
        counts: list[torch.Tensor] = []
        outs: list[tuple[MPSImage, int]] = []
        red, kind = int(self._reduction_type), int(self._loss_type)
        for k, s in enumerate(srcs):
            nin = self.source_channels_used(s)
            d = self._check_image(f"destination_images[{k}]", dests[k], cb)
            for other in srcs:
                self._check_no_alias(d, other)
            shape_ok = (d.width, d.height) == ((s.width, s.height) if red == B.R_NONE else (1, 1))
            need = nin if red == B.R_NONE else 1
            if not shape_ok or d.number_of_images != s.number_of_images or d.feature_channels < self._dst_c_off + need:
                raise value_error(owner, f"destination_images[{k}]", f"{d.number_of_images}x{d.height}x{d.width}x{d.feature_channels} (NxHxWxC)",
                                  f"be {s.number_of_images}x{d.height if not shape_ok else (s.height if red == B.R_NONE else 1)}x"
                                  f"{s.width if red == B.R_NONE else 1} with >= destination_feature_channel_offset + {need} channels")
            lab = _batch_image(owner, self, f"labels[{k}]", labs[k], cb, s.number_of_images, s.width, s.height, nin)
            wt = None if wts is None or wts[k] is None else _batch_image(owner, self, f"weights[{k}]", wts[k], cb, s.number_of_images, s.width, s.height, nin)
            with cb.encoding(owner):
                y = s.tensor[..., self._src_c_off:self._src_c_off + nin]
                t = _smoothed(self, lab.tensor[:, :s.height, :s.width, :nin], self._label_smoothing)
                we = B.effective_weights(self._weight, None if wt is None else wt.tensor[:, :s.height, :s.width, :nin])
                lval = B.loss_elementwise(kind, y, t, self._epsilon, self._delta)
                if red == B.R_NONE:
                    write_result(d, Region(0, s.number_of_images, 0, 0, s.width, s.height, self._dst_c_off, nin), lval * we)
                else:
                    totals.append(B.sum_weighted(lval, we))
                    counts.append(B.nonzero_count(we, lval))
                    outs.append((d, s.width * s.height * (1 if self._loss_type == _T.softMaxCrossEntropy else nin)))
            if states:
                self._fill_state(states[k])
                states[k].geometry = self._geometry(s, d)
        if red != B.R_NONE and srcs:
            with cb.encoding(owner):
                if self._reduce_across_batch:
                    # the batch total goes to image 0 of entry 0; every other image gets 0
                    elements = sum(per_image * tt.shape[0] for (_, per_image), tt in zip(outs, totals))
                    images = sum(tt.shape[0] for tt in totals)
                    value = B.finish_reduction(red, kind, torch.cat(totals).sum(), torch.cat(counts).sum(), elements, self._weight, images)
                    for d, _ in outs:
                        d.tensor[:, 0, 0, self._dst_c_off].zero_()
                    outs[0][0].tensor[0, 0, 0, self._dst_c_off].copy_(value)
                else:
                    for (d, per_image), tt, cc in zip(outs, totals, counts):
                        d.tensor[:, 0, 0, self._dst_c_off].copy_(B.finish_reduction(red, kind, tt, cc, per_image, self._weight))
        _consume([*srcs, *labs, *(wts or [])])
        if not allocate:
            return None
        return (dests, states) if destination_state_is_temporary is not None else dests



class MPSNNLossGradient(_DynamicParameters, MPSCNNGradientKernel):
    """``MPSNNLossGradient``: gradient of :class:`MPSNNForwardLoss` (spec §11); an
    :class:`~mpsnn.MPSCNNGradientKernel` (primary = incoming gradient, secondary = the
    forward source, i.e. the predictions).

    Args:
        device: the device (positional, first).
        loss_descriptor: an :class:`MPSCNNLossDescriptor` (copied; ``reduction_type`` is
            ignored by the arithmetic, as Apple documents).

    Properties: as :class:`MPSNNForwardLoss`, plus ``compute_label_gradients`` (bool, default
    False): False -> ``dL/dy``, True -> ``dL/dt`` (the labels; analytic ``dl/dt`` of the
    backend table times ``dt'/dt`` of label smoothing -- undocumented by Apple, inferred).
    ``secondary_source_feature_channel_offset`` / ``_max_count`` select the channels used,
    ``primary_source_feature_channel_offset`` the incoming gradient's first channel,
    ``destination_feature_channel_offset`` the result's. Offsets and ``clip_rect`` must stay
    at their defaults (:class:`~mpsnn.MPSValueError` otherwise).

    Encode forms:

    * ``encode_batch(cb, source_gradients, source_images, labels, weights=None,
      source_states=None[, destination_gradients])`` -> the gradients (or None).
    * ``encode(cb, source_gradient, source_image, labels, weights=None, source_state=None,
      destination_gradient=None)``: one entry (Python convenience).

    Math: ``out_e = sg * w_e * dl/dy(y_e, t'_e)`` where ``sg`` is the incoming gradient at
    the position ``e`` was reduced into: the element itself when the incoming gradient has
    the source's width and height (reduction none), else its single value per image
    (``1x1``); with ``reduce_across_batch`` and a ``1x1`` incoming gradient, the value of image
    0 of entry 0 (where MPSNNForwardLoss put the batch total) serves every entry. No factor
    from the reduction (mean / count) enters (spec §9, inferred). softMaxCrossEntropy uses
    ``sg w (softmax - t')`` per element, the exact chain rule only where ``sg w`` is constant
    over a pixel's channels and the labels sum to 1 (inferred, as MPSCNNLoss). ``source_states`` (from the
    forward encode) supply ``weight``, ``label_smoothing``, ``epsilon``, ``delta``; without
    them the kernel's own values are used. Result: the source's width, height and channels
    used, in the source's format.
    """

    def __init__(self, device: Device | str, loss_descriptor: MPSCNNLossDescriptor) -> None:
        super().__init__(device)
        self._take(_descriptor(type(self).__name__, loss_descriptor))
        self._compute_label_gradients = False

    @property
    def compute_label_gradients(self) -> bool:
        return self._compute_label_gradients

    @compute_label_gradients.setter
    def compute_label_gradients(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise value_error(self._name(), "compute_label_gradients", value, "be a bool")
        self._compute_label_gradients = value

    def encode(  # type: ignore[override]
        self, command_buffer: MTLCommandBuffer, source_gradient: MPSImage, source_image: MPSImage, labels: MPSImage,
        weights: MPSImage | None = None, source_state: MPSState | None = None, destination_gradient: MPSImage | None = None,
    ) -> MPSImage | None:
        """One-entry form of :meth:`encode_batch` (Python convenience)."""
        out = self.encode_batch(command_buffer, [source_gradient], [source_image], [labels], None if weights is None else [weights],
                                None if source_state is None else [source_state],
                                None if destination_gradient is None else [destination_gradient])
        return None if out is None else out[0]

    def encode_batch(  # type: ignore[override]
        self, command_buffer: MTLCommandBuffer, source_gradients: Sequence[MPSImage], source_images: Sequence[MPSImage],
        labels: Sequence[MPSImage], weights: Sequence[MPSImage] | None = None, source_states: Sequence[MPSState] | None = None,
        destination_gradients: Sequence[MPSImage] | None = None,
    ) -> list[MPSImage] | None:
        """``encodeBatch(commandBuffer:sourceGradients:sourceImages:labels:weights:sourceStates:[destinationGradients:])``."""
        owner = self._name()
        cb = self._check_command_buffer(command_buffer)
        if self._p_offset != MPSOffset(0, 0, 0) or self._s_offset != MPSOffset(0, 0, 0) or self._clip_rect != MPSRectNoClip:
            raise value_error(owner, "primary_offset/secondary_offset/clip_rect", f"{self._p_offset}/{self._s_offset}/{self._clip_rect}",
                              "keep their defaults (whole images are processed)")
        srcs = [self._check_image(f"source_images[{k}]", s, cb) for k, s in enumerate(source_images)]
        n = len(srcs)
        sgs = _list(owner, "source_gradients", source_gradients, n) or []
        sgs = [self._check_image(f"source_gradients[{k}]", g, cb) for k, g in enumerate(sgs)]
        labs, wts = _list(owner, "labels", labels, n), _list(owner, "weights", weights, n)
        if labs is None:
            raise MPSTypeError(f"{owner}: `labels` are required")
        sts = _list(owner, "source_states", source_states, n)
        for k, st in enumerate(sts or []):
            self._check_state(f"source_states[{k}]", st, cb, _LossGradientState)
        allocate = destination_gradients is None
        dests = _list(owner, "destination_gradients", destination_gradients, n)
        nins = [self._channels_used(s, self._s_c_off, self._s_c_max, "secondary") for s in srcs]
        if allocate:
            dests = [self._allocator.image_for_command_buffer(
                cb, MPSImageDescriptor._trusted(s.feature_channel_format, s.width, s.height, nin, s.number_of_images), self)
                for s, nin in zip(srcs, nins)]
        assert dests is not None
        # the incoming gradient: per element (source-sized) or one value per image (1x1)
        per_element = []
        for k, (g, s) in enumerate(zip(sgs, srcs)):
            elementwise = (g.width, g.height) == (s.width, s.height) and g.feature_channels - self._p_c_off >= nins[k]
            if g.number_of_images != s.number_of_images or not (elementwise or ((g.width, g.height) == (1, 1) and g.feature_channels > self._p_c_off)):
                raise value_error(owner, f"source_gradients[{k}]", f"{g.number_of_images}x{g.height}x{g.width}x{g.feature_channels} (NxHxWxC)",
                                  f"have {s.number_of_images} images of the source's size {s.width}x{s.height} with >= {self._p_c_off + nins[k]} channels "
                                  f"(reduction none), or of 1x1 with > primary_source_feature_channel_offset={self._p_c_off} channels")
            per_element.append(elementwise)
        kind = int(self._loss_type)
        sg0 = None
        if self._reduce_across_batch and n and not per_element[0]:
            sg0 = sgs[0].tensor[0:1, 0:1, 0:1, self._p_c_off:self._p_c_off + 1]
        for k, s in enumerate(srcs):
            nin = nins[k]
            d = self._check_image(f"destination_gradients[{k}]", dests[k], cb)
            for other in [*srcs, *sgs]:
                self._check_no_alias(d, other)
            if (d.number_of_images, d.width, d.height) != (s.number_of_images, s.width, s.height) or d.feature_channels < self._dst_c_off + nin:
                raise value_error(owner, f"destination_gradients[{k}]", f"{d.number_of_images}x{d.height}x{d.width}x{d.feature_channels} (NxHxWxC)",
                                  f"be {s.number_of_images}x{s.height}x{s.width} with >= destination_feature_channel_offset + {nin} channels")
            lab = _batch_image(owner, self, f"labels[{k}]", labs[k], cb, s.number_of_images, s.width, s.height, nin)
            wt = None if wts is None or wts[k] is None else _batch_image(owner, self, f"weights[{k}]", wts[k], cb, s.number_of_images, s.width, s.height, nin)
            weight, ls, eps, delta = self._values(sts[k] if sts else None)
            with cb.encoding(owner):
                y = s.tensor[..., self._s_c_off:self._s_c_off + nin]
                t = _smoothed(self, lab.tensor[:, :s.height, :s.width, :nin], ls)
                we = B.effective_weights(weight, None if wt is None else wt.tensor[:, :s.height, :s.width, :nin])
                g = sgs[k].tensor
                sg = g[..., self._p_c_off:self._p_c_off + nin] if per_element[k] else (sg0 if sg0 is not None else g[:, 0:1, 0:1, self._p_c_off:self._p_c_off + 1])
                if self._compute_label_gradients:
                    core = B.loss_label_gradient(kind, y, t, eps, delta) * B.smoothing_factor(kind, ls)
                else:
                    core = B.loss_gradient(kind, y, t, eps, delta)
                write_result(d, Region(0, s.number_of_images, 0, 0, s.width, s.height, self._dst_c_off, nin), core * we * sg.float())
        _consume([*sgs, *srcs, *labs, *(wts or []), *(sts or [])])
        return dests if allocate else None


class MPSNNInitialGradient(MPSCNNKernel):
    """``MPSNNInitialGradient``: the seed of a backward pass (spec §12): an image of ones, the
    gradient of an image with respect to itself.

    Args:
        device: the device (positional, first). No other parameters.

    Encode forms: those of :class:`~mpsnn.MPSCNNKernel` (``encode(cb, source_image[,
    destination_image])``, ``encode_batch``). The result has the source's size (channels
    used) and format; every element of the region written is 1.0 (the source's values are
    not read). No result state.
    """

    _result_state_class = None

    def __init__(self, device: Device | str) -> None:
        super().__init__(device)

    def _encode_region(self, cb: MTLCommandBuffer, src: MPSImage, inp: InputGeometry, dest: MPSImage, region: Region, state: MPSState | None) -> None:
        shape = (region.count, region.height, region.width, region.channels)
        write_result(dest, region, torch.ones(shape, dtype=torch.float32, device=dest.device.torch_device))
