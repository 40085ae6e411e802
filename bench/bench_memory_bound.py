"""Memory-bound kernels on CUDA through mpsnn's public API: pooling (max, average; forward and
gradient), softmax (forward and gradient), upsampling (nearest, bilinear; forward and
gradient), batch normalization (inference + ReLU, statistics, gradients, plain and with the
graph's fused ReLU), the residual addition (inference, training, the graph's fused addition
-> ReLU, their gradients) and the ReLU neuron (forward, gradient), against the device's copy
bandwidth and torch eager on the same tensors.

    PYTHONPATH=. python3 bench/bench_memory_bound.py [--quick] [--only SUBSTRING[,SUBSTRING...]]

``--only`` runs the rows whose full name ("group: name", group one of pooling, softmax,
upsampling, batchnorm, arithmetic, neuron; an indented row's name is prefixed with its
block's title, e.g. "batchnorm: batch norm 256x56x56x256 gradient (dx), fused ReLU") contains
one of the comma-separated substrings (case-insensitive); the new rows alone:
``--only 'arithmetic,neuron,fused ReLU'``.

Every tensor is bfloat16 NHWC (channels-last); the larger side of every op is at least 256 MB
(batch 256; ``--quick``: batch 32, 3 samples).
mpsnn runs as an application would: ``kernel.encode(cb, ...)`` into explicit destination
images, one command buffer per timed sample (committed after the end event); the gradient
kernels get the forward encode's gradient state. Bytes counted: every input read once plus
the result written once (the max-pool gradient reads the incoming gradient and the forward
source; the others only the incoming gradient, softmax's also the forward result). "copy" is
``dst.copy_(src)`` of 1 GB (read + write). Times: CUDA events around ``INNER`` back-to-back
launches, median of 9 samples after warm-up, recorded behind a spinning kernel that outlasts
the host's enqueueing, so that the events measure the device's work and not the host's cost
per encode; that cost is the "host ms" column (Python time per call, mpsnn's encode and
torch's eager call), the subject of CUDA-graph capture. Every mpsnn result is compared with torch's
(rel err; bilinear upsampling runs with ``align_corners`` YES, the sampling both libraries
define alike). The torch peers are the
eager calls an NHWC PyTorch program makes: ``max_pool2d`` / ``avg_pool2d`` / ``softmax`` /
``interpolate`` on channels-last tensors and their backward functions (the max-pool backward
given the forward's indices).

Batch normalization counts one tensor read or write per pass (statistics: x; statistics
gradient: dy, x; gradient: dy, x, dx); its torch peers are the kernels of torch's own training
batch norm for the same passes (``batch_norm_stats``, ``batch_norm_backward_reduce``,
``batch_norm_backward_elemt``), eval ``batch_norm`` + ``relu_`` for inference, and the whole
training forward + backward for a layer's step. The fused-ReLU rows are the gradient kernels
made with the ReLU as ``fused_neuron_descriptor`` (what the graph runs for batch norm ->
ReLU: ``G = dy·(z >= 0)`` at the pre-activation ``z``, inside the same passes), counted like
the plain rows (statistics gradient: dy, x; gradient: dy, x, dx; step: 8 tensor passes); torch
runs the ReLU's backward as a pass of its own, ``threshold_backward(dy, y)``, charged to the
statistics-gradient row's peer (its data-gradient peer then reads that ``G``), and its step is
training ``batch_norm`` + ``relu`` forward and backward.

The residual addition (``MPSCNNAdd``, 2 operands of one shape): inference is one pass (a, b
read, y written: 6 bytes per element); the training form (with a gradient state) also writes
the state's clamp mask, one byte per element (7); the graph's fused addition -> ReLU is the
same training encode with the kernel's ``_fused_relu`` set, as the graph sets it (the Triton
``forward_with_mask`` with ``relu``; 7). Their gradient, ``MPSCNNAddGradient`` (one filter: the
graph's gradient pair shares one image), reads dy and the mask and writes dx (Triton
``masked_copy``; 5 bytes per element), into a new image as in a graph (an explicit, already
allocated destination would add a copy). Torch peers: ``a + b``, ``torch.relu(a + b)``
(it writes no mask; the bytes are mpsnn's) and ``torch.where(mask, dy, 0)``. The ReLU neuron
(``MPSCNNNeuronReLU``, ``MPSCNNNeuronGradient``) reads x and writes y (2 tensors), its
gradient reads dy and x and writes dx (3); peers ``torch.relu`` and ``threshold_backward(dy,
x, 0)``.

Targets: every mpsnn op >= 80 % of the copy bandwidth (issue 4; batch normalization >= 75 %,
issue 5) and never slower than torch.
The results are printed and, when ``$OUT`` is set, written to ``$OUT/bench_memory_bound.txt``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import mpsnn as m
from mpsnn.backends.arithmetic import FLT_MAX

DT = torch.bfloat16
FMT = m.MPSImageFeatureChannelFormat.bfloat16
INNER = 5


#: clock cycles per millisecond of ``torch.cuda._sleep`` (measured once)
_SPIN: list[float] = []


def _spin(ms_: float) -> None:
    """Keep the GPU busy for about ``ms_`` milliseconds (one spinning kernel)."""
    if not _SPIN:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(10_000_000)
        b.record()
        torch.cuda.synchronize()
        _SPIN.append(10_000_000 / a.elapsed_time(b))
    torch.cuda._sleep(int(ms_ * _SPIN[0]))


def ms(fn: Callable[[Any], object], reps: int, queue: m.MTLCommandQueue | None = None) -> tuple[float, float]:
    """(device ms, host ms) per launch of ``fn(cb)`` (``cb`` a fresh command buffer per sample
    with a queue), medians of ``reps`` samples. The device time is taken between CUDA events
    behind a spinning kernel that outlasts the host's enqueueing, so the launches run back to
    back and the host's cost per encode (the second number) does not leak into it."""
    samples, host, cbs = [], [], []
    spin = 1.0
    for r in range(reps + 2):
        cb = queue.make_command_buffer() if queue is not None else None
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _spin(spin)
        a.record()
        t0 = time.perf_counter()
        for _ in range(INNER):
            fn(cb)
        t1 = time.perf_counter()
        b.record()
        if cb is not None:
            cb.commit()
            cbs.append(cb)
        torch.cuda.synchronize()
        spin = max(spin, 2e3 * (t1 - t0) + 0.5)      # outlast the enqueueing next time
        if r >= 2:
            samples.append(a.elapsed_time(b) / INNER)
            host.append(1e3 * (t1 - t0) / INNER)
    for cb in cbs:
        cb.wait_until_completed()
    return statistics.median(samples), statistics.median(host)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp(min=1e-30)).item()


