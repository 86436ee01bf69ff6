"""upsample="mmseg": mmsegmentation's fuse step (bilinear by scale factor 2^k inside the fuse layer,
then a bilinear resize to the exact size in HRModule.forward), in the reference, the plan and the
engine's backends, checked against an oracle written from mmseg's code."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from hrnet_fast import HRNetConfig, load_checkpoint, optimize
from hrnet_fast.backends.torch_cpu import TorchCPU
from hrnet_fast.engine import run_plan
from hrnet_fast.kernels import triton_status
from hrnet_fast.plan import build_plan
from hrnet_fast.reference import HighResolutionNet
from helpers import DEVICE, randomize_bn, rel_err
from test_checkpoints import _mmseg_keys


def _model(preset="w18_small_v1", upsample="mmseg", **kw):
    return randomize_bn(HighResolutionNet(HRNetConfig.preset(preset, upsample=upsample, **kw))).eval()


def mmseg_module_oracle(module, xs):
    """mmseg 1.x HRModule.forward with its fuse layers: for j > i, fuse_layers[i][j] is conv, BN,
    nn.Upsample(scale_factor=2 ** (j - i), mode="bilinear", align_corners=False), and the sum adds
    resize(that, size=x[i].shape[2:], mode="bilinear", align_corners=False)."""
    xs = [module.branches[i](x) for i, x in enumerate(xs)]
    out = []
    for i in range(len(module.fuse_layers)):
        y = None
        for j, x in enumerate(xs):
            if j == i:
                z = x
            elif j > i:
                z = F.interpolate(module.fuse_layers[i][j](x), scale_factor=2 ** (j - i),
                                  mode="bilinear", align_corners=False)
                if z.shape[2:] != xs[i].shape[2:]:
                    z = F.interpolate(z, size=xs[i].shape[2:], mode="bilinear", align_corners=False)
            else:
                z = module.fuse_layers[i][j](x)
            y = z if y is None else y + z
        out.append(F.relu(y))
    return out


@pytest.mark.parametrize("size", [(33, 45), (23, 17)])
def test_reference_module_is_mmseg_fuse(size):
    model = _model().double()
    module = model.stage4[0]
    h, w = size
    xs = [torch.randn(2, c, h, w, dtype=torch.float64) for c in module.num_inchannels]
    for i in range(1, len(xs)):  # each branch (s + 1) // 2 of the previous, as the model makes them
        h, w = (h + 1) // 2, (w + 1) // 2
        xs[i] = torch.randn(2, module.num_inchannels[i], h, w, dtype=torch.float64)
    with torch.no_grad():
        got, want = module([x.clone() for x in xs]), mmseg_module_oracle(module, xs)
    assert all(torch.equal(g, w_) for g, w_ in zip(got, want))
    with torch.no_grad():  # and the two-step resize matters at these sizes
        model.stage4[0].upsample = "bilinear"
        assert rel_err(module([x.clone() for x in xs]), want) > 1e-4


def test_mmseg_equals_bilinear_at_sizes_divisible_by_32():
    m, b = _model(), _model(upsample="bilinear")
    b.load_state_dict(m.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(m(x), b(x))


def test_padded_plan_is_exact_in_float64():
    model = _model().double()
    x = torch.randn(2, 3, 67, 99, dtype=torch.float64)
    plan = build_plan(model, channel_multiple=8)
    with torch.no_grad():
        got = run_plan(plan, TorchCPU.prepare(plan, torch.device("cpu"), torch.float64), x)
        want = model(x)
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("head", ["seg", "pose"])
def test_engine_matches_reference(backend, head):
    if backend == "triton" and not triton_status(DEVICE)[0]:
        pytest.skip(triton_status(DEVICE)[1])
    kw = {"num_classes": 17} if head == "pose" else {}
    model = _model(head=head, **kw).to(DEVICE)
    x = torch.randn(2, 3, 75, 53, device=DEVICE)
    with torch.no_grad():
        got = optimize(model, backend=backend, cuda_graphs=False)(x)
        want = model(x)
    assert rel_err(got, want) < 1e-5


def test_mmseg_checkpoint_names_its_convention():
    sd, _ = _mmseg_keys(_model(upsample="bilinear", preset="w18_small_v1").state_dict())
    for upsample, expect in (("bilinear", 1), ("mmseg", 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = load_checkpoint(HighResolutionNet(HRNetConfig.preset("w18_small_v1",
                                                                          upsample=upsample)), sd)
        said = [str(w.message) for w in caught if "upsample" in str(w.message)]
        assert report.format == "mmseg" and len(said) == expect, said
        if expect:
            assert "upsample='mmseg'" in said[0] and "not divisible by 32" in said[0]


def test_config_rejects_align_corners_with_mmseg():
    with pytest.raises(ValueError, match="align_corners=True is only defined for upsample='bilinear'"):
        HRNetConfig.preset("w18", upsample="mmseg", align_corners=True)
