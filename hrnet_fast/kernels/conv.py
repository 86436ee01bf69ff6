"""Triton implicit-GEMM convolution with a fused bias / residual / ReLU epilogue (channels_last).

Public API
----------
``pack_weight(weight) -> Tensor``
    ``[Cout, Cin, k, k]`` -> ``[k*k*Cin, Cout]`` (contiguous; row index ``(r*k + s)*Cin + c`` for kernel
    row ``r``, kernel column ``s``, input channel ``c``). Call it once per layer (the inference plan does)
    and hand the packed weight to ``conv2d_bias_act``; it must have the dtype of the activations.

``conv2d_bias_act(x, weight, bias=None, *, stride=1, padding=None, residual=None, relu=True,
relu_ranges=None) -> Tensor``
    ``out = act(conv2d(x, weight, bias, stride, padding) + residual)``.

``relu_mask(relu_ranges, cout, device) -> Tensor``
    The per-channel ReLU mask (int8, ``[Cout]``, 1 = ReLU) that ``relu_ranges`` turns into; precompute it
    once per layer when the call is to be captured in a CUDA graph.

Registered op: ``torch.ops.hrnet_fast.conv2d_bias_act_triton(x, w_packed, bias, residual, relu_mask,
ksize, stride, padding, relu) -> Tensor`` (``torch.library.triton_op``; works eagerly, under
``torch.compile`` and inside CUDA graphs once autotuning has run for the shape).

Math: ``out[n, co, oh, ow] = act(b[co] + sum_{r, s, c} x[n, c, oh*stride - pad + r, ow*stride - pad + s]
* w[co, c, r, s] + residual[n, co, oh, ow])`` with zero padding (out-of-image taps masked, nothing
materialised); act = ReLU on every channel (``relu``), on the masked channels (``relu_ranges``) or none.

GEMM view: M = N*Ho*Wo output pixels (rows), N = Cout (columns), K = k*k*Cin (reduction, tap-major,
channel-minor, matching ``pack_weight``). Each program computes a BLOCK_M x BLOCK_N output tile, gathering
the A tile straight from the NHWC input. Its BLOCK_M pixels are consecutive in (n, oh, ow) order, or
(config TILE_W > 0) a 2-D tile of BLOCK_M / TILE_W rows x TILE_W columns of one image, whose taps
overlap in L1 (``_TILED_MMA_CONFIGS``). Two K walks (``use_flat_k``):
  * per tap: for each of the k*k taps, ceil(Cin / BLOCK_K) channel blocks (Cin multiple of 32, or not
    read with VEC_K 8); row gather addresses are 1-D per tap.
  * flat: K walked in BLOCK_K steps across taps. For Cin < ``FLAT_K_MAX_CIN`` (16; the stem's 3 RGB
    channels, so the 27 real K values of a 3x3x3 kernel are not padded to 9*16), and for Cin a multiple
    of 8 but not of 32 read with VEC_K 8 (HRNet's zero-padded branch widths 24, 40, 48, 72, 144): every
    aligned run of 8 K values is 8 consecutive channels of one tap, so the loads stay 16 bytes wide and
    a tap's channels are not padded to a multiple of BLOCK_K (see FLAT_K_ALIGNED for the numbers).

Split-K (``SPLIT_K_MODE``, ``split_k_for``): where the output has too few tiles to fill the card (the
low-resolution branches), K is cut into SPLIT_K runs of steps, each program (m, n, s) writes its fp32
partial tile to a workspace [SPLIT_K, M, Cout], and a second kernel adds the partials in a fixed order
(s = 0, 1, ...) and applies the epilogue: deterministic, one more launch and the partials' traffic.

Layouts and dtypes: x is read through its own strides as long as its channels are contiguous
(``stride(1) == 1``: channels_last tensors and channel slices of them; anything else is made
channels_last first). The residual may have any strides. The packed weight is ``[k*k*Cin, Cout]``
contiguous in x's dtype; bias any float dtype; the output is a new channels_last tensor in x's dtype.
fp32, fp16 and bf16 activations.

VEC rule (16-byte loads for thin layers): Triton only specialises integer arguments divisible by 16, so
a pixel stride of 24 or 40 elements would not prove 16-byte alignment and the A tile would be read one
element at a time. The host therefore passes Cin and x's n/h/w strides divided by
``VEC_K = vec_factor(Cin, x strides)`` and Cout and the residual's n/h/w strides divided by
``VEC_N = vec_factor(Cout, residual strides)`` (the largest power of two <= 8 dividing all of them;
the stride of a size-1 dim counts as 0; 1 if any value needs int64), and the kernel multiplies them back
by the constexpr VEC. Then every row offset is a provable multiple of VEC_K (VEC_N for the weight rows,
the residual and the output), and for fp16/bf16 with VEC 8 the A and weight tiles are fetched with
16-byte ``cp.async`` (SASS ``LDGSTS.E.BYPASS.128``, pipelined over num_stages), the residual with
16-byte loads and the output with 16-byte stores; tests/test_kernels_conv.py checks the sm_90 build.
A channel slice whose strides are not multiples of 8 gets the matching smaller VEC (down to 1: scalar).

Numerics: products and sums in fp32 (fp32 inputs: ``input_precision="ieee"``, no TF32), bias and residual
added in fp32, one rounding to x's dtype at the store. Offsets: image bases and the output offset are
64-bit; offsets inside one image are 32-bit (an image of < 2^31 elements).

Autotuning: per (Cin, Cout, k, stride, next_pow2(M), epilogue, K walk, split, VEC_K, VEC_N, dtype) on the
first call of a shape, unless Triton's disk cache holds the timings from an earlier process
(``cache_results``); under ``TRITON_INTERPRET=1`` a single small config. Run every shape once eagerly before
capturing a CUDA graph (autotuning launches the kernel many times and cannot run inside a capture).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

import triton
import triton.language as tl

from . import interpreter_enabled

__all__ = ["pack_weight", "conv2d_bias_act", "relu_mask", "conv_configs", "vec_factor", "use_flat_k",
           "pinned_config", "device_arch"]

_INTERPRET = interpreter_enabled()

# Test hook: when True, every output buffer the op allocates is filled with NaN before the kernel runs,
# so a tile the kernel forgets to write shows up as NaN (tests set it; never needed in production).
_debug_poison_outputs = False

# Inputs with fewer channels than this walk K flat across the taps (FLAT_K): less padding of K for
# tiny Cin (3 for the stem), more index math per element. A tuning knob (benchmarks A/B it).
FLAT_K_MAX_CIN = 16

# Cin a multiple of 8 (VEC_K 8) but not of 32 (24, 40, 48, 72, 144: HRNet's zero-padded branch widths)
# also walks K flat, in BLOCK_K steps of whole 8-channel runs of one tap, so a tap is not padded to a
# multiple of BLOCK_K. ptxas (sm_90a, fp16, Triton 3.6): the loop body costs the same either way
# (per-tap / flat SASS instructions per K step: 192 / 192 at 128x32x32, 204 / 206 at 128x64x32,
# 344 / 337 at 128x64x64, 147 / 153 at 128x128x32 with 8 warps; 4 or 2 HGMMA and 5-12 16-byte
# LDGSTS per step in both), so the flat walk wins by its step count: Cin 24 with BLOCK_K 32 takes 7
# steps (K 216 -> 224) instead of 9 (9 taps x 32), Cin 40: 12 instead of 18 (BLOCK_K 64: 6 vs 9),
# 48: 14 vs 18, 72: 21 vs 27, 144: 41 vs 45 (BLOCK_K 64: 21 vs 27). Multiples of 32 keep the
# per-tap walk (no padding there and 1-D gather addresses). A tuning knob (the benchmark A/Bs it).
FLAT_K_ALIGNED = True

# Cap of the VEC factors (8 fp16/bf16 elements = 16 bytes, the widest load a thread can issue).
VEC_MAX = 8

# Split-K for convs whose output has too few tiles to fill the card (``split_k_for``). Run D (H200)
# timed the low-resolution branch convs at about one K step per 0.25-0.45 us of one CTA, with the
# grid under one wave: 144->144 at 32x64 (48 tiles of 128x64, 41 steps of K 32) 11.3 us, w48's
# 384->384 at 32x64 (96 tiles, 108 steps) 33 us, against about 1 us of tensor-core work each; they
# are latency-bound, so splitting K over more CTAs shortens each one's chain of dependent steps.
# "auto": ``split_k_for``'s estimate on CUDA devices (1 elsewhere: the estimate models a GPU);
# "off": never; an int: exactly that split (tests, the benchmark's A/B).
SPLIT_K_MODE: Union[str, int] = "auto"
SPLIT_K_MAX = 8


# ----------------------------------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------------------------------

def conv_configs(dtype: Optional[torch.dtype] = None):
    """Config list: one small config under the interpreter, a short Hopper list on the GPU
    (``gpu_configs``).

    ``dtype`` float32 gets its own list (IEEE fp32 dots are FMA loops, not tensor-core MMAs, and spill
    on other tiles); anything else (None, float16, bfloat16) the tensor-core list."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32, "TILE_W": 0}, num_warps=4,
                              num_stages=1)]
    return gpu_configs(dtype)


