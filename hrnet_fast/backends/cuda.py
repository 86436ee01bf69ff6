"""The ``cuda`` backend: the CUDA-extension fuse kernel (``csrc/``, loaded by
``hrnet_fast/cuda_ext.py``); convolutions on cuDNN, the seg head as the fuse kernel plus a conv."""
from __future__ import annotations

from typing import Tuple

import torch

from .. import cuda_ext
from .base import Backend, fuse_then_classify
from .native import native_backend


def cuda_ext_ready() -> bool:
    """The extension is loaded or loads without a JIT build (no minutes-long first call)."""
    return cuda_ext.usable_without_build()


def fuse_cuda(base, contributions, mode, align_corners, relu=True, bias=None):
    # the engine's own arguments: no per-call Python checks (26 calls per eager forward)
    return cuda_ext.fuse_op(base, contributions, mode, align_corners, relu, bias)


class CudaExt(Backend):
    name = "cuda"

    @classmethod
    def available(cls, device: torch.device) -> Tuple[bool, str]:
        if device.type != "cuda":
            return False, "the CUDA extension runs on CUDA tensors only"
        return cuda_ext.cuda_ext_status()

    def __init__(self, plan, device, dtype, *, auto: bool = False) -> None:
        super().__init__(plan, device, dtype, auto=auto)
        self.native = native_backend(plan, device, dtype)
        self.conv = self.native.conv
        self.head = fuse_then_classify(self.fuse)

    def fuse(self, base, contributions, mode, align_corners, relu=True, bias=None):
        return fuse_cuda(base, contributions, mode, align_corners, relu, bias)
