import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hrnet_fast import HRNet, HRNetConfig, PRESET_NAMES
from hrnet_fast.reference import BasicBlock, HighResolutionModule
from hrnet_fast.stats import count_macs, count_parameters
from helpers import randomize_bn

# Published segmentation parameter counts (19 classes) and timm's ImageNet ones (1000 classes).
SEG_PARAMS_M = {"w18_small_v1": 1.54, "w18_small_v2": 3.94, "w18": 9.64, "w32": 29.55, "w48": 65.86}
CLS_PARAMS_M = {"w18_small_v1": 13.19, "w18_small_v2": 15.60, "w18": 21.30, "w30": 37.71,
                "w32": 41.23, "w40": 57.56, "w44": 67.06, "w48": 77.47, "w64": 128.06}
# MACs of conv+linear layers at 1x3x1024x2048 (the published HRNet segmentation tables quote
# about 0.93x of these as GFLOPs).
SEG_GMACS_1024x2048 = {"w18_small_v1": 33.4, "w18_small_v2": 76.9, "w18": 147.4, "w32": 361.2,
                       "w48": 747.5}


@pytest.mark.parametrize("name", list(SEG_PARAMS_M))
def test_segmentation_parameter_counts(name):
    model = HRNet(HRNetConfig.preset(name))
    assert round(count_parameters(model) / 1e6, 2) == SEG_PARAMS_M[name]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_classification_parameter_counts(name):
    model = HRNet(HRNetConfig.preset(name, head="classification", num_classes=1000))
    assert round(count_parameters(model) / 1e6, 2) == CLS_PARAMS_M[name]


@pytest.mark.parametrize("name", list(SEG_GMACS_1024x2048))
def test_macs(name):
    model = HRNet(HRNetConfig.preset(name))
    assert round(count_macs(model, (1024, 2048)) / 1e9, 1) == SEG_GMACS_1024x2048[name]


def test_official_key_names():
    keys = set(HRNet(HRNetConfig.preset("w18")).state_dict())
    for k in ["conv1.weight", "bn1.running_var", "conv2.weight", "bn2.weight",
              "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_mean", "layer1.3.conv3.weight",
              "transition1.0.0.weight", "transition1.1.0.0.weight", "transition2.2.0.0.weight",
              "transition3.3.0.1.bias", "stage2.0.branches.1.3.conv2.weight",
              "stage3.3.fuse_layers.0.2.0.weight", "stage3.3.fuse_layers.0.2.1.running_var",
              "stage4.2.fuse_layers.3.0.2.0.weight", "stage4.2.fuse_layers.3.0.1.1.bias", "stage4.2.fuse_layers.3.2.0.1.weight",
              "last_layer.0.weight", "last_layer.0.bias", "last_layer.1.running_mean",
              "last_layer.3.weight", "last_layer.3.bias"]:
        assert k in keys, k
    # A None transition keeps its index: transition2 has no entry 0 or 1.
    assert not any(k.startswith(("transition2.0.", "transition2.1.")) for k in keys)
    cls_keys = set(HRNet(HRNetConfig.preset("w18", head="classification")).state_dict())
    for k in ["incre_modules.0.0.conv1.weight", "incre_modules.3.0.downsample.1.weight",
              "downsamp_modules.2.0.bias", "downsamp_modules.0.1.running_var",
              "final_layer.0.weight", "final_layer.1.weight", "classifier.weight", "classifier.bias"]:
        assert k in cls_keys, k
    assert not any(k.startswith("last_layer") for k in cls_keys)


