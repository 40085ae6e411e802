"""The ``mpsnn`` command line (``python -m mpsnn`` or the ``mpsnn`` script).

Subcommands:

* ``train-digits`` (the default, the main job): :mod:`mpsnn.models.train_digits`.
* ``run MODEL.onnx --input FILE``: an ONNX model through :func:`mpsnn.io.onnx.load` on .npy
  arrays or images; prints / saves the outputs (:mod:`mpsnn.io.onnx.run`).
* ``demo``: real MNIST digits through a chain of MPSCNN kernels, forward and
  backward, on one command buffer, checked against NumPy. Options: ``--device`` (default
  :func:`mpsnn.default_device`), ``--count N`` (digits, default 256), ``--format
  float32|float16|bfloat16`` (storage of every image the chain writes, default float32),
  ``--activation gelu|sigmoid`` (default gelu), ``--seed`` (upstream gradient, default 0).

The demo encodes, through the public API only::

    x   (MPSImage, unorm8, from the raw MNIST bytes by write_bytes)
    xn  = Linear(a=1/0.3081, b=-0.1307/0.3081)(x)      temporary, read_count 2, + state
    r   = ReLU(xn)                                     temporary, read_count 2, + state
    y   = GeLU(r)  (or sigmoid)                        MPSImage, + state
    dr  = NeuronGradient[GeLU](dy, r, state)           temporary (dy: random upstream gradient)
    dxn = NeuronGradient[ReLU](dr, xn, state)          temporary, takes r's recycled storage
    dx  = NeuronGradient[Linear](dxn, x, state)        MPSImage: dL/d(pixel value in [0, 1])

then commits, waits, reads ``y`` and ``dx`` back with ``read_bytes`` and compares them with a
float64 NumPy computation that rounds to the storage format wherever the chain stores an
image. Exit status: 0 when every result is within tolerance, 1 when the check fails, 2 for
bad arguments or an :class:`~mpsnn.MPSError`.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import __version__
from .core.device import Device, MTLCommandBuffer, default_device
from .core.enums import MPSCNNNeuronType, MPSDataLayout, MPSImageFeatureChannelFormat
from .core.errors import MPSError
from .core.structs import MTLOrigin, MTLRegion, MTLSize
from .datasets.mnist import MNIST_MEAN, MNIST_STD, load_mnist
from .images.image import MPSImage, MPSImageDescriptor, MPSTemporaryImage
from .images.state import MPSState
from .kernels.neuron import MPSCNNNeuron, MPSCNNNeuronGradient, MPSCNNNeuronLinear, MPSCNNNeuronReLU, MPSNNNeuronDescriptor

F = MPSImageFeatureChannelFormat
HWC = MPSDataLayout.HeightxWidthxFeatureChannels
SIDE = 28

#: Check tolerance per storage format: |got - ref| <= tol * (1 + |ref|), with tol = 16 units
#: of roundoff of the format (the reference rounds where the chain stores, so what is left
#: is float32-versus-float64 arithmetic and an occasional rounding tie going the other way).
TOLERANCE = {F.float32: 16 * 2.0**-24, F.float16: 16 * 2.0**-11, F.bfloat16: 16 * 2.0**-8}

FORMATS = {"float32": F.float32, "float16": F.float16, "bfloat16": F.bfloat16}


# -- small helpers -----------------------------------------------------------------------------
def _positive_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`--count` (={text!r}) must be an integer") from None
    if not 1 <= n <= 10000:
        raise argparse.ArgumentTypeError(f"`--count` (={n}) must be in [1, 10000] (the MNIST test set holds 10000 digits)")
    return n


def _region(n: int) -> MTLRegion:
    """All ``n`` images of a 28x28 MPSImage (the ``depth`` of a region counts images)."""
    return MTLRegion(MTLOrigin(0, 0, 0), MTLSize(SIDE, SIDE, n))


def _fmt(image: MPSImage) -> str:
    return image.feature_channel_format.name


def _round_to(fmt: F) -> Callable[[np.ndarray], np.ndarray]:
    """NumPy model of storing float64 values in an image of format ``fmt`` (round to nearest
    even), returned as float64 again."""
    if fmt == F.float32:
        return lambda v: np.asarray(v, np.float32).astype(np.float64)
    if fmt == F.float16:
        return lambda v: np.asarray(v, np.float16).astype(np.float64)

    def bf16(v: np.ndarray) -> np.ndarray:  # bfloat16: the upper 16 bits of a float32
        bits = np.asarray(v, np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return np.asarray(rounded, np.uint64).astype(np.uint32).view(np.float32).astype(np.float64)
    return bf16


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _activation_numpy(name: str, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(f(r), f'(r))`` in float64."""
    if name == "gelu":
        phi = 0.5 * (1.0 + _erf(r * math.sqrt(0.5)))
        return r * phi, phi + r * np.exp(-0.5 * r * r) / math.sqrt(2.0 * math.pi)
    s = 1.0 / (1.0 + np.exp(-r))
    return s, s * (1.0 - s)


