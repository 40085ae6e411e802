"""Triton batch normalization over NHWC images (every pixel a row of ``C`` contiguous
channels): the per-channel affine map with a fused neuron, the batch statistics, and the two
halves of the training gradient. float32 arithmetic in registers.

* :func:`apply` — ``y = f(x·scale[c] + shift[c])`` (inference, or training with the batch's
  statistics folded into ``scale``/``shift``); ``f`` is any neuron of
  :mod:`mpsnn.backends.triton.neuron` (the same float32 math), or none. One read, one write.
* :func:`statistics` — per-channel mean and biased variance over all rows, in one launch.
  Every program sums a band of rows as ``Σ (x − k)`` and ``Σ (x − k)²`` around ``k`` = the
  channel's value in the first row (so the variance does not cancel catastrophically when the
  mean is large) into ``[bands, 2, C]``; an arrival counter per channel block (one atomic add
  per band) lets the band that arrives last add all bands in a fixed order and finish (the
  same bits every run; the counter is left at 0 for the next launch). One read.
* :func:`gradient_sums` — ``Σ dy`` and ``Σ dy·(x − mean)`` per channel, by bands of rows: one
  read of each input; :func:`gradient_totals` finishes them into the statistics gradient
  (``dβ = Σ dy``, ``dγ = rstd·Σ dy·(x − mean)``) in the small launch that adds the bands.
* :func:`gradient_data` — ``dx = a[c]·(dy − b[c] − (x − mean[c])·d[c])`` elementwise (the data
  gradient from those sums). Two reads, one write.
"""
from __future__ import annotations

import torch

from ..torch_eager import NeuronParams
from . import neuron as _neuron
from .neuron import available, tl, triton
from .softmax import rows_view

__all__ = ["apply", "available", "gradient_data", "gradient_sums", "gradient_totals", "rows_view", "statistics"]

