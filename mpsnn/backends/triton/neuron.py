"""Triton kernels for every ``MPSCNNNeuronType``: forward ``f(x)`` and gradient ``dy * f'(x)``.

Semantics
---------
The arithmetic is ``backends/torch_eager.py``'s, operation for operation, so both engines
agree to the last bit wherever the same float32 library function is used, and to a few
float32 ulps where the implementations differ (erf, torch's special cases of ``pow``, the
16-bit GeLU derivative), which rounding to bf16/fp16 storage hides:

* every value is loaded, converted to float32, computed in float32 and rounded once (round
  to nearest even) to the destination dtype; the destination dtype may differ from the
  source's;
* kinks: ReLU / PReLU / ELU take the ``x >= 0`` branch at 0 (``-0.0`` included); HardSigmoid's
  derivative is ``a`` where ``0 <= a*x+b <= 1`` (pre-clamp value, both edges inclusive);
  ReLUN's derivative is 0 where the clamp is active (``p >= b``); Absolute's derivative is
  ``sign(x)`` with ``sign(0) = sign(NaN) = 0`` (torch's ``sign``);
* SoftPlus follows torch's ``softplus``: ``z = b*x``; ``z`` itself where ``z > 20``, else
  ``log1p(exp(z))`` (no overflow: the large branch never reaches ``exp``);
  Sigmoid is ``1 / (1 + exp(-x))``, which saturates to exactly 0 / 1 without NaN;
* Exponential and Logarithm use base e when ``c == -1`` (decided on the host, a compile-time
  constant) and base ``c`` otherwise: ``pow(c, u)`` (IEEE ``pow``: negative bases work for
  integral exponents) and ``log(u) / ln(c)``; ``ln(c)`` of a non-positive base is NaN / -inf
  (``torch_eager._log``), so those results are NaN / -0 as in torch;
* scalar factors that torch_eager forms in Python (``a*ln(c)``) are formed on the host in
  double and rounded to float32 once, as torch rounds a Python scalar;
* GeLU is the exact erf form ``0.5*x*(1 + erf(x*sqrt(0.5)))``; its derivative is the exact
  ``0.5*(1 + erf(x/sqrt 2)) + x*exp(-x^2/2)/sqrt(2 pi)``;
* branches that ``tl.where`` discards are computed on clamped arguments where they could
  overflow (ELU's ``expm1`` / ``exp`` see ``min(x, 0)``), keeping NaN inputs NaN.

Kernels are compiled with floating-point contraction off (``enable_fp_fusion=False``):
``a*x + b`` is rounded twice, as in torch, so decisions at kinks (HardSigmoid's edges, ReLUN's
clamp) are bit-identical to torch_eager's. Transcendentals come from CUDA's libdevice
(``expf``, ``logf``, ``log1pf``, ``expm1f``, ``tanhf``, ``powf``), the same accurate float32
functions torch's CUDA kernels call. ``erf`` is libdevice's ``erff`` algorithm written out
(same coefficients, same operations) with its two ranges evaluated side by side instead of
selecting coefficients per element, which lets the FMAs take them as immediates and keeps
GeLU memory bound (within 1 ulp of torch's CUDA ``erf``). GeLU's derivative stored to a 16-bit format evaluates ``exp(-x^2/2)`` as
one ``ex2.approx`` (relative error < 4e-6, invisible after bf16/fp16 rounding); a float32
destination uses ``expf``. ``tl.exp`` / ``tl.log`` are the fast approximate PTX forms and
are used only by the portable fallback (no libdevice, or Triton's CPU interpreter), which
builds ``log1p``, ``expm1``, ``tanh`` and ``pow`` from them.

Performance design
------------------
Neurons are element-wise and memory bound: 4 bytes per element move for a bf16 forward,
6 for a bf16 gradient. The kernels are written to run at copy bandwidth:

* one program per block of ``BLOCK`` contiguous elements: 4 x 16-byte vectors per thread
  per input (8192 elements for 2-byte dtypes, 4096 for float32, 8 warps), enough bytes in
  flight to saturate HBM without a persistent loop;
* full blocks take an unmasked path (128-bit loads and stores whatever ``numel``); only
  the single tail block is masked;
* offsets are int32, or int64 (a compile-time switch) when ``numel + BLOCK >= 2**31``;
* the neuron type and, for PReLU only, the channel count ``C`` are ``tl.constexpr`` so every
  kernel is specialised to straight-line code; ``a``, ``b``, ``c`` are runtime float32
  scalars (changing them never recompiles);
* PReLU: where every pixel row of ``C`` channels starts 16-byte aligned (``C * element
  size`` a multiple of 16, e.g. C = 168 in bf16), a tile of whole pixels ``[ROWS, CP]``
  (``CP = next_pow2(C)``) loads the C slopes once and broadcasts them, so element accesses
  stay 16-byte vectors; otherwise (small or odd C) the flat kernel computes the channel of
  element ``i`` as ``i % C`` (one scalar per program plus an int32 lane index) and gathers
  its slope from the L1-resident slope vector;
* no autotuning, no host synchronisation: a fixed size heuristic picks the configuration,
  and launches go to torch's current CUDA stream (the command buffer's stream).
"""
from __future__ import annotations

