"""ResNet-50 v1.5 inference (``mpsnn.models.resnet``) against PyTorch on the same weights, in one
process on one GPU: mpsnn (eager encodes and ``use_cuda_graph`` replays) against torch eager
(channels-last) and ``torch.compile`` (default mode), bfloat16 (or ``--format float16``).

    PYTHONPATH=. python3 bench/bench_resnet.py [--batch 256] [--size 224] [--iters 20] [--no-compile]

The torch model is torchvision's resnet50 written out here (torchvision is not needed), in
eval mode, its weights the random state dict the mpsnn graph is built from. The outputs of one
batch are compared first (logits, error relative to their largest magnitude). Times: wall
time per batch over ``--iters`` back-to-back batches after warm-up, one synchronisation at the
end; images per second and the ratio to mpsnn's captured time. Results go to stdout and, with
``$OUT`` set, to ``$OUT/bench_resnet.txt``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mpsnn as m
from mpsnn.models.resnet import BLOCKS, WIDTHS, build_resnet50, random_resnet50_state

sys.path.insert(0, "bench")
from bench_digits import _save, timed  # noqa: E402


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, down: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width * 4, 1, bias=False), nn.BatchNorm2d(width * 4)
        self.downsample = nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4)) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        cin = 64
        for s, (blocks, width) in enumerate(zip(BLOCKS, WIDTHS), start=1):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(cin, width, 2 if b == 0 and s > 1 else 1, b == 0))
                cin = width * 4
            setattr(self, f"layer{s}", nn.Sequential(*layer))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for s in range(1, 5):
            y = getattr(self, f"layer{s}")(y)
        return self.fc(y.mean((2, 3)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--format", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_resnet: needs a CUDA device", file=sys.stderr)
        return 2
    lines: list[str] = []

    def out(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    dt = getattr(torch, a.format)
    fmt = getattr(m.MPSImageFeatureChannelFormat, a.format)
    dev = m.Device("cuda")
    state = random_resnet50_state(0)
    model = ResNet50().cuda().eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    model = model.to(dt).to(memory_format=torch.channels_last)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(a.batch, a.size, a.size, 3, device="cuda", generator=g).to(dt)          # NHWC
    xt = x.permute(0, 3, 1, 2)                                                               # channels-last NCHW view
    out(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  ResNet-50 v1.5 inference  batch {a.batch}  "
        f"{a.size}x{a.size}  {a.format}")

    graph = build_resnet50(dev, state, size=a.size, graph_format=fmt)
    image = m.MPSImage.from_torch(x)
    queue = dev.make_command_queue()

    def mine() -> Any:
        cb = queue.make_command_buffer()
        r = graph.encode(cb, [image])
        cb.commit()
        return r

    with torch.no_grad():
        ref = model(xt).float()
    got = mine().tensor.reshape(a.batch, -1).float()
    torch.cuda.synchronize()
    err = float((got - ref).abs().max() / ref.abs().max())
    out(f"logits: max |mpsnn - torch| / max |torch| = {err:.2e} (top-1 agreement {float((got.argmax(1) == ref.argmax(1)).float().mean()):.3f})")
    rows = [("mpsnn eager encodes", timed(lambda _k: mine(), a.iters, warm=3))]
    graph.use_cuda_graph = True
    rows.append(("mpsnn use_cuda_graph", timed(lambda _k: mine(), a.iters, warm=3)))
    with torch.no_grad():
        rows.append(("torch eager (channels-last)", timed(lambda _k: model(xt), a.iters, warm=3)))
        if not a.no_compile:
            cm = torch.compile(model)
            rows.append(("torch.compile default", timed(lambda _k: cm(xt), a.iters, warm=5)))
    mine_t = dict(rows)["mpsnn use_cuda_graph"]
    out(f"{'':<32}{'ms/batch':>10}{'img/s':>10}{'vs mpsnn captured':>20}")
    for name, t in rows:
        out(f"  {name:<30}{t:>10.2f}{a.batch / t * 1e3:>10.0f}{t / mine_t:>19.2f}x")
    _save(lines, "bench_resnet.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
