"""Where does the time of a ResNet-50 gradient pass go? The 53 convolution gradients in
reverse network order (batch 256 by default, bfloat16, channels-last), as raw torch calls in
variants: torch's ``convolution_backward`` (data + weights, and + bias), the sequence mpsnn's
gradient plans issue (stride-1 data gradient as a cuDNN forward correlation into the
destination, weight gradient, stride-2 data gradient copied into the destination, dW stored
as float32, bias gradient through ``dispatch.column_sum``), the bias gradient on a side
stream, and the same without the bias gradient / the copies / the dW store. Then the pieces
alone. Times: CUDA events around one sequence, median of 7.

    PYTHONPATH=. python3 bench/gradient_breakdown.py [batch]
"""
import math
import sys

import torch

sys.path.insert(0, "bench")
from bench_convolution import resnet50_convs  # noqa: E402

from mpsnn.backends import dispatch  # noqa: E402
from mpsnn.backends.convolution import _transpose_weights  # noqa: E402

DT = torch.bfloat16
N = int(sys.argv[1]) if len(sys.argv) > 1 else 256
torch.backends.cudnn.benchmark = False
convs = [s for _, s in resnet50_convs()]
cbw = torch.ops.aten.convolution_backward.default
cudnn_out = torch.ops.aten.cudnn_convolution.out
hi = torch.cuda.Stream(priority=-1)
lo = torch.cuda.Stream()
layers = []
for s in convs:
    x = torch.randn(N, s.size, s.size, s.cin, device="cuda", dtype=DT)
    e = torch.randn(N, s.out, s.out, s.cout, device="cuda", dtype=DT)
    w = (torch.randn(s.cout, s.cin, s.k, s.k, device="cuda") / math.sqrt(s.cin * s.k * s.k)).to(DT).contiguous(memory_format=torch.channels_last)
    dx = torch.empty_like(x)
    wf = _transpose_weights(w, 1).contiguous(memory_format=torch.channels_last) if s.stride == 1 else None
    gw = torch.empty(s.cout, s.k, s.k, s.cin, device="cuda")
    gb = torch.empty(s.cout, device="cuda")
    layers.append((s, x, e, w, dx, wf, gw, gb))
print("allocated GB", torch.cuda.memory_allocated() / 1e9, flush=True)

def peer(L, db=False):
    s, x, e, w, dx, wf, gw, gb = L
    cbw(e.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), w, [s.cout] if db else None, [s.stride] * 2, [s.pad] * 2, [1, 1], False, [0, 0], 1, [True, True, db])

def ours(L, db="main", copy=True, store=True):
    s, x, e, w, dx, wf, gw, gb = L
    en, xn = e.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2)
    if db in ("hi", "lo"):
        side = hi if db == "hi" else lo
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dispatch.column_sum(e, out=gb)
    if wf is not None:
        p = s.k - 1 - s.pad
        cudnn_out(en, wf, [p, p], [1, 1], [1, 1], 1, False, False, True, out=dx.permute(0, 3, 1, 2))
        _, dw, _ = cbw(en, xn, w, None, [1, 1], [s.pad] * 2, [1, 1], False, [0, 0], 1, [False, True, False])
    else:
        gi, dw, _ = cbw(en, xn, w, None, [s.stride] * 2, [s.pad] * 2, [1, 1], False, [0, 0], 1, [True, True, False])
        if copy:
            dx.permute(0, 3, 1, 2).copy_(gi)
    if store:
        gw.copy_(dw.permute(0, 2, 3, 1))
    if db == "main":
        dispatch.column_sum(e, out=gb)
    elif db in ("hi", "lo"):
        torch.cuda.current_stream().wait_stream(hi if db == "hi" else lo)

variants = {
    "peer": lambda L: peer(L),
    "peer+db": lambda L: peer(L, True),
    "ours (db main)": lambda L: ours(L),
    "ours (db hi-prio side)": lambda L: ours(L, "hi"),
    "ours (db side)": lambda L: ours(L, "lo"),
    "ours no db": lambda L: ours(L, None),
    "ours no db no copy": lambda L: ours(L, None, False),
    "ours no db no copy no store": lambda L: ours(L, None, False, False),
}

def timeit(fn, reps=7):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]

rev = layers[::-1]
base = None
print("network order (53 gradients, reverse)")
for name, f in variants.items():
    t = timeit(lambda: [f(L) for L in rev])  # noqa: B023 (called at once)
    base = base or t
    print(f"  {name:32s} {t:8.3f} ms  {t / base:6.3f}", flush=True)
# db alone
t = timeit(lambda: [dispatch.column_sum(L[2], out=L[7]) for L in rev])
print(f"  {'column sums alone':32s} {t:8.3f} ms")
t = timeit(lambda: [L[2].view(-1, L[0].cout).sum(0, dtype=torch.float32) for L in rev])
print(f"  {'torch sums alone':32s} {t:8.3f} ms")
# stride-1 data: fwd correlation vs dgrad
def dg(L):
    s, x, e, w, dx, wf, gw, gb = L
    cbw(e.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), w, None, [s.stride] * 2, [s.pad] * 2, [1, 1], False, [0, 0], 1, [True, False, False])
def fc(L):
    s, x, e, w, dx, wf, gw, gb = L
    if wf is None:
        return dg(L)
    p = s.k - 1 - s.pad
    cudnn_out(e.permute(0, 3, 1, 2), wf, [p, p], [1, 1], [1, 1], 1, False, False, True, out=dx.permute(0, 3, 1, 2))
def wg(L):
    s, x, e, w, dx, wf, gw, gb = L
    cbw(e.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), w, None, [s.stride] * 2, [s.pad] * 2, [1, 1], False, [0, 0], 1, [False, True, False])
for name, f in (("data: dgrad", dg), ("data: fwd corr (s1)", fc), ("weights only", wg)):
    t = timeit(lambda: [f(L) for L in rev])  # noqa: B023 (called at once)
    print(f"  {name:32s} {t:8.3f} ms")