def image(dev: m.Device, t: torch.Tensor | None, shape: tuple[int, ...] | None = None) -> m.MPSImage:
    if t is not None:
        return m.MPSImage.from_torch(t)
    assert shape is not None
    n, h, w, c = shape
    return m.MPSImage(dev, image_descriptor=m.MPSImageDescriptor(channel_format=FMT, width=w, height=h, feature_channels=c, number_of_images=n))


class Bench:
    def __init__(self, reps: int, out: Callable[[str], None], only: tuple[str, ...] = ()) -> None:
        self.reps, self.out = reps, out
        self.only = tuple(o.lower() for o in only)
        self.dev = m.Device("cuda")
        self.queue = self.dev.make_command_queue()
        self.copy_bw = self.copy_bandwidth()
        self.worst_bw = 1e9
        self.worst_speedup = 1e9
        self.rows = 0
        self._group = self._title = ""

    def group(self, group: str, title: str, names: list[str]) -> bool:
        """Start a block of rows of ``group`` (``title`` names its indented rows): whether
        ``--only`` selects any of its rows ``names``, so that the caller can skip its set-up."""
        self._group, self._title = group, title
        return any(self.selected(nm) for nm in names)

    def full_name(self, name: str) -> str:
        """``"group: name"``, an indented row's name prefixed with its block's title."""
        return f"{self._group}: {self._title + ' ' if name.startswith(' ') else ''}{name.strip()}"

    def selected(self, name: str) -> bool:
        full = self.full_name(name).lower()
        return not self.only or any(o in full for o in self.only)

    def copy_bandwidth(self) -> float:
        src = torch.empty(1 << 29, dtype=DT, device="cuda")
        dst = torch.empty_like(src)
        return 2 * src.numel() * 2 / ms(lambda _cb: dst.copy_(src), self.reps)[0] / 1e6

    def run(self, cb_fn: Callable[[Any], object]) -> None:
        cb = self.queue.make_command_buffer()
        cb_fn(cb)
        cb.commit()
        cb.wait_until_completed()

    def row(self, name: str, nbytes: int, mine: Callable[[Any], object], peer: Callable[[Any], object],
            got: torch.Tensor | Callable[[], torch.Tensor], ref: torch.Tensor) -> None:
        """Time ``mine`` (mpsnn, given a command buffer) and ``peer`` (torch), run ``mine`` once
        more and compare ``got`` (the result, or a function returning it after that run) with
        ``ref``; nothing when ``--only`` does not select the row."""
        if not self.selected(name):
            return
        (t_m, h_m), (t_p, h_p) = ms(mine, self.reps, self.queue), ms(peer, self.reps)
        self.run(mine)
        err = rel(got() if callable(got) else got, ref)
        self.rows += 1
        bw_m, bw_p = nbytes / t_m / 1e6, nbytes / t_p / 1e6
        self.worst_bw = min(self.worst_bw, bw_m / self.copy_bw)
        self.worst_speedup = min(self.worst_speedup, t_p / t_m)
        self.out(f"{name:<36}{nbytes / 1e6:>7.0f} | {t_m:>9.3f}{bw_m:>7.0f}{100 * bw_m / self.copy_bw:>6.1f}% | {t_p:>9.3f}{bw_p:>7.0f}"
                 f"{100 * bw_p / self.copy_bw:>6.1f}% | {t_p / t_m:>7.2f}x{err:>9.1e} | {h_m:>7.3f}{h_p:>7.3f}")


