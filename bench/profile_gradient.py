"""GPU time of the pieces of a convolution gradient, for a few ResNet-50 shapes at batch 256
(bfloat16, channels-last): torch's ``convolution_backward`` for data + weights (the peer),
each half alone, the data gradient as a transposed convolution written into a destination
(``torch.cudnn_convolution_transpose(..., out=)``), the weight gradient with and without
the bias gradient, the bias gradient as a reduction, and mpsnn's whole gradient encode.

    PYTHONPATH=. python3 bench/profile_gradient.py
"""
from __future__ import annotations

import math

import torch

import mpsnn as m

DT = torch.bfloat16
SHAPES = [(256, 128, 1, 1, 56), (64, 64, 3, 1, 56), (2048, 512, 1, 1, 7), (128, 128, 3, 2, 56)]  # cin, cout, k, stride, size


def ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def main() -> None:
    dev = m.Device("cuda")
    q = dev.make_command_queue()
    for shape in SHAPES:
        profile_shape(*shape, dev, q)


def profile_shape(cin: int, cout: int, k: int, s: int, size: int, dev: m.Device, q: m.MTLCommandQueue, n: int = 256) -> None:
    cud = torch.backends.cudnn
    p = k // 2
    out = (size + 2 * p - k) // s + 1
    x = torch.randn(n, size, size, cin, device="cuda", dtype=DT)
    dy = torch.randn(n, out, out, cout, device="cuda", dtype=DT)
    w = (torch.randn(cout, cin, k, k, device="cuda") / math.sqrt(cin * k * k)).to(DT).contiguous(memory_format=torch.channels_last)
    xn, dyn = x.permute(0, 3, 1, 2), dy.permute(0, 3, 1, 2)
    dx = torch.empty_like(x)
    op = [size + 2 * p - ((out - 1) * s + k)] * 2
    cb_ = torch.ops.aten.convolution_backward.default
    desc = m.MPSCNNConvolutionDescriptor(kernel_width=k, kernel_height=k, input_feature_channels=cin, output_feature_channels=cout)
    desc.stride_in_pixels_x = desc.stride_in_pixels_y = s
    ds = m.ConvolutionDataSource(desc, weights=w.permute(0, 2, 3, 1).float().contiguous().cpu().numpy())
    conv, grad = m.MPSCNNConvolution(dev, weights=ds), m.MPSCNNConvolutionGradient(dev, weights=ds)
    conv.offset = m.MPSOffset(k // 2 - p, k // 2 - p, 0)
    x_img, dy_img, dx_img = m.MPSImage.from_torch(x), m.MPSImage.from_torch(dy), m.MPSImage.from_torch(dx)
    y_img = m.MPSImage.from_torch(torch.empty(n, out, out, cout, device="cuda", dtype=DT))
    st = conv.result_state(x_img, None, y_img)
    cb = q.make_command_buffer()
    rows = {
        "peer data+weights": lambda: cb_(dyn, xn, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, [True, True, False]),
        "data only": lambda: cb_(dyn, xn, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, [True, False, False]),
        "weights only": lambda: cb_(dyn, xn, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, [False, True, False]),
        "weights + bias": lambda: cb_(dyn, xn, w, [cout], [s, s], [p, p], [1, 1], False, [0, 0], 1, [False, True, True]),
        "transpose into dx": lambda: torch.ops.aten.cudnn_convolution_transpose.out(dyn, w, [p, p], op, [s, s], [1, 1], 1, cud.benchmark,
                                                                                    cud.deterministic, False, out=dx.permute(0, 3, 1, 2)),
        "bias sum (NHWC)": lambda: dy.view(-1, cout).sum(0, dtype=torch.float32),
        "mpsnn gradient": lambda: grad.encode(cb, dy_img, x_img, st, dx_img),
    }
    print(f"{k}x{k}/{s} {cin}->{cout} @{size} (batch {n})")
    for name, fn in rows.items():
        print(f"  {name:22s} {ms(fn):8.3f} ms")
    cb.commit()
    cb.wait_until_completed()


if __name__ == "__main__":
    main()
