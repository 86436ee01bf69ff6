"""One-launch Triton kernel for an HRNet residual BasicBlock (channels_last).

``basic_block(x, w1, b1, w2, b2) -> Tensor``

The block (BatchNorm folded into the convs, stride 1, no downsample, C channels in and out)::

    h   = relu(conv2d(x, W1, b1, padding=1))           # 3x3, C -> C, rounded to x's dtype
    out = relu(conv2d(h, W2, b2, padding=1) + x)       # 3x3, C -> C, summed in fp32, rounded once

This is what the engine runs as two convs (``engine.run_block``: a conv with bias + ReLU, then a
conv with bias + residual + ReLU); ``h`` is rounded to x's dtype exactly as the unfused run stores
it, so the fused result differs from the unfused one only by the order of fp32 summation.

Why: HRNet's branch bodies are these blocks at 18-144 channels (zero-padded to 24/40/72/144 on
CUDA for w18), where every conv is latency-bound (cuDNN: 18.6-20.4 us for a 24-channel 3x3 at
256x512 against a 3 us copy floor on an H200; the two convs of a block move h through DRAM twice
and cost two launches). Fused, a block reads x and writes out once.

How (as the strided chain kernel, ``conv_chain.py``): each program owns a TH x TW tile of one
image's output. It first computes the (TH+2) x (TW+2) pixels of ``h`` the tile depends on (one
pixel of halo on each side; pixels outside the image are never stored and read back as zeros, which
is conv2's zero padding) into a private per-program scratch slice (global memory that the same SM
writes and at once reads back, so it stays in L1/L2), separated by a CTA barrier, then the output
tile from the scratch, adding b2 and the residual x before the ReLU. The halo costs
(TH+2)(TW+2)/(TH*TW) times the work of conv1: 1.56x at 8x8, 1.41x at 8x16, 1.27x at 16x16.

Layouts, dtypes, VEC: x is read in place when its channels are innermost and its strides keep
the dense VEC (a channel slice of a padded batched conv output), else made dense channels_last;
the output is a new dense channels_last tensor. fp32 / fp16 / bf16; weights packed ``[9*C, C]``
(``conv.pack_weight``) in x's dtype; biases [C] or None. C and x's n/h/w strides travel divided by
``VEC = vec_factor(C, x strides)`` (the largest power of two <= 8 dividing them) and are multiplied
back in the kernel, so with C = 24 / 40 / 72 / 144 every pixel offset of x, of the scratch and of
the output is a provable multiple of 8 elements and the loads are 16 bytes wide.

K walk (``conv.use_flat_k``, as the conv's): flat over (tap, channel) in one pipelined loop for C a
multiple of 8 but not of 32 read with VEC 8 (24, 40, 48, 72, 144: Cin 24 takes 7 K steps of 32
instead of 9 taps of 32 padded channels) and C < 16; per tap otherwise (a runtime loop over the 9
taps around a pipelined loop over channel blocks).

Tiles: (TH, TW) is autotuned with the block sizes per (C, next_pow2(pixels), dtype, biases). The
scratch is sized for the most demanding tile. Run each shape once eagerly before a CUDA graph
capture (autotuning). Offsets inside one image are 32-bit; image and scratch bases 64-bit.

Registered op: ``torch.ops.hrnet_fast.basic_block_triton(x, w1, b1, w2, b2)``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

import triton
import triton.language as tl

from . import conv as _conv
from . import interpreter_enabled
from .conv import _strides, pack_weight, use_flat_k, vec_factor
from .conv_chain import conv3x3_region

__all__ = ["basic_block", "block_configs", "block_reference", "pinned_block_config",
           "PINNED_BLOCK_CONFIGS"]

_INTERPRET = interpreter_enabled()

# Test hook: fill every buffer the op allocates (output and scratch) with NaN before the kernel runs.
_debug_poison_outputs = False
# Override of the output tile (TH, TW) (None: autotuned; the interpreter uses 8 x 8). Tests use it
# to force rectangular tiles and several tiles per image.
_tile_override: Optional[Tuple[int, int]] = None

# Output tiles (TH, TW): 8 x 8 gives the most programs (2048 at 256x512: 15 waves of 132 SMs), 16 x 16
# the least halo recomputation. Rows of 16 pixels keep 16-pixel runs of x contiguous in memory.
BLOCK_TILES = ((8, 8), (8, 16), (16, 16))
# (BLOCK_M, BLOCK_K, num_warps, num_stages), as the chain kernel's (same region loop).
_BLOCK_SHAPES = [(64, 32, 4, 2), (128, 32, 8, 2), (64, 16, 4, 2)]
BLOCK_MAXNREG: Optional[int] = 255

# Pinned configs, as the conv's (``conv.PINNED_CONFIGS``): for a block width C, the config a GPU run
# of the block A/B measured fastest on a card (``bench_conv_kernels.py --kinds block`` prints the
# entries where the block kernel beat cuDNN's two fused convs). A pinned width compiles that one
# config and times nothing, which is what lets ``auto`` offer the block kernel (backends/triton.py:
# a measured per-shape choice between the two convs and the pinned kernel). A pin that is not one of
# the configs the autotuner would time for the width is ignored. The same switches turn them off:
# ``conv.PINNED_MODE`` "off" and ``HRNET_FAST_CONV_PINS=0``.
# Key: (arch, dtype, C), arch as ``conv.device_arch`` names it ("sm90" for H100/H200); value:
# (TH, TW, BLOCK_M, BLOCK_K, num_warps, num_stages). Empty: never measured on a GPU yet.
PINNED_BLOCK_CONFIGS: Dict[Tuple, Tuple[int, int, int, int, int, int]] = {}


def block_configs(tiles=None):
    """Configs: the output tile (TH, TW) (config parameters: the grid and the scratch depend on
    them) crossed with block shapes. Under the interpreter: one config (8 x 8 unless ``tiles``)."""
    tiles = tuple(tiles) if tiles is not None else BLOCK_TILES
    if _INTERPRET:
        th, tw = (8, 8) if (8, 8) in tiles else tiles[0]
        return [triton.Config({"TH": th, "TW": tw, "BLOCK_M": 64, "BLOCK_K": 32},
                              num_warps=4, num_stages=1)]
    return [triton.Config({"TH": th, "TW": tw, "BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w,
                          num_stages=s, maxnreg=BLOCK_MAXNREG)
            for th, tw in tiles for bm, bk, w, s in _BLOCK_SHAPES]


@triton.jit
def _basic_block_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, s_ptr,
    H, W, C,
    sxn, sxh, sxw, sxc,
    OUT_BUCKET,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
    VEC: tl.constexpr, FLAT_K: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # VEC rule (as in conv.py): C and x's n/h/w strides arrive divided by VEC.
    C = C * VEC
    sxn = sxn * VEC
    sxh = sxh * VEC
    sxw = sxw * VEC
    pid = tl.program_id(0)
    tiles_x = (W + TW - 1) // TW
    tiles = ((H + TH - 1) // TH) * tiles_x
    n = pid // tiles
    t = pid - n * tiles
    ty = t // tiles_x
    tx = t - ty * tiles_x
    oy = ty * TH
    ox = tx * TW
    x_img = x_ptr + n.to(tl.int64) * sxn
    out_img = out_ptr + n.to(tl.int64) * H * W * C
    RH: tl.constexpr = TH + 2
    RW: tl.constexpr = TW + 2
    scratch = s_ptr + pid.to(tl.int64) * (RH * RW * C)
    # h over the (TH+2) x (TW+2) region at (oy-1, ox-1), stored at region coordinates
    conv3x3_region(x_img, sxh, sxw, sxc, 0, 0, H, W, C,
                   w1_ptr, b1_ptr, C,
                   scratch, RW * C, C, 1, oy - 1, ox - 1, oy - 1, ox - 1, H, W,
                   x_img, 0, 0, 0,
                   RH, RW, 1, HAS_B1, True, False, IEEE, BLOCK_M, BLOCK_N, BLOCK_K, FLAT_K)
    tl.debug_barrier()
    # the output tile from h, + b2 + x, ReLU
    conv3x3_region(scratch, RW * C, C, 1, oy - 1, ox - 1, H, W, C,
                   w2_ptr, b2_ptr, C,
                   out_img, W * C, C, 1, oy, ox, 0, 0, H, W,
                   x_img, sxh, sxw, sxc,
                   TH, TW, 1, HAS_B2, True, True, IEEE, BLOCK_M, BLOCK_N, BLOCK_K, FLAT_K)


_TUNED: Dict[Tuple, object] = {}


def _tiles() -> Tuple[Tuple[int, int], ...]:
    return (tuple(_tile_override),) if _tile_override is not None else BLOCK_TILES


def block_config_tuple(cfg) -> Tuple[int, ...]:
    """(TH, TW, BLOCK_M, BLOCK_K, num_warps, num_stages): a config as ``PINNED_BLOCK_CONFIGS``
    writes it."""
    k = cfg.kwargs
    return (k["TH"], k["TW"], k["BLOCK_M"], k["BLOCK_K"], cfg.num_warps, cfg.num_stages)


def pinned_block_config(device, dtype: torch.dtype, c: int) -> Optional[Tuple[int, ...]]:
    """The pinned config of a C-channel block on ``device``, or None (none pinned, or the conv's
    ``pins_enabled`` false: the same switches turn both tables off)."""
    if not PINNED_BLOCK_CONFIGS or not _conv.pins_enabled():
        return None
    return PINNED_BLOCK_CONFIGS.get((_conv.device_arch(device), dtype, c))


def _tuned_block_kernel(c: int, pinned: Optional[Tuple[int, ...]] = None):
    """Autotuned kernel, configs pruned in Python for this C (BLOCK_K at most next_pow2(C));
    ``pinned``: that config alone if it survives the pruning."""
    bk_cap = max(16, triton.next_power_of_2(c))
    # keyed on everything the list depends on (asked on every call: no config list built then)
    key = (bk_cap, None if pinned is None else tuple(pinned), _tiles(), tuple(_BLOCK_SHAPES),
           BLOCK_MAXNREG)
    kern = _TUNED.get(key)
    if kern is None:
        configs = block_configs(_tiles())
        kept = [cfg for cfg in configs if cfg.kwargs["BLOCK_K"] <= bk_cap] or configs[:1]
        if pinned is not None:
            kept = [cfg for cfg in kept if block_config_tuple(cfg) == tuple(pinned)] or kept
        kern = triton.autotune(
            configs=kept,
            key=["C", "OUT_BUCKET", "HAS_B1", "HAS_B2", "IEEE", "BLOCK_N", "VEC", "FLAT_K"],
            cache_results=True,  # as the conv's: a later process chooses without timing again
        )(_basic_block_kernel)
        _TUNED[key] = kern
    return kern


def _n_programs(n: int, h: int, w: int, th: int, tw: int) -> int:
    return n * triton.cdiv(h, th) * triton.cdiv(w, tw)


def _readable_in_place(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when the kernel reads it as fast as a dense copy: channels innermost and every
    n/h/w stride and the storage offset divisible by the dense VEC (a channel slice of a padded
    batched conv's output, 24 of 72 channels at offset 24: one copy of the block input saved); else
    a dense channels_last copy (NCHW, or a slice at channel 3 that would be read 2 bytes at a time)."""
    if x.stride(1) == 1:
        sxn, _, sxh, sxw = _strides(x)
        c = x.shape[1]
        if vec_factor(c, (sxn, sxh, sxw, x.storage_offset())) == vec_factor(c, ()):
            return x
    return x.contiguous(memory_format=torch.channels_last)


