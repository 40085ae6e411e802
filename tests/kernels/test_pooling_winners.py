"""The CPU max-pool forward's winners, reused by its gradient (``MPSCNNPoolingMax._keep_winners``,
set by the graph; ``mpsnn.backends.pooling.MaxWinners``): the gradient equals the float64
reference (first maximal tap, ties included) whether it reuses the forward's winners or pools
the source again, it reuses them only while they still fit the source it is given, and a source
that read a NaN leaves none."""
from __future__ import annotations

import numpy as np
import pytest

import mpsnn as m
from mpsnn.backends import pooling as backend
from mpsnn.kernels import pooling as kpool
from mpsnn.testing import reference_pooling as R
from mpsnn.testing.images import finish, image, values
from mpsnn.testing.tolerances import assert_close

CPU = m.Device("cpu")


def _kernels(keep: bool = True) -> tuple[m.MPSCNNPoolingMax, m.MPSCNNPoolingMaxGradient]:
    f = m.MPSCNNPoolingMax(CPU, 2, 2, 2, 2)
    f._keep_winners = keep
    return f, m.MPSCNNPoolingMaxGradient(CPU, 2, 2, 2, 2)


def _ties(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Values from a small set, so many windows hold tied maxima (the first tap must win)."""
    return np.random.default_rng(seed).integers(-2, 3, shape).astype(np.float64)


def _reference(f: m.MPSCNNPoolingMax, e: np.ndarray, x: np.ndarray) -> np.ndarray:
    return R.pooling_gradient_from_forward(e, x, np.zeros(x.shape), mode="max", kernel=(2, 2), stride=(2, 2), dilation=(1, 1),
                                           offset=(f.offset.x, f.offset.y, 0), edge_mode="zero", zero_pad=(0, 0))


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list:
    """The ``winners`` argument of every CPU max-pool gradient call."""
    seen: list = []
    real = backend.max_pool_gradient_nhwc

    def wrapped(*args, winners=None, **kw):  # type: ignore[no-untyped-def]
        seen.append(winners)
        return real(*args, winners=winners, **kw)
    monkeypatch.setattr(kpool.backend, "max_pool_gradient_nhwc", wrapped)
    return seen


def test_gradient_reuses_the_forward_winners(spy: list) -> None:
    f, g = _kernels()
    cb = CPU.make_command_queue().make_command_buffer()
    x_img, x = image(_ties(1, (3, 8, 10, 5)), CPU)
    y, state = f.encode(cb, x_img, destination_state_is_temporary=False)
    kept = getattr(state, kpool._WINNERS_ATTR)
    assert len(kept) == 1 and isinstance(kept[0], backend.MaxWinners)
    e_img, e = image(np.random.default_rng(2).normal(size=y.shape), CPU)
    dx = g.encode(cb, e_img, x_img, state)
    finish(cb)
    assert spy == [kept[0]]                                     # handed to the backend, and it fit
    assert kept[0].fits(x_img.tensor, kept[0].ay, kept[0].ax, kept[0].clamp)
    assert_close(values(dx), _reference(f, e, x), "float32")


def test_a_source_written_after_the_forward_is_pooled_again(spy: list) -> None:
    """The winners no longer fit a source written since the forward (torch's version count):
    the gradient follows the new values, as a kernel that recomputes them would."""
    f, g = _kernels()
    cb = CPU.make_command_queue().make_command_buffer()
    x_img, _ = image(_ties(3, (2, 6, 6, 4)), CPU)
    y, state = f.encode(cb, x_img, destination_state_is_temporary=False)
    new = np.random.default_rng(4).normal(size=x_img.shape)      # other winners almost everywhere
    x_img.tensor.copy_(image(new, CPU)[0].tensor)
    e_img, e = image(np.random.default_rng(5).normal(size=y.shape), CPU)
    dx = g.encode(cb, e_img, x_img, state)
    finish(cb)
    kept = getattr(state, kpool._WINNERS_ATTR)
    assert len(kept) == 1 and not kept[0].fits(x_img.tensor, kept[0].ay, kept[0].ax, kept[0].clamp)
    assert spy == [None]                                         # the kernel did not hand them on
    assert_close(values(dx), _reference(f, e, new.astype(np.float32).astype(np.float64)), "float32")


def test_a_nan_tap_leaves_no_winners() -> None:
    f, g = _kernels()
    cb = CPU.make_command_queue().make_command_buffer()
    xv = _ties(6, (2, 4, 6, 3))
    xv[1, 2, 3, 1] = np.nan
    x_img, x = image(xv, CPU)
    y, state = f.encode(cb, x_img, destination_state_is_temporary=False)
    assert getattr(state, kpool._WINNERS_ATTR, None) is None
    e_img, e = image(np.random.default_rng(7).normal(size=y.shape), CPU)
    dx = g.encode(cb, e_img, x_img, state)
    finish(cb)
    assert_close(values(dx), _reference(f, e, x), "float32")     # NaN taps never win


def test_only_the_graphs_kernels_keep_winners() -> None:
    """A kernel made directly leaves nothing on its state (a NumPy view could write its source
    unseen between forward and gradient); the graph's max-pool kernels keep them."""
    f, _ = _kernels(keep=False)
    cb = CPU.make_command_queue().make_command_buffer()
    x_img, _ = image(_ties(8, (1, 4, 4, 2)), CPU)
    _, state = f.encode(cb, x_img, destination_state_is_temporary=False)
    finish(cb)
    assert getattr(state, kpool._WINNERS_ATTR, None) is None
    src = m.MPSNNImageNode("x")
    assert m.MPSCNNPoolingMaxNode(src, 2)._build_kernel(CPU)._keep_winners is True
    assert m.MPSCNNDilatedPoolingMaxNode(src, 2)._build_kernel(CPU)._keep_winners is True
    assert not hasattr(m.MPSCNNPoolingAverageNode(src, 2)._build_kernel(CPU), "_keep_winners")
