"""Argument checks shared by the ops: every message names the tensor and what is wrong."""
from __future__ import annotations

from typing import Sequence

import torch

MODES = ("bilinear", "nearest")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_image(name: str, t, *, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D NCHW, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *,
               channels: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if t.shape[0] != ref.shape[0]:
        raise ValueError(f"{name} has batch {t.shape[0]} but {ref_name} has {ref.shape[0]}")
    if channels and t.shape[1] != ref.shape[1]:
        raise ValueError(f"{name} has {t.shape[1]} channels but {ref_name} has {ref.shape[1]}")


def check_fuse_args(base: torch.Tensor, contributions: Sequence[torch.Tensor], mode: str,
                    align_corners: bool) -> None:
    check_image("base", base)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if align_corners and mode != "bilinear":
        raise ValueError("align_corners=True is only defined for mode='bilinear'")
    if isinstance(contributions, torch.Tensor):
        raise TypeError("contributions must be a list of tensors, not a tensor")
    H, W = base.shape[-2:]
    for k, c in enumerate(contributions):
        name = f"contributions[{k}]"
        check_image(name, c)
        check_same(name, c, "base", base)
        if c.shape[-2] > H or c.shape[-1] > W:
            raise ValueError(f"{name} is {tuple(c.shape[-2:])}, larger than base {(H, W)}: "
                             "contributions are resized up (or added as they are), never down")


def check_kernel_dtype(what: str, t: torch.Tensor) -> None:
    """The kernels (Triton, CUDA) run float32, float16 and bfloat16."""
    if t.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{what}: dtype {t.dtype} is not supported (float32, float16, bfloat16)")


def check_fuse_bias(base: torch.Tensor, bias) -> None:
    """An optional per-channel bias of the fuse op: a [C] floating tensor on base's device."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != base.shape[1]:
        raise ValueError(f"bias must be a [{base.shape[1]}] tensor (one value per channel), got "
                         f"{tuple(getattr(bias, 'shape', ())) or type(bias).__name__}")
    if not bias.is_floating_point() or bias.device != base.device:
        raise ValueError(f"bias must be floating point on {base.device}, got {bias.dtype} on "
                         f"{bias.device}")


def check_fuse_meta(base: torch.Tensor, contributions: Sequence[torch.Tensor], mode: str) -> None:
    """The fuse rule as ``torch._check``s, for the fake (meta) kernels of the C++ fuse ops, where
    shapes may be symbolic: 4-D base, a known mode, contributions of base's dtype, batch and
    channels, at most base's size."""
    torch._check(base.dim() == 4, lambda: f"base must be 4-d [N, C, H, W], got {tuple(base.shape)}")
    torch._check(mode in MODES, lambda: f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    n, c, h, w = base.shape
    for k, t in enumerate(contributions):
        torch._check(t.dim() == 4 and t.dtype == base.dtype,
                     lambda: f"contributions[{k}] must be 4-d with base's dtype {base.dtype}")
        torch._check(t.shape[0] == n and t.shape[1] == c,
                     lambda: f"contributions[{k}] batch/channels {tuple(t.shape[:2])} != base's {(n, c)}")
        torch._check(t.shape[2] <= h and t.shape[3] <= w,
                     lambda: f"contributions[{k}] {tuple(t.shape)} is larger than base {tuple(base.shape)}")