@torch.library.triton_op("hrnet_fast::basic_block_triton", mutates_args=())
def basic_block_triton(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
) -> torch.Tensor:
    """Registered op: see the module docstring. Weights packed ([9*C, C], x's dtype). Returns a new
    channels_last [N, C, H, W] tensor; x is not modified."""
    x = _readable_in_place(x)
    n, c, h, w = x.shape
    out = torch.empty_like(x, memory_format=torch.channels_last)
    kern = _tuned_block_kernel(c, pinned_block_config(x.device, x.dtype, c))
    tiles = sorted({(cfg.kwargs["TH"], cfg.kwargs["TW"]) for cfg in kern.configs})
    # scratch for the most demanding tile choice (autotuning may pick any of them)
    s_len = max(_n_programs(n, h, w, th, tw) * (th + 2) * (tw + 2) for th, tw in tiles) * c
    scratch = torch.empty((max(s_len, 1),), device=x.device, dtype=x.dtype)
    if _debug_poison_outputs:
        out.fill_(float("nan"))
        scratch.fill_(float("nan"))
    if out.numel() == 0:
        return out
    sxn, sxc, sxh, sxw = _strides(x)
    vec = vec_factor(c, (sxn, sxh, sxw))
    block_n = max(16, min(64 if _INTERPRET else 128, triton.next_power_of_2(c)))

    def grid(meta):
        return (_n_programs(n, h, w, meta["TH"], meta["TW"]),)

    torch.library.wrap_triton(kern)[grid](
        x, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, out, scratch,
        h, w, c // vec, sxn // vec, sxh // vec, sxw // vec, sxc,
        triton.next_power_of_2(n * h * w),
        HAS_B1=b1 is not None, HAS_B2=b2 is not None, IEEE=x.dtype == torch.float32,
        BLOCK_N=block_n, VEC=vec, FLAT_K=use_flat_k(c, vec),
    )
    return out


