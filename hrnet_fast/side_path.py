"""Whether a call runs inside a trace, an export or a compile (a "side path")."""
from __future__ import annotations

import contextlib
import sys
import threading

import torch

_ORDINARY = threading.local()


@contextlib.contextmanager
def ordinary_call():
    """Within the block, :func:`in_side_path` answers False without asking torch. For a caller that
    checked once, at the start of a call, that no trace, export or compile is running: none can
    begin inside the call. Asking torch costs about 6 us, and an engine forward asks about 150 times
    (0.9 ms per w18_small_v2 forward, 2 threads)."""
    before = getattr(_ORDINARY, "on", False)
    _ORDINARY.on = True
    try:
        yield
    finally:
        _ORDINARY.on = before


def in_side_path() -> bool:
    """True while tracing (``torch.jit.trace``), exporting (ONNX, ``torch.export``) or compiling
    (``torch.compile``): a failure there says nothing about the fast path of ordinary calls."""
    if getattr(_ORDINARY, "on", False):
        return False
    try:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return True
        is_exporting = getattr(torch.compiler, "is_exporting", None)
        if is_exporting is not None and is_exporting():
            return True
        onnx = sys.modules.get("torch.onnx")  # never imported: no export can be running
        return bool(onnx is not None and onnx.is_in_onnx_export())
    except Exception:  # an API this torch lacks or that fails: assume ordinary inference
        return False
