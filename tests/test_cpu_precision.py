"""Reduced precision on the CPU: bfloat16/float16 engines where the CPU runs them natively, within
the design's rule; a clear refusal (engine) or the reference path with a warning (drop-in) where
it does not."""
import warnings

import pytest
import torch

from hrnet_fast import BackendUnavailable, HRNet, HRNetConfig, optimize
from hrnet_fast.backends import torch_cpu
from hrnet_fast.check import clone_as
from helpers import randomize_bn
from oracles import assert_model_close


def _model():
    return randomize_bn(HRNet(HRNetConfig.preset("w18_small_v1"))).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_low_precision_within_twice_the_reference_error(dtype):
    ok, why = torch_cpu.native_precision(dtype)
    if not ok:
        pytest.skip(f"{why}: the native {dtype} CPU path is NOT tested on this machine")
    model = _model()
    x = torch.randn(2, 3, 67, 91)
    with torch.no_grad():
        ref64 = clone_as(model, torch.float64)(x.double())
        own = clone_as(model, dtype)(x.to(dtype))
        out = optimize(model, backend="torch", dtype=dtype)(x.to(dtype))
    assert_model_close(out, ref64, own, dtype=dtype, what=f"CPU {dtype}")


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    torch_cpu.native_precision.cache_clear()
    yield
    torch_cpu.native_precision.cache_clear()


def test_engine_refuses_emulated_bfloat16(no_native_bf16):
    with pytest.raises(BackendUnavailable, match="no native bfloat16 .*use dtype=torch.float32"):
        optimize(_model(), dtype=torch.bfloat16)
    assert torch_cpu.native_precision(torch.float32) == (True, "")


def test_dropin_runs_the_reference_on_emulated_bfloat16(no_native_bf16):
    model = _model().to(torch.bfloat16)
    x = torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode():
            got = model(x)
            model(x)
    said = [str(w.message) for w in caught if "reference forward" in str(w.message)]
    assert len(said) == 1 and "no native bfloat16" in said[0]
    assert model.engine is None
    want = model(x).detach()  # autograd on: the reference forward, by definition
    assert torch.equal(got, want)
