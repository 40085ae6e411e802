"""Test oracles for mpsnn: independent float64 NumPy references and one tolerance table.

No reference imports ``mpsnn.backends``: the references re-derive every formula from the
spec (``shared/spec``) so that a bug in the production numerics cannot hide in both.
``engines.py`` (which optional engines a test run has) and ``interpret.py`` (a pytest plugin
that runs the Triton engines on CPU tensors through Triton's interpreter) choose engines.
"""
from __future__ import annotations

from . import reference, tolerances
from .reference import (
    neuron_derivative,
    neuron_forward,
    unary_gradient_reference,
    unary_kernel_reference,
)
from .tolerances import TOLERANCES, Tol, assert_close, tolerance

__all__ = [
    "TOLERANCES",
    "Tol",
    "assert_close",
    "neuron_derivative",
    "neuron_forward",
    "reference",
    "tolerance",
    "tolerances",
    "unary_gradient_reference",
    "unary_kernel_reference",
]