if triton is not None:
    _forward_math = _neuron._forward_math

    @triton.jit
    def _tile(M, C, BR: tl.constexpr, BC: tl.constexpr):
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        return r.to(tl.int64), c, (r[:, None] < M) & (c[None, :] < C), c < C

    @triton.jit
    def _apply_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, slopes_ptr, M, C, xs, ys, a, b, cc, k,
                      NTYPE: tl.constexpr, BASE_E: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        r, c, m, cm = _tile(M, C, BR, BC)
        x = tl.load(x_ptr + r[:, None] * xs + c[None, :], mask=m, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + c, mask=cm, other=0.0)
        sh = tl.load(shift_ptr + c, mask=cm, other=0.0)
        z = x * sc[None, :] + sh[None, :]
        if NTYPE == 10:
            s = tl.load(slopes_ptr + c, mask=cm, other=0.0)[None, :]
        else:
            s = 0.0
        if NTYPE >= 0:
            z = _forward_math(z, s, a, b, cc, k, NTYPE, BASE_E)
        tl.store(y_ptr + r[:, None] * ys + c[None, :], z.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _relu_vectors(rstd_ptr, gamma_ptr, beta_ptr, c, cm):
        """``(rstd, γ, β)`` of channels ``c`` as ``[1, BC]`` rows (loaded once per program)."""
        rs = tl.load(rstd_ptr + c, mask=cm, other=0.0)[None, :]
        ga = tl.load(gamma_ptr + c, mask=cm, other=0.0)[None, :]
        be = tl.load(beta_ptr + c, mask=cm, other=0.0)[None, :]
        return rs, ga, be

    @triton.jit
    def _relu_gradient(g, d, rs, ga, be, slope):
        """``g·f'(z)`` of a fused ReLU (slope ``a`` below 0) at the pre-activation
        ``z = (d·rstd)·γ + β``, ``d = x − mean``: the torch engine's order of operations."""
        z = (d * rs) * ga + be
        return tl.where(z >= 0, g, g * slope)

    @triton.jit
    def _sums_kernel(x_ptr, g_ptr, k_ptr, part_ptr, M, C, xs, gs, rstd_ptr, gamma_ptr, beta_ptr, slope,
                     ITERS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, RELU: tl.constexpr):
        """Band ``program_id(1)``: ``S1 = Σ g``, ``S2 = Σ g·(x−k)`` of channels
        ``program_id(0)·BC + [0, BC)`` into ``part[band, 0:2, C]``; with ``RELU`` (``k`` is then
        the mean) ``g`` is first multiplied by a fused ReLU's derivative (:func:`_relu_gradient`)."""
        c = tl.program_id(0) * BC + tl.arange(0, BC)
        band = tl.program_id(1)
        cm = c < C
        kv = tl.load(k_ptr + c, mask=cm, other=0.0)[None, :]
        if RELU:
            rs, ga, be = _relu_vectors(rstd_ptr, gamma_ptr, beta_ptr, c, cm)
        m0 = band * (ITERS * BR)
        s1 = tl.zeros([BR, BC], tl.float32)
        s2 = tl.zeros([BR, BC], tl.float32)
        for t in tl.static_range(ITERS):
            rows = m0 + t * BR + tl.arange(0, BR)
            mask = (rows[:, None] < M) & cm[None, :]
            r64 = rows.to(tl.int64)[:, None]
            d = tl.where(mask, tl.load(x_ptr + r64 * xs + c[None, :], mask=mask, other=0.0).to(tl.float32) - kv, 0.0)
            g = tl.load(g_ptr + r64 * gs + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if RELU:
                g = _relu_gradient(g, d, rs, ga, be, slope)
            s1 += g
            s2 += g * d
        base = part_ptr + band.to(tl.int64) * 2 * C
        tl.store(base + c, tl.sum(s1, axis=0), mask=cm)
        tl.store(base + C + c, tl.sum(s2, axis=0), mask=cm)

    @triton.jit
    def _statistics_kernel(x_ptr, part_ptr, count_ptr, mean_ptr, var_ptr, M, C, xs, rows_per_band, bands,
                           UNROLL: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BB: tl.constexpr):
        """Band ``program_id(1)`` of channels ``program_id(0)·BC + [0, BC)``: ``Σ(x−k)``,
        ``Σ(x−k)²`` (``k`` = row 0) into ``part[band, 0:2, C]``; the band that arrives last (a
        counter per channel block, reset to 0 by that band) adds all bands' sums in a fixed order
        and writes the mean and the biased variance."""
        cb = tl.program_id(0)
        band = tl.program_id(1)
        c = cb * BC + tl.arange(0, BC)
        cm = c < C
        kv = tl.load(x_ptr + c, mask=cm, other=0.0).to(tl.float32)
        s1 = tl.zeros([BR, BC], tl.float32)
        s2 = tl.zeros([BR, BC], tl.float32)
        r0 = band * rows_per_band
        r_end = tl.minimum(r0 + rows_per_band, M)
        for t in range(r0, r_end, BR * UNROLL):
            for u in tl.static_range(UNROLL):
                rows = t + u * BR + tl.arange(0, BR)
                mask = (rows[:, None] < r_end) & cm[None, :]
                v = tl.load(x_ptr + rows.to(tl.int64)[:, None] * xs + c[None, :], mask=mask, other=0.0).to(tl.float32)
                d = tl.where(mask, v - kv[None, :], 0.0)
                s1 += d
                s2 += d * d
        base = part_ptr + band.to(tl.int64) * 2 * C
        tl.store(base + c, tl.sum(s1, axis=0), mask=cm)
        tl.store(base + C + c, tl.sum(s2, axis=0), mask=cm)
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + cb, 1, sem="acq_rel", scope="gpu")
        if done == bands - 1:
            t1 = tl.zeros([BB, BC], tl.float32)
            t2 = tl.zeros([BB, BC], tl.float32)
            for b0 in range(0, bands, BB):
                b = b0 + tl.arange(0, BB)
                mk = (b[:, None] < bands) & cm[None, :]
                pb = part_ptr + b[:, None].to(tl.int64) * 2 * C + c[None, :]
                t1 += tl.load(pb, mask=mk, other=0.0, cache_modifier=".cg")
                t2 += tl.load(pb + C, mask=mk, other=0.0, cache_modifier=".cg")
            S1 = tl.sum(t1, axis=0)
            S2 = tl.sum(t2, axis=0)
            tl.store(mean_ptr + c, kv + S1 / M, mask=cm)
            tl.store(var_ptr + c, tl.maximum(S2 - S1 * S1 / M, 0.0) / M, mask=cm)
            tl.atomic_xchg(count_ptr + cb, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _finish_kernel(part_ptr, var_ptr, out1_ptr, out2_ptr, C, bands, eps, BB: tl.constexpr, BC: tl.constexpr):
        """Sum the bands' ``(S1, S2)`` of channels ``program_id(0)·BC + [0, BC)`` in a fixed
        order and finish the statistics gradient: ``dγ = rsqrt(var + eps)·S2``, ``dβ = S1``."""
        c = tl.program_id(0) * BC + tl.arange(0, BC)
        cm = c < C
        b = tl.arange(0, BB)
        mask = (b[:, None] < bands) & cm[None, :]
        base = part_ptr + b[:, None].to(tl.int64) * 2 * C + c[None, :]
        s1 = tl.sum(tl.load(base, mask=mask, other=0.0), axis=0)
        s2 = tl.sum(tl.load(base + C, mask=mask, other=0.0), axis=0)
        var = tl.load(var_ptr + c, mask=cm, other=0.0)
        tl.store(out1_ptr + c, s2 / tl.sqrt(var + eps), mask=cm)
        tl.store(out2_ptr + c, s1, mask=cm)

    @triton.jit
    def _data_gradient_kernel(g_ptr, x_ptr, out_ptr, mean_ptr, a_ptr, b_ptr, d_ptr, M, C, gs, xs, os, rstd_ptr, gamma_ptr, beta_ptr,
                              slope, BR: tl.constexpr, BC: tl.constexpr, RELU: tl.constexpr):
        r, c, m, cm = _tile(M, C, BR, BC)
        g = tl.load(g_ptr + r[:, None] * gs + c[None, :], mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + r[:, None] * xs + c[None, :], mask=m, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + c, mask=cm, other=0.0)[None, :]
        if RELU:
            rs, ga, be = _relu_vectors(rstd_ptr, gamma_ptr, beta_ptr, c, cm)
            g = _relu_gradient(g, x - mu, rs, ga, be, slope)
        av = tl.load(a_ptr + c, mask=cm, other=0.0)[None, :]
        bv = tl.load(b_ptr + c, mask=cm, other=0.0)[None, :]
        dv = tl.load(d_ptr + c, mask=cm, other=0.0)[None, :]
        dx = av * (g - bv - (x - mu) * dv)
        tl.store(out_ptr + r[:, None] * os + c[None, :], dx.to(out_ptr.dtype.element_ty), mask=m)


def _tiles(c: int) -> tuple[int, int]:
    """(rows, channels) per tile: up to 128 channels wide, ~4096 elements."""
    bc = min(triton.next_power_of_2(max(c, 1)), 128)
    return max(1, 4096 // bc), bc


def _rows(*tensors: torch.Tensor) -> tuple[int, int, list[int]]:
    views = [rows_view(t) for t in tensors]
    if any(v is None for v in views):
        raise ValueError("batch-norm engine: NHWC tensors whose pixels are equally spaced rows of contiguous channels")
    m, c, _ = views[0]  # type: ignore[misc]
    return m, c, [v[2] for v in views]  # type: ignore[index]


def _vec(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=torch.float32).contiguous()


def apply(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, neuron: NeuronParams | None = None) -> None:
    """``out = f(x·scale + shift)`` per channel (``scale``, ``shift``: ``[C]``)."""
    m, c, (xs, ys) = _rows(x, out)
    if m == 0 or c == 0:
        return
    br, bc = _tiles(c)
    ntype, a, b, cc, k, base_e, slopes = -1, 0.0, 0.0, 0.0, 0.0, False, x
    if neuron is not None:
        ntype = int(neuron.neuron_type)
        a, b, cc, k, base_e = _neuron._scalars(neuron, False)
        if ntype == 10:
            slopes = _neuron._prelu_slopes(neuron, x)
    _apply_kernel[(triton.cdiv(m, br), triton.cdiv(c, bc))](
        x, out, _vec(scale, x), _vec(shift, x), slopes, m, c, xs, ys, a, b, cc, k, NTYPE=ntype, BASE_E=base_e, BR=br, BC=bc,
        num_warps=8, enable_fp_fusion=False)


#: tuning of :func:`_band_sums`: widest channel block, tile elements, programs per SM,
#: largest unrolled tile count per program, warps
SUMS_CONFIG = {"bc": 64, "tile": 4096, "per_sm": 8, "iters": 8, "warps": 4}
#: the same for the fused-ReLU form: half the unrolled tiles (with 8 its extra live values
#: cost 1.6x the time: 1977 against 1217 us summed over ResNet-50's nine training batch-norm
#: shapes at batch 256, bf16, H200; a sweep of 64 configs, the plain form's unchanged)
SUMS_CONFIG_RELU = {"bc": 64, "tile": 4096, "per_sm": 8, "iters": 4, "warps": 4}
#: warps of :func:`gradient_data`'s kernel, plain and with a fused ReLU (the same sweep:
#: 4 warps take the fused form from 1719 to 1141 us; 8 stay best for the plain form)
DATA_WARPS = {False: 8, True: 4}


#: most bands :func:`_finish` adds in one tile (more: torch adds them)
_FINISH_BANDS = 4096


def _bands(x: torch.Tensor, m: int, c: int, bc_max: int, tile: int, per_sm: int) -> tuple[int, int, int, int]:
    """(channel block, rows per tile, channel blocks, bands) of a banded per-channel sum over
    ``m`` rows of ``c`` channels: tiles of about ``tile`` elements (at most 64 rows), about
    ``per_sm`` programs per SM in all."""
    bc = min(triton.next_power_of_2(max(c, 1)), bc_max)
    br = max(1, min(64, triton.next_power_of_2(max(m, 1)), tile // bc))
    col_blocks = triton.cdiv(c, bc)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    return bc, br, col_blocks, max(1, min(triton.cdiv(m, br), (per_sm * sms + col_blocks - 1) // col_blocks))


def _relu_args(relu: "tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None", x: torch.Tensor, mean: torch.Tensor) -> tuple:
    """The kernels' fused-ReLU arguments ``(rstd, γ, β, a)`` (float32 ``[C]`` vectors), or
    placeholders without one."""
    if relu is None:
        return mean, mean, mean, 0.0
    rstd, gamma, beta, a = relu
    return _vec(rstd, x), _vec(gamma, x), _vec(beta, x), float(a)


def _band_sums(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor | None = None,
               eps: float = 0.0, relu: "tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None" = None) -> torch.Tensor:
    """``[2, C]`` float32: ``(Σ g, Σ g·(x − mean))`` of :func:`_sums_kernel`, summed over the
    bands; with ``variance`` the statistics gradient ``(dγ, dβ)`` of :func:`_finish_kernel`
    instead; ``relu`` ``(rstd, γ, β, a)``: ``g`` times a fused ReLU's derivative."""
    cfg = SUMS_CONFIG if relu is None else SUMS_CONFIG_RELU
    m, c, strides = _rows(x, g)
    bc, br, col_blocks, bands = _bands(x, m, c, cfg["bc"], cfg["tile"], cfg["per_sm"])
    # tiles per band: a power of two (few compiled variants), at most cfg["iters"] (unrolled loop)
    iters = min(cfg["iters"], triton.next_power_of_2(triton.cdiv(m, bands * br)))
    bands = max(1, triton.cdiv(m, iters * br))
    part = torch.empty((bands, 2, c), dtype=torch.float32, device=x.device)
    _sums_kernel[(col_blocks, bands)](x, g, mean, part, m, c, strides[0], strides[1], *_relu_args(relu, x, mean), ITERS=iters, BR=br,
                                      BC=bc, RELU=relu is not None, num_warps=cfg["warps"])
    if variance is None:
        return part.sum(0)
    if bands > _FINISH_BANDS:
        s = part.sum(0)
        return torch.stack([s[1] * torch.rsqrt(variance + eps), s[0]])
    out = torch.empty((2, c), dtype=torch.float32, device=x.device)
    bb = triton.next_power_of_2(bands)
    fc = max(1, min(64, 8192 // bb, triton.next_power_of_2(c)))
    _finish_kernel[(triton.cdiv(c, fc),)](part, variance, out[0], out[1], c, bands, float(eps), BB=bb, BC=fc, num_warps=4)
    return out


#: tuning of :func:`statistics`: widest channel block, tile elements, tiles per loop step,
#: programs per SM, warps (a sweep of 12 on an H100, ``bench/tune_memory_bound.py``)
STATISTICS_CONFIG = {"bc": 64, "tile": 4096, "unroll": 2, "per_sm": 4, "warps": 4}

_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` zeroed int32 arrival counters for :func:`statistics`, one set per (device,
    stream): each launch leaves them at 0 again, and launches on one stream never overlap."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.index if device.index is not None else -1, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[key] = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
    return buf


def statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, biased variance)`` of ``x``'s pixels, float32 ``[C]``, in one
    launch: bands of rows sum ``(x − k)`` and ``(x − k)²`` around ``k`` = the first pixel's
    value (a value near every channel's mean, so the variance does not cancel), and the last
    band of each channel block to arrive adds the bands in a fixed order (the same bits every
    run) and finishes."""
    cfg = STATISTICS_CONFIG
    m, c, (xs,) = _rows(x)
    bc, br, col_blocks, bands = _bands(x, m, c, cfg["bc"], cfg["tile"], cfg["per_sm"])
    rows_per_band = triton.cdiv(triton.cdiv(m, bands), br) * br
    bands = triton.cdiv(m, rows_per_band)
    part = torch.empty((bands, 2, c), dtype=torch.float32, device=x.device)
    out = torch.empty((2, c), dtype=torch.float32, device=x.device)
    bb = max(1, min(triton.next_power_of_2(bands), 4096 // bc))
    _statistics_kernel[(col_blocks, bands)](x, part, _counters(x.device, col_blocks), out[0], out[1], m, c, xs, rows_per_band,
                                            bands, UNROLL=cfg["unroll"], BR=br, BC=bc, BB=bb, num_warps=cfg["warps"])
    return out[0], out[1]


def gradient_sums(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel ``(Σ g, Σ g·(x − mean))`` over all pixels, float32 ``[C]``."""
    s = _band_sums(g, x, _vec(mean, x))
    return s[0], s[1]


def gradient_totals(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor,
                    eps: float, relu: "tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel ``(dγ, dβ) = (rsqrt(variance + eps)·Σ g·(x − mean), Σ g)``, float32 ``[C]``:
    the statistics gradient in one pass over ``g`` and ``x`` and one small finishing launch.
    ``relu`` ``(rstd, γ, β, a)``: ``g`` is first multiplied by a fused ReLU's derivative at
    ``(x − mean)·rstd·γ + β`` (``1`` where that is >= 0, else ``a``)."""
    s = _band_sums(g, x, _vec(mean, x), _vec(variance, x), eps, relu)
    return s[0], s[1]


def gradient_data(g: torch.Tensor, x: torch.Tensor, out: torch.Tensor, mean: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  d: torch.Tensor, relu: "tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None" = None) -> None:
    """``out = a·(g − b − (x − mean)·d)`` per channel (all vectors float32 ``[C]``); for the
    training-mode data gradient ``a = γ·rstd``, ``b = Σg / M``, ``d = rstd²·Σ g·(x − mean) / M``;
    ``relu`` as in :func:`gradient_totals`."""
    m, c, (gs, xs, os) = _rows(g, x, out)
    if m == 0 or c == 0:
        return
    br, bc = _tiles(c)
    mv = _vec(mean, x)
    _data_gradient_kernel[(triton.cdiv(m, br), triton.cdiv(c, bc))](
        g, x, out, mv, _vec(a, x), _vec(b, x), _vec(d, x), m, c, gs, xs, os, *_relu_args(relu, x, mv), BR=br, BC=bc,
        RELU=relu is not None, num_warps=DATA_WARPS[relu is not None])
