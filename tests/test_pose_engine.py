"""The engine on pose models: the last module computes branch 0 only, and its fuse plus
``final_layer`` run as one head op (fused kernel for a 1x1 final conv)."""
import pytest
import torch

from hrnet_fast import HRNet, HRNetConfig, optimize
from hrnet_fast.backends.recording import FuseProblem, HeadProblem, record_problems
from hrnet_fast.backends.torch_cpu import TorchCPU
from hrnet_fast.check import clone_as
from hrnet_fast.engine import run_plan
from hrnet_fast.kernels import triton_status
from hrnet_fast.plan import build_plan
from hrnet_fast.reference import HighResolutionNet
from helpers import DEVICE, poisoned_allocations, randomize_bn, rel_err, require_native_precision
from oracles import assert_model_close

TOL = 1e-5


def _pose(preset="w18_small_v1", **kw):
    kw.setdefault("num_classes", 17)
    return randomize_bn(HighResolutionNet(HRNetConfig.preset(preset, head="pose", **kw))).eval()


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_padded_pose_plan_is_exact_in_float64(mode, k):
    model = _pose(upsample=mode, final_conv_kernel=k).double()
    x = torch.randn(2, 3, 67, 45, dtype=torch.float64)
    for m in (1, 8):
        plan = build_plan(model, channel_multiple=m)
        with torch.no_grad():
            got = run_plan(plan, TorchCPU.prepare(plan, torch.device("cpu"), torch.float64), x)
            want = model(x)
        assert got.shape == want.shape == (2, 17, 17, 12)
        assert rel_err(got, want) < 1e-12


def test_last_module_fuses_branch_zero_only_into_the_head():
    calls = record_problems(HRNetConfig.preset("w32", head="pose", num_classes=17), 1, 256, 192)
    fuses = [c for c in calls if isinstance(c, FuseProblem)]
    heads = [c for c in calls if isinstance(c, HeadProblem)]
    # w32: stage 2 (1 module x 2 outputs), stage 3 (4 x 3), stage 4 (3 modules; the last one's
    # single output is the head op).
    assert len(fuses) == 2 + 12 + 2 * 4
    assert len(heads) == 1 and heads[0].base.shape == (1, 32, 64, 48)
    assert [c.shape[1:] for c in heads[0].contributions] == [(32, 32, 24), (32, 16, 12), (32, 8, 6)]
    assert heads[0].weight == (17, 32, 1, 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_pose_engine_matches_reference(backend, mode, monkeypatch):
    if backend == "triton" and not triton_status(DEVICE)[0]:
        pytest.skip(triton_status(DEVICE)[1])
    model = _pose(upsample=mode).to(DEVICE)
    x = torch.randn(2, 3, 61, 47, device=DEVICE)
    engine = optimize(model, backend=backend, cuda_graphs=False)
    with torch.no_grad(), poisoned_allocations(monkeypatch):
        got = engine(x)
    with torch.no_grad():
        want = model(x)
    assert got.shape == want.shape and rel_err(got, want) < TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pose_engine_low_precision(dtype):
    require_native_precision(dtype, DEVICE)
    if dtype == torch.bfloat16 and DEVICE.type == "cpu":
        backend = "torch"  # the interpreter has no bf16
    else:
        backend = "triton" if triton_status(DEVICE)[0] else "torch"
    model = _pose().to(DEVICE)
    x = torch.randn(2, 3, 64, 48, device=DEVICE)
    with torch.no_grad():
        ref64 = clone_as(model, torch.float64)(x.double())
        own = clone_as(model, dtype)(x.to(dtype))
        out = optimize(model, backend=backend, dtype=dtype, cuda_graphs=False)(x.to(dtype))
    assert_model_close(out, ref64, own, dtype=dtype, what=f"pose {backend} {dtype}")


def test_pose_dropin_runs_the_engine():
    model = HRNet(HRNetConfig.preset("w18_small_v1", head="pose", num_classes=16))
    randomize_bn(model).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.inference_mode():
        got = model(x)
    assert model.engine is not None
    with torch.no_grad():
        want = model.forward_backbone(x)[0]
        want = model.final_layer(want)
    assert rel_err(got, want) < TOL