def gpu_configs(dtype: Optional[torch.dtype] = None):
    """The GPU config list for ``dtype`` (also on the CPU: tests check its pruning): float32 gets
    ``_FP32_CONFIGS``, anything else ``_MMA_CONFIGS`` followed by the 2-D tiled ``_TILED_MMA_CONFIGS``."""
    table = _FP32_CONFIGS if dtype == torch.float32 else _MMA_CONFIGS
    cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "TILE_W": 0}, num_warps=w,
                          num_stages=s) for bm, bn, bk, w, s in table]
    if dtype != torch.float32:
        cfgs += [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "TILE_W": tw}, num_warps=w,
                               num_stages=s) for bm, tw, bn, bk, w, s in _TILED_MMA_CONFIGS]
    return cfgs


# Kept short: every config is compiled per kernel specialisation on first use. Registers per thread and
# shared memory from ptxas (sm_90a, Triton 3.6, bundled ptxas) over the sm_90 test's HRNet problem
# classes (tests/test_kernels_conv.py: stem 3->64, 64->64 s1/s2, 1x1 64->256 / 256->64, the padded w18
# widths 24/40/72/144 and w48's 48, 24->40 s2, 1x1 40->24, unpadded 18/36), fp16 and bf16, residual
# on/off x RELU_MODE 0/1/2, at the launch signatures (HRNET_SM90_FULL=1 run): no config spills or uses
# local memory anywhere. Before the VEC rule (scalar 2-byte gathers: more address registers) four
# spilled at 254-255 registers: 256x32x16 24-32 B (Cin 24/40/144/256 -> 24), 128x128x32 112 B
# (72 -> 72), 256x64x32 32 B and 128x64x32 8 B (40 -> 40).
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages):   registers min-max, shared memory max
_MMA_CONFIGS = [
    (128, 64, 32, 4, 4),    # 94-156, 48 KB (flat-K stem: 255 + 8 B spill -> pruned there)
    (128, 128, 32, 8, 3),   # 98-164, 48 KB
    (64, 64, 32, 4, 4),     # 58-100, 32 KB
    (128, 32, 32, 4, 4),    # 64-168, 40 KB
    (256, 64, 32, 8, 3),    # 108-189, 60 KB (flat-K stem: 255, no spill but at the cap -> pruned there)
    (128, 64, 64, 4, 3),    # 122-166, 72 KB
    (64, 128, 32, 8, 3),    # 58-78, 36 KB
    (128, 16, 16, 4, 4),    # 46-126, 18 KB
    (256, 32, 16, 4, 4),    # 104-220, 36 KB
]
# 2-D pixel tiles read through L1, for the thin 3x3 layers (TILE_W > 0; ``TILED_CONFIGS``).
# Why: the configs above fetch the A tile with 16-byte cp.async, which Triton 3.6 always emits as
# cp.async.cg (SASS LDGSTS.E.BYPASS.128: L2 only; a ``cache_modifier=".ca"`` on the load changes
# nothing, checked on the sm_90 build). So each of a 3x3 conv's 9 taps reads its input from L2 again:
# 9 x 6.3 MB = 57 MB of L2 reads for w18's 24-channel conv at 256x512 in fp16, which took 25.9 us here
# and 18.6 us in cuDNN on an H200 (run D: 2.2-3 TB/s of L2 reads), against 3 us for the 12.6 MB it
# must move at the copy ceiling. With num_stages 1 Triton loads the tile with plain LDG.E.128, which
# allocates in L1, and a tile of 8 rows x 16 columns needs 10 x 18 = 180 input pixels for its
# 9 x 128 tap reads (a 1 x 128 row tile: 3 x 130 = 390), so most tap reads can hit L1. Latency is
# then hidden by occupancy (several small CTAs per SM) instead of by the cp.async pipeline.
# Not measured on a GPU yet: the autotuner keeps them only where they time faster (the conv A/B's
# --tile-ab compares the lists).
# (BLOCK_M, TILE_W, BLOCK_N, BLOCK_K, num_warps, num_stages)
_TILED_MMA_CONFIGS = [
    (128, 16, 32, 32, 4, 1),    # 8 x 16 pixels
    (128, 32, 32, 32, 4, 1),    # 4 x 32
    (256, 32, 32, 32, 8, 1),    # 8 x 32
    (128, 16, 64, 32, 4, 1),    # 8 x 16, 48-72 output channels in one tile
    (128, 16, 32, 64, 4, 1),    # 8 x 16, twice the loads in flight per K step
]
# Which layers get them: 3x3 convs with at most this many input channels (HRNet's thin branches;
# wider layers have enough K per pixel to keep the pipelined configs busy).
TILED_MAX_CIN = 96
# "auto": the tiled configs join the autotune list where they apply; "off": never; "only": only
# they, where they apply (the benchmark's A/B). A tuning knob, read when a problem class is tuned.
TILED_CONFIGS = "auto"

