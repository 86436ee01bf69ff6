"""BatchNorm folding: conv + eval-mode BN -> one conv with weight and bias.

    y = g * (conv(x, W) + b - m) / sqrt(v + eps) + beta
      = conv(x, W * s) + (b - m) * s + beta,        s = g / sqrt(v + eps)

Folding is done in float64 so the folded fp32 weights carry no extra rounding beyond one cast.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


def fold_conv_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) in float64 of ``bn(conv(x))``; a conv without BN returns its own (bias 0 if none)."""
    w = conv.weight.detach().to(torch.float64)
    b = (conv.bias.detach().to(torch.float64) if conv.bias is not None
         else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device))
    if bn is None:
        return w, b
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"expected a BatchNorm2d after the conv, got {type(bn).__name__}")
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    mean = bn.running_mean.detach().to(torch.float64)
    var = bn.running_var.detach().to(torch.float64)
    gamma = (bn.weight.detach().to(torch.float64) if bn.weight is not None
             else torch.ones_like(mean))
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return w * scale.view(-1, 1, 1, 1), (b - mean) * scale + beta
