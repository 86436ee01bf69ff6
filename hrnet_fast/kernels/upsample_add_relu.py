"""Fused multi-branch fuse step: ``out = act(base + sum_k resize(c_k, base.shape[-2:]))``.

One Triton kernel reads ``base`` and every contribution at its own resolution and writes the output
once; no upsampled intermediate reaches memory. Registered as the torch.library op
``hrnet_fast::upsample_add_relu_triton`` (``triton_op`` + ``wrap_triton``), so it works under
torch.compile and CUDA-graph capture; :func:`upsample_add_relu` is the plain Python entry point.

The resize reproduces the index arithmetic of ``torch.nn.functional.interpolate(c, size=(H, W),
mode=...)`` for float32/float16/bfloat16 inputs (PyTorch computes those indices in float32):

* ``nearest`` (legacy): ``scale = float32(in) / float32(out)``,
  ``src = min(floor(float32(dst) * scale), in - 1)``.
* ``bilinear``, ``align_corners=False``: ``scale = float32(in) / float32(out)``,
  ``src = max(scale * (dst + 0.5) - 0.5, 0)`` rounded once (a fused multiply-add, as PyTorch's
  compiled CPU and CUDA kernels evaluate it); ``align_corners=True``:
  ``scale = float32(in - 1) / float32(out - 1)`` (0 when ``out == 1``), ``src = scale * dst``.
  Then ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``, ``l1 = src - i0``, ``l0 = 1 - l1`` per axis
  and ``v = l0y * (l0x * v00 + l1x * v01) + l1y * (l0x * v10 + l1x * v11)`` in float32 (PyTorch's
  order of operations).

The scales are computed on the host with numpy float32 division (correctly rounded, as in PyTorch)
and passed to the kernel; a contribution already at the base size is added as is.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import math

import numpy as np
import torch
import triton
import triton.language as tl

from ..ops._validate import check_fuse_args, check_fuse_bias, check_kernel_dtype

__all__ = ["upsample_add_relu", "MAX_CONTRIBUTIONS_PER_LAUNCH"]

# Contributions one launch reads. HRNet needs at most 3 (four branches); more are chained through a
# float32 intermediate (so the result is still rounded to the output dtype only once).
MAX_CONTRIBUTIONS_PER_LAUNCH = 4

_MODES = {"nearest": 0, "bilinear": 1}


# ----------------------------------------------------------------------------------------------
# Device helpers shared with seg_head.py
# ----------------------------------------------------------------------------------------------
@triton.jit
def _linear_axis(dst, in_size, scale, ALIGN: tl.constexpr):
    """Source indices (i0, i1) and weight l1 of bilinear resizing along one axis (PyTorch's formula)."""
    d = dst.to(tl.float32)
    if ALIGN:
        src = scale * d
    else:
        # PyTorch's kernels compute scale * (dst + 0.5) - 0.5 with one fused multiply-add (nvcc and
        # the CPU build contract it). The product of two float32 values is exact in float64 and so
        # is the subtraction here, so one rounding of the float64 result is that fma, bit for bit,
        # on the GPU and under the CPU interpreter alike ([BLOCK_P] values only: cheap).
        src = ((d + 0.5).to(tl.float64) * scale - 0.5).to(tl.float32)
        src = tl.maximum(src, 0.0)
    i0 = src.to(tl.int32)  # src >= 0: truncation is floor
    i0 = tl.minimum(i0, in_size - 1)
    l1 = src - i0.to(tl.float32)
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, l1


@triton.jit
def _nearest_axis(dst, in_size, scale):
    """Legacy nearest: min(floor(float32(dst) * scale), in - 1)."""
    src = (dst.to(tl.float32) * scale).to(tl.int32)  # non-negative: truncation is floor
    return tl.minimum(src, in_size - 1)


@triton.jit
def _load_term(ptr, n64, oh, ow, hw, coff, mask, in_h, in_w, s_n, s_h, s_w, scale_h, scale_w,
               RESIZE: tl.constexpr, FLAT: tl.constexpr, MODE: tl.constexpr, ALIGN: tl.constexpr):
    """One contribution, resized to the output pixels (oh, ow), as a float32 [BLOCK_P, BLOCK_C] tile.

    n64: image index (int64 scalar); oh, ow, hw: output row, column, flat pixel index ([BLOCK_P]);
    coff: channel offsets times the channel stride ([BLOCK_C]); mask: [BLOCK_P, BLOCK_C].
    """
    img = n64 * s_n
    if RESIZE:
        if MODE == 0:
            sh = _nearest_axis(oh, in_h, scale_h).to(tl.int64)
            sw = _nearest_axis(ow, in_w, scale_w).to(tl.int64)
            off = img + sh * s_h + sw * s_w
            val = tl.load(ptr + (off[:, None] + coff[None, :]), mask=mask, other=0.0).to(tl.float32)
        else:
            h0, h1, ly = _linear_axis(oh, in_h, scale_h, ALIGN)
            w0, w1, lx = _linear_axis(ow, in_w, scale_w, ALIGN)
            r0 = img + h0.to(tl.int64) * s_h
            r1 = img + h1.to(tl.int64) * s_h
            c0 = w0.to(tl.int64) * s_w
            c1 = w1.to(tl.int64) * s_w
            v00 = tl.load(ptr + ((r0 + c0)[:, None] + coff[None, :]), mask=mask, other=0.0).to(tl.float32)
            v01 = tl.load(ptr + ((r0 + c1)[:, None] + coff[None, :]), mask=mask, other=0.0).to(tl.float32)
            v10 = tl.load(ptr + ((r1 + c0)[:, None] + coff[None, :]), mask=mask, other=0.0).to(tl.float32)
            v11 = tl.load(ptr + ((r1 + c1)[:, None] + coff[None, :]), mask=mask, other=0.0).to(tl.float32)
            lx1 = lx[:, None]
            lx0 = 1.0 - lx1
            ly1 = ly[:, None]
            ly0 = 1.0 - ly1
            val = ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)
    else:
        if FLAT:
            # pixels of one image are evenly spaced (s_h == W * s_w): lets Triton see contiguity.
            off = img + hw.to(tl.int64) * s_w
        else:
            off = img + oh.to(tl.int64) * s_h + ow.to(tl.int64) * s_w
        val = tl.load(ptr + (off[:, None] + coff[None, :]), mask=mask, other=0.0).to(tl.float32)
    return val


