"""Whether a call runs inside a trace, an export or a compile (a "side path")."""
from __future__ import annotations

import sys

import torch


def in_side_path() -> bool:
    """True while tracing (``torch.jit.trace``), exporting (ONNX, ``torch.export``) or compiling
    (``torch.compile``): a failure there says nothing about the fast path of ordinary calls."""
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
