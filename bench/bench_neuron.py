"""Neuron kernels on CUDA: mpsnn (public API, Triton backend) against copy bandwidth and torch.

Run from the repository root on a CUDA machine::

    PYTHONPATH=. python3 bench/bench_neuron.py

Measures, in one process and on one NHWC bfloat16 image of 64 x 224 x 224 x 168
(539,492,352 elements, 1.08 GB):

* device-to-device copy bandwidth (``dst.copy_(src)``; bytes read + bytes written);
* ``MPSCNNNeuronReLU``, ``MPSCNNNeuron`` (GeLU), ``MPSCNNNeuronSigmoid``,
  ``MPSCNNNeuronPReLU`` forward and ``MPSCNNNeuronGradient`` for ReLU and GeLU, encoded
  through the public API on a command buffer;
* torch's own fused CUDA kernels for the same ops (``F.relu``, ``F.gelu``, ``torch.sigmoid``,
  ``F.prelu`` on the channels-last view, ``aten.threshold_backward``, ``aten.gelu_backward``).

Each time is the median of 25 CUDA-event-timed runs after 3 warm-up runs. Bandwidth counts
the bytes an op must move (forward: read x, write y; gradient: read dy and x, write dx).
Every mpsnn result is checked against a float32 torch reference on the first image; the
script exits non-zero on a mismatch or if the dispatcher did not pick the Triton kernels.
The table is printed and, when ``$OUT`` is set, written to ``$OUT/bench_neuron.txt``.
"""
from __future__ import annotations

import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import mpsnn as m
from mpsnn.backends import dispatch
from mpsnn.backends import torch_eager as te
from mpsnn.backends.torch_eager import NeuronParams

SHAPE = (64, 224, 224, 168)
DTYPE = torch.bfloat16
REPS, WARMUP = 25, 3


def time_ms(run: Callable[[], None], before: Callable[[], None] | None = None, after: Callable[[], None] | None = None) -> float:
    """Median milliseconds of ``run`` over REPS event-timed calls after WARMUP calls.
    ``before`` / ``after`` bracket each batch (open / commit a command buffer)."""
    for batch in ("warmup", "timed"):
        if before is not None:
            before()
        n = WARMUP if batch == "warmup" else REPS
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            run()
            end.record()
        if after is not None:
            after()
        torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


class Batch:
    """One command buffer per timing batch, committed and waited on at the end of it."""

    def __init__(self, device: m.Device) -> None:
        self.queue = device.make_command_queue()
        self.cb = None

    def open(self) -> None:
        self.cb = self.queue.make_command_buffer()

    def close(self) -> None:
        self.cb.commit()
        self.cb.wait_until_completed()


