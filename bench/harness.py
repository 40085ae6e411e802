"""The issue-8 harness in one command and one process on one GPU: the digit-classifier training
step (``bench_digits.py``), ResNet-50 inference (``bench_resnet.py``) and the ResNet-50 training
step (``bench_resnet_training.py``), each against its peers, then the targets in one table.

    PYTHONPATH=. python3 bench/harness.py [--quick] [--no-compile]

``--quick``: fewer iterations (a smoke run). ``--no-compile`` skips the ``torch.compile``
peers (then the ResNet-50 inference target cannot be judged). Each bench checks its outputs
against PyTorch first and prints its own table; with ``$OUT`` set, each also writes its file
and this one writes ``$OUT/harness.txt`` (everything printed).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys

sys.path.insert(0, "bench")
import bench_digits  # noqa: E402
import bench_resnet  # noqa: E402
import bench_resnet_training  # noqa: E402


class _Tee(io.StringIO):
    def write(self, s: str) -> int:
        sys.__stdout__.write(s)
        sys.__stdout__.flush()
        return super().write(s)


def _run(main, argv: list[str]) -> str:  # type: ignore[no-untyped-def]
    buf = _Tee()
    with contextlib.redirect_stdout(buf):
        main(argv)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args(argv)
    nc = ["--no-compile"] if a.no_compile else []
    text = _run(bench_digits.main, ["--iters", "60" if a.quick else "300", *nc])
    text += _run(bench_resnet.main, ["--iters", "5" if a.quick else "20", *nc])
    text += _run(bench_resnet_training.main, ["--iters", "3" if a.quick else "10"])
    rows: list[tuple[str, str, str]] = []
    for batch, ratio in re.findall(r"batch (\d+)\s+ms/step.*?fastest peer / mpsnn captured: ([\d.]+)x", text, re.S):
        rows.append((f"digit classifier training step, batch {batch}, fp32 (vs fastest peer)", ratio, ">= 1.2"))
    m = re.search(r"torch\.compile default\s+[\d.]+\s+\d+\s+([\d.]+)x", text)
    rows.append(("ResNet-50 inference, batch 256, bf16 (vs torch.compile)", m.group(1) if m else "not run", ">= 1.15"))
    m = re.search(r"torch eager autocast / mpsnn captured: ([\d.]+)x", text)
    rows.append(("ResNet-50 training step, batch 256, bf16 (vs torch eager autocast)", m.group(1) if m else "not run", ">= 1.25"))
    summary = ["", f"{'target':<72}{'mpsnn speed-up':>16}{'goal':>9}"]
    summary += [f"  {name:<70}{ratio + ('x' if ratio[0].isdigit() else ''):>16}{goal:>9}" for name, ratio, goal in rows]
    print("\n".join(summary))
    dest = os.environ.get("OUT")
    if dest:
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, "harness.txt"), "w") as f:
            f.write(text + "\n".join(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
