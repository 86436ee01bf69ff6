import pytest

from hrnet_fast import PRESET_NAMES, HRNetConfig, StageConfig


def test_presets_build_and_are_frozen():
    for name in PRESET_NAMES:
        cfg = HRNetConfig.preset(name)
        assert cfg.name == name
        assert cfg.num_classes == 19 and cfg.upsample == "bilinear" and cfg.align_corners is False
        assert cfg.head == "seg" and cfg.final_conv_kernel == 1
        with pytest.raises(Exception):
            cfg.num_classes = 3


def test_wide_preset_layout():
    cfg = HRNetConfig.preset("w48")
    assert cfg.stage4.num_channels == (48, 96, 192, 384)
    assert [s.num_modules for s in cfg.stages] == [1, 1, 4, 3]
    assert cfg.head_channels == 720
    assert HRNetConfig.preset("w18").head_channels == 270
    small = HRNetConfig.preset("w18_small_v1")
    assert small.stage1.num_channels == (32,) and small.stage1.num_blocks == (1,)
    assert [s.num_modules for s in HRNetConfig.preset("w18_small_v2").stages] == [1, 1, 3, 2]


def test_overrides_and_aliases():
    cfg = HRNetConfig.preset("hrnet-w32", num_classes=150, upsample="nearest", head="features")
    assert cfg.name == "w32" and cfg.num_classes == 150 and cfg.upsample == "nearest"
    assert cfg.replace(num_classes=2).num_classes == 2


