"""``dispatch.triton_engine`` and the public kernels' use of the Triton engines: on CUDA with
Triton, pooling, softmax and upsampling encodes run the engines and write an explicit
destination directly (no result copy); on the CPU, for float64 and without Triton the torch
paths run (their results are checked by the families' own tests)."""
from __future__ import annotations

from typing import Any

import pytest
import torch

import mpsnn as m
from mpsnn.backends import dispatch
from mpsnn.testing.engines import triton_module


def test_no_engine_for_cpu_or_float64_tensors() -> None:
    assert dispatch.triton_engine("pooling", torch.zeros(1, 2, 2, 4)) is None
    if torch.cuda.is_available():
        assert dispatch.triton_engine("pooling", torch.zeros(1, 2, 2, 4, device="cuda", dtype=torch.float64)) is None
        t = torch.zeros(1, 2, 2, 4, device="cuda").transpose(2, 3)   # channels not contiguous
        assert dispatch.triton_engine("pooling", t) is None


ENGINES = {name: triton_module(name) for name in ("pooling", "softmax", "upsampling")}
cuda_triton = pytest.mark.skipif(any(v is None for v in ENGINES.values()), reason="no CUDA device with Triton")


def counting(monkeypatch, module: Any, names: list[str], calls: dict[str, int] | None = None) -> dict[str, int]:
    """Count the calls of ``module``'s functions ``names`` into ``calls`` (a new dict when None),
    which the wrappers update in place."""
    calls = {} if calls is None else calls
    calls.update(dict.fromkeys(names, 0))
    for name in names:
        real = getattr(module, name)

        def wrapped(*a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
            calls[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(module, name, wrapped)
    return calls


def run(dev: m.Device, encode: Any) -> None:
    cb = dev.make_command_queue().make_command_buffer()
    encode(cb)
    cb.commit()
    cb.wait_until_completed()


@cuda_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_kernels_run_the_engines_into_their_destinations(monkeypatch, dtype: torch.dtype) -> None:
    dev = m.Device("cuda")
    calls = counting(monkeypatch, ENGINES["pooling"], ["pool_forward", "pool_max_gradient"])
    counting(monkeypatch, ENGINES["softmax"], ["softmax_forward", "softmax_gradient"], calls)
    counting(monkeypatch, ENGINES["upsampling"], ["nearest_forward", "bilinear_gradient"], calls)
    x = m.MPSImage.from_torch(torch.randn(2, 8, 8, 16, device="cuda").to(dtype))
    dy4 = m.MPSImage.from_torch(torch.randn(2, 4, 4, 16, device="cuda").to(dtype))

    def image(n: int, h: int, w: int, c: int) -> m.MPSImage:
        return m.MPSImage.from_torch(torch.full((n, h, w, c), float("nan"), device="cuda", dtype=dtype))

    pool = m.MPSCNNPoolingMax(dev, kernel_width=2, kernel_height=2, stride_in_pixels_x=2, stride_in_pixels_y=2)
    pool.offset = m.MPSOffset(1, 1, 0)
    pool_g = m.MPSCNNPoolingMaxGradient(dev, kernel_width=2, kernel_height=2, stride_in_pixels_x=2, stride_in_pixels_y=2)
    y, dx = image(2, 4, 4, 16), image(2, 8, 8, 16)
    before = (y.tensor.data_ptr(), dx.tensor.data_ptr())
    state = pool.result_state(x, destination_image=y)
    run(dev, lambda cb: (pool.encode(cb, x, y, destination_state=state), pool_g.encode(cb, dy4, x, state, dx)))
    assert (y.tensor.data_ptr(), dx.tensor.data_ptr()) == before, "written in place"
    expect = x.tensor.float().view(2, 4, 2, 4, 2, 16).amax((2, 4))
    torch.testing.assert_close(y.tensor.float(), expect)
    assert not torch.isnan(dx.tensor).any()

    sm, sm_g = m.MPSCNNSoftMax(dev), m.MPSCNNSoftMaxGradient(dev)
    p, dp = image(2, 8, 8, 16), image(2, 8, 8, 16)
    st = sm.result_state(x, destination_image=p)
    dy8 = m.MPSImage.from_torch(torch.randn(2, 8, 8, 16, device="cuda").to(dtype))
    run(dev, lambda cb: (sm.encode(cb, x, p, destination_state=st), sm_g.encode(cb, dy8, p, st, dp)))
    torch.testing.assert_close(p.tensor.float(), torch.softmax(x.tensor.float(), -1), rtol=2e-2, atol=2e-3)
    assert not torch.isnan(dp.tensor).any()

    up = m.MPSCNNUpsamplingNearest(dev, integer_scale_factor_x=2, integer_scale_factor_y=2)
    u = image(2, 16, 16, 16)
    run(dev, lambda cb: up.encode(cb, x, u))
    torch.testing.assert_close(u.tensor, x.tensor.repeat_interleave(2, 1).repeat_interleave(2, 2))
    bl_g = m.MPSCNNUpsamplingBilinearGradient(dev, integer_scale_factor_x=2, integer_scale_factor_y=2)
    g16 = m.MPSImage.from_torch(torch.randn(2, 16, 16, 16, device="cuda").to(dtype))
    d = image(2, 8, 8, 16)
    run(dev, lambda cb: bl_g.encode(cb, g16, x, None, d))
    assert not torch.isnan(d.tensor).any()
    assert all(v == 1 for v in calls.values()), calls
