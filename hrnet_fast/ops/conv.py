"""``conv2d_bias_act``: a convolution with folded BatchNorm and its epilogue (residual, ReLU)."""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import registry
from ._validate import check_image, check_same
from .cpu_conv import in_side_path, warn_once

logger = logging.getLogger(__name__)

# cuDNN's fused conv epilogues (conv + bias [+ residual] + ReLU in one kernel): used for fp16/bf16
# only (fp32 keeps F.conv2d, whose TF32 setting the tests control). Without them every ReLU conv is
# three to four launches (conv, bias, add, ReLU): w18 at 1024x2048 makes ~900 conv-related kernels
# per forward instead of ~340.
#
# Inside a CUDA-graph capture nothing may fail or be tried for the first time (a failed call
# invalidates the capture), so the fused form is captured only for problems that already ran fused
# eagerly (the engine's warm-up runs every shape before it captures); an unseen problem is captured
# unfused. A device/dtype whose cuDNN refuses the fused call is remembered and not tried again, and
# said once (RuntimeWarning) per device/dtype/form; a refusal while tracing, exporting or compiling
# (in_side_path) only sends that call down the unfused form.
_CUDNN_FUSED_BROKEN: set = set()
_WARNED: set = set()
_CUDNN_FUSED_SEEN: set = set()
# What captures recorded: {"fused": n, "unfused": n} conv epilogues (tests and benchmarks read it).
CAPTURED_EPILOGUES = {"fused": 0, "unfused": 0}


def _fused_key(x, weight, stride, padding, residual):
    return (x.device, x.dtype, tuple(x.shape), x.stride(), tuple(weight.shape), stride, padding,
            None if residual is None else residual.stride())


def _cudnn_fused(x, weight, bias, stride, padding, residual):
    broken_key = (x.device, x.dtype, residual is None)
    if broken_key in _CUDNN_FUSED_BROKEN:
        return None
    key = _fused_key(x, weight, stride, padding, residual)
    capturing = torch.cuda.is_current_stream_capturing()
    if capturing:
        seen = key in _CUDNN_FUSED_SEEN
        CAPTURED_EPILOGUES["fused" if seen else "unfused"] += 1
        if not seen:
            return None
    try:
        if residual is None:
            y = torch.cudnn_convolution_relu(x, weight, bias, (stride, stride), (padding, padding),
                                             (1, 1), 1)
        else:
            y = torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, (stride, stride),
                                                 (padding, padding), (1, 1), 1)
    except RuntimeError as e:  # unsupported layout/dtype on this cuDNN: use the unfused form
        if capturing:
            raise  # cannot happen for a problem that ran eagerly; never hide a broken capture
        if in_side_path():
            return None  # a trace/export/compile failure says nothing about eager calls
        _CUDNN_FUSED_BROKEN.add(broken_key)
        form = "conv + bias + ReLU" if residual is None else "conv + bias + residual add + ReLU"
        warn_once(broken_key, f"hrnet_fast: the cuDNN fused {form} epilogue is unavailable for "
                  f"{x.dtype} on {x.device} ({e}); those convolutions run unfused (conv, then the "
                  "epilogue as separate kernels: same results, slower) for the rest of the process",
                  _WARNED)
        return None
    if not capturing:
        _CUDNN_FUSED_SEEN.add(key)
    return y


def conv2d_bias_act_torch(x, weight, bias, stride=1, padding=0, residual=None, relu=True,
                          relu_ranges=None):
    if (x.is_cuda and relu and relu_ranges is None and x.dtype in (torch.float16, torch.bfloat16)
            and bias is not None):
        y = _cudnn_fused(x, weight, bias, stride, padding, residual)
        if y is not None:
            return y
    y = F.conv2d(x, weight, bias, stride, padding)
    if residual is not None:
        y.add_(residual)
    if relu_ranges is not None:
        for start, end in relu_ranges:
            y[:, start:end].relu_()
    elif relu:
        y.relu_()
    return y


def conv2d_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                    stride: int = 1, padding: Optional[int] = None,
                    residual: Optional[torch.Tensor] = None, relu: bool = True,
                    relu_ranges: Optional[Sequence[Tuple[int, int]]] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """``act(conv2d(x, weight, bias, stride, padding) + residual)``.

    ``padding=None`` means "same" for odd kernels (k // 2). ``relu_ranges`` (output-channel
    [start, end) pairs) overrides ``relu``: only those channels take the ReLU.
    """
    check_image("x", x)
    check_image("weight", weight)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {weight.shape[1]}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight is {weight.dtype} on {weight.device}, x is {x.dtype} on {x.device}")
    cout = weight.shape[0]
    if bias is not None and (bias.shape != (cout,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{cout}] of {x.dtype}, got {list(bias.shape)} of {bias.dtype}")
    if padding is None:
        padding = weight.shape[-1] // 2
    if residual is not None:
        check_image("residual", residual)
        check_same("residual", residual, "x", x, channels=False)
        h = (x.shape[2] + 2 * padding - weight.shape[2]) // stride + 1
        w = (x.shape[3] + 2 * padding - weight.shape[3]) // stride + 1
        if tuple(residual.shape[1:]) != (cout, h, w):
            raise ValueError(f"residual must be {[x.shape[0], cout, h, w]}, got {list(residual.shape)}")
    if relu_ranges is not None:
        relu_ranges = tuple((int(s), int(e)) for s, e in relu_ranges)
        if any(not 0 <= s < e <= cout for s, e in relu_ranges):
            raise ValueError(f"relu_ranges {relu_ranges} must lie within [0, {cout})")
    _, fn = registry.resolve("conv2d_bias_act", backend, x.device)
    return fn(x, weight, bias, stride, padding, residual, relu, relu_ranges)


registry.register("conv2d_bias_act", "torch", conv2d_bias_act_torch)
