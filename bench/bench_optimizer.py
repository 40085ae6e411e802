"""One Adam step over ResNet-50's parameters (161 float32 tensors, 25.6 M values): mpsnn's
``MPSNNOptimizerAdam`` through the public API against ``torch.optim.Adam(fused=True)`` on the
same tensors, eager and captured in a CUDA graph.

    PYTHONPATH=. python3 bench/bench_optimizer.py

mpsnn runs as Apple's training sample does: one ``MPSNNOptimizerAdam`` per parameter (the
sample gives every layer's data source its own), one ``encode`` per parameter in the vector
form, then ``commit``; the encodes queue on the command buffer and launch as one
multi-tensor kernel (plus one tiny launch for the step counts). torch runs
``optimizer.step()`` with ``fused=True`` (and ``capturable=True`` for the graph rows).

Rows: ``eager`` times back-to-back steps with CUDA events (host time included where it is
the bottleneck) and reports the host time per step separately; ``graph`` captures one step
and times replays (GPU time only). Bytes: every step reads value, gradient, m, v and writes
value, m, v (28 bytes per parameter); "copy" is ``dst.copy_(src)`` of 1 GB. After the timed
steps both sides have run the same number of steps from the same state; the values are
compared (Apple's Adam puts epsilon outside the bias-corrected root, torch inside: with
epsilon 1e-8 the difference is far below the printed error).

Target (issue 6): mpsnn no slower than torch's fused Adam. Results go to stdout and, when
``$OUT`` is set, to ``$OUT/bench_optimizer.txt``.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

import mpsnn as m

REPS, INNER = 9, 10


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's ResNet-50 (v1.5), in its parameter order."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for blocks, width in ((3, 64), (4, 128), (6, 256), (3, 512)):
        out = 4 * width
        for b in range(blocks):
            shapes += [(width, cin, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, cin, 1, 1), (out,), (out,)]
            cin = out
    return shapes + [(1000, 2048), (1000,)]


def cuda_ms(fn: Callable[[], object]) -> float:
    samples = []
    for r in range(REPS + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(INNER):
            fn()
        b.record()
        torch.cuda.synchronize()
        if r >= 2:
            samples.append(a.elapsed_time(b) / INNER)
    return statistics.median(samples)


def copy_bandwidth() -> float:
    """GB/s of ``dst.copy_(src)`` on 1 GB (read + write)."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / cuda_ms(lambda: dst.copy_(src)) / 1e6


def host_ms(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(INNER):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / INNER


def graph_of(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_optimizer: needs a CUDA device", file=sys.stderr)
        return 2
    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = resnet50_shapes()
    n_params = sum(torch.Size(s).numel() for s in shapes)
    nbytes = 28 * n_params
    copy_bw = copy_bandwidth()
    out(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  ResNet-50: {len(shapes)} tensors, {n_params / 1e6:.2f} M "
        f"parameters, {nbytes / 1e6:.0f} MB moved per step")
    out(f"copy bandwidth (1 GB, read + write): {copy_bw:.0f} GB/s")
    lr, eps = 1e-3, 1e-8
    init = [torch.randn(s, device="cuda", generator=gen) * 0.05 for s in shapes]
    grads = [torch.randn(s, device="cuda", generator=gen) * 1e-2 for s in shapes]

    dev = m.Device("cuda")
    queue = dev.make_command_queue()
    mine = [t.clone() for t in init]
    moments = [torch.zeros_like(t) for t in init]
    velocities = [torch.zeros_like(t) for t in init]
    adams = [m.MPSNNOptimizerAdam(dev, beta1=0.9, beta2=0.999, epsilon=eps, time_step=0,
                                  optimizer_descriptor=m.MPSNNOptimizerDescriptor(lr, 1.0)) for _ in shapes]

    def mine_step() -> None:
        cb = queue.make_command_buffer()
        for opt, v, g, mm, vv in zip(adams, mine, grads, moments, velocities):
            opt.encode(cb, input_gradient_vector=g, input_values_vector=v, input_momentum_vector=mm, input_velocity_vector=vv,
                       result_values_vector=v)
        cb.commit()

    def mine_captured_step() -> None:       # the same encodes; the graph records the launch
        cb = queue.make_command_buffer()
        for opt, v, g, mm, vv in zip(adams, mine, grads, moments, velocities):
            opt.encode(cb, input_gradient_vector=g, input_values_vector=v, input_momentum_vector=mm, input_velocity_vector=vv,
                       result_values_vector=v)
        cb.flush_deferred()

    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    for p, g in zip(theirs, grads):
        p.grad = g
    torch_opt = torch.optim.Adam(theirs, lr=lr, eps=eps, fused=True)
    theirs_c = [torch.nn.Parameter(t.clone()) for t in init]
    for p, g in zip(theirs_c, grads):
        p.grad = g
    torch_opt_c = torch.optim.Adam(theirs_c, lr=torch.tensor(lr, device="cuda"), eps=eps, fused=True, capturable=True)

    head = f"{'Adam step, ResNet-50 params':<34} | {'mpsnn ms':>9}{'GB/s':>7}{'%copy':>7} | {'torch ms':>9}{'GB/s':>7}{'%copy':>7} | {'speed-up':>8}"
    out(head)
    out("-" * len(head))

    def row(name: str, t_m: float, t_p: float) -> None:
        bm, bp = nbytes / t_m / 1e6, nbytes / t_p / 1e6
        out(f"{name:<34} | {t_m:>9.3f}{bm:>7.0f}{100 * bm / copy_bw:>6.1f}% | {t_p:>9.3f}{bp:>7.0f}{100 * bp / copy_bw:>6.1f}% | "
            f"{t_p / t_m:>7.2f}x")

    steps = 0
    mine_step()
    torch_opt.step()
    steps += 1
    row("eager (CUDA events)", cuda_ms(mine_step), cuda_ms(torch_opt.step))
    steps += (REPS + 2) * INNER
    hm, hp = host_ms(mine_step), host_ms(torch_opt.step)
    steps += INNER
    out(f"{'  host time per step':<34} | {hm:>9.3f}{'':>14} | {hp:>9.3f}{'':>14} |")
    g_mine = graph_of(mine_captured_step)
    g_theirs = graph_of(torch_opt_c.step)
    row("CUDA graph replay", cuda_ms(g_mine.replay), cuda_ms(g_theirs.replay))
    torch.cuda.synchronize()
    # the eager torch optimizer ran `steps` steps; mpsnn ran `steps` eager steps, 3 warm-up
    # encodes before capture and the replays: compare against a torch optimizer run the same count
    total = steps + 3 + (REPS + 2) * INNER
    check = [torch.nn.Parameter(t.clone()) for t in init]
    for p, g in zip(check, grads):
        p.grad = g
    check_opt = torch.optim.Adam(check, lr=lr, eps=eps, fused=True)
    for _ in range(total):
        check_opt.step()
    num = sum(float(torch.linalg.vector_norm((a - b.detach()).double()) ** 2) for a, b in zip(mine, check)) ** 0.5
    den = sum(float(torch.linalg.vector_norm((b.detach() - i).double()) ** 2) for b, i in zip(check, init)) ** 0.5
    out("-" * len(head))
    out(f"after {total} steps: |mpsnn - torch| / |torch update| = {num / den:.1e}; Adam time_step {adams[0].time_step} (host encodes), "
        f"{float(adams[0].time_step_tensor()):.0f} (device steps)")
    dest = os.environ.get("OUT")
    if dest:
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, "bench_optimizer.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
