"""Apple's digit-classifier training step (``mpsnn.models.digits``) against its peers, in one
process on one GPU: mpsnn (eager encodes, and ``use_cuda_graph`` replays), PyTorch eager
(channels-last), a hand-captured CUDA graph of the eager step, ``torch.compile`` (default and
``reduce-overhead``) and, when JAX and optax are installed, a ``jax.jit`` step with optax Adam.

    PYTHONPATH=. python3 bench/bench_digits.py [--batch 40 64] [--iters 200] [--no-compile]
    PYTHONPATH=. python3 bench/bench_digits.py --device cpu --iters 20 [--rounds 5]

The step: conv 5x5 1->32 + ReLU, max pool 2, conv 5x5 32->64 + ReLU, max pool 2, fully
connected 3136->1024 + ReLU, fully connected 1024->10, softmax cross-entropy (sum x 1/N, the
sample's loss), Adam (lr 1e-3, betas 0.9/0.999, eps 1e-8) on all weights and biases; float32
everywhere, TF32 off on every side. **No dropout** in any peer: mpsnn's dropout draws its mask
from a host seed per encode, which a CUDA-graph replay cannot repeat correctly
(:mod:`mpsnn.graph.capture` refuses it), so the graph is built with ``keep_probability=None``.
No peer computes the gradient of the input digits: the mpsnn training graph is built with
``input_gradient_needed=False`` (``result_image_is_needed`` NO), which prunes it.

Every peer starts from the same weights; one step on the same batch is checked first (loss and
updated weights against the eager torch step, relative error printed; Adam's first step moves
every weight by about ``lr·sign(g)``, so weights whose gradient is at round-off level may move
the other way: the loss is the tight check). The jax step's first loss is checked against
torch's on the same batch and weights; a jax row that disagrees is marked and not counted. Times: each peer runs
``--iters`` steps back to back on batches already on the device (a step copies its batch into
the peer's input buffers), after warm-up; wall time per step with one synchronisation at the
end. Ratios are the fastest peer's time over mpsnn's captured time (> 1: mpsnn faster).
Results go to stdout and, when ``$OUT`` is set, to ``$OUT/bench_digits.txt``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import mpsnn as m
from mpsnn.kernels.loss_labels import MPSCNNLossLabels
from mpsnn.models.digits import build_digits_graphs, make_data_sources

CLASSES, LABEL_CHANNELS = 10, 12


def timed(step: Callable[[int], Any], iters: int, warm: int = 5, sync: Callable[[], Any] | None = None) -> float:
    """Milliseconds per step over ``iters`` back-to-back steps (after ``warm`` steps);
    ``sync`` waits for the device (default: the current CUDA device)."""
    sync = sync or torch.cuda.synchronize
    for k in range(warm):
        step(k)
    sync()
    t0 = time.perf_counter()
    for k in range(iters):
        step(k)
    sync()
    return (time.perf_counter() - t0) * 1e3 / iters


class TorchDigits(torch.nn.Module):
    """The same network in torch, its weights taken from mpsnn's data sources."""

    def __init__(self, ds: list[Any]) -> None:
        super().__init__()
        w = [d.weights_tensor.detach() for d in ds]
        b = [d.biases_tensor.detach() for d in ds]
        # clones: an OHWI tensor permuted to OIHW already is channels-last, and `contiguous`
        # would share its storage with the data source
        self.w1 = torch.nn.Parameter(w[0].permute(0, 3, 1, 2).clone(memory_format=torch.channels_last))
        self.w2 = torch.nn.Parameter(w[1].permute(0, 3, 1, 2).clone(memory_format=torch.channels_last))
        # a fully connected layer's weights are [Cout][width][height][Cin] (convolution.md §14):
        # to (h, w, c), the NHWC flatten order
        self.w3 = torch.nn.Parameter(w[2].permute(0, 2, 1, 3).reshape(w[2].shape[0], -1).clone())
        self.w4 = torch.nn.Parameter(w[3].reshape(w[3].shape[0], -1).clone())
        self.b = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in b])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(F.relu(F.conv2d(x, self.w1, self.b[0], padding=2)), 2)
        y = F.max_pool2d(F.relu(F.conv2d(y, self.w2, self.b[1], padding=2)), 2)
        y = F.relu(F.linear(y.permute(0, 2, 3, 1).flatten(1), self.w3, self.b[2]))
        return F.linear(y, self.w4, self.b[3])


