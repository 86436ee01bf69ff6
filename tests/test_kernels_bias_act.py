"""The one-pass bias + per-channel ReLU kernel (hrnet_fast/kernels/bias_act.py) against a float64
oracle, and the Triton backend's ReLU-range convs that use it (cuDNN conv without bias + this
kernel). On the CPU the kernel runs under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); on a GPU the ``gpu`` cases run too."""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE, hoisted_w18_small_v1, poisoned_allocations, rel_err
from oracles import assert_close_to_oracle

triton_status = pytest.importorskip("hrnet_fast.kernels").triton_status
_ok, _why = triton_status(DEVICE)
if not _ok:
    pytest.skip(f"Triton kernels cannot run here: {_why}", allow_module_level=True)

from hrnet_fast.kernels.bias_act import bias_relu_mask  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def _oracle(y, bias, mask, dtype):
    """float64 result and the same math in ``dtype`` (torch ops): the fp16/bf16 bound's baseline."""
    m = (mask != 0).view(1, -1, 1, 1)
    z64 = y.double() + bias.double().view(1, -1, 1, 1)
    want = torch.where(m, torch.relu(z64), z64)
    zd = (y.float() + bias.float().view(1, -1, 1, 1)).to(dtype)
    same = torch.where(m, torch.relu(zd), zd)
    return want, same


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", [(2, 40, 13, 17), (1, 88, 16, 32), (1, 3, 1, 1), (3, 24, 5, 1)])
def test_bias_relu_mask_matches_oracle(dtype, layout, shape, monkeypatch):
    _check(dtype, layout, shape, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_gpu_bias_relu_mask(dtype, layout, monkeypatch):
    """On the GPU: bf16 too, a w18-sized output (88 channels at 128x256, a batch of 2) and the
    NaN rule compiled (not interpreted)."""
    _check(dtype, layout, (2, 88, 128, 256), monkeypatch)
    test_bias_relu_mask_nan_and_sign(torch.channels_last if layout == "cl" else torch.contiguous_format)


@pytest.mark.gpu
def test_gpu_bias_relu_mask_in_a_cuda_graph():
    y = torch.randn(1, 64, 32, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    bias = torch.randn(64, device="cuda")
    mask = (torch.arange(64, device="cuda") < 24).to(torch.int8)
    out = bias_relu_mask(y, bias, mask)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = bias_relu_mask(y, bias, mask)
    y.copy_(torch.randn_like(y))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, bias_relu_mask(y, bias, mask)) and not torch.equal(static, out)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_gpu_triton_engine_range_convs(mode, monkeypatch):
    test_triton_engine_range_convs_use_the_kernel(mode, monkeypatch)


def _check(dtype, layout, shape, monkeypatch):
    g = torch.Generator().manual_seed(sum(shape))
    y = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    if layout == "cl":
        y = y.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    bias = torch.randn(C, generator=g).to(DEVICE)
    mask = (torch.rand(C, generator=g) < 0.5).to(torch.int8).to(DEVICE)
    mask[0], mask[-1] = 1, 0 if C > 1 else 1
    for b in (bias, bias.to(dtype)):
        with poisoned_allocations(monkeypatch):
            out = bias_relu_mask(y, b, mask)
        assert out.dtype == dtype and out.shape == y.shape
        assert out.is_contiguous(memory_format=torch.channels_last if layout == "cl" and C > 1
                                 and shape[2] * shape[3] > 1 else torch.contiguous_format)
        want, same = _oracle(y, b, mask, dtype)
        assert_close_to_oracle(out, want, same, dtype=dtype, what=f"bias_act {shape} {layout}")


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_bias_relu_mask_nan_and_sign(layout):
    """A NaN stays NaN in both kinds of channel (``torch.relu``'s rule); negatives clamp only where
    the mask says ReLU."""
    y = torch.tensor([float("nan"), -2.0, 3.0, float("nan"), -2.0, 3.0]).view(1, 6, 1, 1).to(DEVICE)
    y = y.repeat(2, 1, 3, 5).contiguous(memory_format=layout)
    mask = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.int8, device=DEVICE)
    out = bias_relu_mask(y, torch.ones(6, device=DEVICE), mask)
    got = out[0, :, 0, 0].cpu().tolist()
    assert got[0] != got[0] and got[3] != got[3]
    assert got[1:3] == [0.0, 4.0] and got[4:] == [-1.0, 4.0]
    assert torch.equal(out.isnan(), y.isnan())


def test_bias_relu_mask_argument_errors():
    y = torch.randn(1, 4, 3, 3, device=DEVICE)
    ok_mask = torch.ones(4, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="bias must be a \\[4\\]"):
        bias_relu_mask(y, torch.zeros(5, device=DEVICE), ok_mask)
    with pytest.raises(ValueError, match="mask must be int8"):
        bias_relu_mask(y, torch.zeros(4, device=DEVICE), ok_mask.bool())
    with pytest.raises(ValueError, match="dense 4-d"):
        bias_relu_mask(y[:, :, :, ::2], torch.zeros(4, device=DEVICE), ok_mask)
    with pytest.raises(ValueError, match="dtype"):
        bias_relu_mask(y.double(), torch.zeros(4, device=DEVICE), ok_mask)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_triton_engine_range_convs_use_the_kernel(mode, monkeypatch):
    """The Triton backend (``auto``'s, cuDNN convs) on a hoisted plan: every ReLU-range conv goes
    through the bias-act kernel, and the whole model matches the reference."""
    from hrnet_fast.backends import triton as triton_backend
    from hrnet_fast.engine import run_plan

    monkeypatch.setattr(triton_backend, "RANGE_EPILOGUE_DEVICES", {"cpu", "cuda"})
    calls = []
    real = torch.ops.hrnet_fast.bias_relu_mask_triton

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return real(*args)

    model, x, plan = hoisted_w18_small_v1(mode)
    ranged = [s for s in plan.conv_specs() if s.relu_ranges is not None]
    assert ranged, "the plan has no ReLU-range conv: the test would check nothing"
    be = triton_backend.Triton.prepare(plan, DEVICE, torch.float32, auto=True)
    monkeypatch.setattr(torch.ops.hrnet_fast, "bias_relu_mask_triton", Spy())
    with torch.no_grad(), poisoned_allocations(monkeypatch):
        got = run_plan(plan, be, x)
        want = model(x)
    assert len(calls) == len(ranged)
    assert rel_err(got, want) < 1e-5
