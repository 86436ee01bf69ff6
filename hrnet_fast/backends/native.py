"""The device's own torch backend: what every other backend falls back to for what it does not
accelerate (convolutions on oneDNN or cuDNN)."""
from __future__ import annotations

import torch

from .base import Backend
from .torch_cpu import TorchCPU
from .torch_cuda import TorchCUDA


def native_backend(plan, device: torch.device, dtype: torch.dtype) -> Backend:
    cls = TorchCUDA if device.type == "cuda" else TorchCPU
    return cls.prepare(plan, device, dtype)
