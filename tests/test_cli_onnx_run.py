"""``mpsnn run MODEL.onnx --input ...`` (mpsnn/io/onnx/run.py): outputs printed and saved, checked
against onnxruntime on the same inputs (for images: the pixels read back independently)."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
mpimg = pytest.importorskip("matplotlib.image")

from onnx import TensorProto, helper  # noqa: E402

from mpsnn import cli  # noqa: E402
from mpsnn.io.onnx import run as onnx_run  # noqa: E402

H, W = 6, 5
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _export(model: nn.Module, x: torch.Tensor, path: Path, outputs: tuple[str, ...] = ("logits",), dynamic: bool = True) -> Path:
    axes = {n: {0: "N"} for n in ("x", *outputs)} if dynamic else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), x, str(path), dynamo=False, opset_version=13, input_names=["x"], output_names=list(outputs),
                          dynamic_axes=axes)
    return path


class Classifier(nn.Module):
    """Conv - ReLU - global average - Linear(10): logits; ``head`` adds softmax / log_softmax."""

    def __init__(self, cin: int = 3, head: str = "none", classes: int = 10) -> None:
        super().__init__()
        self.c = nn.Conv2d(cin, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)
        with torch.no_grad():
            self.fc.weight.mul_(3)  # spread the logits (a constant factor in forward would be an extra Mul node)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(torch.relu(self.c(x)).mean([2, 3]))
        if self.head == "softmax":
            return torch.softmax(y, 1)
        if self.head == "log_softmax":
            return torch.log_softmax(y, 1)
        return y


def _model(graph: Any) -> Any:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8  # what the installed onnxruntime reads
    return m


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    out = {
        "logits": _export(Classifier(), torch.randn(1, 3, H, W), d / "logits.onnx"),
        "softmax": _export(Classifier(head="softmax"), torch.randn(1, 3, H, W), d / "softmax.onnx"),
        "log_softmax": _export(Classifier(head="log_softmax"), torch.randn(1, 3, H, W), d / "log_softmax.onnx"),
        "gray": _export(Classifier(cin=1), torch.randn(1, 1, H, W), d / "gray.onnx", dynamic=False),
        "small": _export(Classifier(classes=4), torch.randn(1, 3, H, W), d / "small.onnx"),
    }
    # two inputs: out = a + Conv1x1(b)
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["b", "w"], ["cb"]), helper.make_node("Add", ["a", "cb"], ["out"])], "two",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4, 3, 3]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3, 3, 3])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 3, 3])], initializer=[w])
    out["two"] = d / "two.onnx"
    onnx.save(_model(g), str(out["two"]))
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("LSTM", ["x", "W", "R"], ["h"], name="my_lstm", hidden_size=2)],
                          "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 3])],
                          [helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 1, 1, 2])],
                          initializer=[onnx.numpy_helper.from_array(np.zeros((1, 8, 3), np.float32), "W"),
                                       onnx.numpy_helper.from_array(np.zeros((1, 8, 2), np.float32), "R")])
    out["unsupported"] = d / "unsupported.onnx"
    onnx.save(_model(g), str(out["unsupported"]))
    return out


def ort_run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def printed_top(out: str) -> list[list[tuple[int, float]]]:
    """The (class, probability) pairs of every 'image n:' line."""
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s+image \d+: (.*)$", line)
        if m:
            rows.append([(int(c), float(p)) for c, p in re.findall(r"(\d+) \(([0-9.]+)\)", m.group(1))])
    return rows


def write_png(path: Path, pixels: np.ndarray) -> Path:
    mpimg.imsave(str(path), pixels)  # uint8 RGB: stored exactly (as RGBA with alpha 255)
    return path


def pixels(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = cli.main(["run", *[str(a) for a in argv]])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# -- .npy inputs -----------------------------------------------------------------------------------------
def test_npy_input_prints_top5_and_saves_outputs(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, H, W)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_cli(capsys, models["logits"], "--input", tmp_path / "x.npy", "--output", tmp_path / "o.npz", "--device", "cpu")
    assert code == 0, err
    ref = ort_run(models["logits"], {"x": x})["logits"]
    saved = np.load(tmp_path / "o.npz")
    assert list(saved.keys()) == ["logits"]
    assert rel_err(saved["logits"], ref) <= 1e-4
    assert "output  logits: (2, 10) float32" in out and "input   x: (2, 3, 6, 5) float32" in out
    assert "top-5 classes (softmax of the values: logits)" in out and f"saved   1 output to {tmp_path / 'o.npz'}" in out
    tops = printed_top(out)
    probs = softmax(ref.astype(np.float64))
    assert len(tops) == 2
    for n, row in enumerate(tops):
        assert [c for c, _ in row] == list(np.argsort(-probs[n], kind="stable")[:5])
        assert np.allclose([p for _, p in row], np.sort(probs[n])[::-1][:5], atol=1e-4)


def test_npy_without_batch_axis_and_top_k(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(2).standard_normal((3, H, W)).astype(np.float64)  # no batch axis, float64
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_cli(capsys, models["logits"], "--input", tmp_path / "x.npy", "--top", "3", "--device", "cpu", "-o", tmp_path / "o.npz")
    assert code == 0, err
    ref = ort_run(models["logits"], {"x": x[None].astype(np.float32)})["logits"]
    assert rel_err(np.load(tmp_path / "o.npz")["logits"], ref) <= 1e-4
    tops = printed_top(out)
    assert len(tops) == 1 and len(tops[0]) == 3 and "top-3 classes" in out
    assert [c for c, _ in tops[0]] == list(np.argsort(-ref[0], kind="stable")[:3])


def test_top_zero_and_small_outputs_print_no_classes(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "x.npy", np.ones((1, 3, H, W), np.float32))
    code, out, _ = run_cli(capsys, models["logits"], "--input", tmp_path / "x.npy", "--top", "0", "--device", "cpu")
    assert code == 0 and "top-" not in out and "output  logits: (1, 10)" in out
    code, out, _ = run_cli(capsys, models["small"], "--input", tmp_path / "x.npy", "--device", "cpu")
    assert code == 0 and "top-" not in out and "output  logits: (1, 4)" in out  # K = 4 < 5: not a classifier


@pytest.mark.parametrize("head,how", [("softmax", "the values are probabilities"), ("log_softmax", "exp of the values: log-probabilities")])
def test_probability_rule(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], head: str, how: str) -> None:
    x = np.random.default_rng(3).standard_normal((1, 3, H, W)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_cli(capsys, models[head], "--input", tmp_path / "x.npy", "--device", "cpu")
    assert code == 0, err
    ref = ort_run(models[head], {"x": x})["logits"].astype(np.float64)
    probs = ref if head == "softmax" else np.exp(ref)
    assert f"({how})" in out
    (row,) = printed_top(out)
    assert [c for c, _ in row] == list(np.argsort(-probs[0], kind="stable")[:5])
    assert np.allclose([p for _, p in row], np.sort(probs[0])[::-1][:5], atol=1e-4)


def test_class_scores_rule() -> None:
    p = np.array([[0.1, 0.2, 0.3, 0.25, 0.15]])
    assert onnx_run.class_scores(p)[1] == "the values are probabilities"
    assert np.allclose(onnx_run.class_scores(np.log(p))[0], p)
    logits = np.array([[0.1, 0.2, 0.3, 0.25, 0.1]])  # in [0, 1] but not summing to 1: logits
    assert np.allclose(onnx_run.class_scores(logits)[0], softmax(logits))
    assert onnx_run.class_scores(np.ones((2, 4))) is None and onnx_run.class_scores(np.ones((2, 5, 2))) is None
    assert onnx_run.class_scores(np.ones((2, 6, 1, 1)))[0].shape == (2, 6)


def test_multi_input_model_needs_names(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 4, 3, 3)).astype(np.float32), rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    code, out, err = run_cli(capsys, models["two"], "--input", f"b={tmp_path / 'b.npy'}", "--input", f"a={tmp_path / 'a.npy'}",
                             "--output", tmp_path / "o.npz", "--device", "cpu")
    assert code == 0, err
    assert rel_err(np.load(tmp_path / "o.npz")["out"], ort_run(models["two"], {"a": a, "b": b})["out"]) <= 1e-4
    assert "output  out: (2, 4, 3, 3) float32" in out and "top-" not in out
    code, out, err = run_cli(capsys, models["two"], "--input", tmp_path / "a.npy", "--device", "cpu")
    assert code == 2 and "NAME=FILE" in err and "['a', 'b']" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, models["two"], "--input", f"a={tmp_path / 'a.npy'}", "--device", "cpu")
    assert code == 2 and "none for ['b']" in err
    code, _, err = run_cli(capsys, models["two"], "--input", f"c={tmp_path / 'a.npy'}", "--device", "cpu")
    assert code == 2 and "name one of the model's inputs" in err


# -- images ----------------------------------------------------------------------------------------------------
def _image_ref(px: np.ndarray, mean: list[float] | None = None, std: list[float] | None = None) -> np.ndarray:
    x = px.astype(np.float64).transpose(2, 0, 1)[None] / 255.0
    if mean is not None:
        x = (x - np.array(mean).reshape(1, -1, 1, 1)) / np.array(std).reshape(1, -1, 1, 1)
    return x.astype(np.float32)


@pytest.mark.parametrize("normalise", [False, True])
def test_png_input(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], normalise: bool) -> None:
    px = pixels(5)
    png = write_png(tmp_path / "img.png", px)
    extra = ["--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))] if normalise else []
    code, out, err = run_cli(capsys, models["logits"], "--input", png, "--output", tmp_path / "o.npz", "--device", "cpu", *extra)
    assert code == 0, err
    ref = ort_run(models["logits"], {"x": _image_ref(px, MEAN if normalise else None, STD)})["logits"]
    assert rel_err(np.load(tmp_path / "o.npz")["logits"], ref) <= 1e-4
    assert "from 1 image" in out and ("normalised" in out) == normalise
    assert [c for c, _ in printed_top(out)[0]] == list(np.argsort(-ref[0], kind="stable")[:5])


def test_imagenet_flag_equals_mean_std(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = write_png(tmp_path / "img.png", pixels(6))
    assert run_cli(capsys, models["logits"], "-i", png, "--imagenet", "-o", tmp_path / "a.npz", "--device", "cpu")[0] == 0
    assert run_cli(capsys, models["logits"], "-i", png, "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)),
                   "-o", tmp_path / "b.npz", "--device", "cpu")[0] == 0
    assert np.array_equal(np.load(tmp_path / "a.npz")["logits"], np.load(tmp_path / "b.npz")["logits"])


def test_several_images_make_a_batch(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p1, p2 = pixels(7), pixels(8)
    a, b = write_png(tmp_path / "a.png", p1), write_png(tmp_path / "b.png", p2)
    code, out, err = run_cli(capsys, models["logits"], "-i", a, "-i", b, "-o", tmp_path / "o.npz", "--device", "cpu")
    assert code == 0, err
    ref = ort_run(models["logits"], {"x": np.concatenate([_image_ref(p1), _image_ref(p2)])})["logits"]
    assert rel_err(np.load(tmp_path / "o.npz")["logits"], ref) <= 1e-4
    assert "from 2 images" in out and len(printed_top(out)) == 2


def test_rgb_image_for_a_one_channel_model_is_its_luma(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    px = pixels(9)
    png = write_png(tmp_path / "img.png", px)
    code, _, err = run_cli(capsys, models["gray"], "-i", png, "-o", tmp_path / "o.npz", "--device", "cpu")
    assert code == 0, err
    luma = (px.astype(np.float64) / 255.0 @ np.array([0.299, 0.587, 0.114]))[None, None].astype(np.float32)
    assert rel_err(np.load(tmp_path / "o.npz")["logits"], ort_run(models["gray"], {"x": luma})["logits"]) <= 1e-4


def test_png_read_with_matplotlib_when_pillow_is_missing(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    px = pixels(10)
    png = write_png(tmp_path / "img.png", px)
    monkeypatch.setattr(onnx_run, "_pil_image", lambda: None)  # as without Pillow: matplotlib.image.imread reads the PNG
    code, _, err = run_cli(capsys, models["logits"], "-i", png, "-o", tmp_path / "o.npz", "--device", "cpu")
    assert code == 0, err
    ref = ort_run(models["logits"], {"x": _image_ref(px)})["logits"]
    assert rel_err(np.load(tmp_path / "o.npz")["logits"], ref) <= 1e-4


def test_format_float16(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(11).standard_normal((2, 3, H, W)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_cli(capsys, models["logits"], "-i", tmp_path / "x.npy", "--format", "float16", "-o", tmp_path / "o.npz", "--device", "cpu")
    assert code == 0, err
    assert "format float16" in out
    err16 = rel_err(np.load(tmp_path / "o.npz")["logits"], ort_run(models["logits"], {"x": x})["logits"])
    assert 0 < err16 <= 1e-2


# -- errors: exit 2, a message on stderr, no traceback --------------------------------------------------------------
def _bad_cases(models: dict[str, Path], tmp: Path) -> list[tuple[list[Any], str]]:
    np.save(tmp / "x.npy", np.ones((1, 3, H, W), np.float32))
    np.save(tmp / "wrong.npy", np.ones((1, 2, H, W), np.float32))
    np.save(tmp / "str.npy", np.array(["a", "b"]))
    (tmp / "junk.npy").write_bytes(b"not numpy")
    (tmp / "junk.png").write_bytes(b"not a png")
    write_png(tmp / "big.png", pixels(12, H + 1, W))
    m = models["logits"]
    return [
        ([tmp / "missing.onnx", "-i", tmp / "x.npy"], "name an existing .onnx file"),
        ([m, "-i", tmp / "missing.npy"], "existing .npy file"),
        ([m, "-i", tmp / "missing.png"], "existing image file"),
        ([m, "-i", tmp / "junk.npy"], "cannot read"),
        ([m, "-i", tmp / "junk.png"], "cannot read image"),
        ([m, "-i", tmp / "str.npy"], "real numbers"),
        ([m, "-i", tmp / "wrong.npy"], "shape"),
        ([m, "-i", tmp / "big.png"], "does not resize"),
        ([m, "-i", tmp / "x.npy", "-i", tmp / "x.npy"], "one .npy file"),
        ([m, "-i", tmp / "x.npy", "--mean", "0.5"], "go with an image input"),
        ([m, "-i", write_png(tmp / "ok.png", pixels(14)), "--mean", "0.5,0.5"], "give 1 or 3 values"),
        ([m, "-i", tmp / "x.npy", "--output", tmp / "o.txt"], "end in .npz"),
        ([m, "-i", tmp / "x.npy", "--output", tmp / "no" / "dir" / "o.npz"], "existing folder"),
        ([m, "-i", tmp / "x.npy", "--device", "tpu"], "device"),
        ([m, "-i", tmp / "x.npy", "--imagenet", "--mean", "0.5"], "not be combined"),
        ([models["unsupported"], "-i", tmp / "x.npy"], "unsupported op type LSTM (nodes 'my_lstm')"),
        ([m, "-i", tmp / "x.npy", "--format", "float64"], "invalid choice"),
        ([m, "-i", tmp / "x.npy", "--top", "-1"], "negative"),
        ([m, "-i", tmp / "x.npy", "--mean", "a,b"], "not a comma-separated list"),
        ([m], "required: --input"),
    ]


def test_errors_exit_2_with_a_message(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, msg in _bad_cases(models, tmp_path):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert msg in err, (argv, err)
        assert "Traceback" not in err and "error" in err


def test_std_must_be_positive(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = write_png(tmp_path / "img.png", pixels(13))
    code, _, err = run_cli(capsys, models["logits"], "-i", png, "--std", "0.2,0,0.2")
    assert code == 2 and "be > 0" in err


# -- registration -------------------------------------------------------------------------------------------------
def test_run_is_registered_and_train_digits_stays_the_default(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from mpsnn.models import train_digits
    assert "run" in cli.COMMANDS
    args = cli.build_parser().parse_args(["run", "m.onnx", "--input", "x.npy"])
    assert args.run is onnx_run.run and args.model == "m.onnx" and args.input == ["x.npy"] and args.top == 5 and args.format == "float32"
    seen: list[Any] = []
    monkeypatch.setattr(train_digits, "run", lambda a: seen.append(a) or 7)
    assert cli.main(["--iterations", "1"]) == 7  # no subcommand: train-digits
    assert seen and seen[0].command == "train-digits" and seen[0].iterations == 1
    assert cli.main(["run", "--help"]) == 0
    assert "--input [NAME=]FILE" in capsys.readouterr().out