# Pinned configs: for a problem class, the config a GPU run of the conv A/B measured fastest on a
# card (``benchmarks/bench_conv_kernels.py`` keeps every timed config's median per row). A pinned
# class compiles that one config and times nothing: one compile instead of 10-30 timed ones on a
# first call. That is what lets ``auto`` offer the Triton conv for these classes at all
# (backends/triton.py: a measured per-shape choice between cuDNN and the pinned Triton conv), and it
# also shortens an explicit ``backend="triton"``'s first call. A pin that is not among the configs
# the autotuner would time for the class (``gpu_configs``, pruned) is ignored, so a stale entry
# falls back to autotuning instead of running an unchecked tile.
# Key: (arch, dtype, Cin, Cout, ksize, stride), arch as ``device_arch`` names it ("sm90" for
# H100/H200); value: (BLOCK_M, BLOCK_N, BLOCK_K, TILE_W, num_warps, num_stages).
# Empty: no GPU run has measured the thin-layer configs yet (run D timed only the pipelined list,
# which wins on no shape by the 1.5x bar; see benchmarks/RESULTS.md).
PINNED_CONFIGS: Dict[Tuple, Tuple[int, int, int, int, int, int]] = {}
# "on": pinned classes use their pin; "off": every class autotunes (the conv A/B sets it).
# ``HRNET_FAST_CONV_PINS=0`` also turns them off (a whole-model A/B of the pins from the command line).
PINNED_MODE = "on"

# fp32 (IEEE FMA dot, no tensor cores): its own list, measured the same way (classes stem, 64->64,
# 1x1 64->256, 24->24, 36->36, 144->144; every epilogue). The tensor-core list spilled here
# ((128, 64, 64, 4, 3) 16-32 B and (256, 32, 16, 4, 4) 8 B at 255 registers), and ptxas's register
# heuristics squeezed several 4-warp tiles to an occupancy step (96 / 128 / 168) and spilled 8-16 B
# there: (64, 64, 32, 4, 2|3|4), (128, 32, 32, 4, 3|4), (256, 32, 16, 8, 2|3), (64, 32, 32, 4, 3) each
# at some class; forcing ``maxnreg`` made ptxas fill up to the cap and spill more. None of these:
_FP32_CONFIGS = [
    (128, 64, 32, 4, 4),    # 202-212, 72 KB (flat-K stem: 255 + 32 B spill -> pruned there)
    (128, 128, 32, 8, 3),   # 184-194, 64 KB
    (256, 64, 32, 8, 3),    # 204-234, 80 KB (flat-K stem: 255 -> pruned there)
    (128, 64, 32, 8, 3),    # 106-145, 48 KB
    (64, 128, 32, 8, 3),    # 104-128, 48 KB
    (128, 16, 16, 4, 4),    # 72-128, 27 KB
    (128, 32, 32, 8, 3),    # 80-120, 40 KB
]


def _prune_configs(configs, cin: int, cout: int, ksize: int, vec_k: int = VEC_MAX):
    """Drop tiles far larger than the problem (BLOCK_N > pow2(Cout), BLOCK_K > pow2(K per step)) and,
    for the flat-K walk over channels read narrower than 16 bytes (``vec_k`` < 8: the RGB stem, VEC 1),
    tiles with more than 32 fp32 accumulators per thread: its per-element gather math needs the
    registers (stem, 128x64 with 4 warps: 255 registers + 8 B spill fp16, 32 B fp32; 256x64 with 8
    warps: 255 registers). The 2-D tiled configs (TILE_W > 0) stay only for 3x3 convs with at most
    TILED_MAX_CIN input channels (``TILED_CONFIGS``: "off" drops them, "only" keeps nothing else there)."""
    flat = use_flat_k(cin, vec_k)
    kdim = cin * ksize * ksize if flat else cin
    bn_cap = max(16, triton.next_power_of_2(cout))
    bk_cap = max(16, triton.next_power_of_2(kdim))
    acc_cap = None
    if flat and vec_k < VEC_MAX:
        bk_cap = min(bk_cap, 32)
        bn_cap = min(bn_cap, 128)
        acc_cap = 32
    tiled_fit = ksize == 3 and cin <= TILED_MAX_CIN and TILED_CONFIGS != "off"
    if tiled_fit and TILED_CONFIGS == "only":
        configs = [c for c in configs if c.kwargs.get("TILE_W", 0)] or configs
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= bn_cap and c.kwargs["BLOCK_K"] <= bk_cap
            and (tiled_fit or not c.kwargs.get("TILE_W", 0))
            and (acc_cap is None
                 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= acc_cap * 32 * c.num_warps)]
    if not kept:  # always keep at least the smallest tile
        kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_M"]))]
    return kept