def bench_pooling(b: Bench, x: torch.Tensor, k: int, s: int, p: int, g: torch.Generator) -> None:
    """k x k / s pooling with torch's zero padding p (window centre of output 0 at k//2 - p)."""
    names = {kind: (f"{kind} pool {k}x{k}/{s} forward", f"{kind} pool {k}x{k}/{s} gradient") for kind in ("max", "avg")}
    if not b.group("pooling", "", [nm for pair in names.values() for nm in pair]):
        return
    n, h, _, c = x.shape
    o = (h + 2 * p - k) // s + 1
    xn = x.permute(0, 3, 1, 2)
    dy = torch.randn(n, o, o, c, device="cuda", dtype=DT, generator=g)
    dyn = dy.permute(0, 3, 1, 2)
    x_img, dy_img = image(b.dev, x), image(b.dev, dy)
    y_img, dx_img = image(b.dev, None, (n, o, o, c)), image(b.dev, None, tuple(x.shape))
    geo: dict[str, Any] = dict(kernel_width=k, kernel_height=k, stride_in_pixels_x=s, stride_in_pixels_y=s)
    for kind in ("max", "avg"):
        if not any(b.selected(nm) for nm in names[kind]):
            continue
        fwd = (m.MPSCNNPoolingMax if kind == "max" else m.MPSCNNPoolingAverage)(b.dev, **geo)
        grad = (m.MPSCNNPoolingMaxGradient if kind == "max" else m.MPSCNNPoolingAverageGradient)(b.dev, **geo)
        fwd.offset = m.MPSOffset(k // 2 - p, k // 2 - p, 0)
        if kind == "max":
            # torch pads max pooling with -inf: MPS's clamp edge mode (zero mode lets an
            # off-image 0 win); average pooling's zero mode counts the padding like torch
            fwd.edge_mode = grad.secondary_edge_mode = m.MPSImageEdgeMode.clamp
        state = fwd.result_state(x_img, destination_image=y_img)
        b.run(lambda cb: fwd.encode(cb, x_img, y_img, destination_state=state))  # noqa: B023
        if kind == "max":
            yr, idx = F.max_pool2d(xn, k, s, p, return_indices=True)

            def peer_f(_cb: Any) -> object:
                return F.max_pool2d(xn, k, s, p)

            def peer_b(_cb: Any) -> torch.Tensor:
                return torch.ops.aten.max_pool2d_with_indices_backward(dyn, xn, [k, k], [s, s], [p, p], [1, 1], False, idx)  # noqa: B023
            grad_bytes = (dy.numel() + 2 * x.numel()) * 2
        else:
            yr = F.avg_pool2d(xn, k, s, p, count_include_pad=True)

            def peer_f(_cb: Any) -> object:
                return F.avg_pool2d(xn, k, s, p, count_include_pad=True)

            def peer_b(_cb: Any) -> torch.Tensor:
                return torch.ops.aten.avg_pool2d_backward(dyn, xn, [k, k], [s, s], [p, p], False, True, None)
            grad_bytes = (dy.numel() + x.numel()) * 2
            # the reference: torch's NCHW-contiguous kernel (its channels-last backward returns
            # wrong values for padded 3x3/2 windows in torch 2.11 + CUDA 13, see bench/RESULTS.md)
            ref_b = torch.ops.aten.avg_pool2d_backward(dyn.contiguous(), xn.contiguous(), [k, k], [s, s], [p, p], False, True, None)
        b.row(names[kind][0], (x.numel() + dy.numel()) * 2, lambda cb: fwd.encode(cb, x_img, y_img),  # noqa: B023
              peer_f, y_img.tensor, yr.permute(0, 2, 3, 1))
        b.row(names[kind][1], grad_bytes, lambda cb: grad.encode(cb, dy_img, x_img, state, dx_img),  # noqa: B023
              peer_b, dx_img.tensor, (peer_b(None) if kind == "max" else ref_b).permute(0, 2, 3, 1))


def bench_softmax(b: Bench, shape: tuple[int, int, int, int], g: torch.Generator) -> None:
    title = f"softmax {'x'.join(map(str, shape))}"
    if not b.group("softmax", title, [title, "  gradient"]):
        return
    x = torch.randn(*shape, device="cuda", dtype=DT, generator=g)
    dy = torch.randn(*shape, device="cuda", dtype=DT, generator=g)
    x_img, dy_img = image(b.dev, x), image(b.dev, dy)
    y_img, dx_img = image(b.dev, None, shape), image(b.dev, None, shape)
    fwd, grad = m.MPSCNNSoftMax(b.dev), m.MPSCNNSoftMaxGradient(b.dev)
    state = fwd.result_state(x_img, destination_image=y_img)
    b.run(lambda cb: fwd.encode(cb, x_img, y_img, destination_state=state))
    yr = torch.softmax(x, -1)

    def peer_b(_cb: Any) -> torch.Tensor:
        return torch.ops.aten._softmax_backward_data(dy, yr, -1, DT)
    b.row(title, 2 * x.numel() * 2, lambda cb: fwd.encode(cb, x_img, y_img),
          lambda _cb: torch.softmax(x, -1), y_img.tensor, yr)
    b.row("  gradient", 3 * x.numel() * 2, lambda cb: grad.encode(cb, dy_img, y_img, state, dx_img), peer_b, dx_img.tensor,
          torch.ops.aten._softmax_backward_data(dy, y_img.tensor, -1, DT))


def bench_upsampling(b: Bench, x: torch.Tensor, mode: str, g: torch.Generator) -> None:
    title = f"upsample x2 {mode}{' (aligned)' if mode != 'nearest' else ''}"
    if not b.group("upsampling", title, [title, "  gradient"]):
        return
    n, h, w, c = x.shape
    xn = x.permute(0, 3, 1, 2)
    dy = torch.randn(n, 2 * h, 2 * w, c, device="cuda", dtype=DT, generator=g)
    dyn = dy.permute(0, 3, 1, 2)
    x_img, dy_img = image(b.dev, x), image(b.dev, dy)
    y_img, dx_img = image(b.dev, None, (n, 2 * h, 2 * w, c)), image(b.dev, None, tuple(x.shape))
    fwd: Any
    grad: Any
    if mode == "nearest":
        fwd = m.MPSCNNUpsamplingNearest(b.dev, integer_scale_factor_x=2, integer_scale_factor_y=2)
        grad = m.MPSCNNUpsamplingNearestGradient(b.dev, integer_scale_factor_x=2, integer_scale_factor_y=2)
        kw: dict[str, Any] = {}
    else:
        fwd = m.MPSCNNUpsamplingBilinear(b.dev, integer_scale_factor_x=2, integer_scale_factor_y=2, align_corners=True)
        grad = m.MPSCNNUpsamplingBilinearGradient(b.dev, integer_scale_factor_x=2, integer_scale_factor_y=2)
        kw = {"align_corners": True}
    state = fwd.result_state(x_img, destination_image=y_img)
    b.run(lambda cb: fwd.encode(cb, x_img, y_img, destination_state=state))
    yr = F.interpolate(xn, scale_factor=2, mode=mode, **kw)

    def peer_b(_cb: Any) -> torch.Tensor:
        if mode == "nearest":
            return torch.ops.aten.upsample_nearest2d_backward(dyn, [2 * h, 2 * w], [n, c, h, w], 2.0, 2.0)
        return torch.ops.aten.upsample_bilinear2d_backward(dyn, [2 * h, 2 * w], [n, c, h, w], True, None, None)
    b.row(title, (x.numel() + dy.numel()) * 2,
          lambda cb: fwd.encode(cb, x_img, y_img), lambda _cb: F.interpolate(xn, scale_factor=2, mode=mode, **kw),
          y_img.tensor, yr.permute(0, 2, 3, 1))
    b.row("  gradient", (x.numel() + dy.numel()) * 2, lambda cb: grad.encode(cb, dy_img, x_img, state, dx_img), peer_b,
          dx_img.tensor, peer_b(None).permute(0, 2, 3, 1))


def bn_state(bn: m.MPSCNNBatchNormalization, x_img: m.MPSImage) -> m.MPSCNNBatchNormalizationState:
    """A fresh (non-temporary) state of ``bn`` for the batch ``x_img``."""
    st = bn.result_state(x_img)
    assert isinstance(st, m.MPSCNNBatchNormalizationState)
    return st


def bench_batch_norm(b: Bench, shape: tuple[int, int, int, int], g: torch.Generator) -> None:
    """Batch normalization: inference + ReLU, statistics, statistics gradient, gradient, and a
    whole training step of one layer (statistics, normalize + ReLU... as MPS encodes it: the
    ReLU is a separate kernel in training, so the step is statistics + normalize + statistics
    gradient + gradient) against torch's kernels for the same passes. The statistics gradient,
    the gradient and the step also as the graph runs batch norm -> ReLU in training, next to
    the plain rows: the gradient kernels made with the ReLU as their fused neuron apply its
    derivative to dy inside their passes (the Triton engine's ``RELU`` forms of
    ``gradient_totals`` / ``gradient_data``), the normalization applies the ReLU."""
    n, h, w, c = shape
    label = "x".join(map(str, shape))
    title = f"batch norm {label}"
    names = [f"{title} inference + ReLU", "  statistics", "  statistics gradient (dgamma, dbeta)", "  statistics gradient, fused ReLU",
             "  gradient (dx)", "  gradient (dx), fused ReLU", "  training step (4 passes)", "  training step, fused ReLU"]
    n_inf, n_stats, n_sg, n_sg_relu, n_dx, n_dx_relu, n_step, n_step_relu = names
    if not b.group("batchnorm", title, names):
        return
    x = torch.randn(*shape, device="cuda", dtype=DT, generator=g) * 2 + 0.5
    dy = torch.randn(*shape, device="cuda", dtype=DT, generator=g)
    xn, dyn = x.permute(0, 3, 1, 2), dy.permute(0, 3, 1, 2)
    gamma = torch.rand(c, device="cuda", generator=g) + 0.5
    beta = torch.randn(c, device="cuda", generator=g)
    mean = torch.randn(c, device="cuda", generator=g) * 0.1 + 0.5
    var = torch.rand(c, device="cuda", generator=g) + 3.5
    eps = 1e-5
    source = m.BatchNormalizationDataSource(gamma, beta, mean, var, epsilon=eps)
    relu = m.MPSNNNeuronDescriptor.cnn_neuron_descriptor(m.MPSCNNNeuronType.reLU)
    bn_relu = m.MPSCNNBatchNormalization(b.dev, data_source=source, fused_neuron_descriptor=relu)
    bn = m.MPSCNNBatchNormalization(b.dev, data_source=source)
    stats = m.MPSCNNBatchNormalizationStatistics(b.dev)
    stats_grad = m.MPSCNNBatchNormalizationStatisticsGradient(b.dev)
    grad = m.MPSCNNBatchNormalizationGradient(b.dev)
    # the gradient kernels of batch norm -> ReLU as the graph fuses them (its ReLU descriptor)
    stats_grad_relu = m.MPSCNNBatchNormalizationStatisticsGradient(b.dev, fused_neuron_descriptor=relu)
    grad_relu = m.MPSCNNBatchNormalizationGradient(b.dev, fused_neuron_descriptor=relu)
    x_img, dy_img = image(b.dev, x), image(b.dev, dy)
    y_img, dx_img = image(b.dev, None, shape), image(b.dev, None, shape)
    nbytes = x.numel() * 2

    # inference + ReLU: one pass (read x, write y) against torch's eval batch_norm + relu_
    def peer_inference(_cb: Any) -> torch.Tensor:
        return F.batch_norm(xn, mean, var, gamma, beta, False, 0.0, eps).relu_()
    b.row(n_inf, 2 * nbytes, lambda cb: bn_relu.encode(cb, x_img, y_img), peer_inference,
          y_img.tensor, peer_inference(None).permute(0, 2, 3, 1))

    # a state with this batch's statistics and gradient sums for the gradient rows
    st = bn_state(bn, x_img)
    b.run(lambda cb: stats.encode_batch(cb, [x_img], st))

    # statistics: one read of x into a fresh state (as every training step makes one), against
    # torch.batch_norm_stats (the statistics pass of its training batch norm)
    b.row(n_stats, nbytes, lambda cb: stats.encode_batch(cb, [x_img], bn_state(bn, x_img)),
          lambda _cb: torch.batch_norm_stats(xn, eps), st.mean, x.float().mean(dim=(0, 1, 2)))
    b.run(lambda cb: stats_grad.encode_batch(cb, [dy_img], [x_img], st))
    bmean, bvar = st.mean, st.variance
    invstd = torch.rsqrt(bvar + eps)
    sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(dyn, xn, bmean, invstd, gamma, True, False, False)
    count = torch.full((1,), n * h * w, dtype=torch.int32, device="cuda")

    b.run(lambda cb: grad.encode(cb, dy_img, x_img, st, dx_img))  # fills st.gradient_for_beta

    # the same with the fused ReLU: a state of this batch through the fused statistics gradient
    # and gradient (their dgamma, dbeta), and torch's side: G = dy·(z >= 0) at the
    # pre-activation z = (x - mean)·invstd·gamma + beta (the reference), the forward result
    # relu(z) that torch's ReLU saves for its backward, and the sums of G
    st_r = bn_state(bn_relu, x_img)
    b.run(lambda cb: stats.encode_batch(cb, [x_img], st_r))
    b.run(lambda cb: stats_grad_relu.encode_batch(cb, [dy_img], [x_img], st_r))
    b.run(lambda cb: grad_relu.encode(cb, dy_img, x_img, st_r, dx_img))  # fills st_r.gradient_for_gamma / _beta
    z = (x.float() - bmean) * invstd * gamma + beta
    g_relu = torch.where(z >= 0, dy, torch.zeros((), dtype=DT, device="cuda"))
    y_relun = torch.relu(z).to(DT).permute(0, 3, 1, 2)
    del z
    g_relun = g_relu.permute(0, 3, 1, 2)
    sum_g, sum_g_xmu, _, _ = torch.batch_norm_backward_reduce(g_relun, xn, bmean, invstd, gamma, True, False, False)

    # statistics gradient: read dy and x once (sums), against torch.batch_norm_backward_reduce
    # (a second state accumulates across the timed calls; the check uses the first one's sums)
    st_sg = bn_state(bn, x_img)
    b.run(lambda cb: stats.encode_batch(cb, [x_img], st_sg))
    b.row(n_sg, 2 * nbytes, lambda cb: stats_grad.encode_batch(cb, [dy_img], [x_img], st_sg),
          lambda _cb: torch.batch_norm_backward_reduce(dyn, xn, bmean, invstd, gamma, True, True, True),
          st.gradient_for_beta, sum_dy)

    # with the fused ReLU: the same two reads, dy·(z >= 0) summed in the pass, against torch's
    # ReLU backward (threshold_backward of the forward result: read dy, y, write G) and
    # batch_norm_backward_reduce of G; checked: dgamma and dbeta (the first call's)
    st_sg_r = bn_state(bn_relu, x_img)
    b.run(lambda cb: stats.encode_batch(cb, [x_img], st_sg_r))

    def peer_sg_relu(_cb: Any) -> object:
        gt = torch.ops.aten.threshold_backward(dyn, y_relun, 0)
        return torch.batch_norm_backward_reduce(gt, xn, bmean, invstd, gamma, True, True, True)
    b.row(n_sg_relu, 2 * nbytes, lambda cb: stats_grad_relu.encode_batch(cb, [dy_img], [x_img], st_sg_r), peer_sg_relu,
          torch.cat([st_r.gradient_for_gamma, st_r.gradient_for_beta]), torch.cat([sum_g_xmu * invstd, sum_g]))

    # gradient: read dy and x, write dx, against torch.batch_norm_backward_elemt
    def peer_elemt(_cb: Any) -> torch.Tensor:
        return torch.batch_norm_backward_elemt(dyn, xn, bmean, invstd, gamma, sum_dy, sum_dy_xmu, count)
    b.row(n_dx, 3 * nbytes, lambda cb: grad.encode(cb, dy_img, x_img, st, dx_img), peer_elemt,
          dx_img.tensor, peer_elemt(None).permute(0, 2, 3, 1))

    # with the fused ReLU: the same reads and write (G recomputed from dy and x in the pass, the
    # fused statistics gradient's sums), against batch_norm_backward_elemt of torch's G (its
    # ReLU backward ran once, in the peer of the statistics gradient above)
    def peer_elemt_relu(_cb: Any) -> torch.Tensor:
        return torch.batch_norm_backward_elemt(g_relun, xn, bmean, invstd, gamma, sum_g, sum_g_xmu, count)
    b.row(n_dx_relu, 3 * nbytes, lambda cb: grad_relu.encode(cb, dy_img, x_img, st_r, dx_img), peer_elemt_relu,
          dx_img.tensor, peer_elemt_relu(None).permute(0, 2, 3, 1))

    # one layer's training step, a fresh state each time: statistics, normalize, statistics
    # gradient, gradient (8 passes of the tensor size) against torch's training batch_norm
    # forward and its backward (the same 8)
    def layer_step(norm: Any, sgrad: Any, dgrad: Any) -> Callable[[Any], None]:
        def step(cb: Any) -> None:
            s = bn_state(norm, x_img)
            stats.encode_batch(cb, [x_img], s)
            norm.encode(cb, x_img, s, y_img)
            sgrad.encode_batch(cb, [dy_img], [x_img], s)
            dgrad.encode(cb, dy_img, x_img, s, dx_img)
        return step
    mine_step = layer_step(bn, stats_grad, grad)

    rm, rv = mean.clone(), var.clone()
    xl, gl, bl = xn.detach().requires_grad_(), gamma.detach().requires_grad_(), beta.detach().requires_grad_()

    def peer_step(_cb: Any) -> torch.Tensor:
        y = F.batch_norm(xl, rm, rv, gl, bl, True, 0.0, eps)
        return torch.autograd.grad(y, (xl, gl, bl), dyn)[0]
    b.row(n_step, 8 * nbytes, mine_step, peer_step, dx_img.tensor, peer_step(None).permute(0, 2, 3, 1))

    # the step of batch norm -> ReLU as the graph fuses it: normalize + ReLU, the fused-ReLU
    # gradients (the same 8 passes), against torch's training batch_norm + relu forward and
    # their backward (the same 8 plus the ReLU's forward and backward passes)
    mine_step_relu = layer_step(bn_relu, stats_grad_relu, grad_relu)

    def peer_step_relu(_cb: Any) -> torch.Tensor:
        y = F.batch_norm(xl, rm, rv, gl, bl, True, 0.0, eps).relu()
        return torch.autograd.grad(y, (xl, gl, bl), dyn)[0]
    b.row(n_step_relu, 8 * nbytes, mine_step_relu, peer_step_relu, dx_img.tensor, peer_step_relu(None).permute(0, 2, 3, 1))


def bench_arithmetic(b: Bench, shape: tuple[int, int, int, int], g: torch.Generator) -> None:
    """The residual addition ``MPSCNNAdd`` of two operands of one shape: inference (one pass),
    the training form (the result and the gradient state's clamp mask, Triton
    ``forward_with_mask``), the graph's fused addition -> ReLU (the same training encode with
    the kernel's ``_fused_relu`` set, as MPSNNGraph sets it for an addition whose result only a
    ReLU and its gradient read: ``forward_with_mask`` with ``relu``, the ReLU's derivative in
    the mask), and their gradient ``MPSCNNAddGradient`` (dy through the state's mask, Triton
    ``masked_copy``; one filter, as the graph's gradient pair shares one image, into a new
    image as the graph's are), against torch eager on the channels-last tensors."""
    title = f"add {'x'.join(map(str, shape))}"
    names = [f"{title} (inference)", "  training (result + mask)", "  gradient (dy * mask)", "  + ReLU (graph fusion)",
             "  + ReLU gradient (dy * mask)"]
    n_inf, n_train, n_grad, n_relu, n_relu_grad = names
    if not b.group("arithmetic", title, names):
        return
    p = torch.randn(*shape, device="cuda", dtype=DT, generator=g)
    q = torch.randn(*shape, device="cuda", dtype=DT, generator=g)
    dy = torch.randn(*shape, device="cuda", dtype=DT, generator=g)
    pn, qn, dyn = p.permute(0, 3, 1, 2), q.permute(0, 3, 1, 2), dy.permute(0, 3, 1, 2)
    p_img, q_img, dy_img = image(b.dev, p), image(b.dev, q), image(b.dev, dy)
    y_img = image(b.dev, None, shape)
    add, add_relu = m.MPSCNNAdd(b.dev), m.MPSCNNAdd(b.dev)
    add_relu._fused_relu = True      # MPSNNGraph sets this around a fused addition's encode; here for good
    grad = m.MPSCNNAddGradient(b.dev, is_secondary_source_filter=False)
    st = add.result_state(p_img, q_img, destination_image=y_img)
    st_r = add_relu.result_state(p_img, q_img, destination_image=y_img)
    b.run(lambda cb: add.encode(cb, p_img, q_img, y_img, destination_state=st))
    b.run(lambda cb: add_relu.encode(cb, p_img, q_img, y_img, destination_state=st_r))
    numel = p.numel()
    zero = torch.zeros((), dtype=DT, device="cuda")
    # the references' masks: the clamp mask (min < r < max with r in float32: all True here)
    # and the ReLU's derivative at the stored (rounded) sum, 1 at >= 0
    r = p.float() + q.float()
    mask = (r > -FLT_MAX) & (r < FLT_MAX)
    del r
    mask_r = mask & (torch.add(p, q) >= 0)
    mask_n, mask_rn = mask.permute(0, 3, 1, 2), mask_r.permute(0, 3, 1, 2)
    res: dict[str, Any] = {}

    def mine_grad(state: Any) -> Callable[[Any], None]:
        def run(cb: Any) -> None:
            res["dx"] = grad.encode(cb, dy_img, p_img, state)
        return run

    # inference: one pass (read a, b, write y) against torch.add
    b.row(n_inf, 3 * numel * 2, lambda cb: add.encode(cb, p_img, q_img, y_img), lambda _cb: torch.add(pn, qn),
          y_img.tensor, torch.add(p, q))
    # training: also the state's clamp mask (1 byte per element); torch's add saves nothing
    b.row(n_train, 7 * numel, lambda cb: add.encode(cb, p_img, q_img, y_img, destination_state=st),
          lambda _cb: torch.add(pn, qn), y_img.tensor, torch.add(p, q))
    # its gradient: read dy and the mask, write dx
    b.row(n_grad, 5 * numel, mine_grad(st), lambda _cb: torch.where(mask_n, dyn, zero), lambda: res["dx"].tensor,
          torch.where(mask, dy, zero))
    # the graph's fused addition -> ReLU: the same traffic as the training form, against
    # torch.relu(a + b) (two passes and no mask)
    b.row(n_relu, 7 * numel, lambda cb: add_relu.encode(cb, p_img, q_img, y_img, destination_state=st_r),
          lambda _cb: torch.relu(pn + qn), y_img.tensor, torch.relu(p + q))
    # its gradient (the ReLU gradient and the addition's in one): dy through the fused mask
    b.row(n_relu_grad, 5 * numel, mine_grad(st_r), lambda _cb: torch.where(mask_rn, dyn, zero), lambda: res["dx"].tensor,
          torch.where(mask_r, dy, zero))


def bench_neuron(b: Bench, shape: tuple[int, int, int, int], g: torch.Generator) -> None:
    """The ReLU neuron (``MPSCNNNeuronReLU``, slope 0) and its gradient
    (``MPSCNNNeuronGradient`` with the same descriptor: dy·(x >= 0)), as a graph runs a ReLU it
    does not fuse, against ``torch.relu`` and ``threshold_backward(dy, x, 0)``."""
    title = f"ReLU {'x'.join(map(str, shape))}"
    names = [title, "  gradient"]
    if not b.group("neuron", title, names):
        return
    x = torch.randn(*shape, device="cuda", dtype=DT, generator=g)
    dy = torch.randn(*shape, device="cuda", dtype=DT, generator=g)
    xn, dyn = x.permute(0, 3, 1, 2), dy.permute(0, 3, 1, 2)
    x_img, dy_img = image(b.dev, x), image(b.dev, dy)
    y_img, dx_img = image(b.dev, None, shape), image(b.dev, None, shape)
    desc = m.MPSNNNeuronDescriptor.cnn_neuron_descriptor(m.MPSCNNNeuronType.reLU)
    fwd = m.MPSCNNNeuronReLU(b.dev, neuron_descriptor=desc)
    grad = m.MPSCNNNeuronGradient(b.dev, neuron_descriptor=desc)
    state = fwd.result_state(x_img, destination_image=y_img)
    b.run(lambda cb: fwd.encode(cb, x_img, y_img, destination_state=state))
    zero = torch.zeros((), dtype=DT, device="cuda")
    b.row(title, 2 * x.numel() * 2, lambda cb: fwd.encode(cb, x_img, y_img), lambda _cb: torch.relu(xn), y_img.tensor, torch.relu(x))
    b.row("  gradient", 3 * x.numel() * 2, lambda cb: grad.encode(cb, dy_img, x_img, state, dx_img),
          lambda _cb: torch.ops.aten.threshold_backward(dyn, xn, 0), dx_img.tensor, torch.where(x >= 0, dy, zero))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 32, 3 samples")
    ap.add_argument("--only", metavar="SUBSTRING[,SUBSTRING...]",
                    help="only the rows whose full name ('group: name', groups pooling, softmax, upsampling, batchnorm, "
                         "arithmetic, neuron; indented rows prefixed with their block's title) contains one of these "
                         "(case-insensitive), e.g. 'arithmetic,neuron,fused ReLU'")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_memory_bound: needs a CUDA device", file=sys.stderr)
        return 2
    reps, n = (3, 32) if a.quick else (9, 256)
    only = tuple(o.strip() for o in a.only.split(",") if o.strip()) if a.only else ()
    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    b = Bench(reps, out, only)
    out(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  batch {n}  bfloat16 NHWC")
    if only:
        out(f"only rows matching: {', '.join(repr(o) for o in only)}")
    out(f"copy bandwidth (1 GB, read + write): {b.copy_bw:.0f} GB/s")
    head = f"{'op':<36}{'MB':>7} | {'mpsnn ms':>9}{'GB/s':>7}{'%copy':>7} | {'torch ms':>9}{'GB/s':>7}{'%copy':>7} | {'speed-up':>8}{'rel err':>9} | {'host ms':>7}{'torch':>7}"
    out(head)
    out("-" * len(head))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, 112, 112, 64, device="cuda", dtype=DT, generator=g)
    for k, s, p in ((3, 2, 1), (2, 2, 0)):
        bench_pooling(b, x, k, s, p, g)
    del x
    torch.cuda.empty_cache()
    for shape in ((n, 32, 32, 512), (n * 1024, 1, 1, 1000)):
        bench_softmax(b, shape, g)
        torch.cuda.empty_cache()
    x = torch.randn(n, 56, 56, 64, device="cuda", dtype=DT, generator=g)
    for mode in ("nearest", "bilinear"):
        bench_upsampling(b, x, mode, g)
        torch.cuda.empty_cache()
    del x
    for bench in (bench_batch_norm, bench_arithmetic, bench_neuron):
        bench(b, (n, 56, 56, 256), g)
        torch.cuda.empty_cache()
    out("-" * len(head))
    if b.rows:
        out(f"slowest mpsnn op: {100 * b.worst_bw:.1f} % of copy bandwidth (target >= 80 %); smallest speed-up over torch "
            f"{b.worst_speedup:.2f}x (target >= 1)")
    else:
        out(f"no row matches --only {a.only!r}")
    dest = os.environ.get("OUT")
    if dest:
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, "bench_memory_bound.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
