"""The one tolerance table of the test suite, keyed by storage dtype.

A result stored in dtype ``D`` is compared with a float64 reference computed from the
*same* (already ``D``-rounded) inputs, so the tolerance only has to cover the kernel's
internal float32 arithmetic plus one rounding to ``D`` on store:

==========  ===========  =========  ================================================
dtype       rtol         atol       why
==========  ===========  =========  ================================================
float64     1e-12        1e-12      float64 end to end
float32     1e-5         1e-6       a few float32 ulps (2^-24 ~ 6e-8) through exp/tanh/erf
float16     2e-3         1e-5       half an ulp of binary16 (2^-11 ~ 4.9e-4) plus slack;
                                    atol covers subnormals (2^-24 ~ 6e-8) with margin
bfloat16    1.6e-2       1e-4       half an ulp of bfloat16 (2^-8 ~ 3.9e-3) times ~4
unorm8      0            0.5/255+   compare with the *unquantised* reference clamped to
                                    [0, 1]: a store that rounds to nearest is within half
                                    a step (no tie ambiguity); floor/ceil are not
unorm16     0            0.5/65535+ the same for 16-bit unorm
==========  ===========  =========  ================================================

Per-op overrides are declared next to the op's test cases, as a mapping ``{dtype: Tol}``
passed to :func:`tolerance` / :func:`assert_close`::

    POWER_TOL = {"float16": Tol(4e-3, 1e-4)}   # (a*x+b)^c amplifies the input rounding
    assert_close(actual, expected, "float16", overrides=POWER_TOL)

Never write a bare number into a test body: add a row or an override.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TOLERANCES", "Tol", "assert_close", "dtype_key", "tolerance"]


@dataclass(frozen=True)
class Tol:
    """``|actual - expected| <= atol + rtol * |expected|``, element-wise."""

    rtol: float
    atol: float


TOLERANCES: dict[str, Tol] = {
    "float64": Tol(1e-12, 1e-12),
    "float32": Tol(1e-5, 1e-6),
    "float16": Tol(2e-3, 1e-5),
    "bfloat16": Tol(1.6e-2, 1e-4),
    "unorm8": Tol(0.0, 0.5 / 255 + 1e-6),
    "unorm16": Tol(0.0, 0.5 / 65535 + 1e-7),
}

_ALIASES = {"float": "float32", "half": "float16", "double": "float64", "bf16": "bfloat16"}


def dtype_key(dtype: Any) -> str:
    """Normalise a torch dtype, NumPy dtype, ``MPSImageFeatureChannelFormat`` or string."""
    if isinstance(dtype, str):
        key = _ALIASES.get(dtype, dtype)
    elif hasattr(dtype, "is_floating_point") and str(dtype).startswith("torch."):  # torch.dtype
        key = str(dtype).split(".", 1)[1]
    elif hasattr(dtype, "name") and type(dtype).__name__ == "MPSImageFeatureChannelFormat":
        key = dtype.name
    else:
        key = np.dtype(dtype).name
    key = _ALIASES.get(key, key)
    if key not in TOLERANCES:
        raise KeyError(f"no tolerance row for dtype {dtype!r} (rows: {sorted(TOLERANCES)})")
    return key


def tolerance(dtype: Any, overrides: Mapping[Any, Tol] | None = None) -> Tol:
    """The table row for ``dtype``, or the override declared for it."""
    key = dtype_key(dtype)
    for k, tol in (overrides or {}).items():
        if dtype_key(k) == key:
            return tol
    return TOLERANCES[key]


def _as_float64(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor on any device, any float dtype
        a = a.detach().to("cpu").double().numpy()
    return np.asarray(a, dtype=np.float64)


def assert_close(actual: Any, expected: Any, dtype: Any, overrides: Mapping[Any, Tol] | None = None, msg: str = "") -> None:
    """Element-wise comparison with the tolerance of ``dtype``; NaN matches NaN, infinities
    must match exactly. Shapes must agree."""
    a, e = _as_float64(actual), _as_float64(expected)
    tol = tolerance(dtype, overrides)
    if a.shape != e.shape:
        raise AssertionError(f"{msg}: shape {a.shape} != expected {e.shape}")
    np.testing.assert_allclose(a, e, rtol=tol.rtol, atol=tol.atol, equal_nan=True,
                               err_msg=f"{msg} [dtype {dtype_key(dtype)}: rtol={tol.rtol}, atol={tol.atol}]")
