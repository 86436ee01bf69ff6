"""Folding and every plan rewrite, exact against the reference (torch backend, fp32, CPU)."""
import pytest
import torch
from torch import nn

from hrnet_fast import HRNet, HRNetConfig, PRESET_NAMES, optimize
from hrnet_fast.engine import OpSet, _module, run_plan
from hrnet_fast.fold import fold_conv_bn
from hrnet_fast.plan import build_plan
from helpers import randomize_bn, rel_err

TOL = 1e-5


def _model(preset="w18_small_v1", seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_bn(HRNet(HRNetConfig.preset(preset, **kw), fast=False), seed).eval()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("stride,k", [(1, 3), (2, 3), (1, 1)])
def test_fold_conv_bn_exact(bias, stride, k):
    torch.manual_seed(1)
    conv = nn.Conv2d(7, 5, k, stride, k // 2, bias=bias).double()
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(5)), seed=3)[0].double().eval()
    bn.eps = 1e-3
    x = torch.randn(2, 7, 11, 13, dtype=torch.float64)
    w, b = fold_conv_bn(conv, bn)
    folded = nn.functional.conv2d(x, w, b, stride, k // 2)
    torch.testing.assert_close(folded, bn(conv(x)), rtol=1e-12, atol=1e-12)


def test_fold_rejects_bn_without_statistics():
    with pytest.raises(ValueError, match="running statistics"):
        fold_conv_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))


def test_plan_batches_fuse_convs_with_relu_ranges():
    plan = build_plan(_model("w18"))
    fuse = plan.stages[2][0].fuse  # stage 4: branches 18/36/72/144
    up3 = fuse.up[3]
    assert [(s.target, s.start, s.end) for s in up3.splits] == [(0, 0, 18), (1, 18, 54), (2, 54, 126)]
    assert up3.conv.weight.shape == (126, 144, 1, 1) and not up3.conv.relu
    down0 = fuse.down_first[0]
    # chain 0->1 is one conv (no ReLU); 0->2 and 0->3 continue, so their first convs take a ReLU.
    assert [(s.target, s.start, s.end) for s in down0.splits] == [(1, 0, 36), (2, 36, 54), (3, 54, 72)]
    assert down0.conv.relu_ranges == ((36, 72),) and down0.conv.stride == 2
    assert [c.weight.shape[:2] for c in fuse.down_rest[(0, 3)]] == [(18, 18), (144, 18)]
    head = plan.head
    assert [p.weight.shape[:2] for p in head.projections] == [(270, 18), (270, 36), (270, 72), (270, 144)]
    assert head.projections[0].bias is not None and all(p.bias is None for p in head.projections[1:])


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_each_fused_module_matches_reference_module(mode):
    model = _model("w18_small_v2", upsample=mode)
    plan = build_plan(model).to(dtype=torch.float32)
    ops = OpSet.for_backend("torch", torch.device("cpu"))
    xs = [torch.randn(2, c, 31 // 2 ** i + 1, 45 // 2 ** i + 1) for i, c in enumerate((18, 36, 72, 144))]
    with torch.no_grad():
        for ref_module, module_plan in zip(model.stage4, plan.stages[2]):
            got = _module(ops, [x.contiguous(memory_format=torch.channels_last) for x in xs],
                          module_plan, mode, False)
            want = ref_module([x.clone() for x in xs])
            assert rel_err(got, want) < TOL
            xs = want


@pytest.mark.parametrize("mode,align", [("bilinear", False), ("bilinear", True), ("nearest", False)])
def test_head_rewrite_exact(mode, align):
    model = _model("w18_small_v2", upsample=mode, align_corners=align, num_classes=7)
    plan = build_plan(model).to(dtype=torch.float32)
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        feats = model.forward_backbone(x)
        size = feats[0].shape[-2:]
        up = [feats[0]] + [nn.functional.interpolate(
            f, size=size, mode=mode, **({"align_corners": align} if mode == "bilinear" else {}))
            for f in feats[1:]]
        want = model.last_layer(torch.cat(up, 1))
        ops = OpSet.for_backend("torch", torch.device("cpu"))
        p = [ops.conv(f, s) for f, s in zip(feats, plan.head.projections)]
        got = ops.head(p[0], p[1:], plan.head.classifier.weight, plan.head.classifier.bias, mode, align)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_every_preset_matches_reference(preset):
    model = _model(preset)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert rel_err(optimize(model, backend="torch")(x), model(x)) < TOL


@pytest.mark.parametrize("size", [(473, 473), (520, 520), (333, 517)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("head", ["seg", "features"])
def test_odd_sizes_batch2_heads_modes(size, mode, head):
    model = _model("w18_small_v1", upsample=mode, head=head)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        got, want = optimize(model, backend="torch")(x), model(x)
    if head == "features":
        assert len(got) == 4 and all(g.shape == w.shape for g, w in zip(got, want))
    else:
        assert got.shape == want.shape
    assert rel_err(got, want) < TOL


def test_classification_head_and_kernel3_classifier_and_align_corners():
    for kw in ({"head": "classification", "num_classes": 10},
               {"final_conv_kernel": 3, "align_corners": True}):
        model = _model("w18_small_v1", **kw)
        x = torch.randn(2, 3, 70, 90)
        with torch.no_grad():
            assert rel_err(optimize(model, backend="torch")(x), model(x)) < TOL


def test_channels_last_off_and_channels_last_input():
    model = _model("w18_small_v2")
    x = torch.randn(2, 3, 66, 98)
    with torch.no_grad():
        want = model(x)
        plain = optimize(model, backend="torch", channels_last=False)(x)
        cl_in = optimize(model, backend="torch")(x.contiguous(memory_format=torch.channels_last))
    assert rel_err(plain, want) < TOL and rel_err(cl_in, want) < TOL
    assert plain.is_contiguous()
    assert cl_in.is_contiguous(memory_format=torch.channels_last)


def test_plan_map_tensors_and_run_plan_in_float64():
    model = _model("w18_small_v1")
    plan = build_plan(model)
    assert all(t.dtype == torch.float64 for t in plan.tensors())
    x = torch.randn(1, 3, 40, 56, dtype=torch.float64)
    with torch.no_grad():
        got = run_plan(plan, OpSet.for_backend("torch", torch.device("cpu")), x)
        want = model.double()(x)
    assert rel_err(got, want) < 1e-12
