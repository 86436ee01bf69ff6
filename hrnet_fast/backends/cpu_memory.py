"""CPU memory policy: warm calls reuse the process heap instead of faulting in fresh pages.

Why: glibc's malloc serves blocks above its mmap threshold (128 KiB, rising dynamically to 32 MiB)
with fresh ``mmap`` pages and returns them to the kernel on ``free``. HRNet's activations at
512x1024 are 2-35 MB each, so every forward faulted in about 300 MB of new pages: 76,800 minor
page faults per call for w18_small_v2 at 1x3x512x1024 (2 threads, torch 2.13), all of it kernel
time. ONNX Runtime and OpenVINO avoid this with their own arenas. PyTorch's CPU allocator has no
cache, and oneDNN's fused convolutions have no ``out=`` form to write into planned buffers, so the
engine gets the same effect from the allocator: with ``M_MMAP_MAX = 0`` every block comes from the
heap, and with a 1 GiB ``M_TRIM_THRESHOLD`` freed blocks stay there, so the second and later calls of
a shape reuse the first call's memory (measured: 0 minor faults per warm call, system time 146 ms ->
1 ms per call; benchmarks/RESULTS.md). The heap keeps its peak size for the life of the process,
as an arena would.

Process-wide (malloc has one policy per process), glibc only, set once when the first CPU engine
is built; ``HRNET_FAST_CPU_HEAP=0`` leaves malloc as it is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30
_STATE = {"done": False, "applied": False, "why": "not tried"}


def keep_freed_memory() -> bool:
    """Apply the policy once per process; True when it is in force. Never raises."""
    if _STATE["done"]:
        return _STATE["applied"]
    _STATE["done"] = True
    from .selection import cpu_heap_enabled
    if not cpu_heap_enabled():
        _STATE["why"] = "disabled by HRNET_FAST_CPU_HEAP=0"
    elif not sys.platform.startswith("linux"):
        _STATE["why"] = f"only for glibc (this is {sys.platform})"
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError) as e:  # musl and others have no mallopt
            _STATE["why"] = f"no glibc mallopt ({e})"
        else:
            ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            _STATE["applied"] = ok
            _STATE["why"] = "in force" if ok else "mallopt refused"
    logger.info("CPU memory policy (heap reuse across calls): %s", _STATE["why"])
    return _STATE["applied"]


def status() -> str:
    return _STATE["why"]
