#!/usr/bin/env python3
"""Run ONNX's backend node tests on mpsnn (the selection and exclusions of
``tests/io/test_onnx_backend.py``) and write ``docs/onnx.md``: how to load a model, the
operator mappings (from the docstrings of ``mpsnn/io/onnx/ops``), the layout and batch rules
(from ``mpsnn/io/onnx/layout.py``), the limitations, and per ONNX operator the number of node
tests selected, passed, failed and excluded (with the reasons).

Usage (from the repository root; about 10 s on two cores)::

    PYTHONPATH=. python3 scripts/onnx_backend_report.py [--output docs/onnx.md]

Exit status 1 when a selected test that is not excluded fails (the page is written anyway).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import re
import sys
import unittest
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "tests" / "io" / "test_onnx_backend.py"
REGENERATE = "PYTHONPATH=. python3 scripts/onnx_backend_report.py"


# -- running the suite -------------------------------------------------------------------------------------
def load_suite() -> Any:
    """The test module (it builds the runner with the selection and exclusions on import)."""
    spec = importlib.util.spec_from_file_location("test_onnx_backend", SUITE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["test_onnx_backend"] = module
    spec.loader.exec_module(module)
    return module


def first_error_line(text: str) -> str:
    """The exception line of a formatted traceback (the last ``Name: message`` line)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Failed)\b", ln):
            return ln.strip()
    return lines[-1].strip() if lines else ""


def run(suite: Any) -> dict[str, tuple[str, str]]:
    """name -> (status, detail): PASS, FAIL (the error line) or EXCLUDED (the refusal)."""
    from mpsnn import MPSError
    out: dict[str, tuple[str, str]] = {}
    cases = suite.node_cases()
    for name in suite.SELECTED:
        if suite.exclusion(name) is not None:
            try:
                suite.run_case(cases[name[: -len(suite.DEVICE) - 1]])
                detail = "not refused: the exclusion is no longer needed"
            except MPSError as exc:
                detail = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - reported as is
                detail = f"not refused with an MPSError: {type(exc).__name__}: {exc}"
            out[name] = ("EXCLUDED", detail)
            continue
        result = unittest.TestResult()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            suite.OnnxBackendNodeModelTest(name).run(result)
        problems = result.failures + result.errors
        if problems:
            out[name] = ("FAIL", first_error_line(problems[0][1]))
        elif result.skipped:
            out[name] = ("FAIL", f"skipped: {result.skipped[0][1]}")
        else:
            out[name] = ("PASS", "")
    return out


# -- reST docstrings as Markdown ---------------------------------------------------------------------------
def _roles(text: str) -> str:
    def role(m: re.Match[str]) -> str:
        target = m.group(2)
        if target.startswith("~"):
            target = target[1:].split(".")[-1]
        return f"`{target}`"

    text = re.sub(r":(mod|class|func|meth|data|attr|exc|obj):`([^`]+)`", role, text)
    return re.sub(r"``(.+?)``", r"`\1`", text, flags=re.S)


def rst_to_md(doc: str) -> str:
    """Enough reST for the docstrings of mpsnn.io.onnx: roles, literals, literal blocks
    (``::``) and simple tables as preformatted text; bullets and paragraphs are Markdown
    already."""
    lines = _roles(doc.strip("\n")).splitlines()
    out: list[str] = []
    k = 0
    while k < len(lines):
        ln = lines[k]
        if re.fullmatch(r"\s*=+( +=+)+\s*", ln):
            # a simple table: kept as preformatted text (some align more columns than their
            # borders declare, which no converter could split)
            indent = len(ln) - len(ln.lstrip())
            block = [ln[indent:]]
            k += 1
            while k < len(lines) and lines[k].strip():
                block.append(lines[k][indent:])
                k += 1
            out += ["", "```"] + block + ["```", ""]
            continue
        if ln.rstrip().endswith("::"):
            text = ln.rstrip()[:-1]
            out.append(text if text.strip() != ":" else "")
            k += 1
            code: list[str] = []
            while k < len(lines) and (not lines[k].strip() or lines[k].startswith((" ", "\t"))):
                code.append(lines[k])
                k += 1
            while code and not code[-1].strip():
                code.pop()
            while code and not code[0].strip():
                code.pop(0)
            width = min((len(c) - len(c.lstrip()) for c in code if c.strip()), default=0)
            out += ["", "```"] + [c[width:] for c in code] + ["```", ""]
            continue
        out.append(ln)
        k += 1
    return "\n".join(out).replace("\n\n\n", "\n\n").strip()