@pytest.mark.parametrize("size,branches", [
    ((473, 473), [(119, 119), (60, 60), (30, 30), (15, 15)]),
    ((520, 520), [(130, 130), (65, 65), (33, 33), (17, 17)]),
    ((333, 517), [(84, 130), (42, 65), (21, 33), (11, 17)]),
])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_odd_sizes_all_heads(size, branches, mode):
    torch.manual_seed(0)
    cfg = HRNetConfig.preset("w18_small_v1", upsample=mode, head="features")
    feats_model = randomize_bn(HRNet(cfg, fast=False)).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        feats = feats_model(x)
        assert [tuple(f.shape[-2:]) for f in feats] == branches
        assert [f.shape[1] for f in feats] == [16, 32, 64, 128]
        seg = HRNet(cfg.replace(head="seg", num_classes=7), fast=False)
        seg.load_state_dict(feats_model.state_dict(), strict=False)
        out = seg.eval()(x)
        assert tuple(out.shape) == (2, 7, *branches[0])
        assert torch.isfinite(out).all()
        # The head is exactly the official concat + last_layer on the same features.
        up = [feats[0]] + [F.interpolate(f, size=branches[0], mode=mode,
                                         **({"align_corners": False} if mode == "bilinear" else {}))
                           for f in feats[1:]]
        torch.testing.assert_close(out, seg.last_layer(torch.cat(up, 1)), rtol=1e-5, atol=1e-5)


def _features_of(model, x):
    """The branch outputs of ``model``'s backbone, computed by a features model with its weights."""
    feats = HRNet(model.config.replace(head="features", upsample=model.config.upsample), fast=False)
    feats.load_state_dict(model.state_dict(), strict=False)
    return feats.eval()(x)


