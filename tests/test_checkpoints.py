import collections
import contextlib
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from hrnet_fast import CheckpointError, HRNet, HRNetConfig, load_checkpoint
from hrnet_fast.checkpoints import RunnerPlaceholder, read_checkpoint
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
    # The backbone is exactly the classification model's backbone (with its resize, nearest).
    feats = _fresh(head="features", upsample="nearest")
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
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(_fresh(), junk)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(_fresh(), tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not tensors"):
        load_checkpoint(_fresh(), {"epoch": 3, "lr": 0.1})
    with pytest.raises(CheckpointError, match="mapping"):
        load_checkpoint(_fresh(), [1, 2, 3])
    obj_file = tmp_path / "pickled.pth"
    torch.save({"state_dict": _random_model().state_dict(), "cfg": object.__new__(_Custom)}, obj_file)
    with pytest.raises(CheckpointError, match="weights_only") as e:
        load_checkpoint(_fresh(), obj_file)
    msg = str(e.value)
    assert str(obj_file) in msg and "arbitrary Python objects" in msg and "_Custom" in msg
    assert "runs code from the file" in msg and "trusted source" in msg


class _Custom:
    pass


# --- upsample convention of the checkpoint vs the model (issue 10, item 4) ----------------------

def _imagenet_sd():
    """A state dict in the official / timm ImageNet key format (backbone keys plus incre_modules,
    downsamp_modules, final_layer, classifier), as timm's hrnet_w* checkpoints hold it."""
    sd = _random_model(head="classification", num_classes=1000).state_dict()
    assert any(k.startswith("incre_modules.") for k in sd) and "classifier.weight" in sd
    return sd


def _convention_warnings(caught):
    return [w for w in caught if "upsample" in str(w.message)]


def _load_recording(model, sd, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = load_checkpoint(model, sd, **kw)
    return report, _convention_warnings(caught)


def test_imagenet_weights_into_default_classification_model_need_no_warning():
    model = _fresh(head="classification", num_classes=1000)
    assert model.config.upsample == "nearest"  # as the official and timm ImageNet models
    report, caught = _load_recording(model, _imagenet_sd())
    assert report.format == "imagenet" and not caught


def test_imagenet_weights_into_bilinear_classification_model_warn_once():
    model = _fresh(head="classification", num_classes=1000, upsample="bilinear")
    report, caught = _load_recording(model, _imagenet_sd())
    assert report.format == "imagenet"
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "nearest" in msg and "bilinear" in msg and "imagenet" in msg
    assert "HRNetConfig.preset(" in msg and "upsample='nearest'" in msg


def test_imagenet_weights_into_bilinear_features_model_warn():
    report, caught = _load_recording(_fresh(head="features"), _imagenet_sd())
    assert len(caught) == 1 and "upsample='nearest'" in str(caught[0].message)


def test_imagenet_backbone_init_of_a_seg_model_does_not_warn_about_upsample():
    # The official segmentation training starts from the ImageNet (nearest) weights and fine-tunes
    # with bilinear: the head is new anyway, so only the missing-head warning is given.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(_fresh(), _imagenet_sd())
    assert any("head" in str(w.message) for w in caught)
    assert not _convention_warnings(caught)


def test_official_seg_release_into_nearest_model_warns_once():
    src = _random_model()
    sd = {"model." + k: v for k, v in src.state_dict().items()}
    report, caught = _load_recording(_fresh(upsample="nearest"), sd)
    assert report.format == "official-seg" and len(caught) == 1
    msg = str(caught[0].message)
    assert "official-seg" in msg and "upsample='bilinear'" in msg and "nearest" in msg
    _, caught = _load_recording(_fresh(), sd)  # the default seg model: bilinear, no warning
    assert not caught


def test_plain_checkpoints_imply_no_convention():
    src = _random_model(upsample="nearest")
    _, caught = _load_recording(_fresh(), src.state_dict())
    assert not caught


# --- unreadable files, meta tensors, prefixes (issue 10, item 11) -------------------------------

@pytest.mark.parametrize("content,reason", [
    # the weights-only unpickler on random bytes: torch's text suggests weights_only=False
    (bytes(range(256)) * 16, "Unsupported operand"),
    (b"\x80\x02" + bytes(range(200, 256)) * 4, "Unsupported operand"),
    (b"this is not a checkpoint", "Error"),
    (b"", "ends too early"),
    ("zip-truncated", "central directory"),
    ("zip-corrupted", "Error"),
], ids=["random", "pickle-header", "text", "empty", "zip-truncated", "zip-corrupted"])
def test_corrupt_files_never_suggest_unsafe_loading(tmp_path, content, reason):
    if isinstance(content, str):
        good = tmp_path / "good.pth"
        torch.save(_random_model().state_dict(), good)
        data = good.read_bytes()
        if content == "zip-truncated":
            content = data[: len(data) // 2]
        else:
            content = data[:100] + bytes(b ^ 0xFF for b in data[100:400]) + data[400:]
    path = tmp_path / "corrupt.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(_fresh(), path)
    msg = str(e.value)
    assert str(path) in msg and "not a readable PyTorch checkpoint" in msg
    assert "weights_only" not in msg and "trusted" not in msg and "Python objects" not in msg
    assert reason in msg  # torch's reason, kept short
    assert len(msg) < len(str(path)) + 300 and "\n" not in msg


def test_torchscript_archive_is_named(tmp_path):
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation, torch.load's dispatch notice
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
        with pytest.raises(CheckpointError, match="TorchScript") as e:
            load_checkpoint(_fresh(), path)
    assert "trusted source" in str(e.value) and str(path) in str(e.value)


def test_meta_tensors_name_a_key_and_say_there_is_no_data(tmp_path):
    with torch.device("meta"):
        meta = HRNet(HRNetConfig.preset("w18_small_v1"), fast=False)
    for source in (meta.state_dict(), tmp_path / "meta.pth"):
        if not isinstance(source, dict):
            torch.save(meta.state_dict(), source)
        with pytest.raises(CheckpointError, match=r"meta") as e:
            load_checkpoint(_fresh(), source)
        msg = str(e.value)
        assert "conv1.weight" in msg and "no data" in msg


def test_meta_tensors_even_with_strict_false():
    sd = _random_model().state_dict()
    sd["stage4.0.branches.3.0.conv1.weight"] = torch.empty(
        sd["stage4.0.branches.3.0.conv1.weight"].shape, device="meta")
    with pytest.raises(CheckpointError, match=r"no data.*stage4\.0\.branches\.3\.0\.conv1\.weight"):
        load_checkpoint(_fresh(), sd, strict=False)


def _assert_same_state(dst, src):
    want = src.state_dict()
    for k, v in dst.state_dict().items():
        assert torch.equal(v, want[k]), k


@pytest.mark.parametrize("times", [2, 3])
def test_repeated_dataparallel_prefixes_are_stripped(times):
    src = _random_model()
    dst = _fresh()
    report = load_checkpoint(dst, {"module." * times + k: v for k, v in src.state_dict().items()})
    assert report.format == "plain" and not report.missing and not report.skipped
    _assert_same_state(dst, src)
    # also around the official segmentation wrapper
    dst = _fresh()
    report = load_checkpoint(dst, {"module." * times + "model." + k: v
                                   for k, v in src.state_dict().items()})
    assert report.format == "official-seg"
    _assert_same_state(dst, src)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "encoder.net.", "module.encoder."])
def test_unknown_prefix_is_named_as_a_hint(prefix):
    src = _random_model().state_dict()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(_fresh(), {prefix + k: v for k, v in src.items()})
    shown = prefix[len("module."):] if prefix.startswith("module.") else prefix
    msg = str(e.value)
    assert f"prefix '{shown}'" in msg and "strip it" in msg
    assert f"without it {len(src)} of them match" in msg


def test_prefix_hint_only_for_the_unmatched_keys():
    src = _random_model().state_dict()
    sd = dict(src, **{"aux.fc1.weight": torch.zeros(3), "aux.fc2.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"prefix 'aux\.'") as e:  # a whole name part
        load_checkpoint(_fresh(), sd)
    assert "aux.fc1.weight" in str(e.value) and "strip it" not in str(e.value)
    with pytest.raises(CheckpointError) as e:  # one stray key: its own name says it all
        load_checkpoint(_fresh(), dict(src, **{"aux.head.weight": torch.zeros(3)}))
    assert "prefix" not in str(e.value)


# --- every format: the report accounts for every key (issue 15, item 2) -------------------------

_CLS_HEAD = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


def _cls_src():
    return _random_model(head="classification", num_classes=1000)


def _pose_src():
    return _random_model(head="pose", num_classes=17)


def _mmseg_keys(sd):
    """Our seg keys in mmseg's layout (its head conv has no bias), plus an auxiliary head."""
    out = {}
    for k, v in sd.items():
        if k.startswith("last_layer.0.bias"):
            continue
        for ours, theirs in (("last_layer.0.", "decode_head.convs.0.conv."),
                             ("last_layer.1.", "decode_head.convs.0.bn."),
                             ("last_layer.3.", "decode_head.conv_seg.")):
            if k.startswith(ours):
                out[theirs + k[len(ours):]] = v
                break
        else:
            out["backbone." + k] = v
    out["auxiliary_head.conv_seg.weight"] = torch.zeros(19, 64, 1, 1)
    out["auxiliary_head.conv_seg.bias"] = torch.zeros(19)
    return out, ["auxiliary_head.conv_seg.bias", "auxiliary_head.conv_seg.weight"]


def _openmmlab_pose_keys(head_prefix):
    def convert(sd):
        return {(head_prefix + k if k.startswith("final_layer.") else "backbone." + k): v
                for k, v in sd.items()}, []
    return convert


# name: (source model, target head kwargs, key conversion -> (checkpoint, keys it adds that the
# report must skip), detected format, the model's head that the checkpoint does not carry)
FORMAT_CASES = {
    "plain": (_random_model, {}, lambda sd: (dict(sd), []), "plain", None),
    "official-seg": (_random_model, {},
                     lambda sd: ({**{"model." + k: v for k, v in sd.items()},
                                  "loss.criterion.weight": torch.ones(19)},
                                 ["loss.criterion.weight"]), "official-seg", None),
    "imagenet-into-classification": (_cls_src, {"head": "classification", "num_classes": 1000},
                                     lambda sd: (dict(sd), []), "imagenet", None),
    "imagenet-into-seg": (_cls_src, {},
                          lambda sd: (dict(sd), [k for k in sd if k.startswith(_CLS_HEAD)]),
                          "imagenet", "last_layer."),
    "imagenet-into-features": (_cls_src, {"head": "features"},
                               lambda sd: (dict(sd), [k for k in sd if k.startswith(_CLS_HEAD)]),
                               "imagenet", None),
    # The usual start of pose training: the fuse layers of outputs 1-3 in stage 4's last module
    # (w18_small_v1 has one) have no use.
    "imagenet-into-pose": (_cls_src, {"head": "pose", "num_classes": 17},
                           lambda sd: (dict(sd), [k for k in sd if k.startswith(_CLS_HEAD) or (
                               k.startswith("stage4.0.fuse_layers.")
                               and not k.startswith("stage4.0.fuse_layers.0."))]),
                           "imagenet", "final_layer."),
    "mmseg": (_random_model, {}, _mmseg_keys, "mmseg", None),
    "official-pose": (_pose_src, {"head": "pose", "num_classes": 17}, lambda sd: (dict(sd), []),
                      "official-pose", None),
    "mmpose-0.x": (_pose_src, {"head": "pose", "num_classes": 17},
                   _openmmlab_pose_keys("keypoint_head."), "mmpose-0.x", None),
    "mmpose-1.x": (_pose_src, {"head": "pose", "num_classes": 17},
                   _openmmlab_pose_keys("head."), "mmpose-1.x", None),
}


def _wrap(sd, wrapper, dataparallel):
    if dataparallel:
        sd = {"module." + k: v for k, v in sd.items()}
    return sd if wrapper is None else {"meta": {"epoch": 3}, wrapper: sd, "epoch": 3}


@pytest.mark.parametrize("wrapper,dataparallel", [(None, False), ("state_dict", True)],
                         ids=["bare", "wrapped-module"])
@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_report_accounts_for_every_key(case, wrapper, dataparallel):
    make_src, head_kw, convert, fmt, absent_head = FORMAT_CASES[case]
    src = make_src()
    if fmt == "mmseg":
        with torch.no_grad():  # mmseg's head conv has no bias: loading gives a zero one
            src.last_layer[0].bias.zero_()
    ckpt, extra = convert(src.state_dict())
    dst = _fresh(**head_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing-head warning has its own tests
        report = load_checkpoint(dst, _wrap(ckpt, wrapper, dataparallel))
    assert report.format == fmt and report.wrapper == wrapper
    assert f"checkpoint format: {fmt}" in str(report)
    target = dst.state_dict()
    want_missing = sorted(k for k in target if absent_head and k.startswith(absent_head)
                          and not k.endswith("num_batches_tracked"))
    assert report.missing == want_missing
    assert sorted(report.skipped) == sorted(extra)
    assert report.loaded == sorted(k for k in target if not (absent_head and k.startswith(absent_head)))
    want = src.state_dict()
    for k in report.loaded:  # every loaded tensor is the source's own, under our name
        assert torch.equal(target[k], want[k]), k


# --- pose checkpoints (issue 13, item 2) --------------------------------------------------------

def test_pose_formats_give_the_source_heatmaps(tmp_path):
    src = _pose_src()
    sd = src.state_dict()
    assert {k for k in sd if k.startswith("final_layer.")} == {"final_layer.weight", "final_layer.bias"}
    # official training checkpoint: DataParallel keys inside "state_dict", the model's name as "model"
    official = {"epoch": 140, "model": "pose_hrnet", "perf": 0.74,
                "state_dict": {"module." + k: v for k, v in sd.items()}}
    mmpose0 = {"meta": {"epoch": 210}, "state_dict": _openmmlab_pose_keys("keypoint_head.")(sd)[0]}
    mmpose1 = {"meta": {"epoch": 210}, "state_dict": _openmmlab_pose_keys("head.")(sd)[0]}
    want = _outputs(src)
    assert want.shape == (2, 17, 16, 20)
    for fmt, ckpt in (("official-pose", official), ("mmpose-0.x", mmpose0), ("mmpose-1.x", mmpose1)):
        path = tmp_path / f"{fmt}.pth"
        torch.save(ckpt, path)
        dst = _fresh(head="pose", num_classes=17)
        report, caught = _load_recording(dst, path)
        assert report.format == fmt and not caught  # the default pose model is nearest, as they
        _assert_same(_outputs(dst), want)


@pytest.mark.parametrize("fmt", ["official-pose", "mmpose-0.x", "mmpose-1.x"])
def test_pose_formats_imply_nearest(fmt):
    convert = FORMAT_CASES[fmt][2]
    ckpt, _ = convert(_pose_src().state_dict())
    report, caught = _load_recording(_fresh(head="pose", num_classes=17, upsample="bilinear"), ckpt)
    assert report.format == fmt and len(caught) == 1
    msg = str(caught[0].message)
    assert f"format {fmt!r}" in msg and "upsample='nearest'" in msg and "bilinear" in msg


def test_pose_checkpoint_into_a_seg_model_names_the_head():
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(_fresh(num_classes=17), _pose_src().state_dict())
    msg = str(e.value)
    # stage 4's last module of a pose model has no multi-scale fuse layers
    assert "official-pose" in msg and "stage4" in msg and "head='pose'" in msg


def test_pose_checkpoint_with_other_joint_count_names_the_shapes():
    with pytest.raises(CheckpointError, match=r"final_layer\.weight: checkpoint has \[17, 16, 1, 1\], "
                                              r"model has \[16, 16, 1, 1\]"):
        load_checkpoint(_fresh(head="pose", num_classes=16), _pose_src().state_dict())


# --- training-runner checkpoints (issue 15, item 8) ---------------------------------------------

class HistoryBuffer:
    """What mmengine's HistoryBuffer pickles: a max length and numpy arrays of values and counts."""

    def __init__(self, logs, counts, max_length=1000000):
        self.max_length = max_length
        self._log_history = np.array(logs)
        self._count_history = np.array(counts)


class MessageHub:
    """A class the loader does not know (as if a whole mmengine MessageHub were pickled)."""


@contextlib.contextmanager
def _fake_module(module_name, *classes):
    """``classes`` importable from a new module ``module_name`` (new parent packages too) only
    inside the block, so that pickle can save their instances; the loader afterwards cannot import
    them. Whatever sys.modules held under those names before is put back."""
    parts = module_name.split(".")
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    previous = {n: sys.modules.get(n) for n in names}
    originals = [(c, c.__module__) for c in classes]
    try:
        for n in names:
            sys.modules[n] = types.ModuleType(n)
        for c in classes:
            c.__module__ = module_name
            setattr(sys.modules[module_name], c.__qualname__, c)
        yield
    finally:
        for c, module in originals:
            c.__module__ = module
        for n, module in previous.items():
            if module is None:
                del sys.modules[n]
            else:
                sys.modules[n] = module


def _runner_checkpoint(src, **message_hub_extra):
    """A checkpoint as mmengine's runner writes it: meta, state_dict (mmseg keys), message_hub with
    HistoryBuffers and numpy scalars, optimizer (with momentum buffers) and scheduler states."""
    opt = torch.optim.SGD(src.parameters(), lr=0.01, momentum=0.9)
    for p in src.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the momentum buffers; a zero gradient leaves the weights as they are
    return {
        "meta": {"epoch": 2, "iter": 80000, "cfg": "model = dict(type='EncoderDecoder')",
                 "seed": 0, "mmengine_version": "0.10.4",
                 "dataset_meta": {"classes": ("road", "sidewalk"), "palette": [[128, 64, 128]]}},
        "state_dict": _mmseg_keys(src.state_dict())[0],
        "message_hub": {
            "log_scalars": collections.OrderedDict(
                [("train/loss", HistoryBuffer([0.75, 0.5], [1, 1])),
                 ("train/lr", HistoryBuffer(np.array([0.01, 0.009]), np.array([1, 1])))]),
            "runtime_info": collections.OrderedDict(
                [("epoch", 2), ("iter", 80000), ("best_score", np.float64(71.25)),
                 ("max_iters", np.int64(160000)), *message_hub_extra.items()]),
            "resumed_keys": collections.OrderedDict([("train/loss", True), ("epoch", False)]),
        },
        "optimizer": opt.state_dict(),
        "param_schedulers": [{"eta_min": 0.0001, "power": 0.9, "last_step": 80000, "by_epoch": False}],
    }


def test_mmengine_runner_checkpoint_loads_by_path(tmp_path):
    src = _random_model()
    with torch.no_grad():
        src.last_layer[0].bias.zero_()  # mmseg's head conv has no bias
    path = tmp_path / "iter_80000.pth"
    with _fake_module("mmengine.logging.history_buffer", HistoryBuffer):
        torch.save(_runner_checkpoint(src), path)
    safe_before = set(torch.serialization.get_safe_globals())
    dst = _fresh()
    report = load_checkpoint(dst, path)
    assert report.format == "mmseg" and report.wrapper == "state_dict"
    assert not report.missing and sorted(report.skipped) == _mmseg_keys({})[1]
    _assert_same_state(dst, src)
    # the placeholders were allowed only while loading
    assert set(torch.serialization.get_safe_globals()) == safe_before
    # ... and are inert stand-ins that only hold what the file gave them
    hub = read_checkpoint(path)["message_hub"]
    buf = hub["log_scalars"]["train/loss"]
    assert isinstance(buf, RunnerPlaceholder)
    assert buf.stands_for == "mmengine.logging.history_buffer.HistoryBuffer"
    assert buf.state["max_length"] == 1000000
    assert isinstance(buf.state["_log_history"], RunnerPlaceholder)
    assert isinstance(hub["runtime_info"]["best_score"], RunnerPlaceholder)
    assert hub["runtime_info"]["iter"] == 80000


def test_runner_checkpoint_with_an_unknown_class_is_refused(tmp_path):
    ckpt = _runner_checkpoint(_random_model(), hub=MessageHub())
    path = tmp_path / "iter_80000.pth"
    with _fake_module("mmengine.logging.history_buffer", HistoryBuffer), \
            _fake_module("mmengine.logging.message_hub", MessageHub):
        torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(_fresh(), path)
    msg = str(e.value)
    assert "arbitrary Python objects" in msg and "mmengine.logging.message_hub.MessageHub" in msg
    assert "trusted source" in msg


class Thing:
    pass


def test_class_names_from_the_file_reach_the_message_without_escapes(tmp_path):
    # A file decides the class names torch quotes; a name can carry terminal escape sequences.
    path = tmp_path / "colour.pth"
    with _fake_module("\x1b[31mevil", Thing):
        torch.save({"state_dict": _random_model().state_dict(), "x": Thing()}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(_fresh(), path)
    msg = str(e.value)
    assert "\x1b" not in msg and "a pickled evil.Thing" in msg


def test_torch_reasons_lose_their_escape_sequences(tmp_path, monkeypatch):
    path = tmp_path / "x.pth"
    path.write_bytes(b"PK")

    def load(*args, **kwargs):  # torch's messages put advice in bold (\x1b[1m ... \x1b[0m)
        raise RuntimeError("PytorchStreamReader failed reading zip archive: \x1b[1mfailed finding "
                           "central directory\x1b[0m")

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(_fresh(), path)
    msg = str(e.value)
    assert "\x1b" not in msg and "failed finding central directory" in msg