# -- the page ----------------------------------------------------------------------------------------------
USAGE = """\
## Loading a model

`onnx` and `onnxruntime` are the optional extra `onnx` (`pip install 'mpsnn[onnx]'`; the
`test` extra has them too).

```python
import numpy as np
from mpsnn.io import onnx as mo

graph = mo.load("model.onnx")                    # path, bytes or onnx.ModelProto -> ONNXGraph (an MPSNNGraph)
print(graph.input_names, graph.output_names)     # the ONNX names; graph.opset is the model's opset
out = graph.predict({"input": np.random.rand(2, 3, 224, 224).astype(np.float32)})
print(out["output"].shape)                       # NumPy arrays in the ONNX shapes and element types
```

* `mo.load(path_or_model, device=None, format=None)`: `device` is an mpsnn device or a string
  (`"cpu"`, `"cuda"`; default: CUDA when usable), `format` the graph's image format
  (`"float32"`, the default, `"float16"` or `"bfloat16"`). Opsets 7 to the newest the installed
  `onnx` knows (the issue asks for 9; 7 and 8 are the ONNX model zoo's classic CNNs, tested
  with torch exports at those opsets). Every unsupported operator or attribute value is reported in one `MPSError`,
  with the node names, before any work is done.
* `ONNXGraph.predict(inputs)` takes a dict by input name (or a list in `input_names` order) of
  NumPy arrays and returns every output by name. The graph is an ordinary `MPSNNGraph`:
  `images_from_arrays` / `encode` / `arrays_from_images` run it on MPS images and command buffers.
* The CLI: `mpsnn run MODEL.onnx --input FILE.npy|IMAGE.png [--device ...] [--format ...]
  [--output OUT.npz] [--top K]` prints every output (the top-5 classes of classifiers);
  `mpsnn run --help` lists the image preprocessing options.
* As an ONNX backend (`onnx.backend.base.Backend`): `from mpsnn.io.onnx import backend;
  rep = backend.prepare(model, "CPU"); outputs = rep.run([x])`. Graph inputs that an operator
  needs as constants (weights, shapes, axes, ...) are bound at `run` (see
  `mpsnn/io/onnx/backend.py`); that is how the node tests below run.
"""

GENERAL_LIMITS = [
    "Tensors of rank 1 to 4 (one NHWC image each); scalars and zero-size tensors only as constants folded at load time.",
    "Dimension 0 of an image tensor is the batch: nothing moves data across images (reductions, Concat, Slice, "
    "broadcasting of computed operands over dimension 0; a Reshape or Transpose that mixes dimension 0 runs only for the "
    "declared batch).",
    "Weights, shapes, axes, pads, scales, Clip bounds and Pow exponents must be constants (initializers or folded at load time).",
    "Integer tensors are computed as real numbers in the graph format and rounded back: exact in float32 up to 2**24; "
    "integer Div is refused.",
    "Operators folded only on constants (Shape arithmetic: Cast, Gather, Range, Expand, Equal, Where, Less, Min, Max, ...) "
    "cannot compute on image tensors.",
]


def counts_table(suite: Any, results: dict[str, tuple[str, str]]) -> list[str]:
    rows = ["| ONNX operator | selected | passed | failed | excluded | excluded because |", "|---|---:|---:|---:|---:|---|"]
    totals = [0, 0, 0, 0]
    for op in sorted(suite.OPS):
        names = [n for n in suite.SELECTED if suite.op_of(n) == op]
        status = [results[n][0] for n in names]
        c = [len(names), status.count("PASS"), status.count("FAIL"), status.count("EXCLUDED")]
        totals = [a + b for a, b in zip(totals, c)]
        reasons: dict[str, int] = {}
        for n in names:
            why = suite.exclusion(n)
            if why is not None:
                reasons[why] = reasons.get(why, 0) + 1
        because = "; ".join(f"{why} ({k})" for why, k in reasons.items())
        rows.append(f"| {op} | {c[0]} | {c[1]} | {c[2]} | {c[3]} | {because} |")
    rows.append(f"| **all** | **{totals[0]}** | **{totals[1]}** | **{totals[2]}** | **{totals[3]}** | |")
    return rows


