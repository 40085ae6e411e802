"""The optimizers' value copy skipped for a result known to hold its value already
(``mpsnn.backends.optimizers.note_equal``, recorded by a convolution's reload on the CPU):
skipped only while neither tensor was written since (torch's version counts), and never
for tensors the record does not name."""
from __future__ import annotations

import torch

from mpsnn.backends import optimizers as O


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    master = torch.randn(4, 3, 3, 2)
    state = master.clone()
    O.note_equal(state, master)
    return master, state


def _mark(t: torch.Tensor) -> None:
    """Write ``t`` without advancing its version count (``.data`` has a counter of its own),
    so that a skipped copy shows: the mark survives it, a copy overwrites it."""
    t.data.fill_(7.0)


def test_an_unwritten_pair_skips_the_copy() -> None:
    master, state = _pair()
    _mark(state)
    out = O._start_results([master.view_as(master)], [state])   # an export's view of the master
    assert out[0] is state and bool((state == 7.0).all())


def test_a_written_result_is_copied_again() -> None:
    master, state = _pair()
    state.add_(1.0)                                             # the data source wrote its state
    O._start_results([master], [state])
    assert torch.equal(state, master)


def test_a_written_value_is_copied_again() -> None:
    master, state = _pair()
    master.mul_(2.0)                                            # the kernel's master changed
    _mark(state)
    O._start_results([master], [state])
    assert torch.equal(state, master)


def test_other_tensors_are_copied() -> None:
    master, state = _pair()
    other = master.clone()
    _mark(state)
    O._start_results([other], [state])                          # not the recorded source
    assert torch.equal(state, other)
    fresh = torch.empty_like(master)
    O._start_results([master], [fresh])                         # not the recorded copy
    assert torch.equal(fresh, master)


def test_a_sgd_step_after_a_skipped_copy_matches_a_copied_one() -> None:
    master, state = _pair()
    g = torch.randn_like(master)
    expect = master - 0.1 * g
    O.sgd_step([master], [g], None, [state], lr=0.1, momentum=0.0, nesterov=False, pre=O.Preprocess())
    torch.testing.assert_close(state, expect, rtol=0, atol=1e-7)
    assert not torch.equal(state, master)                       # the update went to the result only
