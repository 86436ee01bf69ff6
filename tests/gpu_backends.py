"""Which engine backends the GPU tests may skip, and which must run.

On a machine with a CUDA device, ``torch``, ``triton`` and ``auto`` must run: a broken Triton
install is a defect there, so a GPU test fails instead of skipping. The CUDA extension (``cuda``)
must run wherever it can be built: a prebuilt ``hrnet_fast._C`` is installed, or a JIT build is
possible (a CUDA toolkit, ninja and the csrc/ sources) and ``HRNET_FAST_CUDA_EXT`` allows it. Only
where it cannot be built does its test skip, with ``cuda_ext_status()``'s reason.
"""
from __future__ import annotations

import importlib.util
from typing import Tuple

import pytest
import torch

from hrnet_fast import BackendUnavailable, cuda_ext
from hrnet_fast.backends import selection


def cuda_extension_buildable() -> Tuple[bool, str]:
    """(whether the CUDA extension can be had here, why), without building anything."""
    mode = selection.cuda_ext_mode()
    if mode in ("0", "off", "false", "no"):
        return False, f"HRNET_FAST_CUDA_EXT={mode} turns it off"
    if importlib.util.find_spec("hrnet_fast._C") is not None:
        return True, "a prebuilt hrnet_fast._C is installed"
    if mode == "prebuilt":
        return False, "HRNET_FAST_CUDA_EXT=prebuilt forbids a JIT build and no hrnet_fast._C exists"
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) for a JIT build"
    if not cpp_extension.is_ninja_available():
        return False, "ninja (needed for a JIT build) is not installed"
    missing = [s for s in cuda_ext.SOURCES if not (cuda_ext.csrc_dir() / s).is_file()]
    if missing:
        return False, f"the csrc/ sources are not next to the package (missing {missing})"
    return True, f"a JIT build is possible (CUDA toolkit at {cpp_extension.CUDA_HOME}, ninja)"


def require_backend(backend: str, device=None) -> None:
    """Fail unless ``backend`` runs on ``device`` (default: the current CUDA device); the CUDA
    extension alone may skip, and only where it cannot be built (module docstring)."""
    device = torch.device(device if device is not None else "cuda")
    if backend == "cuda":
        ok, reason = cuda_ext.cuda_ext_status()
        if ok:
            return
        buildable, why = cuda_extension_buildable()
        if buildable:
            pytest.fail(f"the CUDA extension must load here ({why}), but cuda_ext_status() says: "
                        f"{reason}")
        pytest.skip(f"the CUDA extension cannot be built here ({why}): {reason}")
    try:
        selection.resolve_backend(backend, device)
    except BackendUnavailable as e:
        pytest.fail(f"backend {backend!r} must run on a machine with a CUDA device: {e}")