# ----------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _tile_origin(pid_m, Ho, Wo, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """(image, first output row, first output column) of 2-D output tile ``pid_m`` of TILE_H x TILE_W
    pixels, tiles numbered row-major within each image, images one after another."""
    tiles_w = tl.cdiv(Wo, TILE_W)
    tiles_h = tl.cdiv(Ho, TILE_H)
    t_img = pid_m // tiles_w
    return t_img // tiles_h, (t_img % tiles_h) * TILE_H, (pid_m % tiles_w) * TILE_W


@triton.jit
def _pixel_coords(offs_m, Ho, Wo):
    """(image, output row, output column) of flattened NHWC pixel indices ``(n * Ho + oh) * Wo + ow``."""
    hw = Ho * Wo
    img = offs_m // hw
    rem = offs_m - img * hw
    oh = rem // Wo
    return img, oh, rem - oh * Wo


@triton.jit
def _bias_res_act_store(acc, offs_m, offs_n, m_ok, n_ok, img, oh, ow, b_ptr, r_ptr, mask_ptr, out_ptr,
                        Cout, srn, src_, srh, srw, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                        RELU_MODE: tl.constexpr):
    """The epilogue of both kernels: ``out[m, n] = act((acc + bias[n]) + residual[n, oh, ow])`` in
    fp32, one rounding to out's dtype at the store; out dense NHWC [M, Cout], residual through its
    strides (row (img, oh, ow)); act: none, ReLU, or ReLU where the int8 mask is nonzero."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        r_off = (img.to(tl.int64) * srn + oh * srh + ow * srw)[:, None] + offs_n[None, :] * src_
        res = tl.load(r_ptr + r_off, mask=out_ok, other=0.0).to(tl.float32)
        acc = acc + res
    if RELU_MODE == 1:
        acc = tl.maximum(acc, 0.0)
    elif RELU_MODE == 2:
        rm = tl.load(mask_ptr + offs_n, mask=n_ok, other=0)
        acc = tl.where(rm[None, :] != 0, tl.maximum(acc, 0.0), acc)
    o_off = offs_m.to(tl.int64)[:, None] * Cout + offs_n[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _conv2d_bias_act_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, mask_ptr, out_ptr, ws_ptr,
    M, H, W, Cin, Ho, Wo, Cout,
    sxn, sxh, sxw, sxc,
    srn, src_, srh, srw,
    M_BUCKET,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU_MODE: tl.constexpr,
    FLAT_K: tl.constexpr, IEEE: tl.constexpr, VEC_K: tl.constexpr, VEC_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TILE_W: tl.constexpr = 0,
):
    """One BLOCK_M x BLOCK_N tile of ``act(conv2d(x, w) + bias + residual)`` (module docstring: math,
    layouts, K walks). x: NHWC through (sxn, sxh, sxw, sxc) with sxc == 1 in practice; w: packed
    [k*k*Cin, Cout] contiguous; residual through (srn, src_, srh, srw); out: dense NHWC [M, Cout].
    Cin, sxn, sxh, sxw arrive divided by VEC_K and Cout, srn, srh, srw divided by VEC_N (the VEC rule)
    and are multiplied back first, so the compiler knows they are multiples of the VEC.
    SPLIT_K > 1 (split-K, ``split_k_for``): program (m, n, s) sums only the s-th of SPLIT_K equal runs
    of K steps and stores its fp32 partial tile to ws [SPLIT_K, M, Cout] (dense), no epilogue;
    ``_split_k_reduce_kernel`` adds the partials in order s = 0, 1, ... and applies the epilogue.
    M_BUCKET is only an autotuning key. Accumulation in fp32; one rounding at the store."""
    Cin = Cin * VEC_K
    sxn = sxn * VEC_K
    sxh = sxh * VEC_K
    sxw = sxw * VEC_K
    Cout = Cout * VEC_N
    srn = srn * VEC_N
    srh = srh * VEC_N
    srw = srw * VEC_N
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)          # output channel
    n_ok = offs_n < Cout
    if TILE_W > 0:
        # 2-D pixel tile: (BLOCK_M // TILE_W) output rows x TILE_W columns of one image, tiles
        # numbered row-major per image (see TILED_CONFIGS for why)
        img_s, oh0, ow0 = _tile_origin(pid_m, Ho, Wo, BLOCK_M // TILE_W, TILE_W)
        loc = tl.arange(0, BLOCK_M)
        oh = oh0 + loc // TILE_W
        ow = ow0 + loc % TILE_W
        img = tl.zeros((BLOCK_M,), dtype=tl.int32) + img_s
        m_ok = (oh < Ho) & (ow < Wo)
        offs_m = (img * Ho + oh) * Wo + ow                    # output pixel index (n, oh, ow) flattened
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)      # output pixel index (n, oh, ow) flattened
        m_ok = offs_m < M
        img, oh, ow = _pixel_coords(offs_m, Ho, Wo)
    ih0 = oh * STRIDE - PAD
    iw0 = ow * STRIDE - PAD
    x_img = x_ptr + img.to(tl.int64) * sxn                    # 64-bit image base

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)

    if FLAT_K:
        # K walked flat over (tap, channel). With Cin a multiple of VEC_K, every aligned run of VEC_K
        # k values stays inside one tap at consecutive channels, which the compiler can prove.
        KTOT = KSIZE * KSIZE * Cin
        if SPLIT_K == 1:
            k_lo = 0
            k_hi = KTOT
        else:
            n_steps = tl.cdiv(KTOT, BLOCK_K)
            k_lo = (pid_k * n_steps // SPLIT_K) * BLOCK_K
            k_hi = ((pid_k + 1) * n_steps // SPLIT_K) * BLOCK_K
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < KTOT
            tap = kk // Cin
            cc = kk - tap * Cin
            rr = tap // KSIZE
            ss = tap - rr * KSIZE
            ih = ih0[:, None] + rr[None, :]
            iw = iw0[:, None] + ss[None, :]
            a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_img[:, None] + ih * sxh + iw * sxw + cc[None, :] * sxc, mask=a_ok, other=0.0)
            b = tl.load(w_ptr + kk[:, None] * Cout + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
    else:
        # One pipelined loop over (tap, channel block) pairs; gather addresses are 1-D per row.
        n_cc = tl.cdiv(Cin, BLOCK_K)
        if SPLIT_K == 1:
            it_lo = 0
            it_hi = KSIZE * KSIZE * n_cc
        else:
            it_lo = pid_k * (KSIZE * KSIZE * n_cc) // SPLIT_K
            it_hi = (pid_k + 1) * (KSIZE * KSIZE * n_cc) // SPLIT_K
        for it in range(it_lo, it_hi):
            tap = it // n_cc
            c0 = (it - tap * n_cc) * BLOCK_K
            r = tap // KSIZE
            s = tap - r * KSIZE
            ih = ih0 + r
            iw = iw0 + s
            p_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            cc = c0 + offs_k
            c_ok = cc < Cin
            a = tl.load((x_img + ih * sxh + iw * sxw)[:, None] + cc[None, :] * sxc,
                        mask=p_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w_ptr + (tap * Cin + cc)[:, None] * Cout + offs_n[None, :],
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)

    if SPLIT_K > 1:
        # the partial tile, fp32, to ws[pid_k]; the reduce kernel applies the epilogue
        w_off = (pid_k * M + offs_m).to(tl.int64)[:, None] * Cout + offs_n[None, :]
        tl.store(ws_ptr + w_off, acc, mask=m_ok[:, None] & n_ok[None, :])
    else:
        # Epilogue: bias, residual, ReLU (all / per-channel mask), one store.
        _bias_res_act_store(acc, offs_m, offs_n, m_ok, n_ok, img, oh, ow, b_ptr, r_ptr, mask_ptr,
                            out_ptr, Cout, srn, src_, srh, srw, HAS_BIAS, HAS_RES, RELU_MODE)


@triton.jit
def _split_k_reduce_kernel(
    ws_ptr, b_ptr, r_ptr, mask_ptr, out_ptr,
    M, Ho, Wo, Cout,
    srn, src_, srh, srw,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU_MODE: tl.constexpr,
    VEC_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split-K's second pass, one BLOCK_M x BLOCK_N tile: ``out[m, n] = act((sum_s ws[s, m, n] +
    bias[n]) + residual)`` with the partials added in order s = 0 .. SPLIT_K-1 (deterministic: the
    same result on every call and graph replay). ws: fp32 [SPLIT_K, M, Cout] dense; out: dense NHWC
    [M, Cout] in its own dtype (fp32 / fp16 / bf16); residual through its strides. Cout, srn, srh,
    srw arrive divided by VEC_N (the VEC rule)."""
    Cout = Cout * VEC_N
    srn = srn * VEC_N
    srh = srh * VEC_N
    srw = srw * VEC_N
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < Cout
    img, oh, ow = _pixel_coords(offs_m, Ho, Wo)
    ok = m_ok[:, None] & n_ok[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        w_off = (s * M + offs_m).to(tl.int64)[:, None] * Cout + offs_n[None, :]
        acc += tl.load(ws_ptr + w_off, mask=ok, other=0.0)
    _bias_res_act_store(acc, offs_m, offs_n, m_ok, n_ok, img, oh, ow, b_ptr, r_ptr, mask_ptr, out_ptr,
                        Cout, srn, src_, srh, srw, HAS_BIAS, HAS_RES, RELU_MODE)


_TUNED: Dict[Tuple[int, ...], object] = {}
_SM_COUNTS: Dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNTS:
        _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNTS[idx]


@functools.lru_cache(maxsize=None)  # a pure function of the problem, asked on every call
def split_k_for(m: int, cout: int, kdim: int, sms: int) -> int:
    """How many ways to split K for an output of ``m`` pixels x ``cout`` channels with K = ``kdim``
    on a card of ``sms`` SMs (``SPLIT_K_MODE`` "auto"). A rough latency model in units of one
    BLOCK_K = 32 step of one CTA: tiles of 128 x 64, 3 CTAs resident per SM, each CTA costs its
    steps plus 4; a split adds the reduce launch (4) and writing and reading the fp32 partials at
    1.5 MB per unit (about 4 TB/s x 0.35 us). Splits of fewer than 4 steps are not considered, and
    a split must beat no split by 20% (the model is a guess until the A/B measures it:
    ``bench_conv_kernels.py --split-ab``). Values: 144->144 at 32x64 on 132 SMs: 5; 384->384: 4;
    72->72 at 64x128 and everything larger: 1."""
    tiles = -(-m // 128) * -(-cout // 64)
    steps = -(-kdim // 32)

    def cost(split: int) -> float:
        waves = -(-tiles * split // (3 * sms))
        c = waves * (steps / split + 4)
        if split > 1:
            c += 4 + 2 * split * m * cout * 4 / 1.5e6
        return c

    best = min((c for c in range(1, SPLIT_K_MAX + 1) if steps // c >= 4), key=cost, default=1)
    return best if cost(best) <= 0.8 * cost(1) else 1


def _split_k(m: int, cout: int, kdim: int, device: torch.device) -> int:
    mode = SPLIT_K_MODE
    if mode == "off":
        return 1
    if mode == "auto":
        return split_k_for(m, cout, kdim, _sm_count(device)) if device.type == "cuda" else 1
    return max(1, int(mode))


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def device_arch(device: torch.device) -> str:
    """The ``PINNED_CONFIGS`` name of ``device``'s architecture: "sm90" for an H100/H200, the device
    type elsewhere ("cpu": the interpreter, where tests pin configs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


def pins_enabled() -> bool:
    """Whether pinned configs apply (this table's and the block kernel's): ``PINNED_MODE`` "on" and
    ``HRNET_FAST_CONV_PINS`` not "0"."""
    return PINNED_MODE == "on" and os.environ.get("HRNET_FAST_CONV_PINS", "1").strip() != "0"


def pinned_config(device, dtype: torch.dtype, cin: int, cout: int, ksize: int,
                  stride: int) -> Optional[Tuple[int, ...]]:
    """The pinned (BLOCK_M, BLOCK_N, BLOCK_K, TILE_W, num_warps, num_stages) of this problem class on
    ``device``, or None (none pinned, or ``pins_enabled`` false)."""
    if not PINNED_CONFIGS or not pins_enabled():
        return None
    return PINNED_CONFIGS.get((device_arch(device), dtype, cin, cout, ksize, stride))


def _config_tuple(c) -> Tuple[int, ...]:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs.get("TILE_W", 0),
            c.num_warps, c.num_stages)


def _prune_knobs() -> tuple:
    """The module knobs ``_prune_configs`` reads (directly or through ``use_flat_k``)."""
    return (TILED_CONFIGS, TILED_MAX_CIN, FLAT_K_MAX_CIN, FLAT_K_ALIGNED)


def _usable_pin(pinned: Tuple[int, ...], cin: int, cout: int, ksize: int, dtype, vec_k: int) -> tuple:
    """(the pinned Config,) if the autotuner would time it for this class, else ()."""
    return tuple(c for c in _prune_configs(gpu_configs(dtype), cin, cout, ksize, vec_k)
                 if _config_tuple(c) == pinned)


# (conv_configs, problem class, pin, first_only, _prune_knobs()) -> (configs, _TUNED key). The config
# source is part of the key so that replacing ``conv_configs`` (tests, experiments) is never served a
# stale list; the knobs are, so flipping TILED_CONFIGS or FLAT_K_MAX_CIN re-prunes.
_CANDIDATES: Dict[tuple, tuple] = {}


def _candidates(cin: int, cout: int, ksize: int, dtype, vec_k: int, pinned: Optional[tuple],
                first_only: bool) -> tuple:
    """(the configs the autotuner gets, its ``_TUNED`` key) for this problem class. Cached: asked on
    every conv launch, and building and pruning the list made ``_tuned_kernel`` take 72 us a call
    against 6-8 us cached (2-vCPU EPYC, fp16 64->64 3x3, GPU list)."""
    cache_key = (conv_configs, cin, cout, ksize, dtype, vec_k, pinned, first_only, _prune_knobs())
    hit = _CANDIDATES.get(cache_key)
    if hit is None:
        match = (_usable_pin(pinned, cin, cout, ksize, dtype, vec_k)
                 if pinned is not None else ())
        cfgs = list(match) or _prune_configs(conv_configs(dtype), cin, cout, ksize, vec_k)
        if first_only:
            cfgs = cfgs[:1]
        # The flat-K flag changes the kernel's specialisation, not the config list; the Autotuner
        # keys on FLAT_K too (below), so flipping FLAT_K_MAX_CIN retunes, never reuses a stale choice.
        hit = (cfgs, tuple(sorted(_config_tuple(c) + (c.maxnreg or 0,) for c in cfgs)))
        _CANDIDATES[cache_key] = hit
    return hit


def _tuned_kernel(cin: int, cout: int, ksize: int, dtype: Optional[torch.dtype] = None,
                  vec_k: int = VEC_MAX, pinned: Optional[Tuple[int, ...]] = None):
    """The autotuned kernel for this problem class. Configs are pruned here, in Python, rather than
    with ``prune_configs_by`` (one Autotuner per pruned list), which keeps ``wrap_triton`` simple.

    ``HRNET_FAST_CONV_AUTOTUNE=0`` keeps only the first surviving config, so nothing is timed: for
    correctness runs on a GPU: autotuning w18's conv classes at 512x1024 took over 100 s in one test
    while 8 test processes compiled at once (H200, 2026-11-26), against 41 s for all four forced-
    implementation tests in one process.

    ``pinned`` (``pinned_config``): that config alone, if the autotuner would time it here."""
    first_only = os.environ.get("HRNET_FAST_CONV_AUTOTUNE", "1") == "0"
    cfgs, key = _candidates(cin, cout, ksize, dtype, vec_k,
                            tuple(pinned) if pinned is not None else None, first_only)
    kern = _TUNED.get(key)
    if kern is None:
        kern = triton.autotune(
            configs=cfgs,
            key=["Cin", "Cout", "KSIZE", "STRIDE", "M_BUCKET", "HAS_RES", "RELU_MODE", "FLAT_K", "IEEE",
                 "SPLIT_K", "VEC_K", "VEC_N"],
            # the timings go to Triton's disk cache (keyed by the kernel's source, the target, the
            # tuning key and the config list), so a later process chooses without timing again
            cache_results=True,
        )(_conv2d_bias_act_kernel)
        _TUNED[key] = kern
    return kern


def chosen_configs() -> Dict[tuple, str]:
    """The config each conv autotuner chose so far in this process, by its tuning key (the
    benchmarks record them, so that a later choice can be pinned without timing). An autotuner
    with a single config (the CPU interpreter, ``HRNET_FAST_CONV_AUTOTUNE=0``) times nothing and
    records nothing here."""
    return {key: str(cfg) for kern in _TUNED.values()
            for key, cfg in getattr(kern, "cache", {}).items()}


# ----------------------------------------------------------------------------------------------------
# Python side
# ----------------------------------------------------------------------------------------------------

def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """Pack a conv weight ``[Cout, Cin, k, k]`` into the GEMM layout ``[k*k*Cin, Cout]`` (contiguous).

    Row ``(r*k + s)*Cin + c``, column ``co`` holds ``weight[co, c, r, s]``. Same dtype and device as
    ``weight``; convert to the activation dtype before or after packing (the kernel reads the packed
    weight in the activation dtype). Packing is exact (a permutation)."""
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"pack_weight expects a square [Cout, Cin, k, k] weight, got {tuple(weight.shape)}")
    cout, cin, k, _ = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(k * k * cin, cout).contiguous()


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """(s_n, s_c, s_h, s_w) of a 4-D tensor, 0 for an n/h/w dim of size 1 (its index is always 0)."""
    n, _, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    return (sn if n > 1 else 0, sc, sh if h > 1 else 0, sw if w > 1 else 0)