_RAMP = " .:-=+*#%@"


def ascii_panels(panels: Sequence[tuple[str, np.ndarray]]) -> list[str]:
    """Side-by-side ASCII renderings of 28x28 images (two rows per text line, each image
    scaled to its own range)."""
    cols = []
    for title, img in panels:
        v = np.asarray(img, np.float64).reshape(SIDE, SIDE)
        lo, hi = float(v.min()), float(v.max())
        v = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
        v = 0.5 * (v[0::2] + v[1::2])
        rows = ["".join(_RAMP[min(len(_RAMP) - 1, int(p * len(_RAMP)))] for p in row) for row in v]
        cols.append([title[:SIDE].ljust(SIDE), *rows])
    lines = ["    " + "   ".join(parts).rstrip() for parts in zip(*cols)]
    body = [i for i, line in enumerate(lines[1:], 1) if line.strip()]
    return [lines[0]] + (lines[body[0]:body[-1] + 1] if body else [])


# -- the encoded chain ---------------------------------------------------------------------------
@dataclass
class Step:
    """One encode, as the report shows it."""

    kernel: str
    reads: str
    writes: str
    counts: str
    pool: int


@dataclass
class Chain:
    """The images and the log of one pass of the demo chain."""

    command_buffer: MTLCommandBuffer
    y: MPSImage
    dx: MPSImage
    steps: list[Step] = field(default_factory=list)
    encode_s: float = 0.0
    complete_s: float = 0.0
    pool_before_commit: int = 0
    pool_after_completion: int = 0


def _gradient_state(state: MPSState | None) -> MPSState:
    """Neurons always make a gradient state; narrow the optional type of the generic API."""
    if state is None:
        raise MPSError("demo: a neuron kernel returned no gradient state")
    return state


def _describe(name: str, obj: MPSImage | MPSState) -> str:
    if isinstance(obj, MPSImage):
        return f"{name}{'*' if obj.is_temporary else ''}[{_fmt(obj)}]"
    return f"{name}*" if obj.is_temporary else name


def _count(name: str, obj: MPSImage | MPSState) -> str:
    rc = obj.read_count if isinstance(obj, (MPSTemporaryImage, MPSState)) else 0
    return f"{name}={rc}{' (freed)' if rc == 0 and isinstance(obj, MPSImage) else ''}"


