"""Hoisted biases (CUDA plans): the fuse steps' ReLU-free conv biases move into the fuse op,
``relu(x_i + sum_j b_j + sum_j resize(W_j x_j))``; exact for every head and resize convention, and
the fuse op's bias is right in every backend."""
import pytest
import torch

from hrnet_fast import HRNetConfig
from hrnet_fast.backends.recording import FuseProblem, record_problems
from hrnet_fast.backends.torch_cpu import TorchCPU
from hrnet_fast.engine import run_plan
from hrnet_fast.kernels import triton_status
from hrnet_fast.ops import upsample_add_relu
from hrnet_fast.plan import build_plan
from hrnet_fast.reference import HighResolutionNet
from helpers import DEVICE, poisoned_allocations, randomize_bn, rel_err
from oracles import assert_close_to_oracle, fuse_fp64, fuse_same_dtype


def _model(preset="w18_small_v1", **kw):
    return randomize_bn(HighResolutionNet(HRNetConfig.preset(preset, **kw))).eval()


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "mmseg"])
@pytest.mark.parametrize("head", ["seg", "pose", "features"])
def test_hoisted_plan_is_exact_in_float64(head, mode):
    kw = {"num_classes": 17} if head == "pose" else {}
    model = _model(head=head, upsample=mode, **kw).double()
    x = torch.randn(2, 3, 67, 45, dtype=torch.float64)
    plan = build_plan(model, channel_multiple=8, hoist_biases=True)
    fuses = [m.fuse for stage in plan.stages for m in stage if m.fuse is not None]
    assert any(f.bias for f in fuses)
    for f in (f for f in fuses if f.bias):  # every up conv and chain end gave its bias away
        assert all(b.conv.bias is None for b in f.up.values())
        assert all(rest[-1].bias is None for rest in f.down_rest.values())
    # layer1's downsample gave its bias to the block's last conv; the seg head's projection bias
    # sits at the lowest-resolution branch
    assert plan.layer1[0].downsample is not None and plan.layer1[0].downsample.bias is None
    if head == "seg":
        assert plan.head.projections[0].bias is None and plan.head.projections[-1].bias is not None
    with torch.no_grad():
        got = run_plan(plan, TorchCPU.prepare(plan, torch.device("cpu"), torch.float64), x)
        want = model(x)
    assert rel_err(got, want) < 1e-12


def test_unhoisted_plan_keeps_block_and_head_biases():
    plan = build_plan(_model(), channel_multiple=8)
    assert plan.layer1[0].downsample.bias is not None
    assert plan.head.projections[0].bias is not None
    assert all(p.bias is None for p in plan.head.projections[1:])


@pytest.mark.parametrize("narrow", [False, True])
def test_hoisted_head_bias_with_merged_projection(narrow, monkeypatch):
    """The CPU backend's merged head projection sums the merged projections' biases, so a plan whose
    head bias moved to the last branch stays exact whether or not that branch is merged."""
    model = _model(preset="w18_small_v2").double()
    x = torch.randn(1, 3, 61, 83, dtype=torch.float64)
    plan = build_plan(model, channel_multiple=8, hoist_biases=True)
    be = TorchCPU.prepare(plan, torch.device("cpu"), torch.float64)
    monkeypatch.setattr(type(be), "resize_narrow_head_branches", narrow)
    with torch.no_grad():
        got = run_plan(plan, be, x)
        want = model(x)
    assert rel_err(got, want) < 1e-12
    assert any(k[0] == "merged_head_projection" for k in be.derived) == narrow


def test_pose_head_module_keeps_its_biases():
    plan = build_plan(_model(head="pose", num_classes=17), channel_multiple=8, hoist_biases=True)
    last = plan.stages[-1][-1].fuse
    assert not last.bias and all(b.conv.bias is not None for b in last.up.values())


def test_recorded_cuda_plan_fuses_carry_the_bias():
    calls = record_problems("w18_small_v1", 1, 64, 96)
    assert all(c.bias for c in calls if isinstance(c, FuseProblem))
    calls = record_problems("w18_small_v1", 1, 64, 96, channel_multiple=1)
    assert not any(c.bias for c in calls if isinstance(c, FuseProblem))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_fuse_op_bias(backend, dtype, mode, monkeypatch):
    if backend == "triton" and not triton_status(DEVICE)[0]:
        pytest.skip(triton_status(DEVICE)[1])
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        t = torch.randn(*shape, generator=g).to(DEVICE, dtype)
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    base = rnd(2, 24, 13, 17)
    wide = rnd(2, 40, 7, 9)  # a channel slice of a batched conv output
    contributions = [wide[:, 8:32], rnd(2, 24, 4, 5), rnd(2, 24, 13, 17)]
    bias = rnd(24)
    with torch.no_grad(), poisoned_allocations(monkeypatch):
        out = upsample_add_relu(base, contributions, mode=mode, bias=bias, backend=backend)
    oracle = fuse_fp64(base, contributions, mode, False, bias=bias)
    same = fuse_same_dtype(base, contributions, mode, False, bias=bias)
    assert_close_to_oracle(out, oracle, same, dtype=dtype, what=f"{backend} fuse with bias")
    with pytest.raises(ValueError, match=r"bias must be a \[24\] tensor"):
        upsample_add_relu(base, contributions, bias=rnd(23), backend=backend)


def test_triton_engine_on_a_hoisted_plan():
    if not triton_status(DEVICE)[0]:
        pytest.skip(triton_status(DEVICE)[1])
    from hrnet_fast.backends.triton import Triton
    model = _model().to(DEVICE)
    x = torch.randn(2, 3, 45, 61, device=DEVICE).contiguous(memory_format=torch.channels_last)
    plan = build_plan(model, channel_multiple=8, hoist_biases=True).map_tensors(
        lambda t: t.float().contiguous(memory_format=torch.channels_last) if t.dim() == 4
        else t.float().contiguous())
    with torch.no_grad():
        got = run_plan(plan, Triton.prepare(plan, DEVICE, torch.float32), x)
        want = model(x)
    assert rel_err(got, want) < 1e-5
