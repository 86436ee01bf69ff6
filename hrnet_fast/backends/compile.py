"""The ``compile`` backend: ``torch.compile`` of the plan's plain aten program, compiled once per
input shape (Inductor fuses convs and epilogues its own way, so convs stay plain ``F.conv2d``)."""
from __future__ import annotations

from typing import Callable

import torch

from .base import Backend
from .cpu_memory import keep_freed_memory
from .torch_cuda import conv_spec_cudnn


class Compile(Backend):
    """Convs as ``conv2d_bias_act`` with cuDNN's fused epilogues on CUDA fp16/bf16 (Dynamo traces
    them as they are), plain aten elsewhere; the CPU's seg-head ordering (torch_cpu.py)."""

    name = "compile"

    def __init__(self, plan, device, dtype, *, auto: bool = False) -> None:
        super().__init__(plan, device, dtype, auto=auto)
        self.resize_narrow_head_branches = device.type == "cpu"
        if device.type == "cpu":
            keep_freed_memory()

    def conv(self, x, spec, residual=None):
        return conv_spec_cudnn(x, spec, residual)

    def wrap_run(self, run: Callable) -> Callable:
        return torch.compile(run, dynamic=False)