def page(suite: Any, results: dict[str, tuple[str, str]]) -> str:
    import onnx

    from mpsnn.io.onnx import importer, layout
    from mpsnn.io.onnx.ops import composite, convolution, elementwise, pooling, resize, shape

    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    failed = sorted(n for n, (s, _) in results.items() if s == "FAIL")
    excluded = sorted(n for n, (s, _) in results.items() if s == "EXCLUDED")
    stale = [n for n in excluded if not results[n][1].startswith("MPS")]
    out: list[str] = [
        "# ONNX import (`mpsnn.io.onnx`)",
        "",
        f"<!-- generated by scripts/onnx_backend_report.py on {today}; regenerate: {REGENERATE} -->",
        "",
        USAGE,
        "## Operator mappings",
        "",
        "From the docstrings of `mpsnn/io/onnx/ops/*.py` (the source of truth).",
        "",
    ]
    for title, module in (("Element-wise operators", elementwise), ("Layers with weights", convolution),
                          ("Pooling and reductions", pooling), ("Data movement", shape), ("Resampling and slicing", resize),
                          ("Composite operators", composite)):
        out += [f"### {title} (`{module.__name__.split('.')[-1]}.py`)", "", rst_to_md(module.__doc__ or ""), ""]
    out += ["### Folded at load time (`importer.py`)", "", rst_to_md(importer.__doc__ or ""), "",
            "## Layout and batch rules (`layout.py`)", "", rst_to_md(layout.__doc__ or ""), "",
            "## Limitations", ""]
    out += [f"* {x}" for x in GENERAL_LIMITS]
    out += ["", "Variants the node tests exercise that mpsnn refuses (each is an `MPSError` at load or run time):", ""]
    out += [f"* {why}" for why in dict.fromkeys(suite.EXCLUDE.values())]
    out += [
        "",
        "## Conformance: ONNX backend node tests",
        "",
        f"onnx {onnx.__version__} (opsets up to {onnx.defs.onnx_opset_version()}), run {today} on the CPU "
        f"(the `_cpu` variants) by `tests/io/test_onnx_backend.py` (CI) and this page's generator:",
        "",
        "```",
        REGENERATE,
        "```",
        "",
        "Each node test is a one-operator model (or the operator's function expansion, `*_expanded`) "
        "checked against the outputs of ONNX's reference implementation with the test's tolerances "
        "(rtol 1e-3, atol 1e-7 by default), dtypes and shapes. Graph inputs that mpsnn needs as constants "
        "(weights, shapes, axes, ...) are bound as initializers by the backend. *selected*: the operator's "
        "node tests; *excluded*: they run into a documented limitation (listed per test below; CI checks "
        "that each is still refused with an `MPSError`).",
        "",
    ]
    out += counts_table(suite, results)
    out += [""]
    if failed:
        out += ["### Failing tests", ""] + [f"* `{n}`: {results[n][1]}" for n in failed] + [""]
    if stale:
        out += ["### Exclusions to review", ""] + [f"* `{n}`: {results[n][1]}" for n in stale] + [""]
    out += ["### Excluded tests", "", "<details><summary>each excluded test and mpsnn's refusal</summary>", ""]
    for why in dict.fromkeys(suite.EXCLUDE.values()):
        names = [n for n in excluded if suite.exclusion(n) == why]
        if names:
            out += [f"**{why}**", ""] + [f"* `{n}`: {_short(results[n][1])}" for n in names] + [""]
    out += ["</details>", ""]
    return "\n".join(out)


def _short(text: str, limit: int = 240) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default=str(ROOT / "docs" / "onnx.md"), help="where to write the page (default: docs/onnx.md)")
    args = ap.parse_args(argv)
    suite = load_suite()
    results = run(suite)
    Path(args.output).write_text(page(suite, results), encoding="utf-8")
    status = [s for s, _ in results.values()]
    print(f"{len(results)} selected: {status.count('PASS')} passed, {status.count('FAIL')} failed, "
          f"{status.count('EXCLUDED')} excluded -> {args.output}")
    return 1 if "FAIL" in status else 0


if __name__ == "__main__":
    sys.exit(main())
