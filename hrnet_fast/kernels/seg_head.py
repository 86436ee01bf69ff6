"""Fused segmentation head: ``out = conv2d(relu(base + sum_k resize(c_k, base size)), weight, bias)``.

After the head rewrite (docs/architecture.md), the official head's ``last_layer`` becomes: ``base = W0 x0 + b``
at branch 0's size with Cs channels (270 for w18, 720 for w48), contributions ``W_k x_k`` at each
branch's own size, then BN-folded ReLU and the 1x1 classifier (``weight`` [K, Cs, 1, 1], ``bias``
[K]). This kernel does the resize + sum + ReLU + classifier in one pass: for a tile of pixels it loops
over channel chunks, builds the ReLU'd activation chunk in registers (float32) and multiplies it
with the weight chunk on the tensor cores (``tl.dot``); the Cs-channel activation never reaches
memory. Resize semantics are those of :mod:`hrnet_fast.kernels.upsample_add_relu` (PyTorch's
``interpolate`` index arithmetic).

Registered as ``hrnet_fast::seg_head_triton``; :func:`seg_head` is the plain Python entry point.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .upsample_add_relu import (
    MAX_CONTRIBUTIONS_PER_LAUNCH, _MODES, _flat, _load_term, _strides, check_inputs,
    contribution_args, output_like, presum_surplus, vec_factor,
)

__all__ = ["seg_head"]


@triton.jit
def _seg_head_kernel(
    out_ptr, base_ptr,
    c0_ptr, c1_ptr, c2_ptr, c3_ptr,
    w_ptr, bias_ptr,
    x0_ptr, w0_ptr, b0_ptr, CIN0, x_sn, x_sc, x_sh, x_sw,
    C, H, W, K,
    o_sn, o_sk, o_sw,
    b_sn, b_sc, b_sh, b_sw,
    c0_h, c0_w, c0_sn, c0_sc, c0_sh, c0_sw, c0_scale_h, c0_scale_w,
    c1_h, c1_w, c1_sn, c1_sc, c1_sh, c1_sw, c1_scale_h, c1_scale_w,
    c2_h, c2_w, c2_sn, c2_sc, c2_sh, c2_sw, c2_scale_h, c2_scale_w,
    c3_h, c3_w, c3_sn, c3_sc, c3_sh, c3_sw, c3_scale_h, c3_scale_w,
    NUM: tl.constexpr,
    R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr,
    F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
    BASE_FLAT: tl.constexpr,
    MODE: tl.constexpr, ALIGN: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    PROJ: tl.constexpr, HAS_B0: tl.constexpr, CIN_P: tl.constexpr,
):
    """out[n, k, y, x] = bias[k] + sum_c weight[k, c] * relu(base + sum_{j<NUM} resize(c_j))[n, c, y, x].

    With PROJ, base is not read but computed: base[n, c, y, x] = b0[c] + sum_i w0[i, c] *
    x0[n, i, y, x] (the seg head's branch-0 projection, a 1x1 conv of CIN0 <= CIN_P channels),
    one ``tl.dot`` of the pixel tile's x0 rows (loaded once) with the chunk's w0 columns, float32
    accumulation (IEEE products in float32), b0 added in float32; x0 through its (n, c, h, w)
    strides, w0 a dense [CIN0, C] matrix in the dot dtype. The Cs-channel base then never
    reaches memory either (w18 at 1024x2048: 71 MB written and read back in fp16; w48: 189 MB).

    Math: the activation is built per channel chunk in float32 exactly as in
    ``_upsample_add_relu_kernel`` (base first, then c_0, c_1, ...; ReLU in float32). It then enters
    ``tl.dot`` in the weight's dtype: float32 with input_precision="ieee" (exact float32 products,
    IEEE constexpr), or float16/bfloat16 (rounded once, as a stored activation would be) with
    float32 accumulation. The bias is added in float32 and the result rounded once to out's dtype.

    Layouts: every input through its own (n, c, h, w) strides (NCHW, channels_last, strided views);
    weight is a dense [K, C] matrix; out [N, K, H, W] is dense per image with pixel offset
    (y * W + x) * o_sw (NCHW or NHWC). dtypes: float32, float16, bfloat16.

    Tiling: program (pid_p, pid_k, n) owns BLOCK_P consecutive pixels of image n and BLOCK_K classes
    (K padded up to a power of two >= 16 by masking); it loops over C in chunks of BLOCK_C.
    VEC: C and the inputs' n/h/w strides arrive divided by VEC and are multiplied back here (lets
    the compiler prove channel rows are VEC-aligned and use vector loads).
    """
    C = C * VEC
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
    pid_k = tl.program_id(1)
    n64 = tl.program_id(2).to(tl.int64)

    hw = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = hw < H * W
    oh = hw // W
    ow = hw - oh * W
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K

    acc = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    if PROJ:
        ci = tl.arange(0, CIN_P)
        cimask = ci < CIN0
        x_off = n64 * x_sn + oh.to(tl.int64) * x_sh + ow.to(tl.int64) * x_sw
        xt = tl.load(x0_ptr + (x_off[:, None] + (ci.to(tl.int64) * x_sc)[None, :]),
                     mask=pmask[:, None] & cimask[None, :], other=0.0)
    for c_start in range(0, C, BLOCK_C):
        ch = c_start + tl.arange(0, BLOCK_C)
        cmask = ch < C
        ch64 = ch.to(tl.int64)
        mask = pmask[:, None] & cmask[None, :]
        if PROJ:
            w0t = tl.load(w0_ptr + (ci[:, None] * C + ch[None, :]),
                          mask=cimask[:, None] & cmask[None, :], other=0.0)
            if IEEE:
                a = tl.dot(xt.to(tl.float32), w0t.to(tl.float32), input_precision="ieee")
            else:
                a = tl.dot(xt, w0t)
            if HAS_B0:
                a += tl.load(b0_ptr + ch, mask=cmask, other=0.0).to(tl.float32)[None, :]
        else:
            a = _load_term(base_ptr, n64, oh, ow, hw, ch64 * b_sc, mask, H, W, b_sn, b_sh, b_sw,
                           1.0, 1.0, False, BASE_FLAT, MODE, ALIGN)
        if NUM > 0:
            a += _load_term(c0_ptr, n64, oh, ow, hw, ch64 * c0_sc, mask, c0_h, c0_w, c0_sn, c0_sh,
                            c0_sw, c0_scale_h, c0_scale_w, R0, F0, MODE, ALIGN)
        if NUM > 1:
            a += _load_term(c1_ptr, n64, oh, ow, hw, ch64 * c1_sc, mask, c1_h, c1_w, c1_sn, c1_sh,
                            c1_sw, c1_scale_h, c1_scale_w, R1, F1, MODE, ALIGN)
        if NUM > 2:
            a += _load_term(c2_ptr, n64, oh, ow, hw, ch64 * c2_sc, mask, c2_h, c2_w, c2_sn, c2_sh,
                            c2_sw, c2_scale_h, c2_scale_w, R2, F2, MODE, ALIGN)
        if NUM > 3:
            a += _load_term(c3_ptr, n64, oh, ow, hw, ch64 * c3_sc, mask, c3_h, c3_w, c3_sn, c3_sh,
                            c3_sw, c3_scale_h, c3_scale_w, R3, F3, MODE, ALIGN)
        a = tl.maximum(a, 0.0)
        # weight chunk, transposed to [BLOCK_C, BLOCK_K]; padded classes/channels read as 0.
        wt = tl.load(w_ptr + (ks[None, :] * C + ch[:, None]),
                     mask=cmask[:, None] & kmask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, wt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(wt.dtype), wt, acc)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + ks, mask=kmask, other=0.0).to(tl.float32)[None, :]

    o_off = n64 * o_sn + hw.to(tl.int64) * o_sw
    tl.store(out_ptr + (o_off[:, None] + (ks.to(tl.int64) * o_sk)[None, :]),
             acc.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & kmask[None, :])


def _blocks(C: int, K: int, dtype: torch.dtype, vec: int = 16) -> Tuple[int, int, int, int, int]:
    """(BLOCK_P, BLOCK_C, BLOCK_K, num_warps, num_stages) for the head kernel.

    BLOCK_P = 64 pixels: one wgmma M-tile (tl.dot needs M >= 16); 2048 programs per 256x512 image.
    BLOCK_K = K rounded up to a power of two >= 16 (19 -> 32), capped at 64; more classes are split
    over the grid's second axis (each class block recomputes the activation).
    BLOCK_C and stages come from compiling for sm_90 (ptxas resource usage, no GPU needed; the
    test test_sm90_build_fits_without_spills repeats the check): the activation chunk is gathered
    from up to 13 taps (base + 3 bilinear contributions), and Triton's software pipelining
    (num_stages > 1) turns those gathers into cp.async copies into shared memory: at the default
    3 stages a 64x64 chunk needs 233 KB (fp16) / 459 KB (fp32) of shared memory, more than an H100
    SM has, so pipelining is off (num_stages=1). Then fp16 with BLOCK_C=32 and 8 warps takes 125
    registers and no spills when channel rows are 16-byte aligned (C=720; 64 channels: 232);
    C=270 rows (4-byte aligned) took 250 registers at BLOCK_C=32, hence 16 there; fp32 with
    BLOCK_C=16 and 4 warps takes 167 (32 channels and 4 warps: 255 + spills).
    """
    block_k = min(max(triton.next_power_of_2(max(int(K), 1)), 16), 64)
    cp = max(triton.next_power_of_2(max(int(C), 1)), 16)
    if dtype == torch.float32:
        return 64, min(cp, 16), block_k, 4, 1
    return 64, min(cp, 32 if vec >= 8 else 16), block_k, 8, 1


def _launch_head(out: torch.Tensor, cur: torch.Tensor, contribs: Sequence[torch.Tensor],
                 w2: torch.Tensor, bias: Optional[torch.Tensor], mode: str, align_corners: bool,
                 ieee: bool, config: Optional[Tuple[int, int, int, int, int]] = None,
                 projection: Optional[Tuple] = None) -> None:
    """Run the head kernel into a preallocated ``out`` ([N, K, H, W], dense per image); at most
    MAX_CONTRIBUTIONS_PER_LAUNCH contributions; ``w2`` a dense [K, C] matrix in the dot dtype
    (float32 with ``ieee``). ``config`` = (BLOCK_P, BLOCK_C, BLOCK_K, num_warps, num_stages)
    overrides the block choice (benchmarks). ``projection`` = (x0, w0 [CIN0, C] dense in the dot
    dtype, b0 or None): base is computed in the kernel (PROJ) and ``cur`` is x0, read only for
    its size."""
    N, C, H, W = cur.shape
    if projection is not None:
        C = projection[1].shape[1]
    K = w2.shape[0]
    if N == 0 or H == 0 or W == 0 or K == 0:
        return
    if C == 0:
        if bias is not None:
            out.copy_(bias.to(out.dtype).view(1, K, 1, 1).expand_as(out))
        else:
            out.zero_()
        return
    vec = vec_factor(C, [cur, *contribs] if projection is None else list(contribs))
    ptrs, scal, res, flat = contribution_args(cur, contribs, mode, align_corners, vec)
    block_p, block_c, block_k, num_warps, num_stages = config or _blocks(C, K, w2.dtype, vec)
    grid = (triton.cdiv(H * W, block_p), triton.cdiv(K, block_k), N)
    o_sn, o_sk, _, _ = _strides(out)
    o_sw = out.stride(3) if W > 1 else (out.stride(2) if H > 1 else 0)  # dense: pixel stride
    if projection is None:
        b_sn, b_sc, b_sh, b_sw = _strides(cur)
        x0, w0, b0, cin0, x_strides = cur, w2, None, 0, (0, 0, 0, 0)
    else:
        b_sn = b_sc = b_sh = b_sw = 0
        x0, w0, b0 = projection
        cin0, x_strides = x0.shape[1], _strides(x0)
    torch.library.wrap_triton(_seg_head_kernel)[grid](
        out, cur, *ptrs, w2, bias if bias is not None else w2,
        x0, w0, b0 if b0 is not None else w0, cin0, *x_strides,
        C // vec, H, W, K,
        o_sn, o_sk, o_sw,
        b_sn // vec, b_sc, b_sh // vec, b_sw // vec,
        *scal,
        NUM=len(contribs),
        R0=res[0], R1=res[1], R2=res[2], R3=res[3],
        F0=flat[0], F1=flat[1], F2=flat[2], F3=flat[3],
        BASE_FLAT=_flat(cur),
        MODE=_MODES[mode], ALIGN=bool(align_corners), HAS_BIAS=bias is not None, IEEE=bool(ieee),
        VEC=vec,
        BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=num_warps,
        num_stages=num_stages,
        PROJ=projection is not None, HAS_B0=projection is not None and b0 is not None,
        CIN_P=max(triton.next_power_of_2(max(cin0, 1)), 16),
    )


@torch.library.triton_op("hrnet_fast::seg_head_triton", mutates_args=())
def seg_head_triton(base: torch.Tensor, contributions: List[torch.Tensor], weight: torch.Tensor,
                    bias: Optional[torch.Tensor], mode: str, align_corners: bool) -> torch.Tensor:
    """Registered op behind :func:`seg_head` (same semantics, no validation)."""
    N, C, H, W = base.shape
    K = weight.shape[0]
    w2 = weight.reshape(K, C).to(base.dtype).contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = output_like(base, channels=K)
    cur, contribs = presum_surplus(base, list(contributions), mode, align_corners)
    _launch_head(out, cur, contribs, w2, bias, mode, align_corners, base.dtype == torch.float32)
    return out


# Branch-0 widths the projected head takes (its x0 tile stays in registers: w18 24, w48 48 padded).
MAX_PROJECTED_CHANNELS = 64


@torch.library.triton_op("hrnet_fast::seg_head_projected_triton", mutates_args=())
def seg_head_projected_triton(x0: torch.Tensor, w0: torch.Tensor, b0: Optional[torch.Tensor],
                              contributions: List[torch.Tensor], weight: torch.Tensor,
                              bias: Optional[torch.Tensor], mode: str,
                              align_corners: bool) -> torch.Tensor:
    """``seg_head(conv2d(x0, w0, b0), contributions, weight, bias)`` with the 1x1 projection
    ``w0`` [C, CIN0, 1, 1] computed inside the head kernel (no Cs-channel base in memory). At most
    MAX_CONTRIBUTIONS_PER_LAUNCH contributions, CIN0 <= MAX_PROJECTED_CHANNELS; no validation
    (the engine's own arguments)."""
    C, K = w0.shape[0], weight.shape[0]
    w2 = weight.reshape(K, C).to(x0.dtype).contiguous()
    w0t = w0.reshape(C, -1).t().to(x0.dtype).contiguous()
    out = output_like(x0, channels=K)
    _launch_head(out, x0, list(contributions), w2, bias.contiguous() if bias is not None else None,
                 mode, align_corners, x0.dtype == torch.float32,
                 projection=(x0, w0t, b0.contiguous() if b0 is not None else None))
    return out


def projected_head_fits(x0: torch.Tensor, contributions: Sequence[torch.Tensor],
                        projection_weight: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`seg_head_projected_triton` takes this head: a 1x1 projection of at most
    MAX_PROJECTED_CHANNELS input channels, a 1x1 classifier, at most
    MAX_CONTRIBUTIONS_PER_LAUNCH contributions."""
    return (tuple(projection_weight.shape[2:]) == (1, 1) and tuple(weight.shape[2:]) == (1, 1)
            and x0.shape[1] <= MAX_PROJECTED_CHANNELS
            and len(contributions) <= MAX_CONTRIBUTIONS_PER_LAUNCH)


def seg_head(base: torch.Tensor, contributions: Sequence[torch.Tensor], weight: torch.Tensor,
             bias: Optional[torch.Tensor] = None, *, mode: str = "bilinear",
             align_corners: bool = False) -> torch.Tensor:
    """``conv2d(relu(base + sum_k interpolate(c_k, size=base.shape[-2:])), weight, bias)``, fused.

    base: [N, C, H, W]; contributions: [N, C, h_k, w_k] with h_k <= H, w_k <= W (any ratio, any
    number); weight: [K, C, 1, 1] (or [K, C]), cast to base's dtype; bias: [K] or None (added in
    float32). float32 (exact IEEE products), float16, bfloat16; NCHW or channels_last inputs.
    Returns [N, K, H, W] in base's memory format and dtype.
    """
    contributions = list(contributions)
    check_inputs(base, contributions, mode, align_corners, "seg_head")
    C = base.shape[1]
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4) or weight.shape[1] != C \
            or (weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1)):
        raise ValueError(f"seg_head: weight must be [K, {C}, 1, 1] (a 1x1 classifier over base's "
                         f"{C} channels), got {tuple(getattr(weight, 'shape', ()))}")
    if weight.device != base.device:
        raise ValueError(f"seg_head: weight is on {weight.device}, base on {base.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"seg_head: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.device != base.device:
            raise ValueError(f"seg_head: bias is on {bias.device}, base on {base.device}")
    return torch.ops.hrnet_fast.seg_head_triton(base, contributions, weight, bias, mode,
                                                bool(align_corners))
