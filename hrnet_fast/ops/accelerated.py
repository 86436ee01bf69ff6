"""Registers the Triton and CUDA implementations of the ops. Nothing heavy is imported here:
the kernel modules load on first use, so a CPU-only machine without Triton imports cleanly."""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Tuple

import torch

from ..kernels import triton_status
from . import registry


@lru_cache(maxsize=None)
def _kernel_module(name: str):
    return importlib.import_module(f"hrnet_fast.kernels.{name}")


def _triton_kernel_status(module: str):
    def status(device: torch.device) -> Tuple[bool, str]:
        ok, why = triton_status(device)
        if not ok:
            return ok, why
        try:
            _kernel_module(module)
        except Exception as e:  # a broken Triton install must not take the package down
            return False, f"the Triton kernels failed to import: {type(e).__name__}: {e}"
        return True, ""
    return status


def _upsample_add_relu_triton(base, contributions, mode, align_corners, relu):
    return _kernel_module("upsample_add_relu").upsample_add_relu(
        base, contributions, mode=mode, align_corners=align_corners, relu=relu)


def _seg_head_triton(base, contributions, weight, bias, mode, align_corners):
    return _kernel_module("seg_head").seg_head(
        base, contributions, weight, bias, mode=mode, align_corners=align_corners)


def _conv2d_bias_act_triton(x, weight, bias, stride, padding, residual, relu, relu_ranges):
    return _kernel_module("conv").conv2d_bias_act(
        x, weight, bias, stride=stride, padding=padding, residual=residual, relu=relu,
        relu_ranges=relu_ranges)


def _cuda_status(device: torch.device) -> Tuple[bool, str]:
    if device.type != "cuda":
        return False, "the CUDA extension runs on CUDA tensors only"
    from .. import cuda_ext
    return cuda_ext.cuda_ext_status()


def _upsample_add_relu_cuda(base, contributions, mode, align_corners, relu):
    from .. import cuda_ext
    return cuda_ext.upsample_add_relu_cuda(base, contributions, mode=mode,
                                           align_corners=align_corners, relu=relu)


registry.register("upsample_add_relu", "triton", _upsample_add_relu_triton,
                  _triton_kernel_status("upsample_add_relu"))
registry.register("seg_head", "triton", _seg_head_triton, _triton_kernel_status("seg_head"))
registry.register("conv2d_bias_act", "triton", _conv2d_bias_act_triton,
                  _triton_kernel_status("conv"))
registry.register("upsample_add_relu", "cuda", _upsample_add_relu_cuda, _cuda_status)

# ``auto`` on CUDA: the fused Triton kernels first for the memory-bound fuse ops. Convolutions stay
# on cuDNN under ``auto``; the engine's triton backend chooses per layer (see engine.py).
registry.set_auto_order("upsample_add_relu", ["triton", "cuda", "torch"])
registry.set_auto_order("seg_head", ["triton", "torch"])
registry.set_auto_order("conv2d_bias_act", ["torch"])
