"""Fused multi-branch ops: ``upsample_add_relu`` (the fuse step) and ``seg_head`` (head after the
rewrite). Each has a torch implementation that runs anywhere and is the oracle of the kernels."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..reference import resize
from ..side_path import in_side_path
from ._validate import check_fuse_args, check_fuse_bias, check_image


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.preserve_format


def upsample_add_relu_torch(base, contributions, mode="bilinear", align_corners=False, relu=True,
                            bias=None):
    size = base.shape[-2:]
    fmt = _memory_format(base)
    out = None
    # Traces and exports get out-of-place adds: the ONNX exporter has no add with out=.
    functional = in_side_path()
    for c in contributions:
        z = resize(c, size, mode, align_corners)
        if functional:
            out = (base if out is None else out) + z
        elif out is not None:
            out.add_(z)
        elif z is not c and fmt is not torch.preserve_format and z.is_contiguous(memory_format=fmt):
            # The resized tensor is a fresh buffer in base's layout: accumulate into it rather than
            # touching new memory (a first-touch allocation cost 3x the add on the CPU).
            out = z.add_(base)
        else:
            out = torch.empty_like(base)  # keeps base's memory format
            torch.add(base, z, out=out)
    if out is None:
        out = base.clone()
    if bias is not None:
        if functional:
            out = out + bias.to(out.dtype).view(1, -1, 1, 1)
        else:
            out.add_(bias.to(out.dtype).view(1, -1, 1, 1))
    return out.relu_() if relu else out


def seg_head_torch(base, contributions, weight, bias, mode="bilinear", align_corners=False):
    act = upsample_add_relu_torch(base, contributions, mode, align_corners, relu=True)
    k = weight.shape[-1]
    return F.conv2d(act, weight, bias, 1, k // 2)


def upsample_add_relu(base: torch.Tensor, contributions: Sequence[torch.Tensor], *,
                      mode: str = "bilinear", align_corners: bool = False, relu: bool = True,
                      backend: Optional[str] = None,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``relu(base [+ bias[c]] + sum(resize(c, base.shape[-2:]) for c in contributions))``.

    A contribution already at the base size is added as it is; others are resized up (any ratio)
    with ``F.interpolate`` semantics (legacy nearest, or bilinear with ``align_corners``). Batch,
    channels, dtype and device must agree. The output keeps the base's memory format.
    """
    check_fuse_args(base, contributions, mode, align_corners)
    check_fuse_bias(base, bias)
    contributions = list(contributions)
    from ..backends.selection import resolve_op
    _, fn = resolve_op("upsample_add_relu", backend, base.device)
    return fn(base, contributions, mode, align_corners, relu, bias)


def seg_head(base: torch.Tensor, contributions: Sequence[torch.Tensor], weight: torch.Tensor,
             bias: Optional[torch.Tensor], *, mode: str = "bilinear", align_corners: bool = False,
             backend: Optional[str] = None) -> torch.Tensor:
    """``conv2d(relu(base + sum resize(c)), weight, bias)``: the segmentation head after the rewrite
    (base = the branch-0 projection with the folded head bias, contributions = the projections of
    branches 1-3, weight = the classifier, kernel 1 or 3 with "same" padding)."""
    check_fuse_args(base, contributions, mode, align_corners)
    contributions = list(contributions)
    check_image("weight", weight)
    if weight.shape[1] != base.shape[1]:
        raise ValueError(f"weight expects {weight.shape[1]} input channels, base has {base.shape[1]}")
    if weight.dtype != base.dtype or weight.device != base.device:
        raise ValueError(f"weight is {weight.dtype} on {weight.device}, base is {base.dtype} on "
                         f"{base.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != base.dtype):
        raise ValueError(f"bias must be [{weight.shape[0]}] of {base.dtype}, got "
                         f"{list(bias.shape)} of {bias.dtype}")
    from ..backends.selection import resolve_op
    _, fn = resolve_op("seg_head", backend, base.device)
    if weight.shape[-1] != 1 and fn is not seg_head_torch:
        fn = seg_head_torch  # the fused kernels take a 1x1 classifier only
    return fn(base, contributions, weight, bias, mode, align_corners)


__all__ = ["upsample_add_relu", "seg_head", "upsample_add_relu_torch", "seg_head_torch"]
