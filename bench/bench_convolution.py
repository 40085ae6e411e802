"""ResNet-50 convolutions on CUDA: mpsnn (public API) against torch's cuDNN convolution.

Run from the repository root on a CUDA machine::

    PYTHONPATH=. python3 bench/bench_convolution.py [--batch 256] [--quick] [--reps N]
    PYTHONPATH=. python3 bench/bench_convolution.py --list-shapes    # no CUDA needed

Shapes: every convolution of ResNet-50 v1.5 (torchvision's definition: the stride of a
downsampling bottleneck sits in its 3x3 convolution) at 224 x 224, with its multiplicity;
identical shapes are measured once and weighted by their count in the totals. Where
torchvision is installed the list is cross-checked against ``torchvision.models.resnet50()``
(on the meta device, through forward hooks).

For each unique shape, on one NHWC bfloat16 input of ``--batch`` images (default 256):

* forward: ``MPSCNNConvolution.encode(cb, x, y)`` into an explicit destination, and the
  auto-sized form ``encode(cb, x)`` (default padding), against
  ``F.conv2d(x.permute(0, 3, 1, 2), w_channels_last, None, stride, k // 2)``;
* gradient: ``MPSCNNConvolutionGradient.encode(cb, dy, x, state, dx)`` (data and weight
  gradients; its default ``gradient_option`` ``all`` also writes the bias gradient, which
  ResNet does not need) against ``aten.convolution_backward(..., output_mask=[True, True,
  False])``, all tensors channels-last.

The mpsnn kernels use the PyTorch-equivalence recipe of spec/convolution.md §1: weights
``W[o][q][p][c] = torch_weight[o][c][q][p]`` (OHWI), zero edge mode,
``offset = (k >> 1) - padding`` (0 for ResNet's ``padding = k // 2``).

Timing: CUDA events around ``inner`` back-to-back launches (mpsnn: one command buffer per
sample, committed after the end event); 2 warm-up samples, then the median of ``--reps``
samples (10; 3 with ``--quick``), reported per launch. ``inner`` is sized from the shape's
FLOPs so that a sample lasts a few milliseconds. The host time spent encoding one mpsnn
forward is reported too: when it approaches the device time, the API overhead, not the
kernel, sets the pace.

Correctness, in the same run and on the same tensors: mpsnn's forward output (both forms),
data gradient and ``state.gradient_for_weights`` (float32 OHWI) against torch's results
(and ``state.gradient_for_biases`` against the per-channel sum of ``dy``),
``||a - b|| / ||b|| <= 2e-2``; destinations are poisoned with NaN first, so an unwritten
element fails. The explicit-destination forward and the data gradient are checked again
after timing. Exit status: 0 on success, 1 on a mismatch or an error (every shape is tried;
errors are reported with the shape and re-raised at the end), 2 without CUDA.

Network order (after the table; ``--no-network`` skips it): all 53 convolutions in the order
a training step runs them -- the forward pass conv1 ... layer4, then the gradient pass in
reverse -- timed as one sequence per sample (mpsnn: one command buffer), against the same
sequence of torch calls; then both passes as one sequence (a training step's convolutions). This is how the kernels are used: the host encodes ahead of the GPU,
so the per-encode host time is hidden wherever the sequence's GPU time exceeds it. The
per-shape rows, by contrast, repeat one small convolution back to back and show the host
cost of an encode wherever it exceeds the GPU time of that one convolution.

The table is printed and, when ``$OUT`` is set, written to ``$OUT/bench_convolution.txt``.
Totals weight each shape by its multiplicity: ratio = sum(count * mpsnn ms) /
sum(count * torch ms) (target <= 1.05).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import mpsnn as m

DTYPE = torch.bfloat16
TOL = 2e-2            # ||a - b|| / ||b|| for bfloat16 results
TARGET = 1.05         # mpsnn time / torch time, network total
WARMUP = 2            # warm-up samples per measurement
SAMPLE_MS = 3.0       # aim for samples of about this many milliseconds ...
MAX_INNER = 25        # ... with at most this many launches each
EST_TFLOPS = 400.0    # rough bf16 convolution rate used only to size `inner`
# the default padding of MPSCNNKernel (spec kernel-base.md §6): alignCentered | addRemainderToTopLeft | sizeSame
DEFAULT_PADDING = int(m.MPSNNPaddingMethod.alignCentered | m.MPSNNPaddingMethod.addRemainderToTopLeft | m.MPSNNPaddingMethod.sizeSame)


# --------------------------------------------------------------------------------------------
# ResNet-50 v1.5 convolution shapes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class ConvShape:
    """One convolution: square kernel ``k``, stride ``stride``, padding ``k // 2``, no bias,
    input ``size x size x cin``, output ``out x out x cout``."""

    cin: int
    cout: int
    k: int
    stride: int
    size: int

    @property
    def pad(self) -> int:
        return self.k // 2

    @property
    def out(self) -> int:
        return (self.size + 2 * self.pad - self.k) // self.stride + 1

    @property
    def macs(self) -> int:
        """Multiply-accumulates per image (forward)."""
        return self.out * self.out * self.cout * self.cin * self.k * self.k

    def label(self) -> str:
        return f"{self.k}x{self.k}/{self.stride} {self.cin:>4}->{self.cout:<4} @{self.size:<3}"


def resnet50_convs() -> list[tuple[str, ConvShape]]:
    """Every convolution of torchvision's ``resnet50()`` at 224 x 224, in execution order,
    named as torchvision names the modules."""
    convs = [("conv1", ConvShape(3, 64, 7, 2, 224))]
    size, cin = 56, 64  # 112 after the stem, 56 after the 3x3/2 max-pool
    for stage, (blocks, width, stride) in enumerate([(3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)], start=1):
        cout = 4 * width
        for b in range(blocks):
            s = stride if b == 0 else 1
            name = f"layer{stage}.{b}"
            mid = ConvShape(width, width, 3, s, size)       # v1.5: the stride is in the 3x3
            convs.append((f"{name}.conv1", ConvShape(cin, width, 1, 1, size)))
            convs.append((f"{name}.conv2", mid))
            convs.append((f"{name}.conv3", ConvShape(width, cout, 1, 1, mid.out)))
            if b == 0:  # projection shortcut: 1x1, stride s (1 in stage 1)
                convs.append((f"{name}.downsample.0", ConvShape(cin, cout, 1, s, size)))
            cin, size = cout, mid.out
    return convs


def unique_shapes(convs: list[tuple[str, ConvShape]]) -> list[tuple[ConvShape, int, list[str]]]:
    """(shape, count, layer names), in order of first appearance."""
    seen: dict[ConvShape, list[str]] = {}
    for name, shape in convs:
        seen.setdefault(shape, []).append(name)
    return [(shape, len(names), names) for shape, names in seen.items()]


def torchvision_check(convs: list[tuple[str, ConvShape]]) -> str:
    """Compare the hand-written list with torchvision's ``resnet50()`` (meta device, forward
    hooks). Returns a one-line verdict; raises SystemExit when the lists differ."""
    try:
        import torchvision
    except ImportError:
        return "torchvision not installed: shape list not cross-checked"
    try:
        with torch.device("meta"):
            model = torchvision.models.resnet50().eval()
        seen: list[tuple[str, Any]] = []
        names = {mod: name for name, mod in model.named_modules()}

        def hook(mod: torch.nn.Conv2d, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inputs[0]
            kh, kw = mod.kernel_size
            square = kh == kw and mod.stride[0] == mod.stride[1] and x.shape[-1] == x.shape[-2]
            plain = mod.padding == (kh // 2, kw // 2) and mod.dilation == (1, 1) and mod.groups == 1 and mod.bias is None
            shape = ConvShape(mod.in_channels, mod.out_channels, kh, mod.stride[0], x.shape[-1])
            seen.append((names[mod], shape if square and plain else (shape, mod.padding, mod.dilation, mod.groups, mod.bias is None)))

        for mod in model.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.register_forward_hook(hook)
        with torch.no_grad():
            model(torch.empty(1, 3, 224, 224, device="meta"))
    except Exception as exc:  # the cross-check is a convenience: report, do not fail
        return f"torchvision {torchvision.__version__}: cross-check could not run ({type(exc).__name__}: {exc})"
    if Counter(s for _, s in seen) != Counter(s for _, s in convs) or {n for n, _ in seen} != {n for n, _ in convs}:
        ours, theirs = dict(convs), dict(seen)
        diff = [f"{n}: ours {ours.get(n)} torchvision {theirs.get(n)}" for n in sorted(set(ours) | set(theirs)) if ours.get(n) != theirs.get(n)]
        sys.exit("bench_convolution: the ResNet-50 shape list differs from torchvision's:\n  " + "\n  ".join(diff))
    return f"torchvision {torchvision.__version__}: all {len(seen)} convolutions of resnet50() match"


def auto_padding(shape: ConvShape) -> tuple[int, int, int, int]:
    """(width, height, offset.x, offset.y) the default padding gives (auto-sized encode)."""
    r = m.padding.apply_padding_method(DEFAULT_PADDING, shape.size, shape.size, shape.k, shape.k, shape.stride, shape.stride)
    return r.width, r.height, r.offset_x, r.offset_y


def list_shapes(out: Callable[[str], None]) -> None:
    convs = resnet50_convs()
    shapes = unique_shapes(convs)
    total = sum(s.macs * c for s, c, _ in shapes)
    out(f"ResNet-50 v1.5 convolutions at 224x224: {len(convs)} convolutions, {len(shapes)} unique shapes")
    header = f"{'#':>2}  {'shape (k/stride Cin->Cout @in)':<30}{'out':>5}{'count':>6}{'MMAC/img':>10}{'x count':>9}{'share':>7}  auto-sized form         layers"
    out(header)
    out("-" * len(header))
    for i, (s, c, names) in enumerate(shapes, 1):
        w, h, ox, oy = auto_padding(s)
        recipe = s.k // 2 - s.pad
        auto = "= torch (size, offset)" if (w, h) == (s.out, s.out) and (ox, oy) == (recipe, recipe) else f"{w}x{h} offset ({ox},{oy})!"
        shown = ", ".join(names) if len(names) <= 2 else f"{names[0]}, ... ({len(names)})"
        out(f"{i:>2}  {s.label():<30}{s.out:>5}{c:>6}{s.macs / 1e6:>10.1f}{s.macs * c / 1e6:>9.1f}{100 * s.macs * c / total:>6.1f}%  "
            f"{auto:<23} {shown}")
    out(f"total: {total / 1e9:.3f} GMAC per image ({2 * total / 1e9:.2f} GFLOP) forward; the gradient (data + weights) is twice that")
    out(torchvision_check(convs))


# --------------------------------------------------------------------------------------------
# timing and checking
# --------------------------------------------------------------------------------------------
@dataclass
class Timing:
    ms: float        # median device milliseconds per launch
    host_us: float   # median host microseconds to issue one launch


def time_launches(launch: Callable[[Any], Any], inner: int, reps: int, queue: m.MTLCommandQueue | None = None) -> Timing:
    """Median per-launch time of ``launch(cb)`` over ``reps`` samples of ``inner`` back-to-back
    launches between two CUDA events, after WARMUP samples. With ``queue``, every sample
    encodes into a fresh command buffer that is committed after the end event; without it
    ``cb`` is None. The host never waits inside a sample."""
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    host: list[float] = []
    cbs = []
    for r in range(WARMUP + reps):
        cb = queue.make_command_buffer() if queue is not None else None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(inner):
            launch(cb)
        t1 = time.perf_counter()
        end.record()
        if cb is not None:
            cb.commit()
            cbs.append(cb)
        if r < WARMUP:
            if r == WARMUP - 1:
                torch.cuda.synchronize()
            continue
        events.append((start, end))
        host.append((t1 - t0) * 1e6 / inner)
    torch.cuda.synchronize()
    for cb in cbs:
        cb.wait_until_completed()
        if getattr(cb, "error", None) is not None:
            raise RuntimeError(f"command buffer finished with an error: {cb.error!r}")
    return Timing(statistics.median(s.elapsed_time(e) / inner for s, e in events), statistics.median(host))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float32 (NaN when got holds a NaN)."""
    got, ref = got.float(), ref.float()
    if got.shape != ref.shape:
        raise RuntimeError(f"result shape {tuple(got.shape)} != reference shape {tuple(ref.shape)}")
    num = torch.linalg.vector_norm(got - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def worst(errors: dict[str, float]) -> float:
    """The largest error, NaN if any is NaN."""
    vals = list(errors.values())
    return math.nan if any(math.isnan(v) for v in vals) else max(vals, default=0.0)


def inner_for(flops: float) -> int:
    est_ms = flops / (EST_TFLOPS * 1e12) * 1e3
    return max(2, min(MAX_INNER, math.ceil(SAMPLE_MS / max(est_ms, 1e-6))))


@dataclass
class Row:
    shape: ConvShape
    count: int
    fwd: Timing          # mpsnn, explicit destination
    auto: Timing         # mpsnn, auto-sized destination
    peer_fwd: Timing
    bwd: Timing          # mpsnn gradient, explicit destination
    bwd_auto: Timing     # mpsnn gradient, auto-sized result
    peer_bwd: Timing     # torch data + weight gradients (ResNet has no biases)
    peer_bwd_bias: Timing  # torch data + weight + bias gradients (what mpsnn computes)
    errors: dict[str, float]
    notes: list[str]


def bench_shape(shape: ConvShape, count: int, batch: int, reps: int, dev: m.Device, queue: m.MTLCommandQueue, gen: torch.Generator) -> Row:
    cuda = dev.torch_device
    n, k, s, p = batch, shape.k, shape.stride, shape.pad
    H = W = shape.size
    Ho = Wo = shape.out
    stride, padding, dilation = [s, s], [p, p], [1, 1]
    notes: list[str] = []
    errors: dict[str, float] = {}

    # ---- tensors: NHWC activations, channels-last OIHW weights (= OHWI in memory) -------------
    x = torch.randn(n, H, W, shape.cin, device=cuda, dtype=DTYPE, generator=gen)
    dy = torch.randn(n, Ho, Wo, shape.cout, device=cuda, dtype=DTYPE, generator=gen)
    w = (torch.randn(shape.cout, shape.cin, k, k, device=cuda, generator=gen) / math.sqrt(shape.cin * k * k)).to(DTYPE)
    w = w.contiguous(memory_format=torch.channels_last)
    x_nchw, dy_nchw = x.permute(0, 3, 1, 2), dy.permute(0, 3, 1, 2)   # channels-last views, no copies
    w_ohwi = w.permute(0, 2, 3, 1)                                     # contiguous view

    def peer_fwd() -> torch.Tensor:
        return F.conv2d(x_nchw, w, None, stride, padding, dilation, 1)

    def peer_bwd() -> tuple[torch.Tensor, torch.Tensor, Any]:
        return torch.ops.aten.convolution_backward(dy_nchw, x_nchw, w, None, stride, padding, dilation, False, [0, 0], 1, [True, True, False])

    def peer_bwd_bias() -> tuple[torch.Tensor, torch.Tensor, Any]:
        return torch.ops.aten.convolution_backward(dy_nchw, x_nchw, w, [shape.cout], stride, padding, dilation, False, [0, 0], 1,
                                                   [True, True, True])

    y_ref = peer_fwd()
    dx_ref, dw_ref, _ = peer_bwd()
    if not y_ref.is_contiguous(memory_format=torch.channels_last) or not dx_ref.is_contiguous(memory_format=torch.channels_last):
        notes.append("torch result not channels-last")
    y_ref = y_ref.permute(0, 2, 3, 1)              # NHWC
    dx_ref = dx_ref.permute(0, 2, 3, 1)            # NHWC
    dw_ref = dw_ref.permute(0, 2, 3, 1).float()    # OHWI, as state.gradient_for_weights

    # ---- mpsnn objects ----------------------------------------------------------------------------
    desc = m.MPSCNNConvolutionDescriptor(kernel_width=k, kernel_height=k, input_feature_channels=shape.cin, output_feature_channels=shape.cout)
    desc.stride_in_pixels_x = s
    desc.stride_in_pixels_y = s
    # float32 OHWI weights holding exactly the bfloat16 values torch uses
    ds = m.ConvolutionDataSource(desc, weights=w_ohwi.float().contiguous().cpu().numpy(), bias_terms=None)
    conv = m.MPSCNNConvolution(dev, weights=ds)
    grad = m.MPSCNNConvolutionGradient(dev, weights=ds)
    offset = m.MPSOffset(x=k // 2 - p, y=k // 2 - p, z=0)   # spec §1: offset = (kWd >> 1) - P
    conv.offset = offset

    fmt = m.MPSImageFeatureChannelFormat.bfloat16
    x_img, dy_img = m.MPSImage.from_torch(x), m.MPSImage.from_torch(dy)
    y_img = m.MPSImage(dev, image_descriptor=m.MPSImageDescriptor(channel_format=fmt, width=Wo, height=Ho, feature_channels=shape.cout, number_of_images=n))
    dx_img = m.MPSImage(dev, image_descriptor=m.MPSImageDescriptor(channel_format=fmt, width=W, height=H, feature_channels=shape.cin, number_of_images=n))

    def run(encode: Callable[[Any], Any]) -> Any:
        cb = queue.make_command_buffer()
        result = encode(cb)
        cb.commit()
        cb.wait_until_completed()
        if getattr(cb, "error", None) is not None:
            raise RuntimeError(f"command buffer finished with an error: {cb.error!r}")
        return result

    # ---- correctness: forward with a result state, the auto-sized form, the gradient --------------
    y_img.tensor.fill_(math.nan)
    state = conv.result_state(x_img, None, y_img)
    run(lambda cb: conv.encode(cb, x_img, y_img, destination_state=state))
    errors["y"] = rel_err(y_img.tensor, y_ref)

    def encode_auto(cb: Any) -> Any:
        img = conv.encode(cb, x_img)
        if getattr(img, "is_temporary", False):
            img.read_count = 0   # hand the storage back to the command buffer's pool, as a network would
        return img

    y_auto = run(lambda cb: conv.encode(cb, x_img))
    auto_offset = conv.offset
    if tuple(y_auto.shape) != (n, Ho, Wo, shape.cout):
        notes.append(f"auto-sized form gives {tuple(y_auto.shape)}, torch {(n, Ho, Wo, shape.cout)}")
    else:
        errors["y auto"] = rel_err(y_auto.tensor, y_ref)
    if (auto_offset.x, auto_offset.y) != (offset.x, offset.y):
        notes.append(f"auto-sized form set offset ({auto_offset.x},{auto_offset.y}), recipe ({offset.x},{offset.y})")
    del y_auto
    conv.offset = offset   # the auto form sets `offset` from the padding policy

    dx_img.tensor.fill_(math.nan)
    run(lambda cb: grad.encode(cb, dy_img, x_img, state, dx_img))
    errors["dx"] = rel_err(dx_img.tensor, dx_ref)
    gw = torch.as_tensor(state.gradient_for_weights).to(device=cuda, dtype=torch.float32)
    errors["dw"] = rel_err(gw.reshape(shape.cout, k, k, shape.cin), dw_ref)
    gb = getattr(state, "gradient_for_biases", None)   # option .all also sums dy per channel
    if gb is not None:
        errors["db"] = rel_err(torch.as_tensor(gb).to(device=cuda, dtype=torch.float32).reshape(shape.cout), dy.float().sum((0, 1, 2)))
    del gw, gb

    # a non-temporary gradient state (read_count 0) is not consumed by an encode and serves every
    # timed launch; otherwise each launch gets its own state, made before the timed region
    reusable = not getattr(state, "is_temporary", False) and state.read_count == 0
    if not reusable:
        notes.append(f"gradient state not reusable (read_count {state.read_count}): one per launch")

    # ---- timing -----------------------------------------------------------------------------------------
    flops = 2.0 * n * shape.macs
    inner_f, inner_b = inner_for(flops), inner_for(2 * flops)
    peer_f = time_launches(lambda _cb: peer_fwd(), inner_f, reps)
    y_img.tensor.fill_(math.nan)
    fwd = time_launches(lambda cb: conv.encode(cb, x_img, y_img), inner_f, reps, queue)
    errors["y timed"] = rel_err(y_img.tensor, y_ref)
    auto = time_launches(encode_auto, inner_f, reps, queue)
    conv.offset = offset

    peer_b = time_launches(lambda _cb: peer_bwd(), inner_b, reps)
    dx_img.tensor.fill_(math.nan)
    if reusable:
        bwd = time_launches(lambda cb: grad.encode(cb, dy_img, x_img, state, dx_img), inner_b, reps, queue)
    else:
        pool = [conv.result_state(x_img, None, y_img) for _ in range(inner_b * (WARMUP + reps))]
        states = iter(pool)
        bwd = time_launches(lambda cb: grad.encode(cb, dy_img, x_img, next(states), dx_img), inner_b, reps, queue)
        del pool, states
    errors["dx timed"] = rel_err(dx_img.tensor, dx_ref)

    def encode_grad_auto(cb: Any) -> Any:
        img = grad.encode(cb, dy_img, x_img, state)
        if getattr(img, "is_temporary", False):
            img.read_count = 0
        return img

    dx_auto = run(lambda cb: grad.encode(cb, dy_img, x_img, state))
    errors["dx auto"] = rel_err(dx_auto.tensor, dx_ref)
    del dx_auto
    bwd_auto = time_launches(encode_grad_auto, inner_b, reps, queue) if reusable else bwd
    peer_bb = time_launches(lambda _cb: peer_bwd_bias(), inner_b, reps)
    return Row(shape, count, fwd, auto, peer_f, bwd, bwd_auto, peer_b, peer_bb, errors, notes)


@dataclass
class NetworkRow:
    fwd: Timing
    peer_fwd: Timing
    bwd: Timing
    bwd_auto: Timing
    peer_bwd: Timing
    peer_bwd_bias: Timing
    step: Timing            # mpsnn forward then gradient pass, one command buffer
    peer_step: Timing       # torch forward then data + weight gradients
    peer_step_bias: Timing  # torch forward then data + weight + bias gradients (mpsnn's work)


def bench_network(convs: list[tuple[str, ConvShape]], batch: int, reps: int, dev: m.Device, queue: m.MTLCommandQueue,
                  gen: torch.Generator) -> NetworkRow:
    """All convolutions in the network's order, as a training step runs them: the forward
    pass (conv1 ... layer4) and the gradient pass (reverse order), each timed as one sequence
    per sample (one command buffer for mpsnn). Operands are shared per unique shape."""
    cuda = dev.torch_device
    fmt = m.MPSImageFeatureChannelFormat.bfloat16
    ops: dict[ConvShape, dict[str, Any]] = {}
    for _, shape in convs:
        if shape in ops:
            continue
        n, k, s = batch, shape.k, shape.stride
        x = torch.randn(n, shape.size, shape.size, shape.cin, device=cuda, dtype=DTYPE, generator=gen)
        dy = torch.randn(n, shape.out, shape.out, shape.cout, device=cuda, dtype=DTYPE, generator=gen)
        w = (torch.randn(shape.cout, shape.cin, k, k, device=cuda, generator=gen) / math.sqrt(shape.cin * k * k)).to(DTYPE)
        w = w.contiguous(memory_format=torch.channels_last)
        desc = m.MPSCNNConvolutionDescriptor(kernel_width=k, kernel_height=k, input_feature_channels=shape.cin, output_feature_channels=shape.cout)
        desc.stride_in_pixels_x = desc.stride_in_pixels_y = s
        ds = m.ConvolutionDataSource(desc, weights=w.permute(0, 2, 3, 1).float().contiguous().cpu().numpy(), bias_terms=None)
        conv, grad = m.MPSCNNConvolution(dev, weights=ds), m.MPSCNNConvolutionGradient(dev, weights=ds)
        conv.offset = m.MPSOffset(x=k // 2 - shape.pad, y=k // 2 - shape.pad, z=0)
        x_img, dy_img = m.MPSImage.from_torch(x), m.MPSImage.from_torch(dy)
        y_img = m.MPSImage(dev, image_descriptor=m.MPSImageDescriptor(channel_format=fmt, width=shape.out, height=shape.out,
                                                                      feature_channels=shape.cout, number_of_images=n))
        dx_img = m.MPSImage(dev, image_descriptor=m.MPSImageDescriptor(channel_format=fmt, width=shape.size, height=shape.size,
                                                                       feature_channels=shape.cin, number_of_images=n))
        ops[shape] = dict(x=x.permute(0, 3, 1, 2), dy=dy.permute(0, 3, 1, 2), w=w, conv=conv, grad=grad, x_img=x_img, y_img=y_img,
                          dy_img=dy_img, dx_img=dx_img, state=conv.result_state(x_img, None, y_img), p=shape.pad, s=shape.stride)
    order = [ops[shape] for _, shape in convs]

    def mps_fwd(cb: Any) -> None:
        for o in order:
            o["conv"].encode(cb, o["x_img"], o["y_img"])

    def mps_bwd(cb: Any) -> None:
        for o in reversed(order):
            o["grad"].encode(cb, o["dy_img"], o["x_img"], o["state"], o["dx_img"])

    def mps_bwd_auto(cb: Any) -> None:
        for o in reversed(order):
            o["grad"].encode(cb, o["dy_img"], o["x_img"], o["state"]).read_count = 0

    def peer_fwd(_cb: Any) -> None:
        for o in order:
            F.conv2d(o["x"], o["w"], None, o["s"], o["p"])

    def peer_bwd(_cb: Any) -> None:
        for o in reversed(order):
            torch.ops.aten.convolution_backward(o["dy"], o["x"], o["w"], None, [o["s"]] * 2, [o["p"]] * 2, [1, 1], False, [0, 0], 1,
                                                [True, True, False])

    def peer_bwd_bias(_cb: Any) -> None:
        for o in reversed(order):
            torch.ops.aten.convolution_backward(o["dy"], o["x"], o["w"], [o["w"].shape[0]], [o["s"]] * 2, [o["p"]] * 2, [1, 1], False,
                                                [0, 0], 1, [True, True, True])

    def mps_step(cb: Any) -> None:
        mps_fwd(cb)
        mps_bwd(cb)

    def peer_step(cb: Any) -> None:
        peer_fwd(cb)
        peer_bwd(cb)

    def peer_step_bias(cb: Any) -> None:
        peer_fwd(cb)
        peer_bwd_bias(cb)

    return NetworkRow(time_launches(mps_fwd, 1, reps, queue), time_launches(peer_fwd, 1, reps), time_launches(mps_bwd, 1, reps, queue),
                      time_launches(mps_bwd_auto, 1, reps, queue), time_launches(peer_bwd, 1, reps), time_launches(peer_bwd_bias, 1, reps),
                      time_launches(mps_step, 1, reps, queue), time_launches(peer_step, 1, reps), time_launches(peer_step_bias, 1, reps))


def warm_gpu(seconds: float = 1.0) -> None:
    """Bring the clocks up before the first measurement."""
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    t0 = time.time()
    while time.time() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
    del a


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default 256; 32 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 32, 3 timed samples")
    ap.add_argument("--reps", type=int, default=None, help="timed samples per measurement (default 10; 3 with --quick)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="set torch.backends.cudnn.benchmark (applies to both sides)")
    ap.add_argument("--no-network", action="store_true", help="skip the network-order sequence measurement")
    ap.add_argument("--list-shapes", action="store_true", help="print the unique shapes and MAC counts and exit (no CUDA needed)")
    args = ap.parse_args(argv)

    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    if args.list_shapes:
        list_shapes(out)
        return 0
    if not torch.cuda.is_available():
        print("bench_convolution: needs a CUDA device (torch.cuda.is_available() is False); "
              "use --list-shapes to see the shapes without one", file=sys.stderr)
        return 2
    batch = args.batch if args.batch is not None else (32 if args.quick else 256)
    reps = args.reps if args.reps is not None else (3 if args.quick else 10)
    if batch < 1 or reps < 1:
        ap.error("--batch and --reps must be >= 1")
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)

    convs = resnet50_convs()
    shapes = unique_shapes(convs)
    t_start = time.time()
    out(f"mpsnn convolution benchmark (ResNet-50 v1.5)  {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    out(f"device: {torch.cuda.get_device_name()}   torch {torch.__version__}   cuDNN {torch.backends.cudnn.version()}   "
        f"mpsnn {getattr(m, '__version__', '?')}   cudnn.benchmark={torch.backends.cudnn.benchmark}")
    out(f"batch {batch}, NHWC {str(DTYPE).replace('torch.', '')}, channels-last weights, {len(convs)} convolutions = "
        f"{len(shapes)} unique shapes; median of {reps} samples after {WARMUP} warm-up samples, "
        f"each sample 2-{MAX_INNER} back-to-back launches (CUDA events)")
    out(torchvision_check(convs))

    dev = m.Device("cuda")
    queue = dev.make_command_queue()
    gen = torch.Generator(device="cuda").manual_seed(0)
    warm_gpu()

    rows: list[Row] = []
    failures: list[str] = []
    for i, (shape, count, _names) in enumerate(shapes, 1):
        try:
            rows.append(bench_shape(shape, count, batch, reps, dev, queue, gen))
            r = rows[-1]
            print(f"  [{i:>2}/{len(shapes)}] {shape.label()}  fwd {r.fwd.ms:.3f}/{r.peer_fwd.ms:.3f} ms  "
                  f"bwd {r.bwd.ms:.3f}/{r.peer_bwd.ms:.3f} ms  max err {worst(r.errors):.1e}", flush=True)
        except Exception as exc:  # report, go on with the next shape, re-raise at the end
            text = traceback.format_exc()
            print(f"  [{i:>2}/{len(shapes)}] {shape.label()}  FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            print(text, file=sys.stderr, flush=True)
            failures.append(f"{shape.label().strip()} (batch {batch}): {type(exc).__name__}: {exc}")
            del exc
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    # ---- table ------------------------------------------------------------------------------------------
    header = (f"{'shape (k/s Cin->Cout @in)':<28}{'count':>6}{'GFLOP':>8} | {'fwd mpsnn':>10}{'torch':>8}{'ratio':>7}{'auto':>7}"
              f"{'TF/s':>6}{'host us':>8} | {'bwd mpsnn':>10}{'torch':>8}{'ratio':>7}{'auto':>7}{'+db':>7}{'TF/s':>6} | {'max err':>8}")
    out()
    out("times in ms per launch; ratio = mpsnn / torch (explicit destination; 'auto' = auto-sized form); "
        "GFLOP = forward, whole batch; bwd = data + weight gradients (2x the forward FLOPs; mpsnn's option .all "
        "also writes the bias gradient, torch's peer does not); bwd 'auto' = auto-sized gradient result; '+db' = mpsnn / torch "
        "computing the bias gradient too")
    out(header)
    out("-" * len(header))
    mismatches: list[str] = []
    for r in rows:
        s = r.shape
        flops = 2.0 * batch * s.macs
        err = worst(r.errors)
        out(f"{s.label():<28}{r.count:>6}{flops / 1e9:>8.1f} | {r.fwd.ms:>10.3f}{r.peer_fwd.ms:>8.3f}{r.fwd.ms / r.peer_fwd.ms:>7.3f}"
            f"{r.auto.ms / r.peer_fwd.ms:>7.3f}{flops / r.fwd.ms / 1e9:>6.0f}{r.fwd.host_us:>8.0f} | {r.bwd.ms:>10.3f}{r.peer_bwd.ms:>8.3f}"
            f"{r.bwd.ms / r.peer_bwd.ms:>7.3f}{r.bwd_auto.ms / r.peer_bwd.ms:>7.3f}{r.bwd.ms / r.peer_bwd_bias.ms:>7.3f}"
            f"{2 * flops / r.bwd.ms / 1e9:>6.0f} | {err:>8.1e}")
        for note in r.notes:
            out(f"    note: {note}")
        bad = {k: v for k, v in r.errors.items() if not v <= TOL}   # NaN fails
        if bad:
            mismatches.append(f"{s.label().strip()}: " + ", ".join(f"{k} rel err {v:.3e}" for k, v in bad.items()))
    out("-" * len(header))
    if rows:
        def total(attr: str) -> float:
            return sum(r.count * getattr(r, attr).ms for r in rows)

        fwd, auto, peer_f, bwd, peer_b = (total(a) for a in ("fwd", "auto", "peer_fwd", "bwd", "peer_bwd"))
        bwd_auto, peer_bb = total("bwd_auto"), total("peer_bwd_bias")
        flops = sum(r.count * 2.0 * batch * r.shape.macs for r in rows)
        n_convs = sum(r.count for r in rows)
        out(f"{'TOTAL (x count)':<28}{n_convs:>6}{flops / 1e9:>8.1f} | {fwd:>10.3f}{peer_f:>8.3f}{fwd / peer_f:>7.3f}{auto / peer_f:>7.3f}"
            f"{flops / fwd / 1e9:>6.0f}{'':>8} | {bwd:>10.3f}{peer_b:>8.3f}{bwd / peer_b:>7.3f}{bwd_auto / peer_b:>7.3f}{bwd / peer_bb:>7.3f}"
            f"{2 * flops / bwd / 1e9:>6.0f} |")
        out()
        verdict = "PASS" if fwd / peer_f <= TARGET and bwd / peer_b <= TARGET else "MISS"
        out(f"network total, weighted by multiplicity: forward ratio {fwd / peer_f:.3f} (auto-sized form {auto / peer_f:.3f}), "
            f"gradient ratio {bwd / peer_b:.3f} (auto-sized result {bwd_auto / peer_b:.3f}; against torch computing the bias "
            f"gradient too {bwd / peer_bb:.3f}); target <= {TARGET}: {verdict}"
            + (f"  [incomplete: {len(failures)} of {len(shapes)} shapes failed]" if failures else ""))
    if rows and not failures and not args.no_network:
        try:
            net = bench_network(convs, batch, reps, dev, queue, gen)
        except Exception as exc:
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            failures.append(f"network sequence (batch {batch}): {type(exc).__name__}: {exc}")
        else:
            out()
            out(f"network order: the {len(convs)} convolutions as one training step runs them (forward conv1 ... layer4, then the "
                "gradients in reverse), one sequence per sample, ms per sequence (mpsnn host ms = time to encode it)")
            verdict = "PASS" if net.fwd.ms / net.peer_fwd.ms <= TARGET and net.bwd.ms / net.peer_bwd.ms <= TARGET else "MISS"
            out(f"  forward : mpsnn {net.fwd.ms:8.3f}  torch {net.peer_fwd.ms:8.3f}  ratio {net.fwd.ms / net.peer_fwd.ms:.3f}"
                f"   host ms mpsnn {net.fwd.host_us / 1e3:.3f} torch {net.peer_fwd.host_us / 1e3:.3f}")
            out(f"  gradient: mpsnn {net.bwd.ms:8.3f}  torch {net.peer_bwd.ms:8.3f}  ratio {net.bwd.ms / net.peer_bwd.ms:.3f}"
                f"   host ms mpsnn {net.bwd.host_us / 1e3:.3f} torch {net.peer_bwd.host_us / 1e3:.3f}")
            out(f"  gradient, auto-sized results: mpsnn {net.bwd_auto.ms:8.3f}  ratio {net.bwd_auto.ms / net.peer_bwd.ms:.3f}"
                f"   host ms {net.bwd_auto.host_us / 1e3:.3f}")
            out(f"  torch computing the bias gradients too: {net.peer_bwd_bias.ms:8.3f}  mpsnn / torch {net.bwd.ms / net.peer_bwd_bias.ms:.3f} "
                f"(auto-sized {net.bwd_auto.ms / net.peer_bwd_bias.ms:.3f})")
            out(f"  training step (forward then gradients, one sequence): mpsnn {net.step.ms:8.3f}  torch {net.peer_step.ms:8.3f}  "
                f"ratio {net.step.ms / net.peer_step.ms:.3f}; torch with the bias gradients {net.peer_step_bias.ms:8.3f}  "
                f"ratio {net.step.ms / net.peer_step_bias.ms:.3f}   host ms mpsnn {net.step.host_us / 1e3:.3f}")
            out(f"  network order, target <= {TARGET}: {verdict}")
    if mismatches:
        out(f"FAIL: {len(mismatches)} shape(s) differ from torch beyond rel err {TOL}:")
        for line in mismatches:
            out(f"  {line}")
    else:
        out(f"correctness: every checked result within rel err {TOL} of torch (forward, auto-sized forward, dx, dW, dB; "
            "forward and dx again after timing)" if rows else "correctness: nothing checked")
    out(f"wall time {time.time() - t_start:.1f} s")

    dest = os.environ.get("OUT")
    if dest:
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, "bench_convolution.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")

    if failures:
        raise RuntimeError(f"bench_convolution: {len(failures)} of {len(shapes)} shapes raised (tracebacks above):\n  " + "\n  ".join(failures))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