def _prep_weight(w: torch.Tensor, c: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    if tuple(w.shape) == (c, c, 3, 3):
        w = pack_weight(w)
    elif tuple(w.shape) != (9 * c, c):
        raise ValueError(f"basic_block: {name} must be [{c}, {c}, 3, 3] or packed [{9 * c}, {c}] "
                         f"for a {c}-channel x, got {tuple(w.shape)}")
    return w.to(dtype).contiguous()


def _check_bias(b: Optional[torch.Tensor], c: int, name: str) -> None:
    if b is not None and tuple(b.shape) != (c,):
        raise ValueError(f"basic_block: {name} must be [{c}], got {tuple(b.shape)}")


def basic_block(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                b2: Optional[torch.Tensor]) -> torch.Tensor:
    """``relu(conv3x3(relu(conv3x3(x, w1) + b1), w2) + b2 + x)`` in one Triton launch (module
    docstring).

    x:      [N, C, H, W] (any layout; made channels_last), fp32 / fp16 / bf16.
    w1, w2: raw [C, C, 3, 3] or packed ``pack_weight`` [9*C, C].
    b1, b2: [C] or None.
    Returns a new [N, C, H, W] channels_last tensor in x's dtype (x is left unchanged).
    """
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"basic_block needs a 4-D float32/float16/bfloat16 x, got {tuple(x.shape)} "
                        f"{x.dtype}")
    c = x.shape[1]
    p1 = _prep_weight(w1, c, x.dtype, "w1")
    p2 = _prep_weight(w2, c, x.dtype, "w2")
    _check_bias(b1, c, "b1")
    _check_bias(b2, c, "b2")
    return torch.ops.hrnet_fast.basic_block_triton(x, p1, b1, p2, b2)


def block_reference(x, w1, b1, w2, b2):
    """The unfused form (two F.conv2d, ReLUs, the residual) in x's dtype: the oracle and the A/B
    baseline. Weights must be raw [C, C, 3, 3]."""
    import torch.nn.functional as F
    h = torch.relu(F.conv2d(x, w1, b1, padding=1))
    return torch.relu(F.conv2d(h, w2, b2, padding=1) + x)