def run_chain(device: Device, x: MPSImage, dy: MPSImage, fmt: F, activation: str) -> Chain:
    """Encode the demo chain on a new command buffer, commit it and wait (see the module
    docstring). ``x`` is the unorm8 input, ``dy`` the upstream gradient of ``y``."""
    n = x.number_of_images
    desc = MPSImageDescriptor(channel_format=fmt, width=SIDE, height=SIDE, feature_channels=1, number_of_images=n)
    a, b = 1.0 / MNIST_STD, -MNIST_MEAN / MNIST_STD
    linear = MPSCNNNeuronLinear(device, a=a, b=b)
    relu = MPSCNNNeuronReLU(device)
    act_type = MPSCNNNeuronType.geLU if activation == "gelu" else MPSCNNNeuronType.sigmoid
    act = MPSCNNNeuron(device, neuron_descriptor=MPSNNNeuronDescriptor.cnn_neuron_descriptor(act_type))
    act_grad = MPSCNNNeuronGradient(device, neuron_descriptor=act.neuron_descriptor)
    relu_grad = MPSCNNNeuronGradient(device, neuron_descriptor=relu.neuron_descriptor)
    linear_grad = MPSCNNNeuronGradient(device, neuron_descriptor=linear.neuron_descriptor)

    cb = device.make_command_queue().make_command_buffer()
    steps: list[Step] = []

    def log(kernel: str, reads: Sequence[tuple[str, MPSImage | MPSState]], writes: Sequence[tuple[str, MPSImage | MPSState]],
            pool_before: int, dest: MPSImage) -> None:
        pool = cb.pooled_storage_count()
        freed = sum(1 for _, o in reads if isinstance(o, MPSTemporaryImage) and o.read_count == 0)
        reused = dest.is_temporary and pool_before + freed - pool > 0
        counts = " ".join(_count(nm, o) for nm, o in [*reads, *writes] if o.is_temporary)
        written = " ".join(_describe(nm, o) + (" (recycled)" if o is dest and reused else "") for nm, o in writes)
        steps.append(Step(kernel, " ".join(_describe(nm, o) for nm, o in reads), written, counts, pool))

    t0 = time.perf_counter()
    # forward: normalise -> ReLU -> activation, each with its gradient state
    xn = MPSTemporaryImage(cb, desc)
    xn.read_count = 2  # read by the ReLU and by the ReLU gradient
    s_lin = _gradient_state(linear.temporary_result_state(cb, x, destination_image=xn))
    p = cb.pooled_storage_count()
    linear.encode(cb, x, xn, destination_state=s_lin)
    log(f"MPSCNNNeuronLinear a={linear.a:.5g} b={linear.b:.5g}", [("x", x)], [("xn", xn), ("s_lin", s_lin)], p, xn)

    r = MPSTemporaryImage(cb, desc)
    r.read_count = 2  # read by the activation and by its gradient
    s_relu = _gradient_state(relu.temporary_result_state(cb, xn, destination_image=r))
    p = cb.pooled_storage_count()
    relu.encode(cb, xn, r, destination_state=s_relu)
    log(f"MPSCNNNeuronReLU a={relu.a:g}", [("xn", xn)], [("r", r), ("s_relu", s_relu)], p, r)

    y = MPSImage(device, desc)
    s_act = _gradient_state(act.temporary_result_state(cb, r, destination_image=y))
    p = cb.pooled_storage_count()
    act.encode(cb, r, y, destination_state=s_act)
    log(f"MPSCNNNeuron ({act_type.name})", [("r", r)], [("y", y), ("s_act", s_act)], p, y)

    # backward: dL/dy -> dL/dr -> dL/dxn -> dL/dx
    dr = MPSTemporaryImage(cb, desc)
    p = cb.pooled_storage_count()
    act_grad.encode(cb, dy, r, s_act, dr)
    log(f"MPSCNNNeuronGradient ({act_type.name})", [("dy", dy), ("r", r), ("s_act", s_act)], [("dr", dr)], p, dr)

    dxn = MPSTemporaryImage(cb, desc)
    p = cb.pooled_storage_count()
    relu_grad.encode(cb, dr, xn, s_relu, dxn)
    log("MPSCNNNeuronGradient (reLU)", [("dr", dr), ("xn", xn), ("s_relu", s_relu)], [("dxn", dxn)], p, dxn)

    dx = MPSImage(device, desc)
    p = cb.pooled_storage_count()
    linear_grad.encode(cb, dxn, x, s_lin, dx)
    log("MPSCNNNeuronGradient (linear)", [("dxn", dxn), ("x", x), ("s_lin", s_lin)], [("dx", dx)], p, dx)
    t1 = time.perf_counter()

    pool_before_commit = cb.pooled_storage_count()
    cb.commit()
    cb.wait_until_completed()
    t2 = time.perf_counter()
    return Chain(cb, y, dx, steps, t1 - t0, t2 - t1, pool_before_commit, cb.pooled_storage_count())


@dataclass
class Check:
    name: str
    max_abs: float
    scaled: float  # max |got - ref| / (tol * (1 + |ref|)); <= 1 passes

    @property
    def ok(self) -> bool:
        return math.isfinite(self.scaled) and self.scaled <= 1.0