import os
from typing import Any

import torch

from ...core.enums import MPSCNNNeuronType as T
from ..torch_eager import NeuronParams, _log

try:  # Triton is optional: CPU-only installs import this module and report available() False
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

_libdevice: Any = None
if triton is not None:
    try:
        from triton.language.extra import libdevice as _libdevice  # type: ignore[no-redef]  # Triton >= 3.0 (dispatching module)
    except ImportError:  # pragma: no cover
        try:
            from triton.language.extra.cuda import libdevice as _libdevice  # type: ignore[no-redef]
        except ImportError:
            _libdevice = None

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
_MATH_CHOICE = os.environ.get("MPSNN_TRITON_MATH", "auto")  # "libdevice" | "portable" | "auto"
if _MATH_CHOICE == "libdevice":
    USE_LIBDEVICE = _libdevice is not None
elif _MATH_CHOICE == "portable":
    USE_LIBDEVICE = False
else:
    USE_LIBDEVICE = _libdevice is not None and not _INTERPRETING

#: element count from which offsets are computed in int64 (tests lower it to exercise that path)
INT64_THRESHOLD = 2**31

_available: bool | None = None


def available() -> bool:
    """True when Triton is importable and a CUDA device is usable."""
    global _available
    if _available is None:
        ok = triton is not None and torch.cuda.is_available()
        if ok:
            try:
                ok = triton.runtime.driver.active.get_current_target().backend == "cuda"
            except (RuntimeError, AttributeError, ImportError, OSError):  # no usable driver
                ok = False
        _available = ok
    return _available