def vec_factor(channels: int, strides: Sequence[int], cap: int = VEC_MAX) -> int:
    """The VEC rule: the largest power of two <= ``cap`` dividing ``channels`` and every stride.

    1 when a value does not fit in int32: the kernel rebuilds ``(value // VEC) * VEC`` in the type the
    divided value travels in (int32 below 2^31), so an int64 value must go undivided."""
    g = int(channels)
    for v in strides:
        v = int(v)
        if abs(v) >= 2 ** 31 or g >= 2 ** 31:
            return 1
        g = math.gcd(g, v)
    vec = 1
    while vec < cap and g % (2 * vec) == 0:
        vec *= 2
    return vec


def use_flat_k(cin: int, vec_k: Optional[int] = None) -> bool:
    """Whether a layer with ``cin`` input channels, read with ``vec_k`` (None: as a dense NHWC tensor,
    ``vec_factor(cin, ())``), walks K flat across the taps: Cin < FLAT_K_MAX_CIN, or (FLAT_K_ALIGNED)
    VEC_K 8 and Cin not a multiple of 32."""
    if cin < FLAT_K_MAX_CIN:
        return True
    if vec_k is None:
        vec_k = vec_factor(cin, ())
    return FLAT_K_ALIGNED and vec_k == VEC_MAX and cin % 32 != 0


