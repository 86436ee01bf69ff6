"""CPU convolutions through oneDNN (mkldnn) with weights reordered once and the epilogue fused.

``F.conv2d`` on the CPU reorders the weight into oneDNN's blocked layout on every call and runs
bias/residual/ReLU as separate passes. Here the weight is reordered once per (conv, input shape)
and ``torch.ops.mkldnn._convolution_pointwise`` applies ReLU, or residual add + ReLU, in the conv
(the same kernels Inductor uses on the CPU). Same oneDNN convolution, so results are bit-identical
to ``F.conv2d`` (checked in the tests); measured 3-7% faster on w18_small_v2 at 512x1024, 2 cores.
fp32 only. While tracing, exporting (ONNX) or compiling the path is not taken: those graphs get the
plain, portable ``F.conv2d`` (oneDNN's opaque tensors do not trace), and a failure there changes
nothing. A failure in ordinary inference switches the path off for the process, falls back to
``F.conv2d`` (same results, slower) and says so once with a ``RuntimeWarning``.
"""
from __future__ import annotations

import logging
import sys
import warnings
from typing import Optional

import torch

logger = logging.getLogger(__name__)

_STATE = {"ok": None}
_WARNED: set = set()  # causes already warned about in this process
# Input shapes per conv whose reordered weights are kept (oneDNN picks the layout per problem);
# enough for a fixed-size service plus a second size, without growing with every image size.
MAX_SHAPES = 2


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


def warn_once(cause, message: str, warned: Optional[set] = None) -> None:
    """One ``RuntimeWarning`` per process and ``cause`` (remembered in ``warned``, by default this
    module's set) for a downgrade that costs speed."""
    warned = _WARNED if warned is None else warned
    if cause in warned:
        return
    warned.add(cause)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def available() -> bool:
    if _STATE["ok"] is None:
        _STATE["ok"] = bool(torch.backends.mkldnn.is_available()
                            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))
    return _STATE["ok"]


def conv_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
               padding: int, residual: Optional[torch.Tensor], relu: bool, cache: dict
               ) -> Optional[torch.Tensor]:
    """``act(conv2d(x, weight, bias) + residual)`` (ReLU on all channels or none), or None when the
    path cannot take it (then the caller runs the plain form). ``cache`` keeps the reordered weight
    per input shape; it belongs to one conv's weights and must be dropped with them."""
    if not available() or x.dtype != torch.float32 or x.device.type != "cpu" or in_side_path():
        return None
    st, pd = [stride, stride], [padding, padding]
    try:
        key = tuple(x.shape)
        w = cache.pop(key, None)
        if w is None:
            w = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), pd, st, [1, 1], 1,
                                                         list(x.shape))
            while len(cache) >= MAX_SHAPES:  # a copy of the weights per shape: keep a few only
                cache.pop(next(iter(cache)))
        cache[key] = w  # most recently used last
        if residual is not None:
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, w, bias, pd, st, [1, 1], 1, "add", None, "relu" if relu else None, [], "")
        return torch.ops.mkldnn._convolution_pointwise(x, w, bias, pd, st, [1, 1], 1,
                                                       "relu" if relu else "none", [], "")
    except Exception as e:
        if in_side_path():  # began tracing/exporting inside this call: this call only
            return None
        if not isinstance(e, (RuntimeError, NotImplementedError)):
            raise
        _STATE["ok"] = False
        warn_once("onednn-conv", f"hrnet_fast: the oneDNN fused CPU convolution failed ({e}); it is "
                  "switched off for this process and convolutions use F.conv2d (same results, "
                  "slower)")
        return None
