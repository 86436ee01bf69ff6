"""Model size figures: parameter count and multiply-accumulates (MACs) of convolutions and linears.

MACs follow one convention: one multiply-add per weight per output position of
every conv and linear layer, nothing else (BatchNorm, ReLU, adds and resizes are not counted).
Published HRNet tables quote about 0.93x of this figure as "GFLOPs".
"""
from __future__ import annotations

import copy
from typing import Tuple

import torch
from torch import nn

from .reference import HighResolutionNet


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _drop_shape_preserving_layers(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, (nn.modules.batchnorm._BatchNorm, nn.ReLU)):
            setattr(module, name, nn.Identity())
        else:
            _drop_shape_preserving_layers(child)


def count_macs(model: nn.Module, input_size: Tuple[int, int], batch: int = 1) -> int:
    """MACs of one forward pass at ``input_size`` (H, W), computed on the meta device (no memory)."""
    meta = copy.deepcopy(model).to("meta").eval()
    # BatchNorm and ReLU are not counted and keep shapes; on the meta device their decompositions
    # took about half the time of the count (13 s for the nine presets of `hrnet-fast info`).
    _drop_shape_preserving_layers(meta)
    total = 0

    def conv_hook(mod: nn.Conv2d, _inp, out):
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        total += out.numel() * k

    def linear_hook(mod: nn.Linear, _inp, out):
        nonlocal total
        total += out.numel() * mod.in_features

    for m in meta.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
    in_ch = getattr(getattr(model, "config", None), "in_channels", 3)
    x = torch.empty(batch, in_ch, *input_size, device="meta")
    with torch.no_grad():
        # The reference forward, whatever the class: the drop-in's engine does not call the modules.
        forward = HighResolutionNet.forward if isinstance(meta, HighResolutionNet) else type(meta).forward
        forward(meta, x)
    return total