_MASK_CACHE: Dict[Tuple, torch.Tensor] = {}


def relu_mask(relu_ranges, cout: int, device) -> torch.Tensor:
    """Per-output-channel ReLU mask ``[Cout]`` int8 (1: ReLU, 0: identity) from ``relu_ranges``.

    ``relu_ranges`` may be: a sequence of ``(start, end)`` pairs (half-open channel ranges), a flat int
    sequence ``[start0, end0, start1, end1, ...]``, or a tensor of ``Cout`` values (bool or integer,
    nonzero = ReLU), which is returned as an int8 tensor on ``device``. Results for range lists are
    cached per (ranges, Cout, device), so after the first call no host-to-device copy happens."""
    if isinstance(relu_ranges, torch.Tensor):
        if relu_ranges.numel() != cout:
            raise ValueError(f"relu mask has {relu_ranges.numel()} entries, expected Cout={cout}")
        m = relu_ranges.reshape(-1)
        if m.dtype != torch.int8:
            m = (m != 0).to(torch.int8)
        return m.to(device)
    flat = []
    for item in relu_ranges:
        if isinstance(item, (tuple, list)):
            flat.extend(int(v) for v in item)
        else:
            flat.append(int(item))
    if len(flat) % 2:
        raise ValueError(f"relu_ranges must hold (start, end) pairs, got {relu_ranges!r}")
    key = (tuple(flat), int(cout), str(torch.device(device)))
    m = _MASK_CACHE.get(key)
    if m is None:
        host = torch.zeros(cout, dtype=torch.int8)
        for a, b in zip(flat[0::2], flat[1::2]):
            if not (0 <= a <= b <= cout):
                raise ValueError(f"relu range ({a}, {b}) outside [0, {cout}]")
            host[a:b] = 1
        m = host.to(device)
        _MASK_CACHE[key] = m
    return m