@pytest.mark.parametrize("kwargs,field", [
    ({"upsample": "bicubic"}, "upsample"),
    ({"head": "keypoints"}, "head"),
    ({"final_conv_kernel": 5}, "final_conv_kernel"),
    ({"num_classes": 0}, "num_classes"),
    ({"num_clases": 3}, "num_clases"),
    ({"upsample": "nearest", "align_corners": True}, "align_corners"),
])
def test_invalid_fields_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        HRNetConfig.preset("w18", **kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'w19'"):
        HRNetConfig.preset("w19")


def _extra(c=18):
    return {
        "FINAL_CONV_KERNEL": 1,
        "STAGE1": {"NUM_MODULES": 1, "NUM_RANCHES": 1, "BLOCK": "BOTTLENECK", "NUM_BLOCKS": [4],
                   "NUM_CHANNELS": [64], "FUSE_METHOD": "SUM"},
        "STAGE2": {"NUM_MODULES": 1, "NUM_BRANCHES": 2, "BLOCK": "BASIC", "NUM_BLOCKS": [4, 4],
                   "NUM_CHANNELS": [c, 2 * c], "FUSE_METHOD": "SUM"},
        "STAGE3": {"NUM_MODULES": 4, "NUM_BRANCHES": 3, "BLOCK": "BASIC", "NUM_BLOCKS": [4, 4, 4],
                   "NUM_CHANNELS": [c, 2 * c, 4 * c], "FUSE_METHOD": "SUM"},
        "STAGE4": {"NUM_MODULES": 3, "NUM_BRANCHES": 4, "BLOCK": "BASIC", "NUM_BLOCKS": [4, 4, 4, 4],
                   "NUM_CHANNELS": [c, 2 * c, 4 * c, 8 * c], "FUSE_METHOD": "SUM"},
    }


def test_from_yaml_extra_matches_preset_and_round_trips():
    cfg = HRNetConfig.from_yaml_extra(_extra(18))
    assert cfg == HRNetConfig.preset("w18")
    assert HRNetConfig.from_yaml_extra(cfg.to_yaml_extra()) == cfg
    extra = _extra(48)
    extra["FINAL_CONV_KERNEL"] = 3
    assert HRNetConfig.from_yaml_extra(extra).final_conv_kernel == 3


@pytest.mark.parametrize("mutate,needle", [
    (lambda e: e["STAGE3"].update(NUM_BLOCKS=[4, 4]), "num_blocks"),
    (lambda e: e["STAGE4"].update(NUM_CHANNELS=[18, 36, 72]), "num_channels"),
    (lambda e: e["STAGE2"].update(BLOCK="DENSE"), "block"),
    (lambda e: e["STAGE2"].update(FUSE_METHOD="CAT"), "fuse_method"),
    (lambda e: e.pop("STAGE4"), "STAGE4"),
    (lambda e: e["STAGE3"].pop("NUM_MODULES"), "NUM_MODULES"),
    (lambda e: e["STAGE3"].update(NUM_CHANNELS=[20, 36, 72]), "stage3.num_channels"),
    (lambda e: e["STAGE3"].update(NUM_BRANCHES=2, NUM_BLOCKS=[4, 4], NUM_CHANNELS=[18, 36]),
     "stage3.num_branches"),
])
def test_inconsistent_yaml_is_rejected(mutate, needle):
    extra = _extra()
    mutate(extra)
    with pytest.raises(ValueError, match=needle):
        HRNetConfig.from_yaml_extra(extra)


def test_stage_config_validation():
    with pytest.raises(ValueError, match="num_channels"):
        StageConfig(1, 2, "BASIC", (4, 4), (18,))


# --- upsample follows the head (issue 10, item 4) ----------------------------------------------

@pytest.mark.parametrize("head,want", [
    ("classification", "nearest"),  # the official and timm ImageNet models: nearest
    ("seg", "bilinear"),  # the official segmentation model
    ("features", "bilinear"),  # the backbone alone keeps the package's long-standing default
    ("pose", "nearest"),  # the official and mmpose top-down pose models
])
def test_upsample_default_follows_the_head(head, want):
    cfg = HRNetConfig.preset("w30", head=head)
    assert cfg.upsample == want
    assert HRNetConfig.from_yaml_extra(_extra(), head=head).upsample == want


@pytest.mark.parametrize("head", ["classification", "seg", "features", "pose"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_explicit_upsample_always_wins(head, mode):
    assert HRNetConfig.preset("w18", head=head, upsample=mode).upsample == mode
    assert HRNetConfig.from_yaml_extra(_extra(), head=head, upsample=mode).upsample == mode


def test_default_and_explicit_upsample_configs_compare_equal():
    assert HRNetConfig.preset("w18", head="classification") == \
        HRNetConfig.preset("w18", head="classification", upsample="nearest")
    assert hash(HRNetConfig.preset("w18", head="classification")) == \
        hash(HRNetConfig.preset("w18", head="classification", upsample="nearest"))


def test_replace_head_rederives_a_default_upsample_only():
    seg = HRNetConfig.preset("w18")
    assert seg.replace(head="classification").upsample == "nearest"
    assert seg.replace(head="classification").replace(head="seg").upsample == "bilinear"
    explicit = HRNetConfig.preset("w18", upsample="bilinear")
    assert explicit.replace(head="classification").upsample == "bilinear"
    assert seg.replace(head="classification", upsample="bilinear").upsample == "bilinear"
    assert seg.replace(upsample="nearest").replace(head="classification", num_classes=3).upsample \
        == "nearest"


def test_align_corners_implies_bilinear_for_the_default():
    # align_corners=True only exists for bilinear: a classification model asking for it gets it
    cfg = HRNetConfig.preset("w18", head="classification", align_corners=True)
    assert cfg.upsample == "bilinear" and cfg.align_corners is True
    with pytest.raises(ValueError, match="align_corners"):
        HRNetConfig.preset("w18", head="classification", upsample="nearest", align_corners=True)


def test_drop_in_classification_model_uses_nearest():
    from hrnet_fast import HRNet
    assert HRNet("w18_small_v1", head="classification", fast=False).config.upsample == "nearest"
    assert HRNet(HRNetConfig.preset("w18_small_v1"), head="classification",
                 fast=False).config.upsample == "nearest"
    assert HRNet("w18_small_v1", fast=False).config.upsample == "bilinear"


def test_pose_head_config():
    for name in PRESET_NAMES:  # every preset takes the pose head
        cfg = HRNetConfig.preset(name, head="pose", num_classes=17, final_conv_kernel=3)
        assert cfg.head == "pose" and cfg.upsample == "nearest" and cfg.num_classes == 17
    seg = HRNetConfig.preset("w32")
    assert seg.replace(head="pose").upsample == "nearest"
    assert seg.replace(head="pose").replace(head="seg").upsample == "bilinear"
    assert HRNetConfig.preset("w32", head="pose", upsample="bilinear").upsample == "bilinear"
    pose = HRNetConfig.from_yaml_extra(_extra(32), head="pose", num_classes=16)
    assert pose == HRNetConfig.preset("w32", head="pose", num_classes=16)
