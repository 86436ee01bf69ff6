"""The reference HRNet: the seed's model in plain PyTorch, with the official state-dict keys.

This module is the numerical ground truth of the package and it trains like the original; it is
never made faster at the cost of clarity. Two deliberate generalisations of the seed text:

* resizing in the fuse step and the head is size based (``F.interpolate(z, size=x_i.shape[-2:])``),
  as in the official segmentation code, so any input size works (473x473 -> 119/60/30/15). For
  inputs whose branch sizes are exact powers of two apart, ``mode="nearest"`` gives the same numbers
  as the seed's ``nn.Upsample(scale_factor=2**(j-i))``;
* the head is chosen by the config: "seg" (official ``last_layer``), "features" (the four branch
  outputs), "classification" (the ImageNet head with the official/timm key names) or "pose" (the
  official top-down keypoint model, ``PoseHighResolutionNet``: stage 4's last module fuses only
  branch 0 and ``final_layer`` maps it to one heatmap per joint).
"""
from __future__ import annotations

import logging
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import HRNetConfig, StageConfig

logger = logging.getLogger(__name__)

BN_MOMENTUM = 0.1
# Channels of the classification head's incremental Bottlenecks (official/timm ImageNet model).
CLASSIFICATION_HEAD_CHANNELS = (32, 64, 128, 256)
CLASSIFICATION_FEATURES = 2048


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def resize(x: torch.Tensor, size, mode: str, align_corners: bool) -> torch.Tensor:
    """Size-based resize with the package's conventions (legacy nearest, or bilinear; "mmseg"
    resizes bilinearly here, as mmseg's head does)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=tuple(size), mode="nearest")
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def fuse_resize(x: torch.Tensor, size, mode: str, align_corners: bool, factor: int) -> torch.Tensor:
    """The fuse step's resize of a contribution from a branch ``factor`` (2^k) times coarser:
    size-based (:func:`resize`), or for "mmseg" bilinear by ``scale_factor=factor`` first, then
    bilinear to the exact size (mmseg's ``nn.Upsample`` in the fuse layer and ``resize`` in
    ``HRModule.forward``). The first step alone reaches ``size`` whenever ``size`` is exactly
    ``factor`` times the input, and then equals the size-based resize (same scale, 1/factor)."""
    if mode == "mmseg":
        x = F.interpolate(x, scale_factor=float(factor), mode="bilinear", align_corners=align_corners)
        mode = "bilinear"
    return resize(x, size, mode, align_corners)


def check_image_batch(x, in_channels: int) -> None:
    """A ValueError/TypeError naming the problem unless ``x`` is a floating NCHW batch of
    ``in_channels`` channels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"input must be a 4-D NCHW tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"input has {x.shape[1]} channels, the model expects {in_channels} "
                         f"(shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"input must be a floating-point tensor, got {x.dtype}")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out = out + residual
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out = out + residual
        return self.relu(out)


BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def make_layer(block, inplanes: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """A ResNet-style run of ``blocks`` blocks; the first one gets a 1x1 projection if needed."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion, momentum=BN_MOMENTUM),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    inplanes = planes * block.expansion
    for _ in range(1, blocks):
        layers.append(block(inplanes, planes))
    return nn.Sequential(*layers)


class HighResolutionModule(nn.Module):
    """Parallel branches of residual blocks followed by the multi-resolution fuse step."""

    def __init__(self, num_branches: int, blocks, num_blocks, num_inchannels, num_channels,
                 fuse_method: str, multi_scale_output: bool = True, upsample: str = "nearest",
                 align_corners: bool = False) -> None:
        super().__init__()
        self._check_branches(num_branches, blocks, num_blocks, num_inchannels, num_channels)
        self.num_inchannels = list(num_inchannels)
        self.fuse_method = fuse_method
        self.num_branches = num_branches
        self.multi_scale_output = multi_scale_output
        self.upsample = upsample
        self.align_corners = align_corners
        self.branches = self._make_branches(num_branches, blocks, num_blocks, num_channels)
        self.fuse_layers = self._make_fuse_layers()
        self.relu = nn.ReLU(False)

    def _check_branches(self, num_branches, blocks, num_blocks, num_inchannels, num_channels) -> None:
        if num_branches != len(num_blocks):
            error_msg = "NUM_BRANCHES({}) <> NUM_BLOCKS({})".format(num_branches, len(num_blocks))
            logger.error(error_msg)
            raise ValueError(error_msg)
        if num_branches != len(num_channels):
            error_msg = "NUM_BRANCHES({}) <> NUM_CHANNELS({})".format(num_branches, len(num_channels))
            logger.error(error_msg)
            raise ValueError(error_msg)
        if num_branches != len(num_inchannels):
            error_msg = "NUM_BRANCHES({}) <> NUM_INCHANNELS({})".format(
                num_branches, len(num_inchannels))
            logger.error(error_msg)
            raise ValueError(error_msg)

    def _make_one_branch(self, branch_index: int, block, num_blocks, num_channels,
                         stride: int = 1) -> nn.Sequential:
        downsample = None
        out_channels = num_channels[branch_index] * block.expansion
        if stride != 1 or self.num_inchannels[branch_index] != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self.num_inchannels[branch_index], out_channels,
                          kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM),
            )
        layers = [block(self.num_inchannels[branch_index], num_channels[branch_index], stride,
                        downsample)]
        self.num_inchannels[branch_index] = out_channels
        for _ in range(1, num_blocks[branch_index]):
            layers.append(block(self.num_inchannels[branch_index], num_channels[branch_index]))
        return nn.Sequential(*layers)

    def _make_branches(self, num_branches, block, num_blocks, num_channels) -> nn.ModuleList:
        return nn.ModuleList(
            [self._make_one_branch(i, block, num_blocks, num_channels) for i in range(num_branches)])

    def _make_fuse_layers(self) -> Optional[nn.ModuleList]:
        if self.num_branches == 1:
            return None
        num_branches = self.num_branches
        num_inchannels = self.num_inchannels
        fuse_layers = []
        for i in range(num_branches if self.multi_scale_output else 1):
            fuse_layer = []
            for j in range(num_branches):
                if j > i:
                    # The resize to x_i's size happens in forward (size based), so the module holds
                    # only conv + BN: keys fuse_layers.i.j.{0,1}, as in every official model.
                    fuse_layer.append(nn.Sequential(
                        nn.Conv2d(num_inchannels[j], num_inchannels[i], 1, 1, 0, bias=False),
                        nn.BatchNorm2d(num_inchannels[i], momentum=BN_MOMENTUM)))
                elif j == i:
                    fuse_layer.append(None)
                else:
                    conv3x3s = []
                    for k in range(i - j):
                        if k == i - j - 1:
                            out_ch = num_inchannels[i]
                            conv3x3s.append(nn.Sequential(
                                nn.Conv2d(num_inchannels[j], out_ch, 3, 2, 1, bias=False),
                                nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM)))
                        else:
                            out_ch = num_inchannels[j]
                            conv3x3s.append(nn.Sequential(
                                nn.Conv2d(num_inchannels[j], out_ch, 3, 2, 1, bias=False),
                                nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM),
                                nn.ReLU(False)))
                    fuse_layer.append(nn.Sequential(*conv3x3s))
            fuse_layers.append(nn.ModuleList(fuse_layer))
        return nn.ModuleList(fuse_layers)

    def get_num_inchannels(self) -> List[int]:
        return self.num_inchannels

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        x = [self.branches[i](x[i]) for i in range(self.num_branches)]
        x_fuse = []
        for i in range(len(self.fuse_layers)):
            size = x[i].shape[-2:]
            y = None
            for j in range(self.num_branches):
                if j == i:
                    z = x[j]
                elif j > i:
                    z = fuse_resize(self.fuse_layers[i][j](x[j]), size, self.upsample,
                                    self.align_corners, 2 ** (j - i))
                else:
                    z = self.fuse_layers[i][j](x[j])
                y = z if y is None else y + z
            x_fuse.append(self.relu(y))
        return x_fuse


class HighResolutionNet(nn.Module):
    """HRNet with the head chosen by ``config.head``; keys match the official models."""

    def __init__(self, config: HRNetConfig) -> None:
        super().__init__()
        if not isinstance(config, HRNetConfig):
            raise TypeError(f"config must be an HRNetConfig, got {type(config).__name__}")
        self.config = config
        self.conv1 = nn.Conv2d(config.in_channels, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)

        s1 = config.stage1
        block = BLOCKS[s1.block]
        self.layer1 = make_layer(block, 64, s1.num_channels[0], s1.num_blocks[0])
        pre_channels = [block.expansion * s1.num_channels[0]]

        for idx, stage_cfg in ((1, config.stage2), (2, config.stage3), (3, config.stage4)):
            channels = [c * BLOCKS[stage_cfg.block].expansion for c in stage_cfg.num_channels]
            setattr(self, f"transition{idx}", self._make_transition_layer(pre_channels, channels))
            # The pose model reads only branch 0: its last module fuses nothing else (official).
            multi_scale = not (idx == 3 and config.head == "pose")
            stage, pre_channels = self._make_stage(stage_cfg, channels, multi_scale)
            setattr(self, f"stage{idx + 1}", stage)
        self.pre_stage_channels = list(pre_channels)

        if config.head == "seg":
            last_inp_channels = sum(pre_channels)
            k = config.final_conv_kernel
            self.last_layer = nn.Sequential(
                nn.Conv2d(last_inp_channels, last_inp_channels, 1, 1, 0),
                nn.BatchNorm2d(last_inp_channels, momentum=BN_MOMENTUM),
                nn.ReLU(inplace=True),
                nn.Conv2d(last_inp_channels, config.num_classes, k, 1, 1 if k == 3 else 0),
            )
        elif config.head == "classification":
            self.incre_modules, self.downsamp_modules, self.final_layer = \
                self._make_classification_head(pre_channels)
            self.classifier = nn.Linear(CLASSIFICATION_FEATURES, config.num_classes)
        elif config.head == "pose":
            k = config.final_conv_kernel
            self.final_layer = nn.Conv2d(pre_channels[0], config.num_classes, k, 1,
                                         1 if k == 3 else 0)

    def _make_transition_layer(self, num_channels_pre_layer, num_channels_cur_layer) -> nn.ModuleList:
        num_branches_cur = len(num_channels_cur_layer)
        num_branches_pre = len(num_channels_pre_layer)
        transition_layers = []
        for i in range(num_branches_cur):
            if i < num_branches_pre:
                if num_channels_cur_layer[i] != num_channels_pre_layer[i]:
                    transition_layers.append(nn.Sequential(
                        nn.Conv2d(num_channels_pre_layer[i], num_channels_cur_layer[i], 3, 1, 1,
                                  bias=False),
                        nn.BatchNorm2d(num_channels_cur_layer[i], momentum=BN_MOMENTUM),
                        nn.ReLU(inplace=True)))
                else:
                    transition_layers.append(None)
            else:
                conv3x3s = []
                for j in range(i + 1 - num_branches_pre):
                    inchannels = num_channels_pre_layer[-1]
                    outchannels = num_channels_cur_layer[i] if j == i - num_branches_pre else inchannels
                    conv3x3s.append(nn.Sequential(
                        nn.Conv2d(inchannels, outchannels, 3, 2, 1, bias=False),
                        nn.BatchNorm2d(outchannels, momentum=BN_MOMENTUM),
                        nn.ReLU(inplace=True)))
                transition_layers.append(nn.Sequential(*conv3x3s))
        return nn.ModuleList(transition_layers)

    def _make_stage(self, layer_config: StageConfig, num_inchannels, multi_scale_output: bool = True):
        modules = []
        for i in range(layer_config.num_modules):
            reset_multi_scale_output = multi_scale_output or i != layer_config.num_modules - 1
            modules.append(HighResolutionModule(
                layer_config.num_branches, BLOCKS[layer_config.block], layer_config.num_blocks,
                num_inchannels, layer_config.num_channels, layer_config.fuse_method,
                reset_multi_scale_output, self.config.upsample, self.config.align_corners))
            num_inchannels = modules[-1].get_num_inchannels()
        return nn.Sequential(*modules), num_inchannels

    @staticmethod
    def _make_classification_head(pre_stage_channels):
        head_block = Bottleneck
        incre_modules = nn.ModuleList([
            make_layer(head_block, channels, CLASSIFICATION_HEAD_CHANNELS[i], 1, stride=1)
            for i, channels in enumerate(pre_stage_channels)])
        downsamp_modules = []
        for i in range(len(pre_stage_channels) - 1):
            in_channels = CLASSIFICATION_HEAD_CHANNELS[i] * head_block.expansion
            out_channels = CLASSIFICATION_HEAD_CHANNELS[i + 1] * head_block.expansion
            downsamp_modules.append(nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1),
                nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM),
                nn.ReLU(inplace=True)))
        final_layer = nn.Sequential(
            nn.Conv2d(CLASSIFICATION_HEAD_CHANNELS[3] * head_block.expansion, CLASSIFICATION_FEATURES,
                      kernel_size=1, stride=1, padding=0),
            nn.BatchNorm2d(CLASSIFICATION_FEATURES, momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True))
        return incre_modules, nn.ModuleList(downsamp_modules), final_layer

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the problem if ``x`` is not an NCHW image batch for this model."""
        check_image_batch(x, self.config.in_channels)

    def forward_backbone(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Stem, layer1 and stages 2-4: the four branch outputs, highest resolution first (only
        branch 0 for the pose head, whose last module fuses nothing else)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        y_list = [x]
        for idx in (1, 2, 3):
            transition = getattr(self, f"transition{idx}")
            x_list = []
            for i, t in enumerate(transition):
                src = y_list[i] if i < len(y_list) else y_list[-1]
                x_list.append(src if t is None else t(src))
            y_list = getattr(self, f"stage{idx + 1}")(x_list)
        return y_list

    def forward(self, x: torch.Tensor):
        self.check_input(x)
        feats = self.forward_backbone(x)
        head = self.config.head
        if head == "features":
            return feats
        if head == "seg":
            size = feats[0].shape[-2:]
            up = [feats[0]] + [resize(f, size, self.config.upsample, self.config.align_corners)
                               for f in feats[1:]]
            return self.last_layer(torch.cat(up, 1))
        if head == "pose":
            return self.final_layer(feats[0])
        y = self.incre_modules[0](feats[0])
        for i in range(len(self.downsamp_modules)):
            y = self.incre_modules[i + 1](feats[i + 1]) + self.downsamp_modules[i](y)
        y = self.final_layer(y)
        y = y.flatten(2).mean(2)
        return self.classifier(y)
