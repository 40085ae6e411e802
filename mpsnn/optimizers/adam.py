"""MPSNNOptimizerAdam, with AMSGrad (spec/optimizers.md §8)."""
from __future__ import annotations

import numpy as np
import torch

from ..backends import optimizers as backend
from ..core.device import Device, MTLCommandBuffer, flush_deferred
from ..core.errors import MPSValueError, value_error
from .base import MPSNNOptimizer, Update
from .descriptor import MPSNNOptimizerDescriptor, f32, f64

__all__ = ["MPSNNOptimizerAdam"]


def _time_step(owner: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 0:
        raise value_error(owner, "time_step", value, "be an integer >= 0 (NSUInteger)")
    return int(value)


class MPSNNOptimizerAdam(MPSNNOptimizer):
    """``MPSNNOptimizerAdam``: Adam, and AMSGrad when a maximum-velocity operand is given.

    Init forms: ``MPSNNOptimizerAdam(device, learning_rate=lr)`` (beta1 0.9, beta2 0.999,
    epsilon 1e-8, time_step 0); ``MPSNNOptimizerAdam(device, beta1=0.9, beta2=0.999,
    epsilon=1e-8, time_step=0, optimizer_descriptor=desc)``.

    Properties: ``beta1``, ``beta2`` (double), ``epsilon`` (float), ``time_step`` (read-write:
    the number of updates done; the next encode uses ``time_step + 1``), plus
    :class:`~mpsnn.MPSNNOptimizer`'s; ``time_step_tensor(device=None)`` (mpsnn) is the
    device copy of the step count.

    Math (``g`` pre-processed; ``m``, ``vel``, ``vmax`` updated in place)::

        t = time_step + 1 ; time_step = t         (once per encode call, on the host)
        lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
        m = beta1*m + (1-beta1)*g ;  vel = beta2*vel + (1-beta2)*g^2
        Adam:    v_new = v - lr_t * m / (sqrt(vel) + epsilon)
        AMSGrad: vmax = max(vmax, vel) ;  v_new = v - lr_t * m / (sqrt(vmax) + epsilon)

    The step count also lives on the device (a float32 scalar per device, advanced on the
    device inside the update, exact to 2^24 steps); ``lr_t`` is computed from it there, so a
    captured CUDA graph replays with the right bias correction and no host sync happens.
    Setting ``time_step`` re-seeds the device copy at the next encode.

    Encode forms: vectors ``(input_gradient_vector, input_values_vector,
    input_momentum_vector, input_velocity_vector, maximum_velocity_vector?,
    result_values_vector)``, matrices (``_matrix`` labels), and the three state forms with
    ``input_momentum_vectors?, input_velocity_vectors?, maximum_velocity_vectors?``.
    Decisions (inferred): nil momentum AND velocity arrays in a state form apply the plain step
    ``v - lr*g`` (time_step still advances); one of them nil, or a maximum-velocity array
    without both, raises :class:`~mpsnn.MPSValueError`. ``time_step`` advances once per encode
    call however many parameters it updates (so separate encodes for weights and biases
    advance it twice).
    """

    _roles = (("momentum", "input_momentum", True), ("velocity", "input_velocity", True),
              ("maximum_velocity", "maximum_velocity", False))

    def __init__(self, device: Device | str, learning_rate: float | None = None, *, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, time_step: int = 0, optimizer_descriptor: MPSNNOptimizerDescriptor | None = None) -> None:
        super().__init__(device, optimizer_descriptor, learning_rate)
        self._beta1 = f64(self._name(), "beta1", beta1)
        self._beta2 = f64(self._name(), "beta2", beta2)
        self._epsilon = f32(self._name(), "epsilon", epsilon)
        self._time_step = _time_step(self._name(), time_step)
        self._step_tensors: dict[torch.device, torch.Tensor] = {}
        self._stale: set[torch.device] = set()

    beta1 = property(lambda self: self._beta1)
    beta2 = property(lambda self: self._beta2)
    epsilon = property(lambda self: self._epsilon)

    @property
    def time_step(self) -> int:
        return self._time_step

    @time_step.setter
    def time_step(self, value: int) -> None:
        self._time_step = _time_step(self._name(), value)
        self._stale = set(self._step_tensors)

    def time_step_tensor(self, device: Device | str | None = None) -> torch.Tensor:
        """mpsnn: the device copy of the step count (float32 scalar), seeded from
        ``time_step`` when made or after ``time_step`` was set."""
        dev = (self.device if device is None else Device(device)).torch_device
        t = self._step_tensors.get(dev)
        if t is None:
            t = self._step_tensors[dev] = torch.full((), float(self._time_step), dtype=torch.float32, device=dev)
        elif dev in self._stale:
            t.fill_(float(self._time_step))
        self._stale.discard(dev)
        return t

    def copy(self, device: Device | str | None = None) -> "MPSNNOptimizerAdam":
        new = super().copy(device)
        assert isinstance(new, MPSNNOptimizerAdam)
        new._step_tensors, new._stale = {}, set()
        return new

    def _encode_update(self, cb: MTLCommandBuffer, update: Update) -> None:
        m, v, x = update.roles["momentum"], update.roles["velocity"], update.roles["maximum_velocity"]
        if (m is None) != (v is None) or (x is not None and m is None):
            raise MPSValueError(f"{self._name()}: `input_momentum_vectors` and `input_velocity_vectors` must both be given or both be "
                                "nil, and `maximum_velocity_vectors` needs both")
        if self._stale:
            flush_deferred()          # queued updates read the step count before it is re-seeded
        step = self.time_step_tensor()
        if m is None or v is None:
            def plain() -> None:
                step.add_(1)
                backend.sgd_step(update.values, update.gradients, None, update.results, lr=self._learning_rate, momentum=0.0,
                                 nesterov=False, pre=self._preprocess())
            with cb.encoding(self._name()):
                plain()
        else:
            self._run(cb, update, "adam" if x is None else "amsgrad", [m, v, x], lambda: backend.adam_step(
                update.values, update.gradients, m, v, x, update.results, lr=self._learning_rate, beta1=self._beta1,
                beta2=self._beta2, eps=self._epsilon, step_tensor=step, pre=self._preprocess()),
                a=self._beta1, b=self._beta2, eps=self._epsilon, step=step)
        self._time_step += 1

    def __repr__(self) -> str:
        return (f"MPSNNOptimizerAdam(learning_rate={self._learning_rate}, beta1={self._beta1}, beta2={self._beta2}, "
                f"epsilon={self._epsilon}, time_step={self._time_step})")
