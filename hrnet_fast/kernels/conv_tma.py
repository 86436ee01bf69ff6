"""Triton 3x3 stride-1 convolution fed by TMA loads (Hopper's tensor memory accelerator), for the
thin branch convs. Off by default (``TMA_MODE``) until a GPU measures it.

Math: exactly ``kernels.conv``'s ``out = act(conv2d(x, w, bias, stride 1, padding 1) + residual)``
for fp16 / bf16 activations: products and sums in fp32, bias then residual added in fp32, one
rounding at the store (the shared epilogue, ``conv._bias_res_act_store``).

Layout: x NHWC, read through a 4-D tensor descriptor [N, H, W, Cin] with boxes [1, TILE_H, TILE_W,
BLOCK_K]: the box of tap (r, s) for the output tile at (oh0, ow0) starts at (img, oh0 - 1 + r,
ow0 - 1 + s, c0). TMA fills every element outside the tensor with zeros, so the conv's zero padding
at the image border and the channels past Cin in the last K block need neither masks nor address
math. The packed weight [9*Cin, Cout] (``conv.pack_weight``) is read through a 2-D descriptor with
boxes [BLOCK_K, BLOCK_N] at (tap*Cin + c0, n0); rows past the tap's Cin are the next tap's first
rows (zeros past the end) and meet A's zero-filled channels, so they add exact zeros (weights are
finite; a non-finite weight makes the reference output non-finite too). Output dense NHWC; the
residual through its strides.

Why: the pipelined Triton conv computes every A element's address and border mask per thread
(about 190 SASS instructions per K step on sm_90) and fetches each of the 9 taps with 16-byte
``cp.async.cg``; here one thread issues one TMA copy per operand and K step (sm_90 build:
``UTMALDG.4D``, pipelined over num_stages with mbarriers) and the tile goes from shared memory to
the tensor cores. Run D (H200) timed w18's 24-channel conv at 256x512 at 18.6 us (cuDNN) and
25.9 us (the pipelined Triton conv) against 3 us of memory traffic at the copy ceiling.

Requirements (``eligible``): fp16 / bf16; 3x3, stride 1, padding 1; Cin and Cout multiples of 8;
x's pixel strides multiples of 8 elements and its base 16-byte aligned (TMA's 16-byte rule); a
CUDA device of capability 9.0 or newer, or the CPU interpreter.
"""
from __future__ import annotations

from typing import Dict

import torch

import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import interpreter_enabled
from .conv import _bias_res_act_store, _tile_origin

__all__ = ["TMA_MODE", "eligible", "conv3x3_tma", "tma_configs"]

# "off" (default until measured on a GPU), "on": every eligible conv of the Triton conv op.
TMA_MODE = "off"

_INTERPRET = interpreter_enabled()


