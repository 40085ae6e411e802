"""MPSNNOptimizerRMSProp (spec/optimizers.md §7)."""
from __future__ import annotations

from ..backends import optimizers as backend
from ..core.device import Device, MTLCommandBuffer
from .base import MPSNNOptimizer, Update
from .descriptor import MPSNNOptimizerDescriptor, f32, f64

__all__ = ["MPSNNOptimizerRMSProp"]


class MPSNNOptimizerRMSProp(MPSNNOptimizer):
    """``MPSNNOptimizerRMSProp``: gradient scaled by a running root mean square.

    Init forms: ``MPSNNOptimizerRMSProp(device, learning_rate=lr)`` (decay 0.9, epsilon 1e-8);
    ``MPSNNOptimizerRMSProp(device, decay=0.9, epsilon=1e-8, optimizer_descriptor=desc)``.

    Properties: ``decay`` (double, default 0.9), ``epsilon`` (float, default 1e-8), plus
    :class:`~mpsnn.MPSNNOptimizer`'s.

    Math (``s`` the sum-of-squares operand, updated in place; epsilon outside the root)::

        s = decay*s + (1 - decay)*g^2 ;  v_new = v - lr*g/(sqrt(s) + epsilon)

    Encode forms: vectors ``(input_gradient_vector, input_values_vector,
    input_sum_of_squares_vector, result_values_vector)`` and matrices (``_matrix`` labels),
    the sum of squares required; the three state forms with ``input_sum_of_squares_vectors?``.
    Nil ``input_sum_of_squares_vectors`` in a state form (undocumented) applies the plain
    step ``v - lr*g`` (inferred, the spec's recommendation).
    """

    _roles = (("sum_of_squares", "input_sum_of_squares", True),)

    def __init__(self, device: Device | str, learning_rate: float | None = None, *, decay: float = 0.9, epsilon: float = 1e-8,
                 optimizer_descriptor: MPSNNOptimizerDescriptor | None = None) -> None:
        super().__init__(device, optimizer_descriptor, learning_rate)
        self._decay = f64(self._name(), "decay", decay)
        self._epsilon = f32(self._name(), "epsilon", epsilon)

    decay = property(lambda self: self._decay)
    epsilon = property(lambda self: self._epsilon)

    def _encode_update(self, cb: MTLCommandBuffer, update: Update) -> None:
        s = update.roles["sum_of_squares"]
        if s is None:
            self._run(cb, update, "sgd", [], lambda: backend.sgd_step(
                update.values, update.gradients, None, update.results, lr=self._learning_rate, momentum=0.0, nesterov=False,
                pre=self._preprocess()))
            return
        self._run(cb, update, "rmsprop", [s], lambda: backend.rmsprop_step(
            update.values, update.gradients, s, update.results, lr=self._learning_rate, decay=self._decay, eps=self._epsilon,
            pre=self._preprocess()), a=self._decay, eps=self._epsilon)

    def __repr__(self) -> str:
        return f"MPSNNOptimizerRMSProp(learning_rate={self._learning_rate}, decay={self._decay}, epsilon={self._epsilon})"
