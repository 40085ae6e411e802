"""The command line (``mpsnn demo``) and the bundled MNIST loader."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import cli
from mpsnn.datasets import load_mnist, mnist_data_dir
from mpsnn.datasets.mnist import MNIST_SPLITS

REPO = Path(__file__).resolve().parent.parent
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # data/mnist/README.md


# -- demo -------------------------------------------------------------------------------------------
def test_demo_runs_and_reports(capsys):
    assert cli.main(["demo", "--count", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for key in ("device      cpu", "8 MNIST test digits, labels 7 2 1 0 4 1 4 9", "unorm8 <- write_bytes(6272 raw bytes",
                "MPSCNNNeuronLinear", "MPSCNNNeuronReLU", "MPSCNNNeuron (geLU)", "MPSCNNNeuronGradient (linear)",
                "(recycled)", "(freed)", "3 blocks before commit, 0 after completion (status completed)",
                "timing      encode", "max abs error", "digit 0 (label 7)", "result: PASS"):
        assert key in out, key
    assert "FAIL" not in out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16"])
def test_demo_on_cuda(capsys, fmt):
    assert cli.main(["demo", "--count", "64", "--device", "cuda", "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert "after 1 warm-up pass" in out and "encode only enqueues on the CUDA stream" in out
    assert "result: PASS" in out


@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("activation", ["gelu", "sigmoid"])
def test_demo_formats_and_activations(capsys, fmt, activation):
    argv = ["demo", "--count", "3", "--device", "cpu", "--format", fmt, "--activation", activation, "--seed", "5"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"rounded to {fmt} where the chain stores" in out
    assert out.count(" ok\n") == 2


def test_train_digits_is_the_default_command(capsys, tmp_path):
    argv = ["--device", "cpu", "--iterations", "1", "--test-limit", "20", "--out", str(tmp_path), "--no-plot"]
    assert cli.main(argv) == 0
    assert "final test accuracy" in capsys.readouterr().out
    assert (tmp_path / "digits.safetensors").exists()


def test_demo_fails_when_the_check_fails(capsys, monkeypatch):
    # float32 results differ from float64 NumPy by ~1e-7: a zero tolerance must fail the run
    monkeypatch.setitem(cli.TOLERANCE, mpsnn.MPSImageFeatureChannelFormat.float32, 0.0)
    assert cli.main(["demo", "--count", "2", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "result: FAIL" in out


@pytest.mark.parametrize("argv", [["demo", "--device", "tpu"], ["demo", "--count", "0"], ["demo", "--count", "10001"],
                                  ["demo", "--format", "unorm8"], ["demo", "--bogus"]])
def test_demo_bad_arguments_exit_2(capsys, argv):
    assert cli.main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_help_and_version_exit_0(capsys):
    assert cli.main(["--help"]) == 0
    assert cli.main(["demo", "--help"]) == 0
    assert cli.main(["--version"]) == 0
    assert mpsnn.__version__ in capsys.readouterr().out


def test_python_dash_m_mpsnn():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "mpsnn", "demo", "--count", "4", "--device", "cpu"],
                          check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "result: PASS" in proc.stdout


def test_ascii_panels_shape():
    img = np.zeros((28, 28), np.uint8)
    img[10:20, 5:9] = 255
    lines = cli.ascii_panels([("a", img), ("b", img.astype(np.float32))])
    assert lines[0].split() == ["a", "b"]
    assert len(lines) == 1 + 5  # title + rows 10..19 at two rows a line
    assert all("@" in line for line in lines[1:])


# -- MNIST loader -------------------------------------------------------------------------------------
def test_load_mnist_test_head():
    images, labels = load_mnist("test", limit=5)
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5,) and labels.dtype == np.uint8
    assert labels.tolist() == [7, 2, 1, 0, 4]
    assert images.flags.c_contiguous and images.flags.writeable
    assert images.max() == 255 and images.min() == 0


def test_load_mnist_full_test_split_label_counts():
    images, labels = load_mnist("test")
    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels, minlength=10).tolist() == TEST_LABEL_COUNTS


def test_load_mnist_train_head_and_limits():
    images, labels = load_mnist("train", limit=3)
    assert images.shape == (3, 28, 28)
    assert labels.tolist() == [5, 0, 4]
    empty_images, empty_labels = load_mnist("test", limit=0)
    assert empty_images.shape == (0, 28, 28) and empty_labels.shape == (0,)
    assert load_mnist("test", limit=20000)[0].shape == (10000, 28, 28)  # clipped to the split


def test_data_dir_holds_the_files():
    folder = mnist_data_dir()
    for image_file, label_file, _ in MNIST_SPLITS.values():
        assert (folder / image_file).is_file() and (folder / label_file).is_file()


@pytest.mark.parametrize("split", ["validation", "TEST", "", None, 3])
def test_bad_split_raises(split):
    with pytest.raises(mpsnn.MPSError, match="split"):
        load_mnist(split)


@pytest.mark.parametrize("limit, error", [(-1, mpsnn.MPSValueError), ("5", mpsnn.MPSTypeError), (2.0, mpsnn.MPSTypeError)])
def test_bad_limit_raises(limit, error):
    with pytest.raises(error, match="limit"):
        load_mnist("test", limit=limit)


# corrupt copies: the test split copied into tmp_path, one file altered
@pytest.fixture
def test_split_copy(tmp_path):
    for name in MNIST_SPLITS["test"][:2]:
        shutil.copy(mnist_data_dir() / name, tmp_path / name)
    return tmp_path


LABELS = MNIST_SPLITS["test"][1]
IMAGES = MNIST_SPLITS["test"][0]


def _rewrite(folder: Path, name: str, edit) -> None:
    raw = gzip.decompress((folder / name).read_bytes())
    (folder / name).write_bytes(gzip.compress(edit(raw), compresslevel=1))


def test_copy_loads(test_split_copy):
    images, labels = load_mnist("test", limit=5, root=test_split_copy)
    assert images.shape == (5, 28, 28) and labels.tolist() == [7, 2, 1, 0, 4]


def test_checksum_is_verified(test_split_copy):
    path = test_split_copy / IMAGES
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(mpsnn.MPSError, match="MD5"):
        load_mnist("test", limit=5, root=test_split_copy)


def test_recompressed_copy_fails_the_checksum_but_loads_unverified(test_split_copy):
    _rewrite(test_split_copy, LABELS, lambda raw: raw)
    with pytest.raises(mpsnn.MPSError, match="MD5"):
        load_mnist("test", limit=5, root=test_split_copy)
    assert load_mnist("test", limit=5, root=test_split_copy, verify=False)[1].tolist() == [7, 2, 1, 0, 4]


@pytest.mark.parametrize("name, edit, message", [
    (IMAGES, lambda raw: struct.pack(">I", 2049) + raw[4:], "magic number 2051"),
    (LABELS, lambda raw: struct.pack(">I", 2051) + raw[4:], "magic number 2049"),
    (IMAGES, lambda raw: raw[:4] + struct.pack(">I", 9999) + raw[8:], "hold 10000 items"),
    (IMAGES, lambda raw: raw[:8] + struct.pack(">II", 32, 32) + raw[16:], "28x28 images"),
    (IMAGES, lambda raw: raw[:-100], "truncated"),
    (LABELS, lambda raw: raw + b"\x00", "trailing data"),
    (LABELS, lambda raw: raw[:8] + b"\x0a" + raw[9:], r"labels in \[0, 9\]"),
    (LABELS, lambda raw: raw[:5], "IDX header"),
])
def test_corrupt_contents_raise(test_split_copy, name, edit, message):
    _rewrite(test_split_copy, name, edit)
    with pytest.raises(mpsnn.MPSError, match=message):
        load_mnist("test", root=test_split_copy, verify=False)
    with pytest.raises(mpsnn.MPSError, match="MD5"):  # and the checksum catches them first
        load_mnist("test", root=test_split_copy)


def test_not_gzip_raises(test_split_copy):
    (test_split_copy / LABELS).write_bytes(b"not a gzip file at all")
    with pytest.raises(mpsnn.MPSError, match="gzip"):
        load_mnist("test", root=test_split_copy, verify=False)


def test_missing_file_raises(test_split_copy):
    (test_split_copy / LABELS).unlink()
    with pytest.raises(mpsnn.MPSError, match="no such file"):
        load_mnist("test", limit=1, root=test_split_copy)
