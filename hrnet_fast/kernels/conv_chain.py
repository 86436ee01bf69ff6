"""One-launch Triton kernel for an HRNet fuse-step chain of stride-2 3x3 convolutions (channels_last).

``strided_chain(x, weights, biases, *, accumulate_into=None) -> Tensor``

For a source branch j and a target i > j the fuse step applies ``S = i - j`` (here 2 or 3) stride-2 3x3
convolutions with padding 1, each with a (BN-folded) bias, a ReLU between them and none after the last::

    y1 = relu(conv2d(x,  W1, b1, stride=2, padding=1))          # C_j -> C_j
    y2 = relu(conv2d(y1, W2, b2, stride=2, padding=1))          # C_j -> C_j   (3-step chains only)
    out = conv2d(y_{S-1}, W_S, b_S, stride=2, padding=1) [+ accumulate_into]   # C_j -> C_i

Spatial sizes follow ``(size + 1) // 2`` per step. The intermediates are rounded to x's dtype, as they
would be when stored by an unfused run; the last conv, its bias and ``accumulate_into`` are summed in
fp32 and rounded once.

How it is fused (truly one launch): each program owns a T x T tile of the final output of one image.
It computes the (2T+1)^2 pixels of the last intermediate (and, for 3 steps, the (4T+3)^2 pixels of the
first one) that the tile depends on, as implicit GEMMs, into a private per-program scratch slice
(global memory that the same SM writes and immediately reads back, so it stays in L1/L2), separated by
a CTA barrier, then computes the output tile from the scratch. Intermediates never make a round trip
through DRAM as full tensors; the halo costs about ((2T+1)/2T)^2 extra work on the last intermediate and ((4T+3)/4T)^2 on the
first one of a 3-step chain.

``accumulate_into`` is NOT modified: the result ``accumulate_into + chain(x)`` is written into a new
tensor (this keeps the op functional, ``mutates_args=()``, and safe under autotuning re-runs).

Layouts, dtypes, VEC: x is made channels_last; ``accumulate_into`` may have any strides; weights are
packed ``[9*Cin, Cout]`` in x's dtype; fp32 / fp16 / bf16. As in ``conv.py`` (the VEC rule), C_j and x's
n/h/w strides travel divided by ``VEC_J = vec_factor(C_j, x strides)``, C_i and accumulate_into's n/h/w
strides divided by ``VEC_I = vec_factor(C_i, accumulate_into strides)`` (largest power of two <= 8
dividing them), multiplied back in the kernel: with C_j = 24 or 40 (HRNet w18's zero-padded branches)
every pixel offset of x, of the scratch and of the weights is a provable multiple of 8 elements and the
gathers are 16-byte ``cp.async`` instead of 2-byte loads.

Tiles: the output tile edge T (2, 4 or 8) is autotuned with the block sizes per (C_j, C_i, S,
next_pow2(output pixels), dtype): small T gives more programs, large T less halo recomputation. The
scratch is sized for the most demanding T. Run each shape once eagerly before a CUDA graph capture
(autotuning). Offsets inside one image are 32-bit; image and scratch bases 64-bit.

Registered op: ``torch.ops.hrnet_fast.strided_chain_triton(x, w1, b1, w2, b2, w3, b3, accumulate_into)``
with packed weights (``conv.pack_weight``, [9*Cin, Cout], x's dtype), optional biases, ``w3``/``b3`` None
for a 2-step chain.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

import triton
import triton.language as tl

from . import interpreter_enabled
from .conv import _strides, pack_weight, vec_factor

__all__ = ["strided_chain", "chain_configs", "chain_reference"]

_INTERPRET = interpreter_enabled()

# Test hook: fill every buffer the op allocates (output and scratch) with NaN before the kernel runs.
_debug_poison_outputs = False
# Override of the output tile edge T (None: autotuned over 2/4/8; the interpreter uses 4). Tests use it
# to force several tiles per image.
_tile_override: Optional[int] = None


def chain_configs(tiles=(2, 4, 8)):
    """Configs: output tile edge T (a config parameter: the grid and the scratch depend on it) crossed
    with block shapes. Under the interpreter: one config (T=4 unless ``tiles`` says otherwise)."""
    if _INTERPRET:
        t = 4 if 4 in tiles else tiles[0]
        return [triton.Config({"T": t, "BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    cfgs = []
    for t in tiles:
        for bm, bk, w, s in _CHAIN_BLOCKS:
            if t == 2 and bm > 64:
                continue  # regions of 25 / 121 pixels: big M tiles are mostly padding
            cfgs.append(triton.Config({"T": t, "BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s,
                                      maxnreg=CHAIN_MAXNREG))
    return cfgs


# (BLOCK_M, BLOCK_K, num_warps, num_stages). Registers per thread, max over the sm_90 test's chain
# classes (tests/test_kernels_conv.py, HRNET_SM90_FULL=1: 2-step 24->72, 40->144, 96->384, 36->144,
# 3-step 24->144, 48->384; fp16 and bf16; accumulate_into on/off; all biases; ptxas sm_90a, Triton 3.6)
# for T = 2 / 4 / 8, and shared memory:
#   (32, 32, 4, 2): 161 / 155 / 161, 10 KB      (64, 32, 4, 2): 175 / 181 / 216, 24 KB
#   (64, 16, 4, 2): 158 / 166 / 203, 12 KB      (128, 32, 8, 2):  -  / 216 / 230, 32 KB
# Left to its own heuristics ptxas squeezed the 32-row tiles to 128 registers (4 CTAs per SM) and then
# spilled 8 B (T=4, 96 -> 384) and 16 B (T=8, 36 -> 144), 8 B even at 80 registers with one stage;
# ``maxnreg`` (CHAIN_MAXNREG) turns that squeeze off, and no config spills or uses local memory at any of
# those signatures. The price: those tiles now take 140-161 registers, 3 CTAs of 4 warps per SM instead
# of 4 (not yet timed on a GPU; CHAIN_MAXNREG = None restores ptxas's choice for an A/B).
# fp32 (IEEE FMA dots) still spills 8-88 B at most of these tiles, with or without maxnreg and with the
# output tile capped at 32 or 64 channels: it needs its own tiles (HRNet on the GPU runs fp16 / bf16).
_CHAIN_BLOCKS = [(32, 32, 4, 2), (64, 32, 4, 2), (64, 16, 4, 2), (128, 32, 8, 2)]
CHAIN_MAXNREG: Optional[int] = 255


def _prune_chain(configs, cj: int):
    bk_cap = max(16, triton.next_power_of_2(cj))
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= bk_cap]
    return kept or [configs[0]]


@triton.jit
def conv3x3_region(
    src_ptr, s_sh, s_sw, s_sc, s_ay, s_ax, Hs, Ws, Cin,
    w_ptr, b_ptr, Cout,
    dst_ptr, d_sh, d_sw, d_sc, d_oy, d_ox, d_ay, d_ax, Hd, Wd,
    acc_ptr, a_sh, a_sw, a_sc,
    RH: tl.constexpr, RW: tl.constexpr, STRIDE: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_ACC: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FLAT_K: tl.constexpr,
):
    """3x3 pad-1 conv (stride STRIDE, 1 or 2) over an RH x RW region of the destination level whose
    top-left pixel is (d_oy, d_ox) in destination-image coordinates:
    ``act(sum_taps,c src * w [+ bias] [+ acc])`` with fp32 accumulation, act = ReLU if RELU.
    Source pixel (y, x) lives at src_ptr + (y - s_ay)*s_sh + (x - s_ax)*s_sw + c*s_sc and is valid
    iff 0 <= y < Hs, 0 <= x < Ws (zero padding). Destination pixel (y, x) is stored at
    dst_ptr + (y - d_ay)*d_sh + (x - d_ax)*d_sw + co*d_sc iff it lies inside the destination image
    (Hd x Wd); ``acc`` (added before the ReLU) is read at acc_ptr + y*a_sh + x*a_sw + co*a_sc.
    Weights are packed [9*Cin, Cout] (row tap*Cin + c).

    K walks: per tap (FLAT_K False), a runtime loop over the 9 taps around one over channel blocks
    (only the inner loop can be software-pipelined: none of it when Cin <= BLOCK_K); flat, one
    pipelined loop of BLOCK_K steps over (tap, channel) as ``conv.py``'s flat walk (with Cin a
    multiple of 8 every aligned run of 8 k values is 8 consecutive channels of one tap, so loads
    stay 16 bytes wide; Cin 24 takes 7 steps of 32 instead of 9 taps of 32 padded channels)."""
    NP: tl.constexpr = RH * RW
    offs_k = tl.arange(0, BLOCK_K)
    for p0 in range(0, NP, BLOCK_M):
        p = p0 + tl.arange(0, BLOCK_M)
        py = p // RW
        px = p - py * RW
        y = d_oy + py
        x = d_ox + px
        in_img = (p < NP) & (y >= 0) & (y < Hd) & (x >= 0) & (x < Wd)
        for n0 in range(0, Cout, BLOCK_N):
            co = n0 + tl.arange(0, BLOCK_N)
            co_ok = co < Cout
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if FLAT_K:
                for k0 in range(0, 9 * Cin, BLOCK_K):
                    kk = k0 + offs_k
                    k_ok = kk < 9 * Cin
                    tap = kk // Cin
                    cc = kk - tap * Cin
                    r = tap // 3
                    s = tap - r * 3
                    iy = STRIDE * y[:, None] - 1 + r[None, :]
                    ix = STRIDE * x[:, None] - 1 + s[None, :]
                    ok = in_img[:, None] & k_ok[None, :] & (iy >= 0) & (iy < Hs) & (ix >= 0) & (ix < Ws)
                    a = tl.load(src_ptr + (iy - s_ay) * s_sh + (ix - s_ax) * s_sw + cc[None, :] * s_sc,
                                mask=ok, other=0.0)
                    b = tl.load(w_ptr + kk[:, None] * Cout + co[None, :],
                                mask=k_ok[:, None] & co_ok[None, :], other=0.0)
                    if IEEE:
                        acc = tl.dot(a, b, acc, input_precision="ieee")
                    else:
                        acc = tl.dot(a, b, acc)
            else:
                # Runtime tap loop (not static_range): unrolled taps would let the compiler hoist nine
                # sets of gather addresses out of the channel-block loop and spill.
                for tap in range(9):
                    r = tap // 3
                    s = tap - r * 3
                    iy = STRIDE * y - 1 + r
                    ix = STRIDE * x - 1 + s
                    ok = in_img & (iy >= 0) & (iy < Hs) & (ix >= 0) & (ix < Ws)
                    a_base = src_ptr + (iy - s_ay) * s_sh + (ix - s_ax) * s_sw
                    w_tap = w_ptr + (tap * Cin) * Cout
                    for c0 in range(0, Cin, BLOCK_K):
                        cc = c0 + offs_k
                        c_ok = cc < Cin
                        a = tl.load(a_base[:, None] + cc[None, :] * s_sc,
                                    mask=ok[:, None] & c_ok[None, :], other=0.0)
                        b = tl.load(w_tap + cc[:, None] * Cout + co[None, :],
                                    mask=c_ok[:, None] & co_ok[None, :], other=0.0)
                        if IEEE:
                            acc = tl.dot(a, b, acc, input_precision="ieee")
                        else:
                            acc = tl.dot(a, b, acc)
            if HAS_BIAS:
                bias = tl.load(b_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
                acc = acc + bias[None, :]
            st_ok = in_img[:, None] & co_ok[None, :]
            if HAS_ACC:
                a_off = (y * a_sh + x * a_sw)[:, None] + co[None, :] * a_sc
                acc = acc + tl.load(acc_ptr + a_off, mask=st_ok, other=0.0).to(tl.float32)
            if RELU:
                acc = tl.maximum(acc, 0.0)
            d_off = ((y - d_ay) * d_sh + (x - d_ax) * d_sw)[:, None] + co[None, :] * d_sc
            tl.store(dst_ptr + d_off, acc.to(dst_ptr.dtype.element_ty), mask=st_ok)


@triton.jit
def _strided_chain_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, acc_ptr, out_ptr, s1_ptr, s2_ptr,
    H0, W0, H1, W1, H2, W2, H3, W3, Cj, Ci,
    sxn, sxh, sxw, sxc,
    san, sah, saw, sac,
    OUT_BUCKET,
    STEPS: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_B3: tl.constexpr, HAS_ACC: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_NI: tl.constexpr, BLOCK_NF: tl.constexpr,
    VEC_J: tl.constexpr, VEC_I: tl.constexpr,
    T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # VEC rule (as in conv.py): Cj and x's n/h/w strides arrive divided by VEC_J, Ci and
    # accumulate_into's n/h/w strides divided by VEC_I; multiplied back here so every pixel offset of x,
    # of the scratch (strides R*Cj, Cj, 1), of the packed weights (row stride Cj or Ci) and of the
    # output is a provable multiple of the VEC, and channel-contiguous loads/stores are vectorised.
    Cj = Cj * VEC_J
    sxn = sxn * VEC_J
    sxh = sxh * VEC_J
    sxw = sxw * VEC_J
    Ci = Ci * VEC_I
    san = san * VEC_I
    sah = sah * VEC_I
    saw = saw * VEC_I
    pid = tl.program_id(0)
    if STEPS == 2:
        TILES_Y = (H2 + T - 1) // T
        TILES_X = (W2 + T - 1) // T
    else:
        TILES_Y = (H3 + T - 1) // T
        TILES_X = (W3 + T - 1) // T
    tiles = TILES_Y * TILES_X
    n = pid // tiles
    t = pid - n * tiles
    ty = t // TILES_X
    tx = t - ty * TILES_X
    oy = ty * T
    ox = tx * T
    x_img = x_ptr + n.to(tl.int64) * sxn
    acc_img = acc_ptr + n.to(tl.int64) * san
    R1: tl.constexpr = 2 * T + 1          # last intermediate region edge
    R2: tl.constexpr = 4 * T + 3          # first intermediate region edge (3-step chains)
    if STEPS == 2:
        HF = H2
        WF = W2
        out_img = out_ptr + n.to(tl.int64) * HF * WF * Ci
        s1 = s1_ptr + pid.to(tl.int64) * (R1 * R1 * Cj)
        oy1 = 2 * oy - 1
        ox1 = 2 * ox - 1
        # y1 region (R1 x R1 at (oy1, ox1)) from x
        conv3x3_region(x_img, sxh, sxw, sxc, 0, 0, H0, W0, Cj,
                        w1_ptr, b1_ptr, Cj,
                        s1, R1 * Cj, Cj, 1, oy1, ox1, oy1, ox1, H1, W1,
                        acc_img, 0, 0, 0,
                        R1, R1, 2, HAS_B1, True, False, IEEE, BLOCK_M, BLOCK_NI, BLOCK_K, False)
        tl.debug_barrier()
        conv3x3_region(s1, R1 * Cj, Cj, 1, oy1, ox1, H1, W1, Cj,
                        w2_ptr, b2_ptr, Ci,
                        out_img, WF * Ci, Ci, 1, oy, ox, 0, 0, HF, WF,
                        acc_img, sah, saw, sac,
                        T, T, 2, HAS_B2, False, HAS_ACC, IEEE, BLOCK_M, BLOCK_NF, BLOCK_K, False)
    else:
        HF = H3
        WF = W3
        out_img = out_ptr + n.to(tl.int64) * HF * WF * Ci
        s1 = s1_ptr + pid.to(tl.int64) * (R2 * R2 * Cj)
        s2 = s2_ptr + pid.to(tl.int64) * (R1 * R1 * Cj)
        oy2 = 2 * oy - 1
        ox2 = 2 * ox - 1
        oy1 = 2 * oy2 - 1
        ox1 = 2 * ox2 - 1
        conv3x3_region(x_img, sxh, sxw, sxc, 0, 0, H0, W0, Cj,
                        w1_ptr, b1_ptr, Cj,
                        s1, R2 * Cj, Cj, 1, oy1, ox1, oy1, ox1, H1, W1,
                        acc_img, 0, 0, 0,
                        R2, R2, 2, HAS_B1, True, False, IEEE, BLOCK_M, BLOCK_NI, BLOCK_K, False)
        tl.debug_barrier()
        conv3x3_region(s1, R2 * Cj, Cj, 1, oy1, ox1, H1, W1, Cj,
                        w2_ptr, b2_ptr, Cj,
                        s2, R1 * Cj, Cj, 1, oy2, ox2, oy2, ox2, H2, W2,
                        acc_img, 0, 0, 0,
                        R1, R1, 2, HAS_B2, True, False, IEEE, BLOCK_M, BLOCK_NI, BLOCK_K, False)
        tl.debug_barrier()
        conv3x3_region(s2, R1 * Cj, Cj, 1, oy2, ox2, H2, W2, Cj,
                        w3_ptr, b3_ptr, Ci,
                        out_img, WF * Ci, Ci, 1, oy, ox, 0, 0, HF, WF,
                        acc_img, sah, saw, sac,
                        T, T, 2, HAS_B3, False, HAS_ACC, IEEE, BLOCK_M, BLOCK_NF, BLOCK_K, False)


_TUNED: Dict[Tuple, object] = {}


def _tiles() -> Tuple[int, ...]:
    return (int(_tile_override),) if _tile_override is not None else (2, 4, 8)


def _tuned_chain_kernel(cj: int):
    """Autotuned kernel with configs pruned in Python for this C_j (no ``prune_configs_by``)."""
    bk_cap = max(16, triton.next_power_of_2(cj))
    key = (bk_cap, _tiles(), CHAIN_MAXNREG)
    kern = _TUNED.get(key)
    if kern is None:
        kern = triton.autotune(
            configs=_prune_chain(chain_configs(_tiles()), cj),
            key=["Cj", "Ci", "STEPS", "OUT_BUCKET", "HAS_ACC", "IEEE", "BLOCK_NI", "BLOCK_NF", "VEC_J",
                 "VEC_I"],
            cache_results=True,  # as the conv's: a later process chooses without timing again
        )(_strided_chain_kernel)
        _TUNED[key] = kern
    return kern


def _half(s: int) -> int:
    return (s + 1) // 2


def _n_programs(n: int, hf: int, wf: int, t: int) -> int:
    return n * triton.cdiv(hf, t) * triton.cdiv(wf, t)


@torch.library.triton_op("hrnet_fast::strided_chain_triton", mutates_args=())
def strided_chain_triton(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    w3: Optional[torch.Tensor],
    b3: Optional[torch.Tensor],
    accumulate_into: Optional[torch.Tensor],
) -> torch.Tensor:
    """Registered op: see the module docstring. Weights are packed ([9*Cin, Cout], x's dtype);
    ``w3``/``b3`` None for a 2-step chain. Returns a new channels_last [N, Ci, Hf, Wf] tensor."""
    x = x.contiguous(memory_format=torch.channels_last)
    n, cj, h0, w0 = x.shape
    steps = 2 if w3 is None else 3
    w_last = w2 if steps == 2 else w3
    ci = w_last.shape[1]
    h1, wd1 = _half(h0), _half(w0)
    h2, wd2 = _half(h1), _half(wd1)
    h3, wd3 = _half(h2), _half(wd2)
    hf, wf = (h2, wd2) if steps == 2 else (h3, wd3)
    out = torch.empty((n, ci, hf, wf), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    kern = _tuned_chain_kernel(cj)
    tiles = sorted({c.kwargs["T"] for c in kern.configs})
    # Scratch sized for the most demanding tile choice (autotuning may pick any of them).
    r2_len = max(_n_programs(n, hf, wf, t) * (4 * t + 3) ** 2 for t in tiles) * cj
    r1_len = max(_n_programs(n, hf, wf, t) * (2 * t + 1) ** 2 for t in tiles) * cj
    grid_n = _n_programs(n, hf, wf, tiles[0])
    if steps == 2:
        s1 = torch.empty((max(r1_len, 1),), device=x.device, dtype=x.dtype)
        s2 = s1
    else:
        s1 = torch.empty((max(r2_len, 1),), device=x.device, dtype=x.dtype)
        s2 = torch.empty((max(r1_len, 1),), device=x.device, dtype=x.dtype)
    if _debug_poison_outputs:
        out.fill_(float("nan"))
        s1.fill_(float("nan"))
        s2.fill_(float("nan"))
    if grid_n == 0 or ci == 0:
        if accumulate_into is not None:
            out.copy_(accumulate_into)
        return out
    has_acc = accumulate_into is not None
    acc = accumulate_into if has_acc else out
    san, sac, sah, saw = _strides(acc)
    sxn, sxc, sxh, sxw = _strides(x)
    vec_j = vec_factor(cj, (sxn, sxh, sxw))
    vec_i = vec_factor(ci, (san, sah, saw) if has_acc else ())
    cap = 64 if _INTERPRET else 128
    block_ni = max(16, min(cap, triton.next_power_of_2(cj)))    # intermediate convs: C_j outputs
    block_nf = max(16, min(cap, triton.next_power_of_2(ci)))    # last conv: C_i outputs

    def grid(meta):
        return (_n_programs(n, hf, wf, meta["T"]),)

    torch.library.wrap_triton(kern)[grid](
        x, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2,
        w3 if w3 is not None else w2, b3 if b3 is not None else w2,
        acc, out, s1, s2,
        h0, w0, h1, wd1, h2, wd2, h3, wd3, cj // vec_j, ci // vec_i,
        sxn // vec_j, sxh // vec_j, sxw // vec_j, sxc,
        san // vec_i, sah // vec_i, saw // vec_i, sac,
        triton.next_power_of_2(n * hf * wf),
        STEPS=steps,
        HAS_B1=b1 is not None, HAS_B2=b2 is not None, HAS_B3=b3 is not None, HAS_ACC=has_acc,
        IEEE=x.dtype == torch.float32, BLOCK_NI=block_ni, BLOCK_NF=block_nf, VEC_J=vec_j, VEC_I=vec_i,
    )
    return out


def _prep_weight(w: torch.Tensor, cin: int, dtype: torch.dtype) -> torch.Tensor:
    if w.dim() == 4:
        if tuple(w.shape[1:]) != (cin, 3, 3):
            raise ValueError(f"chain weight must be [Cout, {cin}, 3, 3], got {tuple(w.shape)}")
        w = pack_weight(w)
    elif w.dim() == 2:
        if w.shape[0] != 9 * cin:
            raise ValueError(f"packed chain weight must be [9*{cin}, Cout], got {tuple(w.shape)}")
    else:
        raise ValueError(f"chain weight must be [Cout, Cin, 3, 3] or packed [9*Cin, Cout], got {tuple(w.shape)}")
    if w.dtype != dtype:
        w = w.to(dtype)
    return w.contiguous()


def strided_chain(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    *,
    accumulate_into: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run a whole stride-2 fuse chain (2 or 3 convs) in one Triton launch; see the module docstring.

    x:        [N, C_j, H, W] (any layout; made channels_last), fp32 / fp16 / bf16.
    weights:  2 or 3 weights, raw [Cout, Cin, 3, 3] or packed ``pack_weight`` [9*Cin, Cout]; all but the
              last map C_j -> C_j, the last C_j -> C_i.
    biases:   same count, each [Cout] or None.
    accumulate_into: optional [N, C_i, Hf, Wf] tensor (any layout, any float dtype; added in fp32);
              the result is accumulate_into + chain(x), written to a NEW tensor (accumulate_into is
              left unchanged).
    Returns:  [N, C_i, Hf, Wf] channels_last in x's dtype, Hf = ceil(H / 2^S), Wf = ceil(W / 2^S).
    """
    if len(weights) not in (2, 3) or len(biases) != len(weights):
        raise ValueError("strided_chain needs 2 or 3 weights and as many biases (None allowed)")
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"strided_chain needs a 4-D float32/float16/bfloat16 x, got {tuple(x.shape)} {x.dtype}")
    cj = x.shape[1]
    ws = [_prep_weight(w, cj, x.dtype) for w in weights]
    for w in ws[:-1]:
        if w.shape[1] != cj:
            raise ValueError(f"intermediate chain convs must keep C_j={cj} channels, got Cout={w.shape[1]}")
    if accumulate_into is not None:
        h, w = x.shape[2], x.shape[3]
        for _ in ws:
            h, w = _half(h), _half(w)
        exp = (x.shape[0], ws[-1].shape[1], h, w)
        if tuple(accumulate_into.shape) != exp:
            raise ValueError(f"accumulate_into has shape {tuple(accumulate_into.shape)}, expected {exp}")
    w3 = ws[2] if len(ws) == 3 else None
    b3 = biases[2] if len(ws) == 3 else None
    return torch.ops.hrnet_fast.strided_chain_triton(
        x, ws[0], biases[0], ws[1], biases[1], w3, b3, accumulate_into)


def chain_reference(x, weights, biases, accumulate_into=None):
    """The unfused form (F.conv2d per step, ReLU between), in x's dtype: the oracle and the A/B baseline.
    Weights must be raw [Cout, Cin, 3, 3]."""
    import torch.nn.functional as F
    y = x
    for k, (w, b) in enumerate(zip(weights, biases)):
        y = F.conv2d(y, w, b, stride=2, padding=1)
        if k < len(weights) - 1:
            y = torch.relu(y)
    if accumulate_into is not None:
        y = y + accumulate_into
    return y
