"""ResNet-50 v1.5 training step (``mpsnn.models.resnet_training``) against PyTorch eager with
autocast, in one process on one GPU: bfloat16 activations and gradients, float32 weights,
optimizer state, accumulation and loss on both sides; batch norm in training mode; softmax
cross-entropy (mean); SGD with momentum 0.9.

    PYTHONPATH=. python3 bench/bench_resnet_training.py [--batch 256] [--size 224] [--iters 10] [--compile]

The torch model is bench_resnet's torchvision resnet50 (train mode, channels-last, float32
parameters) under ``torch.autocast("cuda", torch.bfloat16)``. Both start from the same random
weights; the first step's loss on the same batch is compared (bfloat16 tolerance). Times: wall
time per step over ``--iters`` back-to-back steps after warm-up (mpsnn: eager encodes and
``use_cuda_graph`` replays), one synchronisation at the end; images per second and the ratio to
mpsnn's captured step. Results go to stdout and, with ``$OUT`` set, to
``$OUT/bench_resnet_training.txt``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F

import mpsnn as m
from mpsnn.kernels.loss_labels import MPSCNNLossLabels
from mpsnn.models.resnet import random_resnet50_state
from mpsnn.models.resnet_training import build_resnet50_training

sys.path.insert(0, "bench")
from bench_digits import _save, timed  # noqa: E402
from bench_resnet import ResNet50  # noqa: E402

LR, MU = 0.01, 0.9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (default mode) of the autocast step")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_resnet_training: needs a CUDA device", file=sys.stderr)
        return 2
    lines: list[str] = []

    def out(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    classes = 1000
    state = random_resnet50_state(0, classes)
    dev = m.Device("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(a.batch, a.size, a.size, 3, device="cuda", generator=g)
    y = torch.randint(0, classes, (a.batch,), device="cuda", generator=g)
    out(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  ResNet-50 v1.5 training step  batch {a.batch}  "
        f"{a.size}x{a.size}  bfloat16 storage, float32 weights and loss, SGD momentum {MU}")

    # -- mpsnn ---------------------------------------------------------------------------------
    tr = build_resnet50_training(dev, a.batch, state, size=a.size, num_classes=classes, learning_rate=LR, momentum=MU)
    image = m.MPSImage.from_torch(x.to(torch.bfloat16))
    images = image.batch_representation()
    onehot = m.MPSImage(dev, m.MPSImageDescriptor(channel_format=m.MPSImageFeatureChannelFormat.float32, width=1, height=1,
                                                  feature_channels=classes, number_of_images=a.batch))
    onehot.tensor.zero_()
    onehot.tensor.view(-1, classes).scatter_(1, y.view(-1, 1), 1.0)
    labels = [MPSCNNLossLabels(dev, labels_image=v) for v in onehot.batch_representation()]
    queue = dev.make_command_queue()

    def mine(_k: int = 0) -> None:
        cb = queue.make_command_buffer()
        tr.graph.encode_batch(cb, [images], [labels])
        cb.commit()

    mine()
    first = float(sum(lab.loss_image().tensor.float().sum() for lab in labels))

    # -- torch ---------------------------------------------------------------------------------
    def torch_model() -> tuple[Any, Any]:
        model = ResNet50(classes).cuda().train()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
        model = model.to(memory_format=torch.channels_last)
        return model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MU, foreach=True)

    model, opt = torch_model()
    xt = x.permute(0, 3, 1, 2)                                                   # channels-last NCHW view

    def step(model: Any, opt: Any) -> Any:
        def run(_k: int = 0) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", torch.bfloat16):
                loss = F.cross_entropy(model(xt).float(), y)
            loss.backward()
            opt.step()
            return loss.detach()
        return run

    eager = step(model, opt)
    ref = float(eager())
    agree = abs(first - ref) / abs(ref)
    out(f"first step loss: mpsnn {first:.5f}  torch autocast {ref:.5f}  (relative difference {agree:.1e})")

    rows = [("mpsnn eager encodes", timed(mine, a.iters, warm=2))]
    tr.graph.use_cuda_graph = True
    rows.append(("mpsnn use_cuda_graph", timed(mine, a.iters, warm=3)))
    rows.append(("torch eager autocast (channels-last)", timed(eager, a.iters, warm=2)))
    if a.compile:
        try:
            cm, copt = torch_model()
            rows.append(("torch.compile default (autocast)", timed(torch.compile(step(cm, copt)), a.iters, warm=3)))
        except Exception as e:  # a peer that cannot run is reported, not fatal
            out(f"torch.compile: failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    mine_t = dict(rows)["mpsnn use_cuda_graph"]
    out(f"{'':<40}{'ms/step':>9}{'img/s':>9}{'vs mpsnn captured':>20}")
    for name, t in rows:
        out(f"  {name:<38}{t:>9.2f}{a.batch / t * 1e3:>9.0f}{t / mine_t:>19.2f}x")
    out(f"  torch eager autocast / mpsnn captured: {dict(rows)['torch eager autocast (channels-last)'] / mine_t:.2f}x (target >= 1.25)")
    _save(lines, "bench_resnet_training.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
