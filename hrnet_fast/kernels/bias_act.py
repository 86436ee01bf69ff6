"""Per-channel bias and a per-channel ReLU over a conv output, in one pass.

    out[n, c, h, w] = act_c(y[n, c, h, w] + bias[c]),  act_c = ReLU if mask[c] != 0 else identity

Why: the batched stride-2 convs of a fuse step stack convs with and without a ReLU along output
channels (``ConvSpec.relu_ranges``). cuDNN has no epilogue for that, so ``F.conv2d`` added the bias
in a broadcast kernel of its own and a ReLU ran per range: two passes over the output. In an H200
profile (w48, 1x3x1024x2048 fp16) the forward's 12 separate bias adds took 0.46 ms, 10 of them
these convs', and their 10 ReLUs 0.06 ms more. Here the conv runs without bias and this kernel
makes the one pass.

Layout: ``y`` dense NCHW (contiguous) or channels_last; float32, float16 or bfloat16. ``bias``: [C],
float32 or y's dtype. ``mask``: [C] int8 (1: ReLU). Arithmetic in float32, one rounding to y's dtype.
The ReLU keeps NaN (``x < 0 ? 0 : x``, as ``torch.relu``). Returns a new tensor in y's layout.
Registered as ``hrnet_fast::bias_relu_mask_triton`` (``triton_op`` + ``wrap_triton``): it works under
CUDA-graph capture and torch.compile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreter_enabled

__all__ = ["bias_relu_mask"]

# 4096 elements per program: 8 KB of fp16 in and out, 16-byte vectors per thread with 4 warps.
_BLOCK = 256 if interpreter_enabled() else 4096


@triton.jit
def _bias_relu_mask_cl_kernel(y_ptr, b_ptr, m_ptr, out_ptr, total, C: tl.constexpr,
                              BLOCK: tl.constexpr):
    # channels_last: element e has channel e % C. One int64 modulo per program; per element an
    # int32 modulo by the constant C (a multiply and shift; a run-time int64 modulo per element
    # would make this memory-bound kernel compute-bound).
    start = tl.program_id(0).to(tl.int64) * BLOCK
    local = tl.arange(0, BLOCK)
    ok = local < total - start
    c = ((start % C).to(tl.int32) + local) % C
    v = tl.load(y_ptr + start + local, mask=ok, other=0.0).to(tl.float32)
    v = v + tl.load(b_ptr + c, mask=ok, other=0.0).to(tl.float32)
    relu = tl.load(m_ptr + c, mask=ok, other=0) != 0
    v = tl.where(relu & (v < 0.0), 0.0, v)
    tl.store(out_ptr + start + local, v.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bias_relu_mask_nchw_kernel(y_ptr, b_ptr, m_ptr, out_ptr, C, HW, BLOCK: tl.constexpr):
    # NCHW: program (plane, block) covers part of one channel plane; bias and mask are scalars.
    plane = tl.program_id(0)
    c = plane % C
    pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = pos < HW
    offs = plane.to(tl.int64) * HW + pos
    v = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32) + tl.load(b_ptr + c).to(tl.float32)
    if tl.load(m_ptr + c) != 0:
        v = tl.where(v < 0.0, 0.0, v)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=ok)


def _channels_last(y: torch.Tensor) -> bool:
    return y.dim() == 4 and y.shape[1] > 1 and y.is_contiguous(memory_format=torch.channels_last) \
        and not y.is_contiguous()


@torch.library.triton_op("hrnet_fast::bias_relu_mask_triton", mutates_args=())
def bias_relu_mask_triton(y: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Registered op behind :func:`bias_relu_mask` (same semantics, no validation)."""
    cl = _channels_last(y)
    out = torch.empty_like(y, memory_format=torch.channels_last if cl else torch.contiguous_format)
    total = y.numel()
    if total == 0:
        return out
    N, C, H, W = y.shape
    if cl:
        torch.library.wrap_triton(_bias_relu_mask_cl_kernel)[(triton.cdiv(total, _BLOCK),)](
            y, bias, mask, out, total, C=C, BLOCK=_BLOCK, num_warps=4)
    else:
        torch.library.wrap_triton(_bias_relu_mask_nchw_kernel)[(N * C, triton.cdiv(H * W, _BLOCK))](
            y, bias, mask, out, C, H * W, BLOCK=_BLOCK, num_warps=4)
    return out


def bias_relu_mask(y: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``act_c(y + bias[c])`` with a ReLU on the channels where ``mask`` is nonzero (module
    docstring); arguments are checked here."""
    if y.dim() != 4 or not (y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"y must be a dense 4-d NCHW or channels_last tensor, got shape "
                         f"{tuple(y.shape)} strides {y.stride()}")
    if y.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"y: dtype {y.dtype} is not supported (float32, float16, bfloat16)")
    C = y.shape[1]
    for name, t in (("bias", bias), ("mask", mask)):
        if t.dim() != 1 or t.shape[0] != C or t.device != y.device:
            raise ValueError(f"{name} must be a [{C}] tensor on {y.device}, got {tuple(t.shape)} "
                             f"on {t.device}")
    if bias.dtype not in (torch.float32, y.dtype):
        raise ValueError(f"bias must be float32 or y's dtype {y.dtype}, got {bias.dtype}")
    if mask.dtype != torch.int8:
        raise ValueError(f"mask must be int8 (1: ReLU), got {mask.dtype}")
    return torch.ops.hrnet_fast.bias_relu_mask_triton(y, bias.contiguous(), mask.contiguous())
