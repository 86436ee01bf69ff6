"""The seg head with its branch-0 projection inside the kernel (hrnet_fast.kernels.seg_head,
``seg_head_projected_triton``) against a float64 oracle: ``head(conv1x1(x0, w0, b0), ...)``.

On the CPU the kernel runs under the Triton interpreter (tests/conftest.py). Oracle and tolerance
rule: tests/oracles.py (fp32 within 1e-6; fp16 within 2x the torch composition in fp16, which
rounds the projection to fp16 before the head, as the unfused engine does)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE
from oracles import assert_close_to_oracle, head_fp64, head_same_dtype

triton_status = pytest.importorskip("hrnet_fast.kernels").triton_status
_ok, _why = triton_status(DEVICE)
if not _ok:
    pytest.skip(f"Triton kernels cannot run here: {_why}", allow_module_level=True)

from hrnet_fast.kernels.seg_head import projected_head_fits  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _rand(shape, dtype, seed, channels_last=False, scale=1.0):
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _case(dtype, channels_last, cin, c, k, base_hw, contrib_hw, n=2, b0=True, bias=True, seed=0):
    x0 = _rand((n, cin, *base_hw), dtype, seed, channels_last)
    w0 = _rand((c, cin, 1, 1), dtype, seed + 1, scale=cin ** -0.5)
    b0 = _rand((c,), dtype, seed + 2) if b0 else None
    contribs = [_rand((n, c, *hw), dtype, seed + 3 + i, channels_last) for i, hw in enumerate(contrib_hw)]
    w = _rand((k, c, 1, 1), dtype, seed + 10, scale=c ** -0.5)
    b = _rand((k,), dtype, seed + 11) if bias else None
    return x0, w0, b0, contribs, w, b


def _run(x0, w0, b0, contribs, w, b, mode, align):
    return torch.ops.hrnet_fast.seg_head_projected_triton(x0, w0, b0, contribs, w, b, mode, align)


def _check(out, x0, w0, b0, contribs, w, b, mode, align, dtype, what):
    base64 = F.conv2d(x0.double(), w0.double(), None if b0 is None else b0.double())
    oracle = head_fp64(base64, contribs, w, b, mode, align)
    same = None
    if dtype != torch.float32:  # the unfused engine: projection rounded to dtype, then the head
        same = head_same_dtype(F.conv2d(x0, w0, b0), contribs, w, b, mode, align)
    return assert_close_to_oracle(out, oracle, same, dtype=dtype, what=what)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode,align", [("nearest", False), ("bilinear", False), ("bilinear", True)],
                         ids=["nearest", "bilinear", "bilinear-ac"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_projected_head_matches_oracle(dtype, mode, align, channels_last):
    """w18-like: 24 input channels projected to 40 head channels (two chunks and a remainder),
    19 classes, three contributions of odd sizes, batch 2; the output poisoned first is every
    element written (a fresh tensor: NaN anywhere fails the oracle)."""
    args = _case(dtype, channels_last, 24, 40, 19, (15, 17), [(8, 9), (4, 5), (2, 3)])
    out = _run(*args, mode, align)
    assert out.shape == (2, 19, 15, 17) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    _check(out, *args, mode, align, dtype, f"projected head {mode}")


@pytest.mark.parametrize("case", ["no-biases", "cin-48-k70", "no-contributions", "cin-5",
                                  "same-size", "nan"])
def test_projected_head_variants(case):
    kw = dict(cin=24, c=40, k=19, base_hw=(9, 11), contrib_hw=[(5, 6), (3, 3)])
    if case == "no-biases":
        kw.update(b0=False, bias=False)
    elif case == "cin-48-k70":  # w48's branch-0 width; classes over two grid blocks
        kw.update(cin=48, c=72, k=70)
    elif case == "no-contributions":
        kw.update(contrib_hw=[])
    elif case == "cin-5":  # a width far below the dot's 16: masked input channels
        kw.update(cin=5)
    elif case == "same-size":
        kw.update(contrib_hw=[(9, 11), (9, 11), (2, 2), (5, 6)])
    x0, w0, b0, contribs, w, b = _case(torch.float32, True, **kw)
    if case == "nan":
        x0[0, 3, 4, 5] = float("nan")
        out = _run(x0, w0, b0, contribs, w, b, "bilinear", False)
        assert torch.isnan(out[0, :, 4, 5]).all()  # a NaN input channel reaches every class
        assert not torch.isnan(out[1]).any() and not torch.isnan(out[0, :, 4, 6]).any()
        return
    out = _run(x0, w0, b0, contribs, w, b, "bilinear", False)
    _check(out, x0, w0, b0, contribs, w, b, "bilinear", False, torch.float32, case)


def test_fits_rule():
    x0, w0, b0, contribs, w, b = _case(torch.float32, False, 24, 40, 19, (9, 11), [(5, 6)] * 4)
    assert projected_head_fits(x0, contribs, w0, w)
    assert not projected_head_fits(x0, contribs + contribs[:1], w0, w)  # five contributions
    assert not projected_head_fits(torch.empty(1, 72, 9, 11), contribs, w0, w)  # too wide
    assert not projected_head_fits(x0, contribs, w0, torch.empty(19, 40, 3, 3))  # 3x3 classifier


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_triton_engine_uses_the_projected_head(mode, monkeypatch):
    """With the projected head switched on, the Triton backend's seg head goes through it once
    per forward (hoisted plan: branch 0's projection without bias), and the whole model matches
    the reference; switched off (the default), it is never called."""
    from hrnet_fast.backends import triton as triton_backend
    from hrnet_fast.engine import run_plan
    from helpers import hoisted_w18_small_v1, poisoned_allocations, rel_err

    model, x, plan = hoisted_w18_small_v1(mode)
    calls = []
    real = torch.ops.hrnet_fast.seg_head_projected_triton

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(torch.ops.hrnet_fast, "seg_head_projected_triton", spy)
    off = triton_backend.Triton.prepare(plan, DEVICE, torch.float32, auto=True)
    monkeypatch.setattr(triton_backend, "PROJECTED_HEAD_DEVICES", {DEVICE.type})
    on = triton_backend.Triton.prepare(plan, DEVICE, torch.float32, auto=True)
    with torch.no_grad(), poisoned_allocations(monkeypatch):
        want = model(x)
        got_off = run_plan(plan, off, x)
        assert calls == []
        got = run_plan(plan, on, x)
    assert len(calls) == 1 and calls[0][1] == 16  # branch 0 of w18_small_v1
    assert rel_err(got, want) < 1e-5 and rel_err(got_off, want) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("cin,c", [(24, 272), (48, 720)], ids=["w18", "w48"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_projected_head_full_size_on_gpu(dtype, cin, c):
    """The w18 / w48 heads at 1x3x1024x2048 (branch 0 at 256x512, three contributions) in the
    engine's dtypes and layout, against the float64 oracle with the tolerance rule."""
    args = _case(dtype, True, cin, c, 19, (256, 512), [(128, 256), (64, 128), (32, 64)], n=1)
    out = _run(*args, "bilinear", False)
    _check(out, *args, "bilinear", False, dtype, f"projected head {cin}->{c}")