def torch_step(model: TorchDigits, opt: torch.optim.Optimizer) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def torch_weights(model: TorchDigits) -> list[torch.Tensor]:
    return [model.w1.permute(0, 2, 3, 1), model.w2.permute(0, 2, 3, 1), model.w3.view(-1, 7, 7, 64).permute(0, 2, 1, 3), model.w4]


class MpsnnDigits:
    """The mpsnn step: one unorm8 batch image and one labels object per image (views of one
    labels image), both refilled in place from the device batch each step."""

    def __init__(self, dev: m.Device, batch: int, captured: bool) -> None:
        self.dev = dev
        self.ds = make_data_sources(dev, init="he", seed=7)
        self.graphs = build_digits_graphs(dev, self.ds, batch, graph_format=m.MPSImageFeatureChannelFormat.float32,
                                          keep_probability=None, input_gradient_needed=False)
        self.graphs.training.use_cuda_graph = captured
        F_ = m.MPSImageFeatureChannelFormat
        self.image = m.MPSImage(dev, m.MPSImageDescriptor(channel_format=F_.unorm8, width=28, height=28, feature_channels=1,
                                                          number_of_images=batch))
        self.images = self.image.batch_representation()
        self.onehot = m.MPSImage(dev, m.MPSImageDescriptor(channel_format=F_.float32, width=1, height=1,
                                                           feature_channels=LABEL_CHANNELS, number_of_images=batch))
        self.labels = [MPSCNNLossLabels(dev, labels_image=v) for v in self.onehot.batch_representation()]
        self.queue = dev.make_command_queue()

    def load(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``x``: float32 NHWC digits in [0, 1] (a unorm8 image stores k/255 as float32)."""
        self.image.tensor.copy_(x.view(self.image.tensor.shape))
        self.onehot.tensor.zero_()
        self.onehot.tensor.view(-1, LABEL_CHANNELS).scatter_(1, y.view(-1, 1), 1.0)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.load(x, y)
        cb = self.queue.make_command_buffer()
        self.graphs.training.encode_batch(cb, [self.images], [self.labels])
        cb.commit()

    def loss(self) -> float:
        return float(sum(lab.loss_image().tensor.sum() for lab in self.labels))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def bench(batch: int, iters: int, compile_: bool, out: Callable[[str], None]) -> None:
    dev = m.Device("cuda")
    steps = 16
    g = torch.Generator(device="cuda").manual_seed(batch)
    xs = torch.randint(0, 256, (steps, batch, 28, 28, 1), dtype=torch.uint8, device="cuda", generator=g)
    ys = torch.randint(0, CLASSES, (steps, batch), device="cuda", generator=g)
    xn = xs.float() / 255                                   # [steps, N, 28, 28, 1]: what a unorm8 image holds
    xf = xn.permute(0, 1, 4, 2, 3)                         # [steps, N, 1, 28, 28] views of the NHWC batches

    def tx(k: int) -> torch.Tensor:
        return xf[k % steps].contiguous(memory_format=torch.channels_last)

    rows: list[tuple[str, float]] = []
    # -- agreement: one step from the same weights on the same batch ------------------------------
    eager_m = MpsnnDigits(dev, batch, False)
    model = TorchDigits(eager_m.ds).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    ref_loss = float(torch_step(model, opt)(tx(0), ys[0]))
    eager_m.step(xn[0], ys[0])
    torch.cuda.synchronize()
    errs = [rel(d.weights_tensor, w) for d, w in zip(eager_m.ds, torch_weights(model))]
    out(f"batch {batch}: one step from the same weights: loss mpsnn {eager_m.loss():.6f} torch {ref_loss:.6f}; "
        f"updated weights max rel err {max(errs):.1e}")

    # -- mpsnn ---------------------------------------------------------------------------------
    rows.append(("mpsnn eager encodes", timed(lambda k: eager_m.step(xn[k % steps], ys[k % steps]), iters)))
    cap_m = MpsnnDigits(dev, batch, True)
    rows.append(("mpsnn use_cuda_graph", timed(lambda k: cap_m.step(xn[k % steps], ys[k % steps]), iters)))

    # -- torch eager ------------------------------------------------------------------------------
    model = TorchDigits(cap_m.ds).cuda()
    with torch.no_grad():
        ref_cap = float(F.cross_entropy(model(tx(0)), ys[0]))       # for the jax check: cap_m's weights now
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    st = torch_step(model, opt)
    rows.append(("torch eager (channels-last)", timed(lambda k: st(tx(k), ys[k % steps]), iters)))

    # -- hand-captured CUDA graph of the eager step ----------------------------------------------------
    model = TorchDigits(cap_m.ds).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True, foreach=True)
    st = torch_step(model, opt)
    sx, sy = tx(0).clone(memory_format=torch.channels_last), ys[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            st(sx, sy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        st(sx, sy)

    def replay(k: int) -> None:
        sx.copy_(tx(k))
        sy.copy_(ys[k % steps])
        graph.replay()
    rows.append(("torch hand-captured CUDA graph", timed(replay, iters)))

    # -- torch.compile -------------------------------------------------------------------------------
    if compile_:
        for mode in ("default", "reduce-overhead"):
            try:
                model = TorchDigits(cap_m.ds).cuda()
                opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=mode == "reduce-overhead", foreach=True)
                cst = torch.compile(torch_step(model, opt), mode=mode)

                def cstep(k: int) -> None:
                    torch.compiler.cudagraph_mark_step_begin()     # a new step: earlier outputs may be overwritten
                    cst(tx(k), ys[k % steps])  # noqa: B023
                rows.append((f"torch.compile {mode}", timed(cstep, iters, warm=10)))
            except Exception as e:  # a peer that cannot run is reported, not fatal
                out(f"torch.compile {mode}: failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")

    # -- jax.jit with optax Adam -----------------------------------------------------------------------
    try:
        import jax  # noqa: F401
        import optax  # noqa: F401
    except ImportError as e:
        out(f"jax.jit: not run ({e})")
    else:
        t, first = jax_step_ms(cap_m.ds, xs, ys, iters)
        agrees = abs(first - ref_cap) <= 1e-4 * max(1.0, abs(ref_cap))
        out(f"batch {batch}: jax.jit first step loss {first:.6f} (torch's on the same batch and weights: {ref_cap:.6f})"
            f"{'' if agrees else ': DISAGREES, the jax row is not counted as a peer'}")
        rows.append(("jax.jit + optax Adam" + ("" if agrees else " (unverified)"), t))

    mine = dict(rows)["mpsnn use_cuda_graph"]
    peers = [(n, t) for n, t in rows if not n.startswith("mpsnn") and not n.endswith("(unverified)")]
    best = min(t for _, t in peers)
    out(f"{'batch ' + str(batch):<34}{'ms/step':>9}{'mpsnn captured speed-up':>26}")
    for name, t in rows:
        out(f"  {name:<32}{t:>9.3f}{t / mine:>25.2f}x")
    out(f"  fastest peer / mpsnn captured: {best / mine:.2f}x (target >= 1.2)")


def bench_cpu(batch: int, iters: int, rounds: int, out: Callable[[str], None]) -> None:
    """The CPU rows: mpsnn's eager encodes against torch eager (NCHW and channels-last), on
    every core torch uses. The peers take turns for ``rounds`` rounds of ``iters`` steps each
    (a shared machine's noise hits all of them alike); each row is its best round."""
    dev = m.Device("cpu")
    steps = 8
    g = torch.Generator().manual_seed(batch)
    xs = torch.randint(0, 256, (steps, batch, 28, 28, 1), dtype=torch.uint8, generator=g)
    ys = torch.randint(0, CLASSES, (steps, batch), generator=g)
    xn = xs.float() / 255
    xf = xn.permute(0, 1, 4, 2, 3)
    mine = MpsnnDigits(dev, batch, False)
    model = TorchDigits(mine.ds)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    ref_loss = float(torch_step(model, opt)(xf[0].contiguous(), ys[0]))
    mine.step(xn[0], ys[0])
    errs = [rel(d.weights_tensor, w) for d, w in zip(mine.ds, torch_weights(model))]
    out(f"batch {batch}: one step from the same weights: loss mpsnn {mine.loss():.6f} torch {ref_loss:.6f}; "
        f"updated weights max rel err {max(errs):.1e}")
    peers: list[tuple[str, Callable[[int], Any]]] = [("mpsnn eager encodes", lambda k: mine.step(xn[k % steps], ys[k % steps]))]
    for name, fmt in (("torch eager (NCHW)", torch.contiguous_format), ("torch eager (channels-last)", torch.channels_last)):
        model = TorchDigits(mine.ds)
        st = torch_step(model, torch.optim.Adam(model.parameters(), lr=1e-3))
        peers.append((name, lambda k, st=st, fmt=fmt: st(xf[k % steps].contiguous(memory_format=fmt), ys[k % steps])))
    best = {name: float("inf") for name, _ in peers}
    for _ in range(rounds):
        for name, step in peers:
            best[name] = min(best[name], timed(step, iters, warm=2, sync=lambda: None))
    t_mine = best["mpsnn eager encodes"]
    fastest = min(t for n, t in best.items() if not n.startswith("mpsnn"))
    out(f"{'batch ' + str(batch) + ' (CPU, ' + str(torch.get_num_threads()) + ' threads)':<34}{'ms/step':>9}{'mpsnn speed-up':>17}")
    for name, t in best.items():
        out(f"  {name:<32}{t:>9.2f}{t / t_mine:>16.2f}x")
    out(f"  fastest torch eager / mpsnn: {fastest / t_mine:.2f}x (target >= 1.0)")


def jax_step_ms(ds: list[Any], xs: torch.Tensor, ys: torch.Tensor, iters: int) -> tuple[float, float]:
    """(ms per step, the first step's loss on batch 0 from ``ds``' weights)."""
    import jax
    import jax.numpy as jnp
    import optax

    jax.config.update("jax_default_matmul_precision", "highest")
    params = {f"w{k}": jnp.asarray((d.weights_tensor.permute(0, 2, 1, 3) if k == 2 else d.weights_tensor).cpu().numpy())
              for k, d in enumerate(ds)}
    params.update({f"b{k}": jnp.asarray(d.biases_tensor.cpu().numpy()) for k, d in enumerate(ds)})

    def net(p: dict[str, Any], x: Any) -> Any:
        dn = ("NHWC", "OHWI", "NHWC")
        y = jax.lax.conv_general_dilated(x, p["w0"], (1, 1), "SAME", dimension_numbers=dn) + p["b0"]
        y = jax.lax.reduce_window(jax.nn.relu(y), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        y = jax.lax.conv_general_dilated(y, p["w1"], (1, 1), "SAME", dimension_numbers=dn) + p["b1"]
        y = jax.lax.reduce_window(jax.nn.relu(y), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        y = jax.nn.relu(y.reshape(y.shape[0], -1) @ p["w2"].reshape(p["w2"].shape[0], -1).T + p["b2"])
        return y @ p["w3"].reshape(p["w3"].shape[0], -1).T + p["b3"]

    opt = optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8)

    @jax.jit
    def step(p: Any, s: Any, x: Any, y: Any) -> Any:
        def loss(q: Any) -> Any:
            return optax.softmax_cross_entropy_with_integer_labels(net(q, x.astype(jnp.float32) / 255), y).mean()
        v, gr = jax.value_and_grad(loss)(p)
        upd, s = opt.update(gr, s, p)
        return optax.apply_updates(p, upd), s, v

    state = opt.init(params)
    xj = jnp.asarray(xs.cpu().numpy())
    yj = jnp.asarray(ys.cpu().numpy())
    n = xj.shape[0]
    first = 0.0
    for k in range(5):
        params, state, v = step(params, state, xj[k % n], yj[k % n])
        if k == 0:
            first = float(v)
    v.block_until_ready()
    t0 = time.perf_counter()
    for k in range(iters):
        params, state, v = step(params, state, xj[k % n], yj[k % n])
    v.block_until_ready()
    return (time.perf_counter() - t0) * 1e3 / iters, first


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[40, 64])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: mpsnn against torch eager on the CPU (--iters steps per round, --rounds rounds)")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    lines: list[str] = []

    def out(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    if a.device == "cpu":
        out(f"CPU ({os.cpu_count()} cores)  torch {torch.__version__}  float32, no dropout")
        for b in a.batch:
            bench_cpu(b, a.iters, a.rounds, out)
        _save(lines, "bench_digits_cpu.txt")
        return 0
    if not torch.cuda.is_available():
        print("bench_digits: needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    out(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  float32, TF32 off, no dropout")
    for b in a.batch:
        bench(b, a.iters, not a.no_compile, out)
    _save(lines, "bench_digits.txt")
    return 0


def _save(lines: list[str], name: str) -> None:
    dest = os.environ.get("OUT")
    if dest:
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, name), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