def check(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max relative error of a bfloat16 result against its float32 reference; exits on a
    mismatch beyond bfloat16 rounding (2^-8 relative, 1e-6 absolute)."""
    got = got.float()
    err = (got - ref).abs()
    bad = ~(err <= ref.abs() * 2.0 ** -8 + 1e-6) & ~(got.isnan() & ref.isnan())
    rel = (err / ref.abs().clamp_min(1e-3)).nan_to_num(0.0).max().item()
    if bad.any():
        i = bad.nonzero()[0].tolist()
        print(f"FAIL {name}: {int(bad.sum())} mismatches, first at {i}: got {got[tuple(i)].item()} want {ref[tuple(i)].item()}", file=sys.stderr)
        sys.exit(1)
    return rel


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_neuron: needs a CUDA device")
    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    import triton

    out(f"mpsnn neuron benchmark  {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    out(f"device: {torch.cuda.get_device_name()}   torch {torch.__version__}   triton {triton.__version__}")
    if dispatch._triton() is None:
        sys.exit("bench_neuron: the dispatcher did not pick the Triton neuron kernels (Triton unusable or MPSNN_DISABLE_TRITON set)")
    n = 1
    for s in SHAPE:
        n *= s
    esz = torch.tensor([], dtype=DTYPE).element_size()
    out(f"image: NHWC {SHAPE} {str(DTYPE).replace('torch.', '')}, {n:,} elements, {n * esz / 1e9:.2f} GB per tensor")
    t0 = time.time()

    gen = torch.Generator(device="cuda").manual_seed(0)
    xt = torch.randn(SHAPE, device="cuda", dtype=DTYPE, generator=gen)
    dyt = torch.randn(SHAPE, device="cuda", dtype=DTYPE, generator=gen)
    yt = torch.empty_like(xt)
    dxt = torch.empty_like(xt)
    slopes = torch.rand(SHAPE[-1], device="cuda") * 0.5

    copy_ms = time_ms(lambda: yt.copy_(xt))
    copy_gbs = 2 * n * esz / copy_ms / 1e6

    dev = m.Device("cuda")
    x, y = m.MPSImage.from_torch(xt), m.MPSImage.from_torch(yt)
    dy, dx = m.MPSImage.from_torch(dyt), m.MPSImage.from_torch(dxt)
    batch = Batch(dev)

    relu = m.MPSCNNNeuronReLU(dev, a=0.0)
    gelu = m.MPSCNNNeuron(dev, neuron_descriptor=m.MPSNNNeuronDescriptor.cnn_neuron_descriptor(m.MPSCNNNeuronType.geLU))
    sigmoid = m.MPSCNNNeuronSigmoid(dev)
    prelu = m.MPSCNNNeuronPReLU(dev, a=slopes)
    relu_state = relu.result_state(x, None, y)
    gelu_state = gelu.result_state(x, None, y)
    relu_grad = m.MPSCNNNeuronGradient(dev, neuron_descriptor=relu.neuron_descriptor)
    gelu_grad = m.MPSCNNNeuronGradient(dev, neuron_descriptor=gelu.neuron_descriptor)
    w = slopes.to(DTYPE)
    x_nchw = xt.permute(0, 3, 1, 2)  # channels-last view for F.prelu
    P = m.MPSCNNNeuronType
    one = slice(0, 1)

    # (name, bytes per element, mpsnn encode, torch peer, reference on image 0)
    ops = [
        ("reLU forward", 2, lambda: relu.encode(batch.cb, x, y, destination_state=relu_state), lambda: F.relu(xt),
         lambda: (yt[one], te.neuron_forward(xt[one], NeuronParams(P.reLU)))),
        ("geLU forward", 2, lambda: gelu.encode(batch.cb, x, y, destination_state=gelu_state), lambda: F.gelu(xt),
         lambda: (yt[one], te.neuron_forward(xt[one], NeuronParams(P.geLU)))),
        ("sigmoid forward", 2, lambda: sigmoid.encode(batch.cb, x, y), lambda: torch.sigmoid(xt),
         lambda: (yt[one], te.neuron_forward(xt[one], NeuronParams(P.sigmoid)))),
        ("pReLU forward", 2, lambda: prelu.encode(batch.cb, x, y), lambda: F.prelu(x_nchw, w),
         lambda: (yt[one], te.neuron_forward(xt[one], NeuronParams(P.pReLU, slopes=slopes)))),
        ("reLU gradient", 3, lambda: relu_grad.encode(batch.cb, dy, x, relu_state, dx),
         lambda: torch.ops.aten.threshold_backward(dyt, xt, 0.0),
         lambda: (dxt[one], dyt[one].float() * te.neuron_derivative(xt[one], NeuronParams(P.reLU)))),
        ("geLU gradient", 3, lambda: gelu_grad.encode(batch.cb, dy, x, gelu_state, dx),
         lambda: torch.ops.aten.gelu_backward(dyt, xt),
         lambda: (dxt[one], dyt[one].float() * te.neuron_derivative(xt[one], NeuronParams(P.geLU)))),
    ]

    header = f"{'op':<18}{'mpsnn ms':>10}{'GB/s':>9}{'% copy':>8}{'torch ms':>10}{'GB/s':>9}{'% copy':>8}{'speed-up':>10}{'max rel err':>13}"
    out()
    out(header)
    out("-" * len(header))
    out(f"{'copy (d2d)':<18}{copy_ms:>10.3f}{copy_gbs:>9.0f}{100.0:>7.1f}%")
    worst = 100.0
    for name, tensors, encode, peer, reference in ops:
        ms = time_ms(encode, before=batch.open, after=batch.close)
        got, ref = reference()
        rel = check(name, got, ref)
        peer_ms = time_ms(peer)
        nbytes = tensors * n * esz
        gbs, peer_gbs = nbytes / ms / 1e6, nbytes / peer_ms / 1e6
        worst = min(worst, 100 * gbs / copy_gbs)
        out(f"{name:<18}{ms:>10.3f}{gbs:>9.0f}{100 * gbs / copy_gbs:>7.1f}%{peer_ms:>10.3f}{peer_gbs:>9.0f}"
            f"{100 * peer_gbs / copy_gbs:>7.1f}%{peer_ms / ms:>9.2f}x{rel:>13.2e}")
    out()
    out(f"slowest mpsnn op: {worst:.1f}% of copy bandwidth (target >= 85%); all results within bfloat16 rounding "
        f"of the float32 reference; wall time {time.time() - t0:.1f} s")

    dest = os.environ.get("OUT")
    if dest:
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, "bench_neuron.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