@triton.jit
def _conv3x3_tma_kernel(
    x_desc, w_desc, b_ptr, r_ptr, mask_ptr, out_ptr,
    H, W, Cin, Cout,
    srn, src_, srh, srw,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU_MODE: tl.constexpr, VEC_N: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (TILE_H x TILE_W pixels) x BLOCK_N tile of ``act(conv3x3(x, w) + bias + residual)``
    (module docstring: math, layouts). Cout, srn, srh, srw arrive divided by VEC_N (the VEC rule of
    ``kernels.conv``). M_BUCKET is only an autotuning key."""
    Cout = Cout * VEC_N
    srn = srn * VEC_N
    srh = srh * VEC_N
    srw = srw * VEC_N
    BLOCK_M: tl.constexpr = TILE_H * TILE_W
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    img_s, oh0, ow0 = _tile_origin(pid_m, H, W, TILE_H, TILE_W)
    n0 = pid_n * BLOCK_N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_cc = tl.cdiv(Cin, BLOCK_K)
    for it in range(0, 9 * n_cc):
        tap = it // n_cc
        c0 = (it - tap * n_cc) * BLOCK_K
        r = tap // 3
        s = tap - r * 3
        a = x_desc.load([img_s, oh0 - 1 + r, ow0 - 1 + s, c0])
        a = tl.reshape(a, [BLOCK_M, BLOCK_K])
        b = w_desc.load([tap * Cin + c0, n0])
        acc = tl.dot(a, b, acc)

    loc = tl.arange(0, BLOCK_M)
    oh = oh0 + loc // TILE_W
    ow = ow0 + loc % TILE_W
    img = tl.zeros((BLOCK_M,), dtype=tl.int32) + img_s
    offs_m = (img * H + oh) * W + ow
    offs_n = n0 + tl.arange(0, BLOCK_N)
    _bias_res_act_store(acc, offs_m, offs_n, (oh < H) & (ow < W), offs_n < Cout, img, oh, ow,
                        b_ptr, r_ptr, mask_ptr, out_ptr, Cout, srn, src_, srh, srw,
                        HAS_BIAS, HAS_RES, RELU_MODE)


def _set_block_shapes(nargs) -> None:
    """Autotune pre-hook: the descriptors' boxes follow the config being run."""
    nargs["x_desc"].block_shape = [1, nargs["TILE_H"], nargs["TILE_W"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]


# (TILE_H, TILE_W, BLOCK_N, BLOCK_K, num_warps, num_stages). sm_90a build (Triton 3.6, fp16, bias +
# residual + ReLU mask; tests/test_kernels_conv_tma.py compiles every config): 76-145 registers,
# 22-45 KB shared, no spills; x and w each by 3-4 TMA copies (UTMALDG.4D / .2D) into HGMMA.
_CONFIGS = [
    (8, 16, 32, 32, 4, 3),
    (4, 32, 32, 32, 4, 4),
    (8, 32, 32, 32, 8, 3),
    (8, 16, 64, 32, 4, 3),
    (8, 16, 32, 64, 4, 3),
]


def tma_configs(cin: int, cout: int):
    """Autotune configs for a problem: one under the interpreter; on the GPU the list above without
    tiles far wider than the problem (BLOCK_N > pow2(Cout), BLOCK_K > pow2(Cin))."""
    if _INTERPRET:
        rows = [(4, 8, 32, 32, 4, 1)]
    else:
        rows = [c for c in _CONFIGS if c[2] <= max(32, triton.next_power_of_2(cout))
                and c[3] <= max(32, triton.next_power_of_2(cin))] or _CONFIGS[:1]
    return [triton.Config({"TILE_H": th, "TILE_W": tw, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                          num_stages=s, pre_hook=_set_block_shapes) for th, tw, bn, bk, w, s in rows]


_TUNED: Dict[tuple, object] = {}


def _tuned_kernel(cin: int, cout: int):
    configs = tma_configs(cin, cout)
    key = tuple((c.kwargs["TILE_H"], c.kwargs["TILE_W"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                 c.num_warps, c.num_stages) for c in configs)
    kern = _TUNED.get(key)
    if kern is None:
        kern = triton.autotune(configs=configs,
                               key=["Cin", "Cout", "M_BUCKET", "HAS_RES", "RELU_MODE", "VEC_N"],
                               )(_conv3x3_tma_kernel)
        _TUNED[key] = kern
    return kern


def eligible(x: torch.Tensor, w_packed: torch.Tensor, ksize: int, stride: int, padding: int) -> bool:
    """Whether ``conv3x3_tma`` can run this conv (module docstring: requirements)."""
    if TMA_MODE != "on" or ksize != 3 or stride != 1 or padding != 1:
        return False
    if torch.compiler.is_compiling():  # traced graphs keep the pipelined kernel (same math)
        return False
    if x.dtype not in (torch.float16, torch.bfloat16) or w_packed.dtype != x.dtype:
        return False
    if x.device.type == "cuda":
        if torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif not _INTERPRET:
        return False
    n, cin, h, w = x.shape
    cout = w_packed.shape[1]
    sn, sc, sh, sw = x.stride()
    if not (cin % 8 == 0 and cout % 8 == 0 and sc == 1 and sh % 8 == 0 and sw % 8 == 0
            and (sn % 8 == 0 or n == 1) and w_packed.is_contiguous()):
        return False
    try:
        return x.data_ptr() % 16 == 0 and w_packed.data_ptr() % 16 == 0
    except RuntimeError:  # a fake tensor (tracing) has no address: the pipelined kernel
        return False


def conv3x3_tma(x, w_packed, bias, residual, mask_t, out, relu_mode: int, vec_n: int,
                res_strides, grid_m_bucket: int) -> torch.Tensor:
    """Launch the TMA conv into ``out`` (dense NHWC, x's dtype); the caller (``conv``'s registered
    op) has checked ``eligible`` and prepared the epilogue's operands as for its own kernel."""
    n, cin, h, w = x.shape
    cout = w_packed.shape[1]
    sn, _, sh, sw = x.stride()
    x_nhwc = x.permute(0, 2, 3, 1)
    # the boxes are placeholders: the autotuner's pre-hook sets them per config
    x_desc = TensorDescriptor(x_nhwc, [n, h, w, cin], [sn if n > 1 else h * sh, sh, sw, 1],
                              [1, 8, 16, 32])
    w_desc = TensorDescriptor(w_packed, list(w_packed.shape), [cout, 1], [32, 32])
    srn, src_, srh, srw = res_strides
    has_bias = bias is not None
    has_res = residual is not None

    def grid(meta):
        return (n * triton.cdiv(h, meta["TILE_H"]) * triton.cdiv(w, meta["TILE_W"]),
                triton.cdiv(cout, meta["BLOCK_N"]))

    torch.library.wrap_triton(_tuned_kernel(cin, cout))[grid](
        x_desc, w_desc, bias if has_bias else w_packed, residual if has_res else out,
        mask_t, out,
        h, w, cin, cout // vec_n,
        srn // vec_n, src_, srh // vec_n, srw // vec_n,
        grid_m_bucket,
        HAS_BIAS=has_bias, HAS_RES=has_res, RELU_MODE=relu_mode, VEC_N=vec_n,
    )
    return out
