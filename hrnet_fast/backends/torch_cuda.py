"""The ``torch`` backend on CUDA: cuDNN convolutions with cuDNN's fused epilogues, torch
compositions for the fuse step and the head.

cuDNN's fused conv epilogues (conv + bias [+ residual] + ReLU in one kernel) are used for
fp16/bf16 only (fp32 keeps ``F.conv2d``, whose TF32 setting the tests control). Without them every
ReLU conv is three to four launches (conv, bias, add, ReLU): w18 at 1024x2048 makes ~900
conv-related kernels per forward instead of ~340.

Inside a CUDA-graph capture nothing may fail or be tried for the first time (a failed call
invalidates the capture), so the fused form is captured only for problems that already ran fused
eagerly (the engine's warm-up runs every shape before it captures); an unseen problem is captured
unfused. A device/dtype whose cuDNN refuses the fused call is remembered and not tried again, and
said once (RuntimeWarning) per device/dtype/form; a refusal while tracing, exporting or compiling
(``in_side_path``) only sends that call down the unfused form.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..plan import ConvSpec
from ..ops.conv import conv2d_bias_act_torch
from .base import Backend, in_side_path, warn_once

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


def conv2d_bias_act_cudnn(x, weight, bias, stride=1, padding=0, residual=None, relu=True,
                          relu_ranges=None):
    """``conv2d_bias_act`` with cuDNN's fused epilogue where it applies (fp16/bf16 CUDA, ReLU on
    every channel, a bias), the plain composition otherwise."""
    if (x.is_cuda and relu and relu_ranges is None and x.dtype in (torch.float16, torch.bfloat16)
            and bias is not None):
        y = _cudnn_fused(x, weight, bias, stride, padding, residual)
        if y is not None:
            return y
    return conv2d_bias_act_torch(x, weight, bias, stride, padding, residual, relu, relu_ranges)


def conv_spec_cudnn(x: torch.Tensor, spec: ConvSpec, residual: Optional[torch.Tensor] = None):
    return conv2d_bias_act_cudnn(x, spec.weight, spec.bias, spec.stride, spec.padding, residual,
                                 spec.relu, spec.relu_ranges)


class TorchCUDA(Backend):
    """``backend="torch"`` on a CUDA device."""

    name = "torch"

    @classmethod
    def available(cls, device: torch.device) -> Tuple[bool, str]:
        if device.type != "cuda":
            return False, "TorchCUDA runs on CUDA devices only"
        return (True, "") if torch.cuda.is_available() else (False, "no CUDA GPU is available")

    def conv(self, x, spec, residual=None):
        return conv_spec_cudnn(x, spec, residual)
