"""Triton kernels. Importing this package never imports triton; ``triton_status`` says whether the
kernels can run here (a CUDA GPU, or the CPU interpreter with ``TRITON_INTERPRET=1``)."""
from __future__ import annotations

import importlib.util
import os
from typing import Tuple

import torch


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_status(device: torch.device | str | None = None) -> Tuple[bool, str]:
    """(usable, reason): whether Triton kernels can run on ``device`` in this process."""
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed (pip install triton)"
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is available"
        return True, ""
    if dev is not None and dev.type != "cpu":
        return False, f"Triton kernels do not run on {dev.type} tensors"
    if interpreter_enabled():
        return True, ""
    if dev is None and torch.cuda.is_available():
        return True, ""
    return False, ("Triton kernels need a CUDA GPU (on the CPU they run only under the interpreter, "
                   "TRITON_INTERPRET=1 set before triton is imported)")
