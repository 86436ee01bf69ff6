"""``conv2d_bias_act``: a convolution with folded BatchNorm and its epilogue (residual, ReLU)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._validate import check_image, check_same


def conv2d_bias_act_torch(x, weight, bias, stride=1, padding=0, residual=None, relu=True,
                          relu_ranges=None):
    """``act(conv2d(x, weight, bias) + residual)`` as plain aten ops: the oracle of every conv."""
    y = F.conv2d(x, weight, bias, stride, padding)
    if residual is not None:
        y.add_(residual)
    if relu_ranges is not None:
        for start, end in relu_ranges:
            y[:, start:end].relu_()
    elif relu:
        y.relu_()
    return y


def conv2d_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                    stride: int = 1, padding: Optional[int] = None,
                    residual: Optional[torch.Tensor] = None, relu: bool = True,
                    relu_ranges: Optional[Sequence[Tuple[int, int]]] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """``act(conv2d(x, weight, bias, stride, padding) + residual)``.

    ``padding=None`` means "same" for odd kernels (k // 2). ``relu_ranges`` (output-channel
    [start, end) pairs) overrides ``relu``: only those channels take the ReLU. ``backend``: "torch"
    (aten; cuDNN's fused epilogue on CUDA fp16/bf16), "triton", "auto" or None (the process
    default); arguments are checked here, once.
    """
    check_image("x", x)
    check_image("weight", weight)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {weight.shape[1]}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight is {weight.dtype} on {weight.device}, x is {x.dtype} on {x.device}")
    cout = weight.shape[0]
    if bias is not None and (bias.shape != (cout,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{cout}] of {x.dtype}, got {list(bias.shape)} of {bias.dtype}")
    if padding is None:
        padding = weight.shape[-1] // 2
    if residual is not None:
        check_image("residual", residual)
        check_same("residual", residual, "x", x, channels=False)
        h = (x.shape[2] + 2 * padding - weight.shape[2]) // stride + 1
        w = (x.shape[3] + 2 * padding - weight.shape[3]) // stride + 1
        if tuple(residual.shape[1:]) != (cout, h, w):
            raise ValueError(f"residual must be {[x.shape[0], cout, h, w]}, got {list(residual.shape)}")
    if relu_ranges is not None:
        relu_ranges = tuple((int(s), int(e)) for s, e in relu_ranges)
        if any(not 0 <= s < e <= cout for s, e in relu_ranges):
            raise ValueError(f"relu_ranges {relu_ranges} must lie within [0, {cout})")
    from ..backends.selection import resolve_op
    _, fn = resolve_op("conv2d_bias_act", backend, x.device)
    return fn(x, weight, bias, stride, padding, residual, relu, relu_ranges)
