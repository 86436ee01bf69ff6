import warnings

import pytest
import torch

from hrnet_fast import CheckpointError, HRNet, HRNetConfig, load_checkpoint
from helpers import randomize_bn

X = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))


def _random_model(preset="w18_small_v1", seed=0, **kw):
    torch.manual_seed(seed)
    model = randomize_bn(HRNet(HRNetConfig.preset(preset, **kw), fast=False), seed=seed)
    with torch.no_grad():  # the default conv init is fine; also randomise the conv biases
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _outputs(model):
    with torch.no_grad():
        return model.eval()(X)


def _assert_same(a, b):
    if isinstance(a, list):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _fresh(preset="w18_small_v1", **kw):
    return HRNet(HRNetConfig.preset(preset, **kw), fast=False).eval()


def test_plain_state_dict_round_trip_via_file(tmp_path):
    src = _random_model()
    path = tmp_path / "plain.pth"
    torch.save(src.state_dict(), path)
    dst = _fresh()
    report = load_checkpoint(dst, path)
    assert report.format == "plain" and report.wrapper is None
    assert not report.missing and not report.skipped
    assert len(report.loaded) == len(src.state_dict())
    _assert_same(_outputs(dst), _outputs(src))


def test_official_segmentation_release(tmp_path):
    src = _random_model()
    sd = {"model." + k: v for k, v in src.state_dict().items()}
    sd["loss.criterion.weight"] = torch.ones(19)
    path = tmp_path / "hrnet_cs.pth"
    torch.save(sd, path)
    dst = _fresh()
    report = load_checkpoint(dst, str(path))
    assert report.format == "official-seg"
    assert report.skipped == ["loss.criterion.weight"]
    _assert_same(_outputs(dst), _outputs(src))


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_training_checkpoint_wrappers(tmp_path, wrapper):
    src = _random_model()
    inner = {"model." + k: v for k, v in src.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({wrapper: inner, "epoch": 484, "best_mIoU": 0.81}, path)
    dst = _fresh()
    report = load_checkpoint(dst, path)
    assert report.wrapper == wrapper and report.format == "official-seg"
    _assert_same(_outputs(dst), _outputs(src))


def test_dataparallel_prefix():
    src = _random_model()
    dst = _fresh()
    load_checkpoint(dst, {"module." + k: v for k, v in src.state_dict().items()})
    _assert_same(_outputs(dst), _outputs(src))


@pytest.mark.parametrize("head", ["seg", "features"])
def test_imagenet_weights_into_seg_and_features(head):
    cls = _random_model(head="classification", num_classes=1000)
    dst = _fresh(head=head)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = load_checkpoint(dst, cls.state_dict())
    assert report.format == "imagenet"
    head_keys = [k for k in cls.state_dict() if k.startswith(
        ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier."))]
    assert sorted(report.skipped) == sorted(head_keys)
    if head == "seg":
        assert report.missing and all(k.startswith("last_layer.") for k in report.missing)
        assert any("head" in str(w.message) for w in caught)
    else:
        assert not report.missing
    # The backbone is exactly the classification model's backbone.
    feats = _fresh(head="features")
    load_checkpoint(feats, cls.state_dict())
    with torch.no_grad():
        _assert_same(feats(X), cls.forward_backbone(X))


def test_imagenet_weights_into_classification_model():
    cls = _random_model(head="classification", num_classes=1000)
    dst = _fresh(head="classification", num_classes=1000)
    report = load_checkpoint(dst, cls.state_dict())
    assert report.format == "imagenet" and not report.skipped and not report.missing
    _assert_same(_outputs(dst), _outputs(cls))


def test_mmseg_format(tmp_path):
    src = _random_model()
    sd = {}
    for k, v in src.state_dict().items():
        if k.startswith("last_layer.0.bias"):
            continue
        if k.startswith("last_layer.0."):
            sd["decode_head.convs.0.conv." + k[len("last_layer.0."):]] = v
        elif k.startswith("last_layer.1."):
            sd["decode_head.convs.0.bn." + k[len("last_layer.1."):]] = v
        elif k.startswith("last_layer.3."):
            sd["decode_head.conv_seg." + k[len("last_layer.3."):]] = v
        else:
            sd["backbone." + k] = v
    with torch.no_grad():  # mmseg's head conv has no bias: the source model must have a zero one
        src.last_layer[0].bias.zero_()
    path = tmp_path / "mmseg.pth"
    torch.save({"meta": {"epoch": 3}, "state_dict": sd}, path)
    dst = _fresh()
    report = load_checkpoint(dst, path)
    assert report.format == "mmseg" and report.wrapper == "state_dict"
    assert torch.equal(dst.last_layer[0].bias, torch.zeros_like(dst.last_layer[0].bias))
    _assert_same(_outputs(dst), _outputs(src))


def test_inplace_abn_conversion():
    src = _random_model()
    sd = src.state_dict()
    bn_weights = [k for k in sd if k.endswith(".weight") and sd[k].dim() == 1
                  and not k.startswith("last_layer.3")]
    abn = dict(sd)
    for k in bn_weights:  # InPlaceABN stores w with abs(w) + eps used at run time
        abn[k] = -(sd[k] - 1e-5)
    dst = _fresh()
    load_checkpoint(dst, abn, inplace_abn=True)
    for k in bn_weights:
        torch.testing.assert_close(dst.state_dict()[k], sd[k].abs(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_outputs(dst), _outputs(src), rtol=1e-5, atol=1e-5)


def test_wrong_preset_names_key_shapes_and_preset():
    src = _random_model("w18_small_v2")
    dst = HRNet(HRNetConfig.preset("w18_small_v1"))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(dst, src.state_dict())
    msg = str(e.value)
    assert "w18_small_v2" in msg and "w18_small_v1" in msg


def test_wrong_class_count_names_key_and_both_shapes():
    src = _random_model(num_classes=19)
    dst = _fresh(num_classes=21)
    with pytest.raises(CheckpointError, match=r"last_layer\.3\.weight: checkpoint has \[19, 240, 1, 1\], "
                                              r"model has \[21, 240, 1, 1\]"):
        load_checkpoint(dst, src.state_dict())


def test_missing_and_unexpected_keys_strict_and_not():
    src = _random_model().state_dict()
    partial = {k: v for k, v in src.items() if not k.startswith("stage4.0.branches.3")}
    with pytest.raises(CheckpointError, match="stage4.0.branches.3"):
        load_checkpoint(_fresh(), partial)
    report = load_checkpoint(_fresh(), partial, strict=False)
    assert any(k.startswith("stage4.0.branches.3") for k in report.missing)
    extra = dict(src, **{"foo.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="foo.weight"):
        load_checkpoint(_fresh(), extra)
    assert "foo.weight" in load_checkpoint(_fresh(), extra, strict=False).skipped


def test_old_checkpoints_without_num_batches_tracked():
    src = _random_model()
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    dst = _fresh()
    report = load_checkpoint(dst, sd)
    assert not report.missing
    _assert_same(_outputs(dst), _outputs(src))


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(_fresh(), junk)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(_fresh(), tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not tensors"):
        load_checkpoint(_fresh(), {"epoch": 3, "lr": 0.1})
    with pytest.raises(CheckpointError, match="mapping"):
        load_checkpoint(_fresh(), [1, 2, 3])
    obj_file = tmp_path / "pickled.pth"
    torch.save({"state_dict": _random_model().state_dict(), "cfg": object.__new__(_Custom)}, obj_file)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(_fresh(), obj_file)


class _Custom:
    pass