if triton is not None:
    # ---- float32 math helpers: libdevice, or a portable fallback -------------------------
    if USE_LIBDEVICE:
        @triton.jit
        def _exp(x):
            return _libdevice.exp(x)

        @triton.jit
        def _ln(x):
            return _libdevice.log(x)

        @triton.jit
        def _log1p(x):
            return _libdevice.log1p(x)

        @triton.jit
        def _expm1(x):
            return _libdevice.expm1(x)

        @triton.jit
        def _tanh(x):
            return _libdevice.tanh(x)

        @triton.jit
        def _erf(x):
            # libdevice's erff, operation for operation, with its two coefficient sets
            # evaluated side by side instead of selected per element: FMAs then take the
            # coefficients as immediates, ~25% fewer issued instructions for GeLU, which keeps
            # it memory bound. Measured on H200 against torch's CUDA erf over a dense sweep:
            # within 1 ulp everywhere, 93% bit-identical (libdevice's own erff as Triton links
            # it agrees as often but flushes subnormal results to zero).
            t = tl.abs(x)
            # |x| < 1.00296: x + x * P(x^2)
            s = x * x
            p = tl.fma(8.483494457323104e-05, s, -0.0008213091641664505)
            p = tl.fma(p, s, 0.005213488824665546)
            p = tl.fma(p, s, -0.026868773624300957)
            p = tl.fma(p, s, 0.11284004896879196)
            p = tl.fma(p, s, -0.37612664699554443)
            p = tl.fma(p, s, 0.12837915122509003)
            small = tl.fma(p, x, x)
            # |x| >= 1.00296: sign(x) * (1 - 2^(-t - t * Q(t)))
            q = tl.fma(1.6425845387857407e-05, t, -0.0004680210549850017)
            q = tl.fma(q, t, 0.0052647641859948635)
            q = tl.fma(q, t, -0.034303076565265656)
            q = tl.fma(q, t, 0.1532936990261078)
            q = tl.fma(q, t, 0.9163130521774292)
            q = tl.fma(q, t, 0.6282998323440552)
            q = tl.fma(q, -t, -t)
            large = 1.0 - tl.exp2(q)
            large = tl.where(x < 0, -large, large)
            return tl.where(t >= 1.002959966659546, large, small)

        @triton.jit
        def _pow(x, y):
            return _libdevice.pow(x, y)
    else:
        @triton.jit
        def _exp(x):
            return tl.exp(x)

        @triton.jit
        def _ln(x):
            return tl.log(x)

        @triton.jit
        def _log1p(x):
            # log(u) * x / (u - 1) with u = 1 + x cancels the rounding of u (Goldberg)
            u = 1.0 + x
            d = u - 1.0
            d_safe = tl.where(d == 0.0, 1.0, d)
            r = tl.log(u) * (x / d_safe)
            r = tl.where(d == 0.0, x, r)
            return tl.where(u == float("inf"), u, r)

        @triton.jit
        def _expm1(x):
            # (u - 1) * x / log(u) with u = exp(x) (Kahan); exact x for tiny |x|
            u = tl.exp(x)
            um1 = u - 1.0
            lu = tl.log(u)
            lu_safe = tl.where(lu == 0.0, 1.0, lu)
            r = um1 * (x / lu_safe)
            r = tl.where(u == 1.0, x, r)
            r = tl.where(um1 == -1.0, -1.0, r)
            return tl.where(u == float("inf"), u, r)

        @triton.jit
        def _tanh(x):
            ax = tl.abs(x)
            t = _expm1(-2.0 * ax)
            r = -t / (2.0 + t)
            return tl.where(x < 0, -r, r)

        @triton.jit
        def _erf(x):
            return tl.erf(x)

        @triton.jit
        def _pow(x, y):
            # IEEE pow (x, y: tensors of one shape) from exp2/log2: a negative base needs an
            # integral exponent, its sign follows the exponent's parity, -0.0 included
            mag = tl.exp2(y * tl.log2(tl.abs(x)))
            y_int = tl.floor(y) == y
            y_odd = y_int & (tl.floor(y * 0.5) * 2.0 != y)
            negative = (x < 0) | ((x == 0.0) & (1.0 / x < 0))
            r = tl.where(negative & y_odd, -mag, mag)
            r = tl.where((x < 0) & (x != float("-inf")) & (tl.floor(y) != y), float("nan"), r)
            r = tl.where((x == -1.0) & (tl.abs(y) == float("inf")), 1.0, r)
            return tl.where((y == 0.0) | (x == 1.0), 1.0, r)

    # ---- the neuron math (NTYPE: MPSCNNNeuronType raw value) -----------------------------
    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + _exp(-x))

    @triton.jit
    def _forward_math(x, s, a, b, c, k, NTYPE: tl.constexpr, BASE_E: tl.constexpr):
        """f(x) in float32. ``s``: PReLU slope per element; ``k``: ln(c) for logarithm."""
        if NTYPE == 0:  # none
            y = x
        elif NTYPE == 1:  # reLU
            y = tl.where(x >= 0, x, a * x)
        elif NTYPE == 2:  # linear
            y = a * x + b
        elif NTYPE == 3:  # sigmoid
            y = _sigmoid(x)
        elif NTYPE == 4:  # hardSigmoid: clamp(a*x + b, 0, 1), NaN kept
            u = a * x + b
            y = tl.where(u < 0.0, 0.0, tl.where(u > 1.0, 1.0, u))
        elif NTYPE == 5:  # tanH
            y = a * _tanh(b * x)
        elif NTYPE == 6:  # absolute
            y = tl.abs(x)
        elif NTYPE == 7:  # softPlus (torch's threshold 20)
            z = b * x
            y = a * tl.where(z > 20.0, z, _log1p(_exp(tl.where(z > 20.0, 0.0, z))))
        elif NTYPE == 8:  # softSign
            y = x / (1.0 + tl.abs(x))
        elif NTYPE == 9:  # ELU
            xn = tl.where(x >= 0, 0.0, x)
            y = tl.where(x >= 0, x, a * _expm1(xn))
        elif NTYPE == 10:  # pReLU
            y = tl.where(x >= 0, x, s * x)
        elif NTYPE == 11:  # reLUN: min(p, b), NaN in p or b propagates
            p = tl.where(x >= 0, x, a * x)
            y = tl.minimum(p, b, propagate_nan=tl.PropagateNan.ALL)
        elif NTYPE == 12:  # power
            y = _pow(a * x + b, tl.full(x.shape, c, tl.float32))
        elif NTYPE == 13:  # exponential
            if BASE_E:
                y = _exp(a * x + b)
            else:
                y = _pow(tl.full(x.shape, c, tl.float32), a * x + b)
        elif NTYPE == 14:  # logarithm
            if BASE_E:
                y = _ln(a * x + b)
            else:
                y = _ln(a * x + b) / k
        else:  # 15: geLU
            y = (0.5 * x) * (1.0 + _erf(x * 0.7071067811865476))
        return y

    @triton.jit
    def _derivative_math(x, s, a, b, c, k, NTYPE: tl.constexpr, BASE_E: tl.constexpr, FAST: tl.constexpr):
        """f'(x) in float32. ``k``: a*ln(c) for exponential, ln(c) for logarithm. ``FAST``: the
        result is stored in a 16-bit format, whose rounding hides a few float32 ulps."""
        one = tl.full(x.shape, 1.0, tl.float32)
        if NTYPE == 0:  # none
            d = one
        elif NTYPE == 1:  # reLU
            d = tl.where(x >= 0, one, a * one)
        elif NTYPE == 2:  # linear
            d = a * one
        elif NTYPE == 3:  # sigmoid
            sg = _sigmoid(x)
            d = sg * (1.0 - sg)
        elif NTYPE == 4:  # hardSigmoid: a on [0, 1] of the pre-clamp value, edges inclusive
            u = a * x + b
            d = tl.where((u >= 0.0) & (u <= 1.0), a * one, 0.0 * one)
        elif NTYPE == 5:  # tanH
            th = _tanh(b * x)
            d = (a * b) * (1.0 - th * th)
        elif NTYPE == 6:  # absolute: sign(x), 0 at 0 and NaN
            d = tl.where(x > 0, one, tl.where(x < 0, -one, 0.0 * one))
        elif NTYPE == 7:  # softPlus
            d = (a * b) * _sigmoid(b * x)
        elif NTYPE == 8:  # softSign
            q = 1.0 + tl.abs(x)
            d = 1.0 / (q * q)
        elif NTYPE == 9:  # ELU
            xn = tl.where(x >= 0, 0.0, x)
            d = tl.where(x < 0, a * _exp(xn), one)
        elif NTYPE == 10:  # pReLU
            d = tl.where(x >= 0, one, s * one)
        elif NTYPE == 11:  # reLUN: 0 where the clamp is active
            p = tl.where(x >= 0, x, a * x)
            d = tl.where(p >= b, 0.0 * one, tl.where(x >= 0, one, a * one))
        elif NTYPE == 12:  # power
            d = (a * c) * _pow(a * x + b, tl.full(x.shape, c - 1.0, tl.float32))
        elif NTYPE == 13:  # exponential
            if BASE_E:
                d = a * _exp(a * x + b)
            else:
                d = k * _pow(tl.full(x.shape, c, tl.float32), a * x + b)
        elif NTYPE == 14:  # logarithm
            if BASE_E:
                d = a / (a * x + b)
            else:
                d = a / (k * (a * x + b))
        else:  # 15: geLU
            if FAST:  # 16-bit destination: exp(-x^2/2) as one ex2.approx (rel. error < 4e-6)
                gauss = tl.exp2((x * x) * -0.7213475204444817)
            else:
                gauss = _exp((-0.5 * x) * x)
            d = 0.5 * (1.0 + _erf(x * 0.7071067811865476)) + (x * gauss) * 0.3989422804014327
        return d

    @triton.jit
    def _block_start(BLOCK: tl.constexpr, INT64: tl.constexpr):
        pid = tl.program_id(0)
        if INT64:
            start = pid.to(tl.int64) * BLOCK
        else:
            start = pid * BLOCK
        return start

    @triton.jit
    def _per_channel(ptr, start, C: tl.constexpr, BLOCK: tl.constexpr):
        """The per-channel values (float32) of the block's elements: channel ``i % C``."""
        return tl.load(ptr + ((start % C).to(tl.int32) + tl.arange(0, BLOCK)) % C).to(tl.float32)

    @triton.jit
    def _slope(slopes_ptr, start, NTYPE: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
        if NTYPE == 10:
            s = _per_channel(slopes_ptr, start, C, BLOCK)
        else:
            s = 0.0
        return s

    @triton.jit
    def _neuron_forward_kernel(x_ptr, out_ptr, slopes_ptr, bias_ptr, n, a, b, c, k,
                               NTYPE: tl.constexpr, BASE_E: tl.constexpr, C: tl.constexpr, BIAS: tl.constexpr,
                               BLOCK: tl.constexpr, INT64: tl.constexpr):
        start = _block_start(BLOCK, INT64)
        offs = start + tl.arange(0, BLOCK)
        s = _slope(slopes_ptr, start, NTYPE, C, BLOCK)
        if BIAS:   # a per-channel bias added first (a convolution's epilogue), channel i % C
            bias = _per_channel(bias_ptr, start, C, BLOCK)
        else:
            bias = 0.0
        if start + BLOCK <= n:  # full block: unmasked, vectorised
            x = tl.load(x_ptr + offs).to(tl.float32) + bias
            y = _forward_math(x, s, a, b, c, k, NTYPE, BASE_E)
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty))
        else:  # the tail block
            mask = offs < n
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + bias
            y = _forward_math(x, s, a, b, c, k, NTYPE, BASE_E)
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _neuron_gradient_kernel(dy_ptr, x_ptr, out_ptr, slopes_ptr, n, a, b, c, k,
                                NTYPE: tl.constexpr, BASE_E: tl.constexpr, C: tl.constexpr,
                                BLOCK: tl.constexpr, INT64: tl.constexpr, FAST: tl.constexpr):
        start = _block_start(BLOCK, INT64)
        offs = start + tl.arange(0, BLOCK)
        s = _slope(slopes_ptr, start, NTYPE, C, BLOCK)
        if start + BLOCK <= n:
            x = tl.load(x_ptr + offs).to(tl.float32)
            dy = tl.load(dy_ptr + offs).to(tl.float32)
            g = dy * _derivative_math(x, s, a, b, c, k, NTYPE, BASE_E, FAST)
            tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty))
        else:
            mask = offs < n
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = dy * _derivative_math(x, s, a, b, c, k, NTYPE, BASE_E, FAST)
            tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rows_tile(slopes_ptr, rows, C: tl.constexpr, CP: tl.constexpr, ROWS: tl.constexpr, INT64: tl.constexpr):
        """A [ROWS, CP] tile of whole pixels (rows of C channels): offsets, mask, slopes."""
        pid = tl.program_id(0)
        if INT64:
            r = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        else:
            r = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, CP)
        s = tl.load(slopes_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        offs = r[:, None] * C + cols[None, :]
        mask = (r[:, None] < rows) & (cols[None, :] < C)
        return offs, mask, s[None, :]

    @triton.jit
    def _prelu_rows_forward_kernel(x_ptr, out_ptr, slopes_ptr, rows, C: tl.constexpr, CP: tl.constexpr,
                                   ROWS: tl.constexpr, INT64: tl.constexpr):
        offs, mask, s = _rows_tile(slopes_ptr, rows, C, CP, ROWS, INT64)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = _forward_math(x, s, 0.0, 0.0, 0.0, 0.0, 10, False)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _prelu_rows_gradient_kernel(dy_ptr, x_ptr, out_ptr, slopes_ptr, rows, C: tl.constexpr, CP: tl.constexpr,
                                    ROWS: tl.constexpr, INT64: tl.constexpr):
        offs, mask, s = _rows_tile(slopes_ptr, rows, C, CP, ROWS, INT64)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = dy * _derivative_math(x, s, 0.0, 0.0, 0.0, 0.0, 10, False, False)
        tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=mask)


