"""Optimizer numerics (spec/optimizers.md §5-8) as pure multi-tensor functions.

Every function takes LISTS of tensors (one entry per parameter updated by one encode call:
weights and biases, gamma and beta, or a single vector/matrix) so that a fused engine (one
kernel launch for all of an encode's operands) can replace it without touching the API file.
All operands of one list entry have the same shape; tensors are updated in place through
``torch._foreach_*`` ops; nothing synchronises the host with the device (Adam's bias
correction comes from a device step tensor). The arithmetic runs in the operands' dtype
(float32 for the optimizers; the functions are dtype-generic, which the float64 tests use).

``results[i]`` may be ``values[i]`` (in-place update); otherwise ``values[i]`` is copied into
``results[i]`` after pre-processing and the update is applied to ``results[i]``.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["Preprocess", "adam_step", "note_equal", "preprocess", "rmsprop_step", "sgd_step"]

Tensors = Sequence[torch.Tensor]


@dataclass(frozen=True)
class Preprocess:
    """Gradient pre-processing (§5): ``clamp -> rescale -> + regularisation``.

    ``regularization``: 0 none, 1 L1 (``+ scale*sign(v)``, sign(0) = 0), 2 L2 (``+ scale*v``).
    """

    clip: bool = False
    clip_min: float = float("-inf")
    clip_max: float = float("inf")
    rescale: float = 1.0
    regularization: int = 0
    regularization_scale: float = 0.0


def preprocess(values: Tensors, gradients: Tensors, pre: Preprocess) -> list[torch.Tensor]:
    """New tensors ``g3`` (the inputs are not modified)."""
    if pre.clip:
        g = list(torch._foreach_clamp_min(list(gradients), pre.clip_min))
        torch._foreach_clamp_max_(g, pre.clip_max)
        if pre.rescale != 1.0:
            torch._foreach_mul_(g, pre.rescale)
    else:
        g = list(torch._foreach_mul(list(gradients), pre.rescale))
    if pre.regularization == 1:
        torch._foreach_add_(g, torch._foreach_sign(list(values)), alpha=pre.regularization_scale)
    elif pre.regularization == 2:
        torch._foreach_add_(g, list(values), alpha=pre.regularization_scale)
    return g


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


#: CPU tensors known to hold equal values (:func:`note_equal`): the first one's address ->
#: (weak references to both, the second one's address, both layouts, both version counts)
_EQUAL: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor], int, tuple, tuple, int, int]] = {}


def note_equal(copy: torch.Tensor, source: torch.Tensor) -> None:
    """Record that CPU tensor ``copy`` holds ``source``'s values (the caller just copied them),
    so that an update whose result is ``copy`` and whose value is (a view of) ``source`` skips
    its value copy while neither was written since (torch's version counts, shared by views).

    A graph's weight update is the case: the kernel reloads its master from the data source's
    state (a copy), and the next step's update copies that master back into the same state
    before updating it (a 12.8 MB pass for the digit classifier's largest layer: 0.8 ms on
    two CPU cores). Only the CPU: there the copy costs a pass on the host, on CUDA it is
    microseconds and a captured graph would freeze the host-side decision."""
    if copy.device.type != "cpu" or source.device.type != "cpu":
        return
    if len(_EQUAL) > 256:                      # drop entries whose tensors died
        for key in [k for k, e in _EQUAL.items() if e[0]() is None or e[1]() is None]:
            del _EQUAL[key]
    _EQUAL[copy.data_ptr()] = (weakref.ref(copy), weakref.ref(source), source.data_ptr(), (copy.shape, copy.stride()),
                               (source.shape, source.stride()), copy._version, source._version)


def _known_equal(v: torch.Tensor, r: torch.Tensor) -> bool:
    """Whether :func:`note_equal` recorded ``r`` as a copy of ``v``'s memory, both unwritten since."""
    e = _EQUAL.get(r.data_ptr())
    if e is None:
        return False
    copy, source, ptr, clay, slay, cver, sver = e
    c, s = copy(), source()
    return (c is not None and s is not None and ptr == v.data_ptr() and clay == (r.shape, r.stride()) and slay == (v.shape, v.stride())
            and r._version == cver and v._version == sver and c._version == cver and s._version == sver)


def _start_results(values: Tensors, results: Tensors) -> list[torch.Tensor]:
    """Copy each value into its result unless they are the same storage or the result is
    known to hold the value's values already (:func:`note_equal`); return the results."""
    out = list(results)
    for v, r in zip(values, out):
        if not _same(v, r) and not (_EQUAL and _known_equal(v, r)):
            r.copy_(v)
    return out


def sgd_step(values: Tensors, gradients: Tensors, momenta: Tensors | None, results: Tensors, *,
             lr: float, momentum: float, nesterov: bool, pre: Preprocess) -> None:
    """SGD (§6). ``momenta`` None: ``v -= lr*g``. Classic: ``m = mu*m + lr*g; v -= m``.
    Nesterov: ``m = mu*m + g; v -= lr*(g + mu*m)``."""
    if not values:
        return
    g = preprocess(values, gradients, pre)
    r = _start_results(values, results)
    if momenta is None:
        torch._foreach_add_(r, g, alpha=-lr)
        return
    m = list(momenta)
    torch._foreach_mul_(m, momentum)
    if nesterov:
        torch._foreach_add_(m, g)
        torch._foreach_add_(g, m, alpha=momentum)
        torch._foreach_add_(r, g, alpha=-lr)
    else:
        torch._foreach_add_(m, g, alpha=lr)
        torch._foreach_sub_(r, m)


def rmsprop_step(values: Tensors, gradients: Tensors, sum_of_squares: Tensors, results: Tensors, *,
                 lr: float, decay: float, eps: float, pre: Preprocess) -> None:
    """RMSProp (§7): ``s = decay*s + (1-decay)*g^2; v -= lr*g/(sqrt(s) + eps)``."""
    if not values:
        return
    g = preprocess(values, gradients, pre)
    r = _start_results(values, results)
    s = list(sum_of_squares)
    torch._foreach_mul_(s, decay)
    torch._foreach_addcmul_(s, g, g, value=1.0 - decay)
    denom = torch._foreach_sqrt(s)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(r, g, denom, value=-lr)


def adam_step(values: Tensors, gradients: Tensors, m: Tensors, v: Tensors, vmax: Tensors | None, results: Tensors, *,
              lr: float, beta1: float, beta2: float, eps: float, step_tensor: torch.Tensor, pre: Preprocess) -> None:
    """Adam / AMSGrad (§8). ``step_tensor`` (0-d, on the operands' device) holds the step
    count BEFORE this update; it is advanced by one here, on the device, and
    ``lr_t = lr*sqrt(1 - beta2^t)/(1 - beta1^t)`` is computed from it::

        m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g^2 ;  [vmax = max(vmax, v)]
        value -= lr_t * m / (sqrt(v or vmax) + eps)
    """
    step_tensor.add_(1)
    if not values:
        return
    if _fused_adam_cpu(values, gradients, m, v, vmax, results, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step_tensor=step_tensor, pre=pre):
        return
    t = step_tensor.to(values[0].dtype)
    lr_t = torch.sqrt(1.0 - torch.pow(beta2, t)) / (1.0 - torch.pow(beta1, t)) * lr
    g = preprocess(values, gradients, pre)
    r = _start_results(values, results)
    mm, vv = list(m), list(v)
    torch._foreach_mul_(mm, beta1)
    torch._foreach_add_(mm, g, alpha=1.0 - beta1)
    torch._foreach_mul_(vv, beta2)
    torch._foreach_addcmul_(vv, g, g, value=1.0 - beta2)
    if vmax is not None:
        xx = list(vmax)
        torch._foreach_maximum_(xx, vv)
        denom = torch._foreach_sqrt(xx)
    else:
        denom = torch._foreach_sqrt(vv)
    torch._foreach_add_(denom, eps)
    upd = torch._foreach_div(mm, denom)
    torch._foreach_mul_(upd, lr_t)
    torch._foreach_sub_(r, upd)


#: whether torch's fused CPU Adam kernel is usable in this build (None: not tried yet)
_fused_cpu: bool | None = None


def _fused_adam_cpu(values: Tensors, gradients: Tensors, m: Tensors, v: Tensors, vmax: Tensors | None, results: Tensors, *,
                    lr: float, beta1: float, beta2: float, eps: float, step_tensor: torch.Tensor, pre: Preprocess) -> bool:
    """The CPU form of :func:`adam_step` (after the step was advanced) as torch's fused CPU
    Adam kernel: one pass per tensor instead of about ten. False (nothing done) off the CPU,
    for mixed or 16-bit dtypes, for non-contiguous operands, when a bias correction is 0, or
    when this torch has no such kernel.

    torch's kernel computes ``value -= lr/c1 · m / (sqrt(v)/sqrt(c2) + eps')`` with
    ``c_k = 1 - beta_k^t``; with ``eps' = eps/sqrt(c2)`` that is exactly §8's
    ``value -= lr·sqrt(c2)/c1 · m / (sqrt(v) + eps)``. The step count is read on the host,
    which costs nothing on the CPU."""
    global _fused_cpu
    if _fused_cpu is False or step_tensor.device.type != "cpu":
        return False
    dtype = values[0].dtype
    ops = [*gradients, *m, *v, *(vmax or []), *results]           # the values are only copied (or read by L1/L2)
    if (dtype not in (torch.float32, torch.float64) or any(t.device.type != "cpu" or t.dtype != dtype for t in [*values, *ops])
            or not all(t.is_contiguous() for t in ops)):
        return False
    t = float(step_tensor)
    c1, c2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    if not (c1 > 0.0 and c2 > 0.0):
        return False
    identity = not pre.clip and pre.rescale == 1.0 and pre.regularization == 0
    g = list(gradients) if identity else preprocess(values, gradients, pre)
    r = _start_results(values, results)
    steps = [torch.full((), t, dtype=torch.float32)] * len(r)
    try:
        torch._fused_adam_(r, g, list(m), list(v), list(vmax or []), steps, lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0,
                           eps=eps / c2 ** 0.5, amsgrad=vmax is not None, maximize=False)
    except (AttributeError, NotImplementedError, RuntimeError):
        if _fused_cpu is None:
            # the kernel refuses before writing: the general path takes over (it copies the
            # unchanged values into the results again)
            _fused_cpu = False
            return False
        raise
    _fused_cpu = True
    return True