@torch.library.triton_op("hrnet_fast::conv2d_bias_act_triton", mutates_args=())
def conv2d_bias_act_triton(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    relu_mask: Optional[torch.Tensor],
    ksize: int,
    stride: int,
    padding: int,
    relu: bool,
) -> torch.Tensor:
    """Registered op. ``x`` [N,Cin,H,W] (read in place when its channels are contiguous, e.g. a channel
    slice of a channels_last tensor; otherwise made channels_last here), ``w_packed`` [k*k*Cin, Cout] from
    ``pack_weight`` in x's dtype, ``bias`` [Cout] or None, ``residual`` [N,Cout,Ho,Wo] any layout or None,
    ``relu_mask`` int8 [Cout] (nonzero = ReLU; overrides ``relu``) or None. Returns a new channels_last
    tensor [N,Cout,Ho,Wo] in x's dtype. fp32 inputs accumulate exactly (IEEE fp32 dot, no TF32);
    fp16/bf16 accumulate in fp32 and round once at the store."""
    if x.stride(1) != 1 and x.shape[1] > 1:
        x = x.contiguous(memory_format=torch.channels_last)
    n, cin, h, w = x.shape
    kdim, cout = w_packed.shape
    ho = _out_size(h, ksize, stride, padding)
    wo = _out_size(w, ksize, stride, padding)
    out = torch.empty((n, cout, ho, wo), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    if _debug_poison_outputs:
        out.fill_(float("nan"))
    m = n * ho * wo
    if m == 0 or cout == 0:
        return out
    has_res = residual is not None
    res = residual if has_res else out
    has_bias = bias is not None
    if relu_mask is not None:
        relu_mode = 2
        mask_t = relu_mask
    else:
        relu_mode = 1 if relu else 0
        mask_t = out
    srn, src_, srh, srw = _strides(res)
    sxn, sxc, sxh, sxw = _strides(x)
    sxc = 1 if cin == 1 else sxc
    vec_k = vec_factor(cin, (sxn, sxh, sxw))
    vec_n = vec_factor(cout, (srn, srh, srw) if has_res else ())
    split = _split_k(m, cout, kdim, x.device)
    if split == 1:
        from . import conv_tma  # imports this module: here, not at the top
        if conv_tma.eligible(x, w_packed, ksize, stride, padding):
            return conv_tma.conv3x3_tma(x, w_packed, bias, res if has_res else None, mask_t, out,
                                        relu_mode, vec_n, (srn, src_, srh, srw),
                                        triton.next_power_of_2(m))
    ws = out
    if split > 1:  # fp32 partial sums, one [M, Cout] slab per split
        ws = torch.empty((split, m, cout), device=x.device, dtype=torch.float32)
        if _debug_poison_outputs:
            ws.fill_(float("nan"))

    def grid(meta):
        tile_w = meta.get("TILE_W", 0)
        if tile_w:
            tiles = n * triton.cdiv(ho, meta["BLOCK_M"] // tile_w) * triton.cdiv(wo, tile_w)
        else:
            tiles = triton.cdiv(m, meta["BLOCK_M"])
        return (tiles, triton.cdiv(cout, meta["BLOCK_N"]), split)

    bias_arg = bias if has_bias else w_packed
    pinned = pinned_config(x.device, x.dtype, cin, cout, ksize, stride)
    torch.library.wrap_triton(_tuned_kernel(cin, cout, ksize, x.dtype, vec_k, pinned))[grid](
        x, w_packed, bias_arg, res, mask_t, out, ws,
        m, h, w, cin // vec_k, ho, wo, cout // vec_n,
        sxn // vec_k, sxh // vec_k, sxw // vec_k, sxc,
        srn // vec_n, src_, srh // vec_n, srw // vec_n,
        triton.next_power_of_2(m),
        KSIZE=ksize, STRIDE=stride, PAD=padding,
        HAS_BIAS=has_bias, HAS_RES=has_res, RELU_MODE=relu_mode,
        FLAT_K=use_flat_k(cin, vec_k), IEEE=x.dtype == torch.float32, VEC_K=vec_k, VEC_N=vec_n,
        SPLIT_K=split,
    )
    if split > 1:
        # tiles of 4096 outputs, 4 warps (32 fp32 per thread per partial), 64 channels wide or less
        block_n = min(64, max(16, triton.next_power_of_2(cout)))
        block_m = 4096 // block_n
        torch.library.wrap_triton(_split_k_reduce_kernel)[(triton.cdiv(m, block_m),
                                                           triton.cdiv(cout, block_n))](
            ws, bias_arg, res, mask_t, out,
            m, ho, wo, cout // vec_n,
            srn // vec_n, src_, srh // vec_n, srw // vec_n,
            SPLIT_K=split, HAS_BIAS=has_bias, HAS_RES=has_res, RELU_MODE=relu_mode, VEC_N=vec_n,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )
    return out


def conv2d_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    stride: int = 1,
    padding: Optional[int] = None,
    residual: Optional[torch.Tensor] = None,
    relu: bool = True,
    relu_ranges: Union[None, Sequence, torch.Tensor] = None,
) -> torch.Tensor:
    """``out = act(conv2d(x, weight, bias, stride, padding) + residual)`` by a Triton implicit GEMM.

    x:        [N, Cin, H, W], fp32 / fp16 / bf16, any memory format (made channels_last unless its channels
              are contiguous: NHWC tensors and channel slices of them are read in place).
    weight:   raw ``[Cout, Cin, k, k]`` (packed on every call; slower), or packed ``[k*k*Cin, Cout]`` from
              ``pack_weight`` (k inferred as sqrt(K / Cin), so square kernels only). Cast to x's dtype if
              it differs. k = 1 or 3 are the tuned cases; any odd square k works.
    bias:     [Cout] or None (any float dtype; added in fp32).
    stride:   1 or 2. padding: default k // 2 (1 for 3x3, 0 for 1x1).
    residual: [N, Cout, Ho, Wo] or None, any layout/strides, added in fp32 before the activation.
    relu:     True: ReLU on every channel; False: none.
    relu_ranges: overrides ``relu``: ReLU only on the given output channels, as ``[(start, end), ...]``
              half-open ranges, a flat ``[start0, end0, ...]`` list, or a precomputed per-channel mask
              tensor (``relu_mask(...)``; bool/int, nonzero = ReLU). An empty list means no ReLU.
    Returns:  [N, Cout, Ho, Wo], channels_last, dtype of x, Ho = (H + 2p - k)//stride + 1.
    Accumulation: fp32 (fp32 inputs: exact IEEE fp32 products, no TF32); one rounding at the store.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"conv2d_bias_act supports float32 / float16 / bfloat16 inputs, got {x.dtype}")
    cin = x.shape[1]
    if weight.dim() == 4:
        if weight.shape[1] != cin:
            raise ValueError(f"weight has Cin={weight.shape[1]}, x has {cin} channels")
        k = weight.shape[2]
        w_packed = pack_weight(weight)
    elif weight.dim() == 2:
        kk = weight.shape[0] // max(cin, 1)
        k = int(round(math.sqrt(kk)))
        if k * k * cin != weight.shape[0]:
            raise ValueError(f"packed weight {tuple(weight.shape)} does not fit Cin={cin} and a square kernel")
        w_packed = weight
    else:
        raise ValueError(f"weight must be [Cout, Cin, k, k] or packed [k*k*Cin, Cout], got {tuple(weight.shape)}")
    if w_packed.dtype != x.dtype:
        w_packed = w_packed.to(x.dtype)
    if not w_packed.is_contiguous():
        w_packed = w_packed.contiguous()
    cout = w_packed.shape[1]
    if padding is None:
        padding = k // 2
    if bias is not None and bias.numel() != cout:
        raise ValueError(f"bias has {bias.numel()} entries, expected Cout={cout}")
    if residual is not None:
        n, _, h, w = x.shape
        exp = (n, cout, _out_size(h, k, stride, padding), _out_size(w, k, stride, padding))
        if tuple(residual.shape) != exp:
            raise ValueError(f"residual has shape {tuple(residual.shape)}, expected {exp}")
    mask = relu_mask(relu_ranges, cout, x.device) if relu_ranges is not None else None
    return torch.ops.hrnet_fast.conv2d_bias_act_triton(
        x, w_packed, bias, residual, mask, int(k), int(stride), int(padding), bool(relu))