# ---- host side -------------------------------------------------------------------------------
_SMALL = 1024  # tensors up to this many elements use one small configuration


def _config(n: int, *tensors: torch.Tensor) -> tuple[int, int]:
    """(BLOCK, num_warps): 4 x 16-byte vectors per thread of the widest input, 8 warps."""
    if n <= _SMALL:
        return _SMALL, 4
    widest = max(t.element_size() for t in tensors)
    vec = 16 // widest
    num_warps = 8
    return vec * 32 * num_warps * 4, num_warps


def _scalars(p: NeuronParams, gradient: bool) -> tuple[float, float, float, float, bool]:
    """(a, b, c, k, base_e) for the kernel; ``k`` is formed in double like torch_eager's scalars."""
    a, b, c = float(p.a), float(p.b), float(p.c)
    t = T(p.neuron_type)
    base_e = c == -1.0 and t in (T.exponential, T.logarithm)  # a compile-time switch for these two only
    k = 0.0
    if t == T.logarithm and not base_e:
        k = _log(c)
    elif t == T.exponential and not base_e and gradient:
        k = a * _log(c)
    return a, b, c, k, base_e


def _prelu_slopes(p: NeuronParams, x: torch.Tensor) -> torch.Tensor:
    if p.slopes is None:
        raise ValueError("pReLU needs per-channel slopes")
    slopes = p.slopes
    if slopes.device != x.device or slopes.dtype != torch.float32 or not slopes.is_contiguous():
        slopes = slopes.to(device=x.device, dtype=torch.float32).contiguous()
    return slopes