def test_classification_and_final_conv_kernel_3():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        cls = randomize_bn(HRNet(HRNetConfig.preset("w18_small_v1", head="classification",
                                                     num_classes=10), fast=False)).eval()
        logits = cls(x)
        assert tuple(logits.shape) == (2, 10)
        # The official ImageNet head: incremental blocks, strided sums, final conv, global mean, fc.
        f = _features_of(cls, x)
        y = cls.incre_modules[0](f[0])
        for i in range(3):
            y = cls.incre_modules[i + 1](f[i + 1]) + cls.downsamp_modules[i](y)
        y = F.adaptive_avg_pool2d(cls.final_layer(y), 1).flatten(1)
        torch.testing.assert_close(logits, F.linear(y, cls.classifier.weight, cls.classifier.bias),
                                   rtol=1e-5, atol=1e-5)

        seg3 = randomize_bn(HRNet(HRNetConfig.preset("w18_small_v1", final_conv_kernel=3,
                                                      num_classes=5), fast=False)).eval()
        assert seg3.last_layer[3].kernel_size == (3, 3)
        out = seg3(x)
        assert tuple(out.shape) == (2, 5, 16, 24)
        # concat of the resized branches, 1x1 conv, BN, ReLU, then a 3x3 conv with padding 1
        f = _features_of(seg3, x)
        cat = torch.cat([f[0]] + [F.interpolate(t, size=(16, 24), mode="bilinear",
                                                align_corners=False) for t in f[1:]], 1)
        conv, bn, cls3 = seg3.last_layer[0], seg3.last_layer[1], seg3.last_layer[3]
        act = torch.relu(F.batch_norm(F.conv2d(cat, conv.weight, conv.bias), bn.running_mean,
                                      bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
        torch.testing.assert_close(out, F.conv2d(act, cls3.weight, cls3.bias, padding=1),
                                   rtol=1e-5, atol=1e-5)


def test_nearest_mode_equals_seed_scale_factor_upsample():
    """On power-of-two sizes, size-based nearest resizing is the seed's nn.Upsample(scale_factor)."""
    torch.manual_seed(0)
    model = randomize_bn(HRNet(HRNetConfig.preset("w18_small_v2", upsample="nearest", head="features"),
                               fast=False))
    model.eval()
    module: HighResolutionModule = model.stage4[0]
    xs = [torch.randn(1, c, 32 // 2 ** i, 48 // 2 ** i) for i, c in enumerate((18, 36, 72, 144))]
    with torch.no_grad():
        got = module([x.clone() for x in xs])
        branches = [module.branches[i](xs[i]) for i in range(4)]
        for i in range(4):
            y = branches[0] if i == 0 else module.fuse_layers[i][0](branches[0])
            for j in range(1, 4):
                if i == j:
                    y = y + branches[j]
                elif j > i:
                    y = y + nn.Upsample(scale_factor=2 ** (j - i), mode="nearest")(
                        module.fuse_layers[i][j](branches[j]))
                else:
                    y = y + module.fuse_layers[i][j](branches[j])
            torch.testing.assert_close(got[i], torch.relu(y), rtol=0, atol=0)


def test_check_branches_messages():
    args = dict(blocks=BasicBlock, fuse_method="SUM")
    with pytest.raises(ValueError, match=r"^NUM_BRANCHES\(2\) <> NUM_BLOCKS\(1\)$"):
        HighResolutionModule(2, num_blocks=[1], num_inchannels=[8, 16], num_channels=[8, 16], **args)
    with pytest.raises(ValueError, match=r"^NUM_BRANCHES\(2\) <> NUM_CHANNELS\(3\)$"):
        HighResolutionModule(2, num_blocks=[1, 1], num_inchannels=[8, 16], num_channels=[8, 16, 32],
                             **args)
    with pytest.raises(ValueError, match=r"^NUM_BRANCHES\(2\) <> NUM_INCHANNELS\(1\)$"):
        HighResolutionModule(2, num_blocks=[1, 1], num_inchannels=[8], num_channels=[8, 16], **args)


def test_module_helpers_and_single_scale_output():
    torch.manual_seed(0)
    args = (3, BasicBlock, [1, 1, 1], [8, 16, 32], [8, 16, 32], "SUM")
    m = randomize_bn(HighResolutionModule(*args, multi_scale_output=False)).eval()
    assert m.get_num_inchannels() == [8, 16, 32]
    assert len(m.fuse_layers) == 1
    xs = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]
    with torch.no_grad():
        out = m([x.clone() for x in xs])
        assert len(out) == 1 and out[0].shape == (2, 8, 16, 16)
        # output 0 of the multi-scale module with the same weights ...
        multi = HighResolutionModule(*args, multi_scale_output=True).eval()
        missing = multi.load_state_dict(m.state_dict(), strict=False).missing_keys
        assert missing and all(k.startswith(("fuse_layers.1.", "fuse_layers.2.")) for k in missing)
        torch.testing.assert_close(out[0], multi([x.clone() for x in xs])[0], rtol=0, atol=0)
        # ... and the fuse rule: relu(b_0 + sum_j up(conv_bn_j(b_j))), nearest (the module default)
        b = [m.branches[i](xs[i]) for i in range(3)]
        want = torch.relu(b[0] + sum(F.interpolate(m.fuse_layers[0][j](b[j]), size=(16, 16))
                                     for j in (1, 2)))
        torch.testing.assert_close(out[0], want, rtol=1e-6, atol=1e-6)


def test_bad_input_is_named():
    model = HRNet(HRNetConfig.preset("w18_small_v1"), fast=False).eval()
    with pytest.raises(ValueError, match="4 channels"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_reference_trains():
    """Its gradients are the derivatives of its output: a central difference along a random
    direction (float64, training-mode BatchNorm) matches autograd, also through a fuse layer."""
    torch.manual_seed(0)
    model = HRNet(HRNetConfig.preset("w18_small_v1", num_classes=3)).double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out = model(x)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    # the stem, a resized and a strided fuse path, the head
    params = [model.conv1.weight, model.stage3[0].fuse_layers[0][2][0].weight,
              model.stage3[0].fuse_layers[2][0][0][0].weight, model.last_layer[0].weight,
              model.last_layer[3].weight]
    assert all(p.grad is not None for p in params)
    # d loss / d bias_c of the classifier is the sum of the loss weights of class c
    torch.testing.assert_close(model.last_layer[3].bias.grad, weights.sum((0, 2, 3)))
    dirs = [torch.randn_like(p) for p in params]
    slope = sum(float((p.grad * d).sum()) for p, d in zip(params, dirs))
    h = 1e-9  # small enough that no ReLU kink lies within the step (float64: rounding ~1e-7)
    with torch.no_grad():
        losses = []
        for sign in (1, -1):
            for p, d in zip(params, dirs):
                p.add_(sign * h * d)
            losses.append(float((model(x) * weights).sum()))
            for p, d in zip(params, dirs):
                p.sub_(sign * h * d)
    assert abs((losses[0] - losses[1]) / (2 * h) - slope) <= 1e-5 * abs(slope)


def test_hrnet_accepts_preset_name():
    model = HRNet("w18_small_v2", num_classes=4)
    assert model.config.name == "w18_small_v2" and model.config.num_classes == 4
