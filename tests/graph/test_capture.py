"""CUDA-graph capture of whole graph encodes (``MPSNNGraph.use_cuda_graph``,
``mpsnn.graph.capture``): a captured and replayed encode gives the same bits as the eager
encode of the same graph, for inference and for training steps that update weights with Adam;
new shapes and reloaded weights capture again; loss values reach the caller's labels; nodes a
replay would run wrongly are refused; the CPU ignores the switch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mpsnn as m
from mpsnn.graph import capture
from mpsnn.models.digits import build_digits_graphs, make_data_sources
from mpsnn.models.train_digits import image_batch, labels_batch, read_losses

CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


def digits(device: str, batch: int, keep: float | None = None, fmt: m.MPSImageFeatureChannelFormat = m.MPSImageFeatureChannelFormat.float32):  # type: ignore[no-untyped-def]
    dev = m.Device(device)
    ds = make_data_sources(dev, init="he", seed=3)
    return dev, build_digits_graphs(dev, ds, batch, graph_format=fmt, keep_probability=keep)


def data(step: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(step)
    return rng.integers(0, 256, (batch, 28, 28), dtype=np.uint8), rng.integers(0, 10, batch)


def train(dev: m.Device, graphs, steps: int, batch: int, captured: bool) -> list[tuple[float, list[torch.Tensor]]]:  # type: ignore[no-untyped-def]
    graphs.training.use_cuda_graph = captured
    out = []
    for k in range(steps):
        x, y = data(k, batch)
        labels = labels_batch(dev, y)
        cb = dev.make_command_queue().make_command_buffer()
        graphs.training.encode_batch(cb, [image_batch(dev, x)], [labels])
        cb.commit()
        cb.wait_until_completed()
        out.append((read_losses(labels), [d.weights_tensor.clone() for d in graphs.data_sources]))
    return out


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("batch", [8, 5])
def test_captured_training_steps_match_eager(batch: int) -> None:
    """The eager step itself is not bit-reproducible (the weight-gradient reductions), so the
    captured steps are held to float32 round-off of the eager ones."""
    dev, eager = digits("cuda", batch)
    _, cap = digits("cuda", batch)
    a = train(dev, eager, 5, batch, False)
    b = train(dev, cap, 5, batch, True)
    assert len(cap.training._captures) == 1 and isinstance(next(iter(cap.training._captures.values())), capture._Captured)
    for k, ((la, wa), (lb, wb)) in enumerate(zip(a, b)):
        assert la == pytest.approx(lb, rel=1e-5), f"step {k}: loss {la} vs {lb}"
        for x, y in zip(wa, wb):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=lambda s: f"step {k}: {s}")  # noqa: B023
    assert a[0][1][0].ne(a[-1][1][0]).any(), "the steps trained"
    # Adam's device step count advanced at every replay
    assert float(cap.data_sources[0].optimizer.time_step_tensor()) == 5.0


@pytest.mark.cuda
@cuda
def test_captured_inference_replays_new_inputs_and_recaptures_on_new_shapes_and_weights() -> None:
    dev, g = digits("cuda", 8, fmt=m.MPSImageFeatureChannelFormat.float16)
    inf = g.inference

    def run(x: np.ndarray) -> np.ndarray:
        cb = dev.make_command_queue().make_command_buffer()
        out = inf.encode_batch(cb, [image_batch(dev, x)])
        cb.commit()
        cb.wait_until_completed()
        assert out is not None
        return np.stack([o.to_numpy() for o in out])

    xs = [data(k, 8)[0] for k in range(4)] + [data(9, 6)[0]]
    inf.use_cuda_graph = False
    want = [run(x) for x in xs]
    inf.use_cuda_graph = True
    got = [run(x) for x in xs]
    for k, (w, o) in enumerate(zip(want, got)):
        assert np.array_equal(w, o), f"encode {k}"
    assert [v is not None for v in inf._captures.values()] == [True, False], "batch 8 captured, batch 6 seen once"
    # new weights: every capture is dropped and the new weights are used
    for d in g.data_sources:
        d.weights_tensor.mul_(0.5)
    inf.reload_from_data_sources()
    assert not inf._captures
    inf.use_cuda_graph = False
    want2 = run(xs[0])
    inf.use_cuda_graph = True
    assert np.array_equal(run(xs[0]), want2) and np.array_equal(run(xs[0]), want2) and not np.array_equal(want2, want[0])


@pytest.mark.cuda
@cuda
def test_replays_return_the_capture_images_and_fill_the_callers_labels() -> None:
    dev, g = digits("cuda", 4)
    tr = g.training
    tr.use_cuda_graph = True
    results, losses = [], []
    for k in range(4):
        x, y = data(k, 4)
        labels = labels_batch(dev, y)
        cb = dev.make_command_queue().make_command_buffer()
        results.append(tr.encode_batch(cb, [image_batch(dev, x)], [labels]))
        cb.commit()
        cb.wait_until_completed()
        losses.append([float(lab.loss_image().to_numpy().ravel()[0]) for lab in labels])
    assert results[2][0] is results[3][0], "replays hand back the capture's result images"
    assert results[0][0] is not results[2][0]
    for k in (1, 2, 3):
        assert all(v != 0 for v in losses[k]) and losses[k] != losses[k - 1], f"step {k}: the caller's labels got this step's losses"


@pytest.mark.cuda
@cuda
def test_dropout_is_refused_when_the_encode_would_be_captured() -> None:
    dev, g = digits("cuda", 4, keep=0.5)
    tr = g.training
    tr.use_cuda_graph = True
    x, y = data(0, 4)
    for k in range(2):
        cb = dev.make_command_queue().make_command_buffer()
        if k == 0:
            tr.encode_batch(cb, [image_batch(dev, x)], [labels_batch(dev, y)])   # first encode of a key: eager
        else:
            with pytest.raises(m.MPSValueError, match="dropout"):
                tr.encode_batch(cb, [image_batch(dev, x)], [labels_batch(dev, y)])
        cb.commit()
        cb.wait_until_completed()


def test_refusals_are_named_and_the_switch_is_validated() -> None:
    _, g = digits("cpu", 4, keep=0.5)
    with pytest.raises(m.MPSValueError, match=r"MPSCNNDropout.*keep_probability 0.5"):
        capture.check_capturable(g.training)
    capture.check_capturable(g.inference)            # no dropout at inference
    with pytest.raises(m.MPSValueError, match="use_cuda_graph"):
        g.training.use_cuda_graph = 1  # type: ignore[assignment]
    _, g1 = digits("cpu", 4)
    g1.training.use_cuda_graph = True
    assert g1.training.use_cuda_graph
    capture.check_capturable(g1.training)


def test_the_cpu_ignores_the_switch() -> None:
    dev, eager = digits("cpu", 4)
    _, cap = digits("cpu", 4)
    a = train(dev, eager, 3, 4, False)
    b = train(dev, cap, 3, 4, True)
    assert not cap.training._captures
    for (la, wa), (lb, wb) in zip(a, b):
        assert la == lb and all(torch.equal(x, y) for x, y in zip(wa, wb))


@pytest.mark.cuda
@cuda
def test_the_same_objects_refilled_in_place_replay_without_rebinding() -> None:
    """The pattern of a training loop over device data: one batch image and one labels object
    per entry (views of one labels image), refilled in place every step. The binding of those
    objects to the capture is made once and reused; the steps match eager encodes."""
    batch = 6
    runs = {}
    for captured in (False, True):
        dev, g = digits("cuda", batch)
        g.training.use_cuda_graph = captured
        fmt = m.MPSImageFeatureChannelFormat
        img = m.MPSImage(dev, m.MPSImageDescriptor(channel_format=fmt.unorm8, width=28, height=28, feature_channels=1,
                                                    number_of_images=batch))
        onehot = m.MPSImage(dev, m.MPSImageDescriptor(channel_format=fmt.float32, width=1, height=1, feature_channels=12,
                                                       number_of_images=batch))
        labels = [m.MPSCNNLossLabels(dev, labels_image=v) for v in onehot.batch_representation()]
        images = img.batch_representation()
        losses, bindings = [], []
        for k in range(5):
            x, y = data(k, batch)
            img.tensor.copy_(torch.from_numpy(x).view(batch, 28, 28, 1).float().div(255))
            onehot.tensor.zero_()
            onehot.tensor.view(batch, 12)[torch.arange(batch), torch.from_numpy(y)] = 1.0
            cb = dev.make_command_queue().make_command_buffer()
            g.training.encode_batch(cb, [images], [labels])
            cb.commit()
            cb.wait_until_completed()
            losses.append(sum(float(lab.loss_image().tensor) for lab in labels))
            bindings.append(g.training._binding)
        runs[captured] = (losses, [d.weights_tensor.clone() for d in g.data_sources])
        if captured:
            assert bindings[1] is not None and bindings[2] is bindings[1] and bindings[4] is bindings[1], "bound once, reused"
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for a, b in zip(runs[False][1], runs[True][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