def _run(kernel: Any, grid: tuple[int], x: torch.Tensor, args: tuple, meta: dict) -> None:
    if x.is_cuda and x.device.index is not None and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def _prelu_rows_config(n: int, channels: int, tensors: tuple[torch.Tensor, ...]) -> tuple[int, int, int] | None:
    """(CP, ROWS, num_warps) of the whole-pixel PReLU tiling, or None where it does not apply.

    A tile of ROWS pixels x CP >= C channels loads the C slopes once and broadcasts them, so
    the element loads stay 16-byte vectors. It needs every pixel row to start 16-byte aligned
    (C * element size a multiple of 16 for every tensor) and C <= 4096; otherwise the flat
    kernel gathers the slope of each element (cheap for small C, whose slopes share a line).
    """
    if n <= _SMALL or channels > 4096 or any((channels * t.element_size()) % 16 for t in tensors):
        return None
    block, num_warps = _config(n, *tensors)
    cp = triton.next_power_of_2(channels)
    return cp, max(1, block // cp), num_warps


def _launch(flat_kernel: Any, rows_kernel: Any, tensors: tuple[torch.Tensor, ...], x: torch.Tensor, p: NeuronParams, gradient: bool,
            bias: torch.Tensor | None = None) -> None:
    n = x.numel()
    if n == 0:
        return
    t = T(p.neuron_type)
    if t == T.count:
        raise ValueError("the `count` sentinel is not a neuron type")
    common = {"num_stages": 1, "enable_fp_fusion": False}
    if t == T.pReLU:
        slopes = _prelu_slopes(p, x)
        channels = int(x.shape[-1])
        rows_cfg = None if bias is not None else _prelu_rows_config(n, channels, tensors)
        if rows_cfg is not None:
            cp, rows_per_program, num_warps = rows_cfg
            rows = n // channels
            meta = {"C": channels, "CP": cp, "ROWS": rows_per_program, "INT64": n + rows_per_program * cp >= INT64_THRESHOLD,
                    "num_warps": num_warps, **common}
            _run(rows_kernel, (triton.cdiv(rows, rows_per_program),), x, (*tensors, slopes, rows), meta)
            return
    else:
        # C only matters for PReLU and a bias: one compiled kernel for every C otherwise
        channels, slopes = (int(x.shape[-1]) if bias is not None else 1), x
    block, num_warps = _config(n, *tensors)
    a, b, c, k, base_e = _scalars(p, gradient)
    meta = {"NTYPE": int(t), "BASE_E": base_e, "C": channels, "BLOCK": block, "INT64": n + block >= INT64_THRESHOLD,
            "num_warps": num_warps, **common}
    args: tuple[Any, ...] = (*tensors, slopes)
    if gradient:  # a 16-bit destination lets GeLU's derivative use a one-instruction exp (see _derivative_math)
        meta["FAST"] = tensors[-1].element_size() <= 2 and t == T.geLU
    else:
        meta["BIAS"] = bias is not None
        args += (x if bias is None else bias,)
    _run(flat_kernel, (triton.cdiv(n, block),), x, (*args, n, a, b, c, k), meta)


def neuron_forward(x: torch.Tensor, out: torch.Tensor, p: NeuronParams, bias: torch.Tensor | None = None) -> None:
    """``out[...] = f(x + bias)``; contiguous tensors of one shape ``[..., C]`` (float32/16,
    bfloat16); ``bias``: ``C`` values or None (added in float32 before the neuron: a
    convolution's bias in the same pass as its fused neuron).

    The channel of flat element ``i`` is ``i % C`` (PReLU, bias). Enqueued on the current stream.
    """
    if bias is not None and (bias.numel() != x.shape[-1] or not bias.is_contiguous() or bias.device != x.device):
        raise ValueError("neuron engine: the bias must be a contiguous vector of the channel count on the tensor's device")
    _launch(_neuron_forward_kernel, _prelu_rows_forward_kernel, (x, out), x, p, gradient=False, bias=bias)


def neuron_gradient(dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor, p: NeuronParams) -> None:
    """``out[...] = dy * f'(x)``; same layout rules as :func:`neuron_forward`."""
    _launch(_neuron_gradient_kernel, _prelu_rows_gradient_kernel, (dy, x, out), x, p, gradient=True)


__all__ = ["INT64_THRESHOLD", "USE_LIBDEVICE", "available", "neuron_forward", "neuron_gradient"]
