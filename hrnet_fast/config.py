"""HRNet configurations: stage layouts, presets and the official YAML ``MODEL.EXTRA`` form.

Everything here is a frozen dataclass, so a config can key caches and be compared safely.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Optional, Tuple

BLOCKS = ("BASIC", "BOTTLENECK")
FUSE_METHODS = ("SUM",)
UPSAMPLE_MODES = ("bilinear", "nearest", "mmseg")
HEADS = ("seg", "features", "classification", "pose")
# The resize each head's published models were trained with: the official segmentation model
# bilinear, the official and timm ImageNet classification models and the official (and mmpose)
# top-down pose models nearest. "features" (the backbone alone) keeps the package's long-standing
# default, bilinear.
DEFAULT_UPSAMPLE = {"seg": "bilinear", "classification": "nearest", "features": "bilinear",
                    "pose": "nearest"}
PRESET_NAMES = (
    "w18_small_v1", "w18_small_v2", "w18", "w30", "w32", "w40", "w44", "w48", "w64",
)


def _as_int_tuple(value: Any, name: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        value = (value,)
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of integers, got {value!r}") from None
    if any(v <= 0 for v in out):
        raise ValueError(f"{name} must hold positive integers, got {list(out)}")
    return out


@dataclass(frozen=True)
class StageConfig:
    """One stage: ``num_modules`` HighResolutionModules over ``num_branches`` parallel branches."""

    num_modules: int
    num_branches: int
    block: str
    num_blocks: Tuple[int, ...]
    num_channels: Tuple[int, ...]
    fuse_method: str = "SUM"

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_blocks", _as_int_tuple(self.num_blocks, "num_blocks"))
        object.__setattr__(self, "num_channels", _as_int_tuple(self.num_channels, "num_channels"))
        block = str(self.block).upper()
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "fuse_method", str(self.fuse_method).upper())
        if self.num_modules < 1:
            raise ValueError(f"num_modules must be >= 1, got {self.num_modules}")
        if self.num_branches < 1:
            raise ValueError(f"num_branches must be >= 1, got {self.num_branches}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
        if self.fuse_method not in FUSE_METHODS:
            raise ValueError(f"fuse_method must be one of {FUSE_METHODS}, got {self.fuse_method!r}")
        if len(self.num_blocks) != self.num_branches:
            raise ValueError(
                f"num_blocks has {len(self.num_blocks)} entries but num_branches is {self.num_branches}")
        if len(self.num_channels) != self.num_branches:
            raise ValueError(
                f"num_channels has {len(self.num_channels)} entries but num_branches is {self.num_branches}")

    @classmethod
    def from_yaml(cls, d: Mapping[str, Any], stage_name: str = "stage") -> "StageConfig":
        """Build from one ``STAGEk`` mapping of the official YAML (accepts the misspelt NUM_RANCHES)."""
        try:
            branches = d["NUM_BRANCHES"] if "NUM_BRANCHES" in d else d["NUM_RANCHES"]
            return cls(
                num_modules=int(d["NUM_MODULES"]),
                num_branches=int(branches),
                block=d["BLOCK"],
                num_blocks=d["NUM_BLOCKS"],
                num_channels=d["NUM_CHANNELS"],
                fuse_method=d.get("FUSE_METHOD", "SUM"),
            )
        except KeyError as e:
            raise ValueError(f"{stage_name} is missing the key {e.args[0]}") from None
        except ValueError as e:
            raise ValueError(f"{stage_name}: {e}") from None


def _wide(c: int) -> Tuple[StageConfig, ...]:
    return (
        StageConfig(1, 1, "BOTTLENECK", (4,), (64,)),
        StageConfig(1, 2, "BASIC", (4, 4), (c, 2 * c)),
        StageConfig(4, 3, "BASIC", (4, 4, 4), (c, 2 * c, 4 * c)),
        StageConfig(3, 4, "BASIC", (4, 4, 4, 4), (c, 2 * c, 4 * c, 8 * c)),
    )


_PRESET_STAGES = {
    "w18_small_v1": (
        StageConfig(1, 1, "BOTTLENECK", (1,), (32,)),
        StageConfig(1, 2, "BASIC", (2, 2), (16, 32)),
        StageConfig(1, 3, "BASIC", (2, 2, 2), (16, 32, 64)),
        StageConfig(1, 4, "BASIC", (2, 2, 2, 2), (16, 32, 64, 128)),
    ),
    "w18_small_v2": (
        StageConfig(1, 1, "BOTTLENECK", (2,), (64,)),
        StageConfig(1, 2, "BASIC", (2, 2), (18, 36)),
        StageConfig(3, 3, "BASIC", (2, 2, 2), (18, 36, 72)),
        StageConfig(2, 4, "BASIC", (2, 2, 2, 2), (18, 36, 72, 144)),
    ),
    **{f"w{c}": _wide(c) for c in (18, 30, 32, 40, 44, 48, 64)},
}


@dataclass(frozen=True)
class HRNetConfig:
    """A whole HRNet: four stages, the head and the resize convention of the fuse step.

    ``head``: "seg" (the official segmentation ``last_layer``, ``num_classes`` classes), "features"
    (the four branch outputs), "classification" (the ImageNet head, ``num_classes`` logits) or
    "pose" (the official top-down keypoint model: stage 4's last module fuses only the
    highest-resolution branch and ``final_layer``, a ``final_conv_kernel`` conv, gives one heatmap
    per joint at 1/4 of the input). For "pose", ``num_classes`` is the number of joints: pass 17
    for COCO or 16 for MPII (the default, 19, is the generic one of every head).
    ``final_conv_kernel`` (1 or 3) is the kernel of the seg and pose heads' last conv.

    ``upsample`` is the resize used wherever a lower-resolution branch meets a higher one (fuse step
    and head): "bilinear" as the official segmentation model, "nearest" as the seed, classification
    and pose models. Resizing is size based, so any input size works. Left out (None), it follows
    the head: "nearest" for ``head="classification"`` (as the official and timm ImageNet models,
    whose weights give other logits under bilinear) and ``head="pose"`` (as the official and mmpose
    pose models), "bilinear" for "seg" and for "features" (unchanged default), "bilinear" also
    whenever ``align_corners=True`` asks for it. An explicit value always wins. "mmseg" is
    OpenMMLab mmsegmentation's fuse step: a contribution from a branch 2^k times coarser is resized
    bilinearly by scale factor 2^k (to floor(size * 2^k)), then bilinearly to the exact size; the
    head resizes once, bilinearly. At input sizes divisible by 32 both steps are one and "mmseg"
    equals "bilinear"; at other sizes an mmseg checkpoint gives mmseg's numbers only with "mmseg".
    ``replace(head=...)`` derives it again for the new head unless it was given explicitly
    (``upsample_from_head`` says which).
    """

    stage1: StageConfig
    stage2: StageConfig
    stage3: StageConfig
    stage4: StageConfig
    num_classes: int = 19
    upsample: Optional[str] = None
    align_corners: bool = False
    head: str = "seg"
    final_conv_kernel: int = 1
    in_channels: int = 3
    name: str = field(default="custom", compare=False)
    # True when ``upsample`` was derived from the head rather than given (set in __post_init__).
    upsample_from_head: bool = field(default=False, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        from_head = self.upsample is None
        object.__setattr__(self, "upsample_from_head", from_head)
        if from_head:
            mode = "bilinear" if self.align_corners is True else DEFAULT_UPSAMPLE.get(self.head)
            object.__setattr__(self, "upsample", mode or "bilinear")  # a bad head is named below
        for i, st in enumerate(self.stages, start=1):
            if not isinstance(st, StageConfig):
                raise ValueError(f"stage{i} must be a StageConfig, got {type(st).__name__}")
            if st.num_branches != i:
                raise ValueError(f"stage{i}.num_branches must be {i}, got {st.num_branches}")
        for i in (2, 3, 4):
            st = self.stages[i - 1]
            if st.block != "BASIC":
                # Transitions and fuse layers assume expansion 1 past stage 1, as every official model.
                raise ValueError(f"stage{i}.block must be BASIC, got {st.block}")
        for i in (3, 4):
            prev, cur = self.stages[i - 2], self.stages[i - 1]
            if prev.num_channels != cur.num_channels[: len(prev.num_channels)]:
                raise ValueError(
                    f"stage{i}.num_channels {list(cur.num_channels)} must extend "
                    f"stage{i - 1}.num_channels {list(prev.num_channels)}")
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {self.upsample!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.final_conv_kernel not in (1, 3):
            raise ValueError(f"final_conv_kernel must be 1 or 3, got {self.final_conv_kernel!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if not isinstance(self.in_channels, int) or self.in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {self.in_channels!r}")
        if not isinstance(self.align_corners, bool):
            raise ValueError(f"align_corners must be a bool, got {self.align_corners!r}")
        if self.align_corners and self.upsample != "bilinear":
            raise ValueError(f"align_corners=True is only defined for upsample='bilinear', "
                             f"not {self.upsample!r}")

    @property
    def stages(self) -> Tuple[StageConfig, StageConfig, StageConfig, StageConfig]:
        return (self.stage1, self.stage2, self.stage3, self.stage4)

    @property
    def branch_channels(self) -> Tuple[int, ...]:
        """Channels of the four stage-4 branches (18/36/72/144 for w18)."""
        return self.stage4.num_channels

    @property
    def head_channels(self) -> int:
        """Channels of the concatenated segmentation head input (270 for w18, 720 for w48)."""
        return sum(self.stage4.num_channels)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "HRNetConfig":
        """A published architecture by name (``w18_small_v1`` ... ``w64``), with field overrides."""
        key = str(name).lower().replace("-", "_")
        if key.startswith("hrnet_"):
            key = key[len("hrnet_"):]
        if key not in _PRESET_STAGES:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
        return cls._with_overrides(_PRESET_STAGES[key], key, overrides)

    @classmethod
    def from_yaml_extra(cls, extra: Mapping[str, Any], **overrides: Any) -> "HRNetConfig":
        """Build from the official YAML's ``MODEL.EXTRA`` mapping (STAGE1..STAGE4, FINAL_CONV_KERNEL)."""
        if not isinstance(extra, Mapping):
            raise ValueError(f"extra must be a mapping, got {type(extra).__name__}")
        stages = []
        for i in (1, 2, 3, 4):
            key = f"STAGE{i}"
            if key not in extra:
                raise ValueError(f"MODEL.EXTRA is missing {key}")
            stages.append(StageConfig.from_yaml(extra[key], stage_name=key))
        if "FINAL_CONV_KERNEL" in extra and "final_conv_kernel" not in overrides:
            overrides = dict(overrides, final_conv_kernel=int(extra["FINAL_CONV_KERNEL"]))
        name = overrides.pop("name", "custom")
        return cls._with_overrides(tuple(stages), name, overrides)

    @classmethod
    def _with_overrides(cls, stages, name, overrides) -> "HRNetConfig":
        allowed = {f.name for f in fields(cls) if f.init}
        for k in overrides:
            if k not in allowed:
                raise ValueError(f"unknown HRNetConfig field {k!r}; fields are {sorted(allowed)}")
        kw = dict(zip(("stage1", "stage2", "stage3", "stage4"), stages))
        kw["name"] = name
        kw.update(overrides)
        return cls(**kw)

    def replace(self, **changes: Any) -> "HRNetConfig":
        """A copy with ``changes``; a head or align_corners change derives ``upsample`` again when
        it was not given explicitly (pass ``upsample=`` to fix it)."""
        if ("upsample" not in changes and self.upsample_from_head
                and ("head" in changes or "align_corners" in changes)):
            changes = dict(changes, upsample=None)
        return replace(self, **changes)

    def to_yaml_extra(self) -> dict:
        """The official ``MODEL.EXTRA`` form of this config."""
        out: dict = {"FINAL_CONV_KERNEL": self.final_conv_kernel}
        for i, st in enumerate(self.stages, start=1):
            out[f"STAGE{i}"] = {
                "NUM_MODULES": st.num_modules, "NUM_BRANCHES": st.num_branches, "BLOCK": st.block,
                "NUM_BLOCKS": list(st.num_blocks), "NUM_CHANNELS": list(st.num_channels),
                "FUSE_METHOD": st.fuse_method,
            }
        return out

