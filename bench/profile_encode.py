"""Where does the host time of one encode go? Profiles repeated forward and gradient encodes
of a small (host-bound) convolution with cProfile and prints the top entries, next to the
host time of the equivalent torch calls. Run on the device machine:

    PYTHONPATH=. python3 bench/profile_encode.py [--device cuda] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

import mpsnn as m


def per_call_us(fn, n: int, sync) -> float:
    best = float("inf")
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)  # host issue time (the GPU runs behind)
        sync()
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--calls", type=int, default=2000)
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    dev = m.Device(a.device)
    tdev = dev.torch_device
    sync = torch.cuda.synchronize if dev.is_cuda else (lambda: None)
    c = 64
    desc = m.MPSCNNConvolutionDescriptor(kernel_width=3, kernel_height=3, input_feature_channels=c, output_feature_channels=c)
    w = torch.randn(c, 3, 3, c)
    ds = m.ConvolutionDataSource(desc, weights=w)
    conv, grad = m.MPSCNNConvolution(dev, weights=ds), m.MPSCNNConvolutionGradient(dev, weights=ds)
    x = m.MPSImage.from_torch(torch.randn(2, 8, 8, c, device=tdev, dtype=dt))
    y = m.MPSImage.from_torch(torch.empty(2, 8, 8, c, device=tdev, dtype=dt))
    dy = m.MPSImage.from_torch(torch.randn(2, 8, 8, c, device=tdev, dtype=dt))
    dx = m.MPSImage.from_torch(torch.empty(2, 8, 8, c, device=tdev, dtype=dt))
    cb = dev.make_command_queue().make_command_buffer()
    st = conv.result_state(x, None, y)
    wt = w.permute(0, 3, 1, 2).to(tdev, dt).contiguous(memory_format=torch.channels_last)
    xn, dyn = x.tensor.permute(0, 3, 1, 2), dy.tensor.permute(0, 3, 1, 2)

    def torch_fwd() -> None:
        F.conv2d(xn, wt, None, 1, 1)

    def torch_bwd() -> None:
        torch.ops.aten.convolution_backward(dyn, xn, wt, [c], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, True])

    def fwd() -> None:
        conv.encode(cb, x, y)

    def bwd() -> None:
        grad.encode(cb, dy, x, st, dx)

    def auto() -> None:
        conv.encode(cb, x)

    for f in (torch_fwd, torch_bwd, fwd, bwd, auto):
        for _ in range(50):
            f()
    print(f"device {dev.name}, {a.dtype}, 2x8x8x{c} 3x3 convolution (host-bound on purpose)")
    for name, f in (("torch conv2d", torch_fwd), ("torch convolution_backward", torch_bwd), ("mpsnn forward (explicit)", fwd),
                    ("mpsnn forward (auto)", auto), ("mpsnn gradient (explicit)", bwd)):
        print(f"  {name:30s} {per_call_us(f, a.calls, sync):8.1f} us per call (host)")
    for name, f in (("forward (explicit)", fwd), ("gradient (explicit)", bwd)):
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(a.calls):
            f()
        pr.disable()
        sync()
        print(f"\n--- cProfile, mpsnn {name}, {a.calls} calls (tottime order) ---")
        pstats.Stats(pr).sort_stats("tottime").print_stats(16)
    cb.commit()
    cb.wait_until_completed()


if __name__ == "__main__":
    main()
