"""The main job (``mpsnn train-digits``): a short run end to end, its outputs, its options."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

import mpsnn
from mpsnn import cli
from mpsnn.models import build_digits_graphs, make_data_sources
from mpsnn.models import train_digits as td


def test_short_run_writes_weights_plot_and_history(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train-digits", "--device", "cpu", "--iterations", "4", "--eval-interval", "2", "--test-limit", "200",
                     "--test-batch-size", "64", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "Test Set Accuracy" in text and "final test accuracy" in text
    hist = json.loads((out / "history.json").read_text())
    assert hist["eval_iterations"] == [0, 2, 4]
    assert len(hist["accuracies"]) == 3 and all(0.0 <= a <= 100.0 for a in hist["accuracies"])
    assert hist["iterations"][-1] == 4 and all(np.isfinite(hist["losses"]))
    assert (out / "digits_training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from safetensors.torch import load_file
    w = load_file(str(out / "digits.safetensors"))
    assert w["conv1.weights"].shape == (32, 5, 5, 1) and w["conv2.weights"].shape == (64, 5, 5, 32)
    assert w["fc1.weights"].shape == (1024, 7, 7, 64) and w["fc2.weights"].shape == (10, 1, 1, 1024)
    assert w["fc2.biases"].shape == (10,)
    # four Adam steps moved the sample's initial biases (0.1) away
    assert not torch.allclose(w["fc2.biases"], torch.full((10,), 0.1))


def test_training_lowers_the_loss_and_beats_chance():
    dev = mpsnn.Device("cpu")
    recipe = td.Recipe(iterations=40, eval_interval=40, test_batch_size=250)
    hist = td.train(recipe, dev, mpsnn.MPSImageFeatureChannelFormat.float32, None, stream=io.StringIO(), log=lambda *a: None,
                    test_limit=500)
    assert hist.losses[-1] < 0.5 * hist.losses[0]
    assert hist.accuracies[-1] > 70.0 > hist.accuracies[0]


def test_graphs_share_the_data_sources_and_reload():
    dev = mpsnn.Device("cpu")
    ds = make_data_sources(dev)
    g = build_digits_graphs(dev, ds, 8, graph_format=mpsnn.MPSImageFeatureChannelFormat.float32)
    x, y = mpsnn.datasets.load_mnist("test", limit=8)
    q = dev.make_command_queue()

    def infer() -> np.ndarray:
        cb = q.make_command_buffer()
        res = g.inference.encode_batch(cb, [td.image_batch(dev, x)])
        cb.commit()
        cb.wait_until_completed()
        return np.stack([r.to_numpy().ravel() for r in res])

    before = infer()
    np.testing.assert_allclose(before.sum(axis=1), 1.0, rtol=1e-5)
    cb = q.make_command_buffer()
    labels = td.labels_batch(dev, y)
    g.training.encode_batch(cb, [td.image_batch(dev, x)], [labels])
    cb.commit()
    cb.wait_until_completed()
    assert all(d.updates == 1 and d.optimizer.time_step == 1 for d in ds)
    assert np.allclose(infer(), before)           # not reloaded yet: the old weights
    g.inference.reload_from_data_sources()
    assert not np.allclose(infer(), before)       # the Adam step reached the inference graph
    assert td.read_losses(labels) > 0


def test_training_graph_has_one_terminal_and_float32_gradients():
    dev = mpsnn.Device("cpu")
    seen = []
    g = build_digits_graphs(dev, make_data_sources(dev), 4, node_handler=lambda gn, fn, s, gs: seen.append(gn))
    assert g.training.plan.results[0].producer is seen[-1]
    assert type(seen[-1]).__name__ == "MPSCNNConvolutionGradientNode"
    assert all(n.result_image.format == mpsnn.MPSImageFeatureChannelFormat.float32 for n in seen)
    assert g.training.format == mpsnn.MPSImageFeatureChannelFormat.float16


def test_progress_bar_without_a_terminal_prints_deciles():
    s = io.StringIO()
    p = td.Progress(20, "x", s)
    for _ in range(20):
        p.update(1, "loss 1")
    p.close()
    lines = s.getvalue().strip().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("x [########################] 20/20")


@pytest.mark.parametrize("argv, name", [(["--iterations", "0"], "--iterations"), (["--batch-size", "0"], "--batch-size"),
                                        (["--eval-interval", "0"], "--eval-interval"), (["--test-limit", "0"], "--test-limit"),
                                        (["--epoch", "--iterations", "2000"], "--iterations")])
def test_bad_options_are_reported(argv, name, capsys, tmp_path):
    assert cli.main(["train-digits", "--device", "cpu", "--out", str(tmp_path), *argv]) == 2
    assert name in capsys.readouterr().err


def test_epoch_recipe_covers_the_training_set_once():
    r = td.EPOCH
    assert r.iterations * r.batch_size == 60000 and r.shuffle_epoch and r.init == "he" and r.decay_to_zero
    assert r.learning_rate_at(0) == r.learning_rate and r.learning_rate_at(r.iterations) == 0.0
