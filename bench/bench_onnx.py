"""An imported ONNX CNN on the GPU: ``mpsnn.io.onnx.load`` of a torch-exported ResNet-18
against the same torch model in PyTorch eager (channels-last), in one process.

    PYTHONPATH=. python3 bench/bench_onnx.py [--batch 32] [--size 224] [--iters 30]

The network is torchvision's ResNet-18 topology written out here (torchvision is not needed):
conv 7x7/2 + BN + ReLU, max pool 3x3/2, four stages of two basic blocks (64-512 channels,
stride-2 1x1 downsample convolutions), global average pool, flatten, fully connected 1000;
random weights with BN statistics perturbed (so the folding matters). It is exported with
``torch.onnx.export(dynamo=False, opset 17)`` with a dynamic batch and loaded with
``mpsnn.io.onnx.load`` (batch norm and ReLU fold into the convolutions, the flatten into the
fully connected weights).

Rows: float32 (graph format float32 against the float32 torch model, both without TF32:
mpsnn's convolutions accumulate in float32 unless a node's ``accumulator_precision`` is half,
so torch runs with ``torch.backends.cudnn.allow_tf32 = False``) and float16 (graph format
float16 against ``model.half()``).
Times are wall time per batch over ``--iters`` back-to-back inferences after warm-up, each
mpsnn inference one ``graph.encode`` on a new command buffer plus ``commit`` (the host
encodes while the GPU runs earlier batches), torch's ``model(x)`` under ``no_grad``; one
``torch.cuda.synchronize`` at the end. Also printed: the host time of one encode on an idle
GPU (best of 5), the import time, and the largest difference of the logits relative to their largest magnitude. Results
go to stdout and, when ``$OUT`` is set, to ``$OUT/bench_onnx.txt``.

Not an issue target (issue 9 has none): a record of what an imported graph runs at before the
compiled graph path (issue 8).
"""
from __future__ import annotations

import argparse
import io
import os
import time
import warnings

import numpy as np
import torch
from torch import nn

from mpsnn.io import onnx as mo


class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    m = ResNet18()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.8, 1.2)
            mod.weight.data.uniform_(0.8, 1.2)
            mod.bias.data.uniform_(-0.1, 0.1)
    return m.eval()


def export(model: nn.Module, size: int) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, size, size), f, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return f.getvalue()


def time_loop(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def measure(fmt: str, dtype: torch.dtype, data: bytes, x: np.ndarray, iters: int) -> str:
    """One row: the imported graph in ``fmt`` against the torch model in ``dtype``."""
    batch = x.shape[0]
    t0 = time.perf_counter()
    graph = mo.load(data, device="cuda", format=fmt)
    t_import = time.perf_counter() - t0
    imgs = graph.images_from_arrays({"x": x})
    queue = graph.device.make_command_queue()
    last: list = [None]

    def run_mpsnn() -> None:
        cb = queue.make_command_buffer()
        last[0] = graph.encode(cb, imgs)
        cb.commit()

    ms_mpsnn = time_loop(run_mpsnn, iters)
    host = []
    for _ in range(5):  # one encode on an idle GPU: the host's time alone (never blocked by a full launch queue)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_mpsnn()
        host.append(time.perf_counter() - t0)
    host_ms = min(host) * 1e3
    torch.cuda.synchronize()
    got = last[0].to_torch().float().reshape(batch, -1).cpu().numpy()
    tm = make_model().to("cuda", dtype).to(memory_format=torch.channels_last)
    xt = torch.from_numpy(x).to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # mpsnn's float32 convolutions accumulate in float32 (no TF32)
    try:
        with torch.no_grad():
            ms_torch = time_loop(lambda: tm(xt), iters)
            ref = tm(xt).float().cpu().numpy()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    diff = float(np.abs(got - ref).max() / np.abs(ref).max())
    return (f"{fmt:<9}{ms_mpsnn:>10.2f}{ms_torch:>10.2f}{ms_torch / ms_mpsnn:>8.2f}{batch / ms_mpsnn * 1e3:>13.0f}"
            f"{batch / ms_torch * 1e3:>13.0f}{host_ms:>11.2f}{t_import:>10.2f}{diff:>14.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_onnx: needs a CUDA device")
    model = make_model()
    data = export(model, args.size)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    lines = [f"ResNet-18 (ONNX opset 17, {len(data) / 1e6:.1f} MB) batch {args.batch} x 3 x {args.size} x {args.size} on "
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}",
             f"{'format':<9}{'mpsnn ms':>10}{'torch ms':>10}{'ratio':>8}{'mpsnn img/s':>13}{'torch img/s':>13}"
             f"{'encode ms':>11}{'import s':>10}{'max rel diff':>14}"]
    for fmt, dtype in (("float32", torch.float32), ("float16", torch.float16)):
        lines.append(measure(fmt, dtype, data, x, args.iters))
    text = "\n".join(lines)
    print(text)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_onnx.txt"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