@triton.jit
def _upsample_add_relu_kernel(
    out_ptr, base_ptr, bias_ptr,
    c0_ptr, c1_ptr, c2_ptr, c3_ptr,
    C, H, W,
    o_sn, o_sc, o_sw,
    b_sn, b_sc, b_sh, b_sw,
    c0_h, c0_w, c0_sn, c0_sc, c0_sh, c0_sw, c0_scale_h, c0_scale_w,
    c1_h, c1_w, c1_sn, c1_sc, c1_sh, c1_sw, c1_scale_h, c1_scale_w,
    c2_h, c2_w, c2_sn, c2_sc, c2_sh, c2_sw, c2_scale_h, c2_scale_w,
    c3_h, c3_w, c3_sn, c3_sc, c3_sh, c3_sw, c3_scale_h, c3_scale_w,
    NUM: tl.constexpr,
    R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr,
    F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
    BASE_FLAT: tl.constexpr, HAS_BIAS: tl.constexpr,
    MODE: tl.constexpr, ALIGN: tl.constexpr, RELU: tl.constexpr, VEC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[n, c, y, x] = act(base[n, c, y, x] [+ bias[c]] + sum_{k < NUM} resize(c_k)[n, c, y, x]).

    Math: resize as in the module docstring (PyTorch's index arithmetic, float32 weights); every
    term is converted to float32, summed in the order base, bias, c_0, c_1, ..., the activation
    (ReLU if RELU else identity) applied in float32, and the result rounded once to out's dtype.

    Layouts: every tensor is addressed through its own (n, c, h, w) strides, so NCHW-contiguous,
    channels_last and strided views (e.g. channel slices of a stacked conv output) all work. The
    output is written through (o_sn, o_sc, o_sw) with pixel offset (y * W + x) * o_sw, i.e. it must
    be NCHW- or NHWC-dense per image (the wrapper allocates it that way).
    dtypes: float32, float16, bfloat16 inputs (each may differ), any float output dtype.

    Tiling: program (pid_p, pid_c, n) handles BLOCK_P consecutive pixels (flattened y * W + x) of
    image n times BLOCK_C channels. Pixel offsets are computed in int64 (tensors over 2^31 elements).
    R_k: contribution k needs resizing (else it is at base size and added as is); F_k / BASE_FLAT:
    that tensor's pixels are evenly spaced (s_h == W * s_w), so the flat pixel index addresses it.
    VEC: C and every n/h/w stride arrive divided by VEC (a power of two dividing all of them) and
    are multiplied back here, so the compiler can prove pixel offsets are multiples of VEC and use
    vector loads along contiguous channels (e.g. 36 channels: 4-wide; Triton's own argument
    specialisation only knows "divisible by 16").
    """
    C = C * VEC
    o_sn = o_sn * VEC
    o_sw = o_sw * VEC
    b_sn = b_sn * VEC
    b_sh = b_sh * VEC
    b_sw = b_sw * VEC
    c0_sn = c0_sn * VEC
    c0_sh = c0_sh * VEC
    c0_sw = c0_sw * VEC
    c1_sn = c1_sn * VEC
    c1_sh = c1_sh * VEC
    c1_sw = c1_sw * VEC
    c2_sn = c2_sn * VEC
    c2_sh = c2_sh * VEC
    c2_sw = c2_sw * VEC
    c3_sn = c3_sn * VEC
    c3_sh = c3_sh * VEC
    c3_sw = c3_sw * VEC
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n64 = tl.program_id(2).to(tl.int64)

    hw = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = hw < H * W
    cmask = ch < C
    mask = pmask[:, None] & cmask[None, :]
    oh = hw // W
    ow = hw - oh * W
    ch64 = ch.to(tl.int64)

    acc = _load_term(base_ptr, n64, oh, ow, hw, ch64 * b_sc, mask, H, W, b_sn, b_sh, b_sw, 1.0, 1.0,
                     False, BASE_FLAT, MODE, ALIGN)
    if HAS_BIAS:  # [C], contiguous: the biases of the contributions' convs, hoisted by the plan
        acc += tl.load(bias_ptr + ch64, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if NUM > 0:
        acc += _load_term(c0_ptr, n64, oh, ow, hw, ch64 * c0_sc, mask, c0_h, c0_w, c0_sn, c0_sh, c0_sw,
                          c0_scale_h, c0_scale_w, R0, F0, MODE, ALIGN)
    if NUM > 1:
        acc += _load_term(c1_ptr, n64, oh, ow, hw, ch64 * c1_sc, mask, c1_h, c1_w, c1_sn, c1_sh, c1_sw,
                          c1_scale_h, c1_scale_w, R1, F1, MODE, ALIGN)
    if NUM > 2:
        acc += _load_term(c2_ptr, n64, oh, ow, hw, ch64 * c2_sc, mask, c2_h, c2_w, c2_sn, c2_sh, c2_sw,
                          c2_scale_h, c2_scale_w, R2, F2, MODE, ALIGN)
    if NUM > 3:
        acc += _load_term(c3_ptr, n64, oh, ow, hw, ch64 * c3_sc, mask, c3_h, c3_w, c3_sn, c3_sh, c3_sw,
                          c3_scale_h, c3_scale_w, R3, F3, MODE, ALIGN)
    if RELU:
        acc = tl.maximum(acc, 0.0)

    o_off = n64 * o_sn + hw.to(tl.int64) * o_sw
    tl.store(out_ptr + (o_off[:, None] + (ch64 * o_sc)[None, :]), acc.to(out_ptr.dtype.element_ty),
             mask=mask)


# ----------------------------------------------------------------------------------------------
# Host helpers (shared with seg_head.py)
# ----------------------------------------------------------------------------------------------
def _f32_div(a: int, b: int) -> float:
    """float32(a) / float32(b), correctly rounded in float32 (as PyTorch computes its scales)."""
    return float(np.float32(a) / np.float32(b))


def resize_scales(in_h: int, in_w: int, out_h: int, out_w: int, mode: str,
                  align_corners: bool) -> Tuple[float, float]:
    """The float32 scales PyTorch's interpolate uses for a size-based resize (exact float32 values)."""
    def one(i: int, o: int) -> float:
        i, o = int(i), int(o)  # concrete sizes (a SymInt under torch.compile specialises here)
        if mode == "bilinear" and align_corners:
            return _f32_div(i - 1, o - 1) if o > 1 else 0.0
        return _f32_div(i, o)
    return one(in_h, out_h), one(in_w, out_w)


def is_channels_last_like(t: torch.Tensor) -> bool:
    """Whether ``t`` keeps channels innermost (the output then is allocated channels_last)."""
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    if t.is_contiguous():
        return False
    return t.stride(1) < t.stride(3)


def output_like(base: torch.Tensor, channels: Optional[int] = None,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A new [N, channels, H, W] tensor in base's memory format (channels_last or contiguous)."""
    n, c, h, w = base.shape
    fmt = torch.channels_last if is_channels_last_like(base) else torch.contiguous_format
    return torch.empty((n, c if channels is None else channels, h, w), dtype=dtype or base.dtype,
                       device=base.device, memory_format=fmt)


def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """(s_n, s_c, s_h, s_w) with 0 for the n/h/w dims of size 1 (their index is always 0)."""
    n, _, h, w = t.shape
    return (t.stride(0) if n > 1 else 0, t.stride(1), t.stride(2) if h > 1 else 0,
            t.stride(3) if w > 1 else 0)


def _flat(t: torch.Tensor) -> bool:
    """Whether the pixels of one image are evenly spaced (flat index y * W + x times s_w)."""
    _, _, sh, sw = _strides(t)
    return t.shape[2] == 1 or sh == t.shape[3] * sw


def vec_factor(C: int, tensors: Sequence[torch.Tensor], cap: int = 16) -> int:
    """Largest power of two (<= cap) dividing C and the n/h/w strides of every tensor.

    1 when a stride does not fit in int32: the kernel rebuilds ``(stride // VEC) * VEC`` in the
    argument's type, which is int32 for the scaled value (the unscaled one travels as int64)."""
    g = int(C)
    for t in tensors:
        sn, _, sh, sw = _strides(t)
        if max(abs(sn), abs(sh), abs(sw)) >= 2 ** 31:
            return 1
        g = math.gcd(math.gcd(math.gcd(g, sn), sh), sw)
    v = 1
    while v < cap and g % (2 * v) == 0:
        v *= 2
    return v


def contribution_args(base: torch.Tensor, contribs: Sequence[torch.Tensor], mode: str,
                      align_corners: bool, vec: int = 1,
                      slots: int = MAX_CONTRIBUTIONS_PER_LAUNCH):
    """Per-slot kernel arguments: (pointers, scalar args, resize flags, flat flags); n/h/w strides
    divided by ``vec``. Unused slots point at ``base`` and are never read (NUM masks them out at
    compile time)."""
    H, W = base.shape[-2:]
    ptrs, scal, res, flat = [], [], [], []
    for k in range(slots):
        if k < len(contribs):
            c = contribs[k]
            h, w = c.shape[-2:]
            resize = (h, w) != (H, W)
            sh, sw = resize_scales(h, w, H, W, mode, align_corners) if resize else (1.0, 1.0)
            t_sn, t_sc, t_sh, t_sw = _strides(c)
            ptrs.append(c)
            scal += [h, w, t_sn // vec, t_sc, t_sh // vec, t_sw // vec, sh, sw]
            res.append(resize)
            flat.append(_flat(c))
        else:
            ptrs.append(base)
            scal += [1, 1, 0, 0, 0, 0, 1.0, 1.0]
            res.append(False)
            flat.append(False)
    return ptrs, scal, res, flat


def check_inputs(base: torch.Tensor, contributions: Sequence[torch.Tensor], mode: str,
                 align_corners: bool, what: str) -> None:
    """The public ops' fuse-argument rule (``hrnet_fast/ops/_validate.py``, one place) plus the
    kernels' dtypes; ValueError with a clear message."""
    check_fuse_args(base, contributions, mode, align_corners)
    check_kernel_dtype(what, base)


def _blocks(C: int, channels_last: bool, vec: int = 16) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) for the fuse-step kernel.

    The kernel is memory bound (no reuse beyond the 2x2 bilinear taps). Sizes were chosen by
    compiling for sm_90 without a GPU and reading ptxas' register counts (the test
    test_sm90_build_fits_without_spills repeats that check):
    * channels_last, channel rows 16-byte aligned (vec >= 8, e.g. C = 48, 72, 144): 4096 elements
      (8 KB of fp16 per tensor read or written) with 8 warps, 16 elements per thread: 56 registers
      with three bilinear contributions, so four programs (32 warps) fit on an SM, each with ~13
      independent vector loads in flight (8192-element tiles: 138 registers, one program per SM).
    * otherwise (C = 18 or 36 rows are only 4 or 8 bytes aligned; NCHW, where contributions are
      gathered element by element): 2048 elements with 8 warps; at 16 scalar elements per thread
      the bilinear taps took 255 registers and spilled.
    channels_last tiles span all channels of a pixel (next power of two, capped at 128; more go to
    the grid's second axis); NCHW tiles are long in pixels (contiguous there) and 8 channels wide.
    """
    cp = triton.next_power_of_2(max(int(C), 1))
    elems = 4096 if (channels_last and vec >= 8) else 2048
    if channels_last:
        block_c = min(cp, 128)
        block_p = max(16, elems // block_c)
    else:
        block_c = min(cp, 8)
        block_p = elems // block_c
    num_warps = 8 if block_p * block_c >= 2048 else 4
    return block_p, block_c, num_warps


def _launch(out: torch.Tensor, base: torch.Tensor, contribs: Sequence[torch.Tensor], mode: str,
            align_corners: bool, relu: bool, config: Optional[Tuple[int, int, int]] = None,
            bias: Optional[torch.Tensor] = None) -> None:
    """Run the kernel once into a preallocated ``out`` (dense per image, NCHW or NHWC) with at most
    MAX_CONTRIBUTIONS_PER_LAUNCH contributions and an optional contiguous per-channel ``bias``.
    ``config`` = (BLOCK_P, BLOCK_C, num_warps) overrides the block choice (benchmarks)."""
    N, C, H, W = base.shape
    if N == 0 or C == 0 or H == 0 or W == 0:
        return
    vec = vec_factor(C, [out, base, *contribs])
    ptrs, scal, res, flat = contribution_args(base, contribs, mode, align_corners, vec)
    block_p, block_c, num_warps = config or _blocks(C, is_channels_last_like(out), vec)
    grid = (triton.cdiv(H * W, block_p), triton.cdiv(C, block_c), N)
    o_sn, o_sc, _, _ = _strides(out)
    # dense output: the pixel stride (0 when there is a single pixel)
    o_sw = out.stride(3) if W > 1 else (out.stride(2) if H > 1 else 0)
    b_sn, b_sc, b_sh, b_sw = _strides(base)
    torch.library.wrap_triton(_upsample_add_relu_kernel)[grid](
        out, base, bias if bias is not None else base, *ptrs,
        C // vec, H, W,
        o_sn // vec, o_sc, o_sw // vec,
        b_sn // vec, b_sc, b_sh // vec, b_sw // vec,
        *scal,
        NUM=len(contribs),
        R0=res[0], R1=res[1], R2=res[2], R3=res[3],
        F0=flat[0], F1=flat[1], F2=flat[2], F3=flat[3],
        BASE_FLAT=_flat(base), HAS_BIAS=bias is not None,
        MODE=_MODES[mode], ALIGN=bool(align_corners), RELU=bool(relu), VEC=vec,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps,
    )


def presum_surplus(base: torch.Tensor, contribs: List[torch.Tensor], mode: str,
                   align_corners: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``(cur, rest)`` with ``cur + sum(rest) == base + sum(contribs)`` and at most
    MAX_CONTRIBUTIONS_PER_LAUNCH in ``rest``: the surplus contributions (the first ones) are summed
    into a float32 buffer, so the final launch still rounds to the output dtype once. HRNet needs
    three at most; the public ops take any number."""
    step = MAX_CONTRIBUTIONS_PER_LAUNCH
    cur = base
    while len(contribs) > step:
        take = min(step, len(contribs) - step)
        tmp = output_like(base, dtype=torch.float32)
        _launch(tmp, cur, contribs[:take], mode, align_corners, False)
        cur, contribs = tmp, contribs[take:]
    return cur, contribs


@torch.library.triton_op("hrnet_fast::upsample_add_relu_triton", mutates_args=())
def upsample_add_relu_triton(base: torch.Tensor, contributions: List[torch.Tensor], mode: str,
                             align_corners: bool, relu: bool,
                             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Registered op behind :func:`upsample_add_relu` (same semantics, no validation); ``bias``: an
    optional contiguous [C] tensor added per channel before the contributions."""
    cur, contribs = presum_surplus(base, list(contributions), mode, align_corners)
    out = output_like(base)
    _launch(out, cur, contribs, mode, align_corners, relu, bias=bias)
    return out


def upsample_add_relu(base: torch.Tensor, contributions: Sequence[torch.Tensor], *,
                      mode: str = "bilinear", align_corners: bool = False,
                      relu: bool = True, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(base [+ bias[c]] + sum_k interpolate(c_k, size=base.shape[-2:], mode, align_corners))``.

    base: [N, C, H, W]; contributions: any number of [N, C, h_k, w_k] tensors with h_k <= H,
    w_k <= W at any ratio (a contribution at base size is added as is). act is ReLU if ``relu``.
    float32/float16/bfloat16, NCHW or channels_last (any strides); accumulation in float32 and one
    rounding at the end. Returns a new tensor in base's memory format and dtype. Index arithmetic
    matches ``torch.nn.functional.interpolate`` ("nearest" is PyTorch's legacy nearest).
    """
    contributions = list(contributions)
    check_inputs(base, contributions, mode, align_corners, "upsample_add_relu")
    check_fuse_bias(base, bias)
    return torch.ops.hrnet_fast.upsample_add_relu_triton(base, contributions, mode,
                                                         bool(align_corners), bool(relu),
                                                         None if bias is None else bias.contiguous())
