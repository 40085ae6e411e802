"""MPSNNRegularizationType and MPSNNOptimizerDescriptor (spec/optimizers.md §2-3).

Decisions where the spec is silent (``(inferred)``):

* Swift's case ``.None`` cannot be a Python attribute written literally, so the member is
  ``MPSNNRegularizationType.none`` (as ``MPSCNNNeuronType.none`` and the other enums), with
  ``MPSNNRegularizationType["None"]`` and ``getattr(MPSNNRegularizationType, "None")`` as
  aliases of it.
* ``gradient_clip_max`` / ``gradient_clip_min`` default to ``+inf`` / ``-inf`` (the spec's
  recommendation; Apple documents no default).
* Float properties hold float32 values (Apple's ``float``): assigned numbers are rounded to
  float32; non-numbers raise :class:`~mpsnn.MPSTypeError`.
"""
from __future__ import annotations

import enum
import math
from typing import Any

import numpy as np

from ..core.errors import MPSTypeError, value_error

__all__ = ["MPSNNOptimizerDescriptor", "MPSNNRegularizationType"]


class MPSNNRegularizationType(enum.IntEnum):
    """Regularisation added to the gradient (§2): ``none`` (Swift ``.None``; also reachable as
    ``MPSNNRegularizationType["None"]``), ``L1`` (``+ scale*sign(v)``, sign(0) = 0), ``L2``
    (``+ scale*v``)."""

    none = 0
    L1 = 1
    L2 = 2


setattr(MPSNNRegularizationType, "None", MPSNNRegularizationType.none)  # noqa: B010 (not a literal attribute name)
MPSNNRegularizationType._member_map_["None"] = MPSNNRegularizationType.none


def f32(owner: str, name: str, value: Any) -> float:
    """A Python number rounded to float32 (Apple's ``float`` properties)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise MPSTypeError(f"{owner}: `{name}` must be a number, but got {type(value).__name__}")
    return float(np.float32(value))


def f64(owner: str, name: str, value: Any) -> float:
    """A Python number kept in double precision (Apple's ``double`` properties)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise MPSTypeError(f"{owner}: `{name}` must be a number, but got {type(value).__name__}")
    return float(value)


def regularization_type(owner: str, value: Any) -> MPSNNRegularizationType:
    if isinstance(value, str):
        try:
            return MPSNNRegularizationType[value]
        except KeyError:
            raise value_error(owner, "regularization_type", value, "be an MPSNNRegularizationType (None, L1, L2)") from None
    try:
        return MPSNNRegularizationType(value)
    except (ValueError, TypeError):
        raise value_error(owner, "regularization_type", value, "be an MPSNNRegularizationType (None, L1, L2)") from None


class MPSNNOptimizerDescriptor:
    """``MPSNNOptimizerDescriptor``: the hyper-parameters every optimizer takes.

    Args (all read-write properties, same names):
        learning_rate: step size (default 0.001).
        gradient_rescale: multiplier of the incoming gradient (default 1.0).
        apply_gradient_clipping: clamp the gradient to ``[gradient_clip_min, gradient_clip_max]``
            before rescaling (default False).
        gradient_clip_max / gradient_clip_min: clamp bounds (default +inf / -inf, inferred).
        regularization_type: :class:`MPSNNRegularizationType` (default ``none``).
        regularization_scale: regularisation factor (default 0.0).

    Init forms: ``MPSNNOptimizerDescriptor(learning_rate=, gradient_rescale=,
    regularization_type=, regularization_scale=)`` (clipping off) and the 7-keyword form with
    ``apply_gradient_clipping``, ``gradient_clip_max``, ``gradient_clip_min``; the class factory
    :meth:`optimizer_descriptor_with_learning_rate` takes the same arguments.
    ``learning_rate`` and ``gradient_rescale`` may be positional; the rest are keywords.
    """

    def __init__(self, learning_rate: float = 0.001, gradient_rescale: float = 1.0, *, apply_gradient_clipping: bool = False,
                 gradient_clip_max: float = math.inf, gradient_clip_min: float = -math.inf,
                 regularization_type: MPSNNRegularizationType = MPSNNRegularizationType.none,
                 regularization_scale: float = 0.0) -> None:
        self.learning_rate = learning_rate
        self.gradient_rescale = gradient_rescale
        self.apply_gradient_clipping = apply_gradient_clipping
        self.gradient_clip_max = gradient_clip_max
        self.gradient_clip_min = gradient_clip_min
        self.regularization_type = regularization_type
        self.regularization_scale = regularization_scale

    @classmethod
    def optimizer_descriptor_with_learning_rate(cls, learning_rate: float, gradient_rescale: float = 1.0, **kwargs: Any) -> "MPSNNOptimizerDescriptor":
        """``optimizerDescriptorWithLearningRate:gradientRescale:[applyGradientClipping:
        gradientClipMax:gradientClipMin:]regularizationType:regularizationScale:``."""
        return cls(learning_rate, gradient_rescale, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        owner = "MPSNNOptimizerDescriptor"
        if name in ("learning_rate", "gradient_rescale", "gradient_clip_max", "gradient_clip_min", "regularization_scale"):
            value = f32(owner, name, value)
        elif name == "apply_gradient_clipping":
            if not isinstance(value, (bool, np.bool_)):
                raise MPSTypeError(f"{owner}: `apply_gradient_clipping` must be a bool, but got {type(value).__name__}")
            value = bool(value)
        elif name == "regularization_type":
            value = regularization_type(owner, value)
        else:
            raise AttributeError(f"{owner} has no property {name!r}")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return (f"MPSNNOptimizerDescriptor(learning_rate={self.learning_rate}, gradient_rescale={self.gradient_rescale}, "
                f"apply_gradient_clipping={self.apply_gradient_clipping}, gradient_clip_max={self.gradient_clip_max}, "
                f"gradient_clip_min={self.gradient_clip_min}, regularization_type={self.regularization_type.name}, "
                f"regularization_scale={self.regularization_scale})")