def check_chain(images: np.ndarray, dy: np.ndarray, y: np.ndarray, dx: np.ndarray, fmt: F, activation: str,
                a: float, b: float) -> list[Check]:
    """Compare the chain's results with float64 NumPy, rounding where the chain stores."""
    q = _round_to(fmt)
    u = images.astype(np.float64)[..., None] / 255.0
    xn = q(a * u + b)
    r = q(np.where(xn >= 0, xn, 0.0))
    f, fprime = _activation_numpy(activation, r)
    y_ref = q(f)
    dr = q(dy.astype(np.float64) * fprime)
    dxn = q(dr * np.where(xn >= 0, 1.0, 0.0))
    dx_ref = q(dxn * a)
    tol = TOLERANCE[fmt]
    out = []
    for name, got, ref in (("y", y, y_ref), ("dx", dx, dx_ref)):
        err = np.abs(got.astype(np.float64) - ref)
        if not np.all(np.isfinite(got)):
            out.append(Check(name, math.inf, math.inf))
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = np.where(err == 0.0, 0.0, err / (tol * (1.0 + np.abs(ref))))
        out.append(Check(name, float(err.max(initial=0.0)), float(scaled.max(initial=0.0))))
    return out


# -- the demo subcommand ------------------------------------------------------------------------------
def demo(args: argparse.Namespace) -> int:
    device = Device(args.device) if args.device is not None else default_device()
    fmt = FORMATS[args.format]
    n = args.count
    say = print

    t = time.perf_counter()
    images, labels = load_mnist("test", limit=n)
    load_ms = (time.perf_counter() - t) * 1e3

    # the input: raw MNIST bytes into a unorm8 image of n images (values k/255)
    x = MPSImage(device, MPSImageDescriptor(channel_format=F.unorm8, width=SIDE, height=SIDE, feature_channels=1, number_of_images=n))
    x.label = "mnist"
    raw = images.tobytes()
    x.write_bytes(raw, HWC, 0, region=_region(n), bytes_per_row=SIDE, bytes_per_image=SIDE * SIDE)

    # the upstream gradient dL/dy: standard normal, stored in the chain's format
    rng = np.random.default_rng(args.seed)
    dy = MPSImage(device, MPSImageDescriptor(channel_format=fmt, width=SIDE, height=SIDE, feature_channels=1, number_of_images=n))
    host = np.float16 if fmt == F.float16 else np.float32
    dy.write_bytes(rng.standard_normal((n, SIDE, SIDE, 1)).astype(host), HWC, 0, region=_region(n))

    warmups = 1 if device.is_cuda else 0
    for _ in range(warmups):  # first CUDA use pays for context set-up and kernel loading
        run_chain(device, x, dy, fmt, args.activation)
    chain = run_chain(device, x, dy, fmt, args.activation)

    y = chain.y.read_bytes(HWC, 0, region=_region(n))
    dx = chain.dx.read_bytes(HWC, 0, region=_region(n))
    dy_host = dy.read_bytes(HWC, 0, region=_region(n))
    lin_a, lin_b = float(np.float32(1.0 / MNIST_STD)), float(np.float32(-MNIST_MEAN / MNIST_STD))
    checks = check_chain(images, dy_host, y, dx, fmt, args.activation, lin_a, lin_b)
    ok = all(c.ok for c in checks)

    # -- report -------------------------------------------------------------------------------------
    act_name = "GeLU" if args.activation == "gelu" else "sigmoid"
    shown = " ".join(str(v) for v in labels[:10]) + (" ..." if n > 10 else "")
    say(f"mpsnn {__version__} demo: MNIST digits through MPSCNN neurons, forward and gradient, on one command buffer")
    where = f"{device.torch_device}, " if device.is_cuda else f"{torch.get_num_threads()} threads, "
    say(f"  device      {device.name} ({where}torch {torch.__version__})")
    say(f"  data        {n} MNIST test digits, labels {shown}  (loaded in {load_ms:.1f} ms)")
    say(f"  input       x: MPSImage {n}x{SIDE}x{SIDE}x1 unorm8 <- write_bytes({len(raw)} raw bytes, "
        f"bytes_per_row={SIDE}, bytes_per_image={SIDE * SIDE})")
    say(f"  upstream    dy: MPSImage {n}x{SIDE}x{SIDE}x1 {fmt.name} <- write_bytes(N(0,1) values, seed {args.seed})")
    say(f"  format      {fmt.name} for every image the chain writes; all images {n}x{SIDE}x{SIDE}x1 (NxHxWxC); * = temporary")
    say("")
    say(f"  encoded ({len(chain.steps)} kernels{f', after {warmups} warm-up pass' if warmups else ''}):")
    w_k = max(len(s.kernel) for s in chain.steps)
    w_r = max(len(s.reads) for s in chain.steps)
    w_w = max(len(s.writes) for s in chain.steps)
    say(f"    #  {'kernel'.ljust(w_k)}  {'reads'.ljust(w_r)}    {'writes'.ljust(w_w)}  pool  read counts after the encode")
    for i, s in enumerate(chain.steps, 1):
        say(f"    {i}  {s.kernel.ljust(w_k)}  {s.reads.ljust(w_r)} -> {s.writes.ljust(w_w)}  {s.pool:>4}  {s.counts}")
    say("    (pool = cb.pooled_storage_count() after the encode; recycled = storage taken from the pool, freed = given back)")
    say(f"  pool        {chain.pool_before_commit} blocks before commit, {chain.pool_after_completion} after completion "
        f"(status {chain.command_buffer.status.name})")
    if device.is_cuda:
        note = "encode only enqueues on the CUDA stream; the wait covers the GPU work"
    else:
        note = "CPU: kernels run inside encode"
    say(f"  timing      encode {chain.encode_s * 1e3:.2f} ms on the host, commit -> completed {chain.complete_s * 1e3:.2f} ms ({note})")
    say("")
    say(f"  check vs NumPy (float64 math, rounded to {fmt.name} where the chain stores an image; "
        f"tolerance {TOLERANCE[fmt]:.2g} * (1 + |ref|)):")
    what = {"y": f"y  = {act_name}(ReLU((x - {MNIST_MEAN}) / {MNIST_STD}))",
            "dx": f"dx = dy * {act_name}'(r) * ReLU'(xn) / {MNIST_STD}"}
    w_c = max(len(v) for v in what.values())
    for c in checks:
        say(f"    {what[c.name].ljust(w_c)}  max abs error {c.max_abs:.3g}  ({c.scaled:.2f} of tolerance)  {'ok' if c.ok else 'FAILED'}")
    say("")
    say(f"  digit 0 (label {labels[0]}):")
    panels = [("before: x (unorm8)", images[0]), (f"after: y = {act_name}(...)", y[0]), ("|dx| (0 where ReLU' is 0)", np.abs(dx[0]))]
    for line in ascii_panels(panels):
        say(line)
    say("")
    say(f"result: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


# -- entry point ------------------------------------------------------------------------------------
COMMANDS = ("train-digits", "demo", "run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpsnn", description="Apple's MPS neural-network API on NVIDIA GPUs and CPUs.")
    parser.add_argument("--version", action="version", version=f"mpsnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train-digits,demo,run}")
    from .models import train_digits
    t = sub.add_parser("train-digits", help="train Apple's MNIST digit classifier through MPSNNGraph (the main job, default)",
                       description="Apple's digit-classifier training sample through the public MPSNNGraph API: train, report the "
                                   "test accuracy, save the weights (safetensors) and a PNG plot of the curves.")
    train_digits.add_arguments(t)
    t.set_defaults(run=train_digits.run)
    d = sub.add_parser("demo", help="run MNIST digits through a chain of MPSCNN kernels and check the result (default)",
                       description="Run real MNIST digits through Linear -> ReLU -> GeLU and the gradient chain on one command buffer, "
                                   "check the results against NumPy and print a report.")
    d.add_argument("--device", default=None, help="'cpu', 'cuda' or 'cuda:N' (default: mpsnn.default_device())")
    d.add_argument("--count", type=_positive_count, default=256, metavar="N", help="number of test digits (default 256)")
    d.add_argument("--format", choices=sorted(FORMATS), default="float32",
                   help="storage format of the images the chain writes (default float32)")
    d.add_argument("--activation", choices=("gelu", "sigmoid"), default="gelu", help="activation after the ReLU (default gelu)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random upstream gradient (default 0)")
    d.set_defaults(run=demo)
    from .io.onnx import run as onnx_run
    r = sub.add_parser("run", help="run an ONNX model on a .npy array or an image and print / save its outputs",
                       description="Load an ONNX model into an MPSNNGraph (mpsnn.io.onnx.load), run it on .npy arrays or images, "
                                   "print every output (top-K classes of classifiers) and optionally save them to .npz.")
    onnx_run.add_arguments(r)
    r.set_defaults(run=onnx_run.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 failed check, 2 error)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0] not in COMMANDS and args_list[0] not in ("-h", "--help", "--version")):
        args_list.insert(0, "train-digits")
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
        return int(args.run(args))
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except MPSError as exc:
        print(f"mpsnn {args_list[0]}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
