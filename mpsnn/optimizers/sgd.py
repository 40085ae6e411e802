"""MPSNNOptimizerStochasticGradientDescent (spec/optimizers.md §6)."""
from __future__ import annotations

import numpy as np

from ..backends import optimizers as backend
from ..core.device import Device, MTLCommandBuffer
from ..core.errors import MPSTypeError
from .base import MPSNNOptimizer, Update
from .descriptor import MPSNNOptimizerDescriptor, f32

__all__ = ["MPSNNOptimizerStochasticGradientDescent"]


class MPSNNOptimizerStochasticGradientDescent(MPSNNOptimizer):
    """``MPSNNOptimizerStochasticGradientDescent``: gradient descent with optional (Nesterov)
    momentum.

    Init forms:
        ``MPSNNOptimizerStochasticGradientDescent(device, learning_rate=lr)`` (momentum 0,
        Nesterov off, descriptor defaults otherwise);
        ``MPSNNOptimizerStochasticGradientDescent(device, momentum_scale=mu,
        use_nestrov_momentum=False, optimizer_descriptor=desc)``.
        ``learning_rate`` and ``optimizer_descriptor`` are exclusive; with neither the
        descriptor defaults apply (mpsnn; Apple marks ``initWithDevice:`` unavailable).

    Properties: ``momentum_scale`` (default 0.0), ``use_nestrov_momentum`` (Apple's spelling;
    alias ``use_nesterov_momentum``; default False), plus :class:`~mpsnn.MPSNNOptimizer`'s.

    Math (``g`` pre-processed, ``m`` the momentum operand, updated in place)::

        no momentum operand:  v_new = v - lr*g
        classic:              m = mu*m + lr*g ;  v_new = v - m          (lr folded into m)
        Nesterov:             m = mu*m + g    ;  v_new = v - lr*(g + mu*m)

    Encode forms (keywords; ``?`` optional): vectors ``(input_gradient_vector,
    input_values_vector, input_momentum_vector?, result_values_vector)``, matrices (``_matrix``
    labels), ``(convolution_gradient_state, convolution_source_state, input_momentum_vectors?,
    result_state)``, ``(batch_normalization_state, input_momentum_vectors?, result_state)``,
    ``(batch_normalization_gradient_state, batch_normalization_source_state,
    input_momentum_vectors?, result_state)``.
    """

    _roles = (("momentum", "input_momentum", False),)

    def __init__(self, device: Device | str, learning_rate: float | None = None, *, momentum_scale: float = 0.0,
                 use_nestrov_momentum: bool = False, optimizer_descriptor: MPSNNOptimizerDescriptor | None = None,
                 use_nesterov_momentum: bool | None = None) -> None:
        super().__init__(device, optimizer_descriptor, learning_rate)
        self._momentum_scale = f32(self._name(), "momentum_scale", momentum_scale)
        if use_nesterov_momentum is not None:
            use_nestrov_momentum = use_nesterov_momentum
        if not isinstance(use_nestrov_momentum, (bool, np.bool_)):
            raise MPSTypeError(f"{self._name()}: `use_nestrov_momentum` must be a bool, but got {type(use_nestrov_momentum).__name__}")
        self._use_nestrov_momentum = bool(use_nestrov_momentum)

    momentum_scale = property(lambda self: self._momentum_scale)
    use_nestrov_momentum = property(lambda self: self._use_nestrov_momentum)
    use_nesterov_momentum = use_nestrov_momentum

    def _encode_update(self, cb: MTLCommandBuffer, update: Update) -> None:
        m = update.roles["momentum"]
        kind = "sgd" if m is None else "nesterov" if self._use_nestrov_momentum else "momentum"
        self._run(cb, update, kind, [m], lambda: backend.sgd_step(
            update.values, update.gradients, m, update.results, lr=self._learning_rate, momentum=self._momentum_scale,
            nesterov=self._use_nestrov_momentum, pre=self._preprocess()), a=self._momentum_scale)

    def __repr__(self) -> str:
        return (f"MPSNNOptimizerStochasticGradientDescent(learning_rate={self._learning_rate}, momentum_scale={self._momentum_scale}, "
                f"use_nestrov_momentum={self._use_nestrov_momentum})")


