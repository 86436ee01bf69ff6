"""The ``torch`` backend on the CPU: oneDNN convolutions with weights reordered once and the
epilogue fused; the thin 3x3 layers (w18's 18-144 channels, see THIN_* below) through the CPU
thin-layer conv kernel, a branch's residual blocks as one chain (``TorchCPU.blocks``: planar
intermediates, or on AVX2 the kernel's row-pair format); in
bfloat16 on CPUs with AMX, the 3x3 and 1x1 convs (stride 1 or 2) through the AMX kernel where it
measured faster (see AMX_MAX_OUT); the fuse step and the head's fuse through the CPU fuse kernel (hrnet_fast/cpu_ext.py) where it is
built, else torch compositions.

``F.conv2d`` on the CPU reorders the weight into oneDNN's blocked layout on every call and runs
bias/residual/ReLU as separate passes. Here the weight is reordered once per (conv, input shape)
and ``torch.ops.mkldnn._convolution_pointwise`` applies ReLU, or residual add + ReLU, in the conv
(the same kernels Inductor uses on the CPU). Same oneDNN convolution, so results are bit-identical
to ``F.conv2d`` (checked in the tests); measured 3-7% faster on w18_small_v2 at 512x1024, 2 cores
(benchmarks/RESULTS.md). float32, and bfloat16/float16 where the CPU runs them natively (there
the unfused form spends a third of its time on separate bias, residual and ReLU passes). While tracing, exporting (ONNX) or compiling the path is not
taken: those graphs get the plain, portable ``F.conv2d`` (oneDNN's opaque tensors do not trace),
and a failure there changes nothing. A failure in ordinary inference switches the path off for the
process, falls back to ``F.conv2d`` (same results, slower) and says so once with a
``RuntimeWarning``.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import cpu_ext
from ..plan import ConvSpec
from ..ops.conv import conv2d_bias_act_torch
from .base import Backend, in_side_path, warn_once
from .cpu_memory import keep_freed_memory

logger = logging.getLogger(__name__)

_STATE = {"ok": None}
_WARNED: set = set()  # causes already warned about in this process
# Input shapes per conv whose reordered weights are kept (oneDNN picks the layout per problem);
# enough for a fixed-size service plus a second size, without growing with every image size.
MAX_SHAPES = 2


@lru_cache(maxsize=None)
def native_precision(dtype: torch.dtype) -> Tuple[bool, str]:
    """Whether this CPU runs ``dtype`` convolutions natively (oneDNN): float32 always; bfloat16 with
    AVX512-BF16 or AMX; float16 with AVX512-FP16 or AMX-FP16. Without it oneDNN emulates them, many
    times slower than float32, so the engine refuses rather than run slowly."""
    if dtype == torch.float32:
        return True, ""
    probe = {torch.bfloat16: ("_is_mkldnn_bf16_supported", "bfloat16 (AVX512-BF16 or AMX)"),
             torch.float16: ("_is_mkldnn_fp16_supported", "float16 (AVX512-FP16 or AMX-FP16)")}
    if dtype not in probe:
        return False, f"the CPU engine runs float32, bfloat16 or float16, not {dtype}"
    name, what = probe[dtype]
    try:
        ok = bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):
        ok = False
    if ok:
        return True, ""
    return False, (f"this CPU has no native {what} support: its {dtype} convolutions would run "
                   "emulated, slower than float32; use dtype=torch.float32")


def onednn_available() -> bool:
    if _STATE["ok"] is None:
        _STATE["ok"] = bool(torch.backends.mkldnn.is_available()
                            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))
    return _STATE["ok"]


def conv_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
               padding: int, residual: Optional[torch.Tensor], relu: bool, cache: dict,
               into_residual: bool = False) -> Optional[torch.Tensor]:
    """``act(conv2d(x, weight, bias) + residual)`` (ReLU on all channels or none), or None when the
    path cannot take it (then the caller runs the plain form). ``cache`` keeps the reordered weight
    per input shape; it belongs to one conv's weights and must be dropped with them.
    ``into_residual``: the result is written into ``residual``'s memory (oneDNN's in-place sum
    post-op; the caller owns ``residual`` and reads it no more), same values."""
    if (not onednn_available() or x.device.type != "cpu" or in_side_path()
            or not (x.dtype == torch.float32 or native_precision(x.dtype)[0])):
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
        if residual is not None and into_residual:
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                residual, x, w, bias, pd, st, [1, 1], 1, "add", None, "relu" if relu else None, [], "")
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
                  "slower)", _WARNED)
        return None


def kernel_failed(switch: dict, key: str, failure: str, instead: str) -> None:
    """The one failure rule of the CPU kernels: a kernel that raised in ordinary inference is off for
    the process (``switch["on"] = False``) and says so once, ``instead`` telling what runs in its
    place; a failure while tracing, exporting or compiling changes nothing. Returns None, the
    callers' "no result"."""
    if in_side_path():
        return None
    switch["on"] = False
    warn_once(key, f"hrnet_fast: the {failure}; it is switched off for this process and {instead}",
              _WARNED)
    return None


_FUSE = {"on": True}  # False once the CPU fuse kernel failed in ordinary inference


def fuse_kernel_fits(base: torch.Tensor, contributions: Sequence[torch.Tensor], mode: str) -> bool:
    """Whether the CPU fuse kernel (hrnet_fast/cpu_ext.py) takes these arguments: CPU tensors of
    one dtype it runs, a channels_last base (its output is channels_last, like the composition's),
    contributions with channel stride 1 and at most base's size, and no autograd, trace or export
    in progress (those get the composition). Builds the kernel on first use."""
    if (not _FUSE["on"] or base.device.type != "cpu" or base.dtype not in cpu_ext.DTYPES
            or mode not in ("nearest", "bilinear") or base.dim() != 4
            or not base.is_contiguous(memory_format=torch.channels_last) or in_side_path()):
        return False
    grad = torch.is_grad_enabled()
    if grad and base.requires_grad:
        return False
    n, c, h, w = base.shape
    for t in contributions:
        if (t.device != base.device or t.dtype != base.dtype or t.dim() != 4
                or t.shape[0] != n or t.shape[1] != c or not 0 < t.shape[2] <= h
                or not 0 < t.shape[3] <= w or (c > 1 and t.stride(1) != 1)
                or (grad and t.requires_grad)):
            return False
    return cpu_ext.load_extension()


def concat_kernel_fits(parts: Sequence[torch.Tensor], size, mode: str) -> bool:
    """Whether the CPU kernel's resize_concat takes these parts: CPU tensors of one dtype it runs and
    one batch, 4-d, channel stride 1, at most ``size``, no autograd, trace or export in progress.
    Builds the kernel on first use."""
    if not _FUSE["on"] or mode not in ("nearest", "bilinear") or in_side_path() or not parts:
        return False
    first = parts[0]
    if first.device.type != "cpu" or first.dtype not in cpu_ext.DTYPES:
        return False
    grad = torch.is_grad_enabled()
    h, w = size
    for t in parts:
        if (t.device != first.device or t.dtype != first.dtype or t.dim() != 4
                or t.shape[0] != first.shape[0] or not 0 < t.shape[2] <= h or not 0 < t.shape[3] <= w
                or (t.shape[1] > 1 and t.stride(1) != 1) or (grad and t.requires_grad)):
            return False
    return cpu_ext.load_extension()


_THIN = {"on": True}  # False once the thin-layer conv kernel failed in ordinary inference
# The thin-layer kernel (csrc/cpu_conv_thin.cpp) vectorises over pixels; oneDNN over output
# channels in 16-lane vectors, so it pads 18 channels to 32, 36 to 48 and 72 to 80. Measured
# against oneDNN's fused conv (2 threads, channels_last in and out, same process, alternating
# calls, GFLOP/s counted as direct convolution; benchmarks/RESULTS.md): 18 ch direct 239 against
# 155 (Winograd 196); 36 ch Winograd 166 against 88 (direct 107); 72 ch Winograd 196 against 102;
# 144 ch Winograd 293 against 240 (direct 140); 256 -> 18 (w18's first transition) direct 245
# against 171; 64 ch (layer1's 3x3) Winograd 364 against 316. So: direct up to 24 output
# channels, where Winograd's short reductions leave its transforms dominant; Winograd F(2x2, 3x3)
# (2.25x fewer multiplies) above; the widths oneDNN pads by 10% or more, up to 72, and the
# measured wins above. Other widths (w32/w48's multiples of 16) stay in oneDNN: not measured.
THIN_MAX_CHANNELS = 72
THIN_MIN_PADDING = 1.1
THIN_EXTRA_WIDTHS = {(144, 144), (256, 18), (64, 64)}
THIN_DIRECT_MAX_OUT = 24
# AVX2 (the kernel's 8-lane variant; AMD EPYC Zen 3, 2 threads, same A/B): oneDNN pads to 8
# lanes and has no fp32 Winograd there; Winograd against oneDNN: 18 ch 132 against 85 GFLOP/s,
# 36 230/138, 72 244/145, 144 191/131, 256 -> 18 123/106, 64 185/169, 48 189/167, 96 235/171,
# 128 153/131, 192 186/159, 384 228/173; only 32 ch lost (149/152). Direct lost to Winograd on
# every width. After the Winograd blocks' position stride was padded (4 KB aliasing at channel
# counts divisible by 16), the widths below 36 won too, Winograd time against oneDNN's, channels_
# last and planar: 32 ch at 128x256 1.14-1.23x and at 64x128 1.37-1.43x, 256 -> 32 1.15-1.21x,
# 30 ch (w30) 1.49-1.87x, 256 -> 30 1.36-1.41x, 24 ch 1.07-1.37x, 16 ch 1.19-1.36x, 8 ch
# 1.00-1.70x. So on AVX2: Winograd for every width up to 384.
THIN_AVX2_MAX_CHANNELS = 384


def _isa(isa: Optional[str]) -> str:
    return isa if isa is not None else torch.backends.cpu.get_cpu_capability()


def thin_conv_pays(in_channels: int, out_channels: int, isa: Optional[str] = None) -> bool:
    """Whether a 3x3 stride-1 conv of these widths runs faster in the thin-layer kernel, on the
    kernel variant for ``isa`` (torch's CPU capability, "AVX512" or "AVX2"; default: this CPU's)."""
    if _isa(isa) == "AVX2":
        return in_channels <= THIN_AVX2_MAX_CHANNELS and out_channels <= THIN_AVX2_MAX_CHANNELS
    padded = -(-out_channels // 16) * 16
    return ((in_channels, out_channels) in THIN_EXTRA_WIDTHS
            or (in_channels <= THIN_MAX_CHANNELS and out_channels <= THIN_MAX_CHANNELS
                and padded >= THIN_MIN_PADDING * out_channels))


# AVX2, per row (same A/B, batch 1 and 8, Winograd against oneDNN): a row of W pixels is (W + 1) / 2
# Winograd tiles, computed in 8-lane vectors (csrc/cpu_conv_thin_avx2.cpp, wino_rows: the tiles
# rounded up to 8), and every block of tiles streams all 16 transformed weight matrices (64 * Ci *
# Co bytes). Narrow rows (pose crops: 256x192 leaves 6-48 columns per branch) waste lanes and, with
# wide weights, stream them for a few tiles; the kernel packs several row pairs' tiles into one
# row where that fills more lanes (``winograd_rows``). Since the weights are read in panels and
# 17-24 leftover tiles run as one block, the kernel wins wherever a thread gets work for 6 tiles or
# more per pass of weights (kernel against oneDNN, 2 threads, 2026-11-27): 256 ch at 8x8x6 1.26x
# and at 1x8x6 1.32x, 384 at 4x12x9 1.36x, 8x8x6 1.36x, 1x8x6 1.20x, 1x24x18 1.39x, 128 at 1x16x12
# 1.38x, 144 at 1x17x17 1.21x, 256 at 2x9x9 1.16x and 2x4x5 1.14x, 384 at 2x2x11 1.01x; and
# weights up to 128 x 128 win at any size (96 at 1x4x6 1.60x, 64 at 1x4x4 1.85x, 8 at 1x1x5 4.95x).
# It loses with wide weights and fewer real tiles per row (256 at 1x4x3 0.56x, 1x2x5 0.63x, 1x4x5
# 0.81x, 384 at 2x4x3 0.86x, 192 at 1x4x6 0.93x) and with one row for two threads (256 at 1x2x11
# 0.82x, 384 at 1x2x12 0.78x). So on AVX2 a row takes the kernel when oneDNN pads the width by 10%
# or more, when Ci * Co <= 16384, or when its row holds 6 real tiles or more and every thread
# gets a row. (Misses, all under 0.25 ms: 144-192 ch on one row of 3-6 tiles, 1.06-1.14x.)
THIN_AVX2_SMALL_WEIGHTS = 16384  # Ci * Co: 1 MB of transformed weights
THIN_AVX2_MIN_TILES = 6  # real tiles per row (after packing) for wider weights


def winograd_rows(width: int, height: int, batch: int) -> Tuple[int, int, int]:
    """(real tiles, computed lanes, rows) of the AVX2 kernel's Winograd rows for a [batch, C, height,
    width] input on torch's threads: one row pair's tiles per row, or several row pairs' packed side
    by side as ``packed_pairs`` in csrc/cpu_conv_thin_avx2.cpp decides."""
    return _winograd_rows(width, height, batch, max(1, torch.get_num_threads()))


@lru_cache(maxsize=1024)  # asked per conv and call; a chain asks once per conv with one shape
def _winograd_rows(width: int, height: int, batch: int, threads: int) -> Tuple[int, int, int]:
    def lanes(t):
        return -(-t // 8) * 8
    tiles = (width + 1) // 2
    stride, items = tiles + 1, batch * ((height + 1) // 2)
    g = min(64 // stride, -(-items // threads))
    if g < 2 or g * tiles * lanes(tiles) <= tiles * lanes(g * stride - 1):
        return tiles, lanes(tiles), items

    def busiest(k):  # lanes computed by the busiest thread with k pairs per row
        return -(-(-(-items // k)) // threads) * lanes(k * stride - 1)
    best = g
    for k in range(g - 1, 1, -1):
        if busiest(k) < busiest(best):
            best = k
    return best * tiles, lanes(best * stride - 1), -(-items // best)


def thin_row_pays(shape: Sequence[int], in_channels: int, out_channels: int,
                  isa: Optional[str] = None) -> bool:
    """Whether the thin-layer kernel pays on an input of ``shape`` [N, C, H, W] (the rule above;
    AVX-512: no row rule, not measured there)."""
    batch, height, width = shape[0], shape[-2], shape[-1]
    if _isa(isa) != "AVX2" or min(batch, height, width) <= 0:
        return True
    if -(-out_channels // 8) * 8 >= THIN_MIN_PADDING * out_channels:
        return True
    if in_channels * out_channels <= THIN_AVX2_SMALL_WEIGHTS:
        return True
    real, _, rows = winograd_rows(width, height, batch)
    return real >= THIN_AVX2_MIN_TILES and rows >= max(1, torch.get_num_threads())


def thin_winograd(out_channels: int, isa: Optional[str] = None) -> bool:
    """Whether the thin-layer kernel runs this width as Winograd F(2x2, 3x3) (else direct)."""
    return _isa(isa) == "AVX2" or out_channels > THIN_DIRECT_MAX_OUT


def thin_spec_fits(spec: ConvSpec) -> bool:
    """Whether a conv's spec suits the thin-layer kernel: 3x3, stride 1, padding 1, float32 weights,
    ReLU on all channels or none, widths where it pays."""
    w = spec.weight
    return (w.dim() == 4 and tuple(w.shape[-2:]) == (3, 3) and spec.stride == 1
            and spec.padding == 1 and w.dtype == torch.float32 and spec.relu_ranges is None
            and thin_conv_pays(w.shape[1], w.shape[0]))


def thin_input_fits(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the thin-layer kernel takes ``x``: float32 on the CPU, no autograd, trace or export in
    progress, the kernel built and this CPU's capability AVX-512 or AVX2. Builds the kernel on
    first use."""
    if (not _THIN["on"] or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4
            or in_side_path()):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    return cpu_ext.thin_conv_supported() and cpu_ext.load_extension()


def thin_conv(x: torch.Tensor, spec: ConvSpec, packs: dict,
              residual: Optional[torch.Tensor] = None, *, channels_last: bool = True,
              into_residual: bool = False) -> Optional[torch.Tensor]:
    """The thin-layer kernel's result, or None when it failed: then it is off for the process and
    the caller runs oneDNN, after one warning (a failure while tracing or exporting changes
    nothing). The kernel checks its arguments before it writes anything. ``packs`` keeps each
    conv's packed weight, by identity of its ConvSpec (the backend's, dropped with the plan)."""
    try:
        packed = packs.get(id(spec))
        if packed is None:
            packed = packs[id(spec)] = cpu_ext.conv3x3_thin_pack(
                spec.weight, winograd=thin_winograd(spec.weight.shape[0]))
        return cpu_ext.conv3x3_thin_cpu(x, packed, spec.bias, residual, relu=spec.relu,
                                        channels_last=channels_last,
                                        into_residual=into_residual and residual is not None)
    except RuntimeError as e:
        return kernel_failed(_THIN, "cpu-thin-conv", f"CPU thin-layer conv kernel failed ({e})",
                             "those convolutions run in oneDNN (same results to float32 "
                             "rounding, slower)")


# A branch chain's intermediates in the row-pair format (cpu_ext.conv3x3_thin_rows_from, AVX2):
# each conv reads its input rows where they are instead of deinterleaving them into scratch, and
# writes its output's two columns per tile where they go with bias, residual and ReLU in
# registers, instead of interleaving them into a planar row and writing that out in a second
# pass. Chains of four blocks against the planar chain (AMD EPYC Zen 3, 2 threads, same process,
# alternating, per-round medians of 21, two runs; benchmarks/RESULTS.md): 18 ch at 128x256
# 1.03/1.05x, 36 at 64x128 1.10/1.08x, 72 at 32x64 1.07x, 144 at 16x32 1.10/1.11x, 32 at 128x256
# 1.03/1.06x, 64 at 64x128 1.08x, 48 at 128x256 1.05/1.03x, w32 pose's 8x32x64x48 1.17/1.22x;
# whole seg models at 1x3x512x1024 1.02-1.06x. Only rows the kernel does not pack (several row
# pairs side by side in one row: narrow pose rows) take it. ``_ROWS["on"]``: an A/B switch.
_ROWS = {"on": True}


def thin_rows_fit(x: torch.Tensor) -> bool:
    """Whether a thin chain on ``x`` (which the thin-layer kernel takes) keeps its intermediates in
    the row-pair format: the kernel's AVX2 variant, on rows it does not pack."""
    if not _ROWS["on"] or not cpu_ext.thin_rows_supported():
        return False
    n, _, h, w = x.shape
    return winograd_rows(w, h, n)[2] == n * ((h + 1) // 2)


def thin_rows_conv(x: torch.Tensor, spec: ConvSpec, packs: dict,
                   residual: Optional[torch.Tensor] = None, *, width: int, out_rows: bool,
                   into_residual: bool = False) -> Optional[torch.Tensor]:
    """thin_conv with the row-pair format (cpu_ext.conv3x3_thin_rows_cpu): x strided or row-pair,
    the residual row-pair; the same failure rule."""
    try:
        packed = packs.get(id(spec))
        if packed is None:
            packed = packs[id(spec)] = cpu_ext.conv3x3_thin_pack(spec.weight, winograd=True)
        return cpu_ext.conv3x3_thin_rows_cpu(x, packed, spec.bias, residual, relu=spec.relu,
                                             width=width, out_rows=out_rows,
                                             into_residual=into_residual)
    except RuntimeError as e:
        return kernel_failed(_THIN, "cpu-thin-conv", f"CPU thin-layer conv kernel failed ({e})",
                             "those convolutions run in oneDNN (same results to float32 "
                             "rounding, slower)")


_POINTWISE = {"on": True}  # False once the 1x1 conv kernel failed in ordinary inference
# The 1x1 conv kernel (csrc/cpu_conv1x1.cpp): float32 on AVX2 + FMA, 6-pixel x 16-channel register
# tiles over weights packed in 16-channel panels, bias, residual and ReLU applied in registers.
# Against oneDNN's fused conv as the engine calls it (AMD EPYC Zen 3, 2 threads, channels_last,
# same process, alternating calls, per-round ratios; benchmarks/RESULTS.md): layer1's 64 -> 256
# into the residual 1.13x, 64 -> 64 1.11x, pose's 64 -> 256 at 8x64x48 1.09x; the fuse steps'
# 1x1s 1.03-1.30x (36 -> 18 at 64x128 1.21x, 144 -> 126 at 16x32 1.30x, w48's 192 -> 144 1.06x),
# and a bottleneck's last conv with its downsample as one GEMM 1.10x against oneDNN's two convs.
# It lost only where the input outweighs the output: layer1's 256 -> 64 0.92-0.98x (at 128x256
# and 8x64x48; loop orders, block sizes and input prefetch changed nothing), so convs with
# Ci >= POINTWISE_INPUT_BOUND_CI and Ci >= 4 Co stay in oneDNN.
# AVX2 only: on AVX-512 oneDNN computes 16 lanes to the kernel's 8.
POINTWISE_INPUT_BOUND_CI = 256


def pointwise_spec_fits(spec: ConvSpec, isa: Optional[str] = None) -> bool:
    """Whether a conv's spec suits the 1x1 conv kernel: 1x1, stride 1, no padding, float32
    weights, ReLU on all channels or none, not input-bound, on an AVX2 CPU (not AVX-512; see
    above)."""
    w = spec.weight
    if w.dim() != 4 or tuple(w.shape[-2:]) != (1, 1):
        return False
    input_bound = w.shape[1] >= POINTWISE_INPUT_BOUND_CI and w.shape[1] >= 4 * w.shape[0]
    return (_isa(isa) == "AVX2" and not input_bound and spec.stride == 1 and spec.padding == 0
            and w.dtype == torch.float32 and spec.relu_ranges is None)


def pointwise_input_fits(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the 1x1 conv kernel takes ``x``: what the thin-layer kernel needs of it
    (thin_input_fits), dense channels_last."""
    return (_POINTWISE["on"] and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and thin_input_fits(x, *weights))


def pointwise_conv(x: torch.Tensor, spec: ConvSpec, packs: dict,
                   residual: Optional[torch.Tensor] = None, *, into_residual: bool = False,
                   x2: Optional[torch.Tensor] = None,
                   downsample: Optional[ConvSpec] = None) -> Optional[torch.Tensor]:
    """The 1x1 conv kernel's result, or None when it failed: then it is off for the process and
    the caller runs oneDNN, after one warning. With ``downsample``, ``x2`` is the block's input and
    the result is act(conv(x, spec) + conv(x2, downsample)), one GEMM over both inputs. ``packs``
    keeps the packed weights and biases, by identity of the ConvSpecs."""
    try:
        key = (id(spec), id(downsample))
        packed = packs.get(key)
        if packed is None:
            weight, bias = spec.weight, spec.bias
            if downsample is not None:
                weight = torch.cat([weight, downsample.weight], 1)
                if downsample.bias is not None:
                    bias = downsample.bias if bias is None else bias + downsample.bias
            packed = packs[key] = (cpu_ext.conv1x1_pack(weight), bias)
        return cpu_ext.conv1x1_cpu(x, packed[0], spec.weight.shape[0], packed[1], residual,
                                   relu=spec.relu, x2=x2, into_residual=into_residual)
    except RuntimeError as e:
        return kernel_failed(_POINTWISE, "cpu-1x1-conv", f"CPU 1x1 conv kernel failed ({e})",
                             "those convolutions run in oneDNN (same results to float32 "
                             "rounding, slower)")


_AMX = {"on": True}  # False once the AMX conv kernel failed in ordinary inference
# The AMX kernel (csrc/cpu_conv_amx.cpp) takes bfloat16 3x3 and 1x1 convs, stride 1 or 2: a tile
# row's K is a whole row of the window (3 Ci values for 3x3: 54 of 64 slots for 18 channels, where
# oneDNN pads each tap's 18 to 32), and a call costs a few microseconds of host work (oneDNN
# through torch 150-170 us). Measured against oneDNN's fused conv as the engine calls it (2
# threads, channels_last, same process, alternating calls; benchmarks/RESULTS.md), after edge
# blocks were staged as one run of pixels: 3x3 stride 1 18 -> 18 at 128x256 1.90x, 36 -> 36 1.97x,
# 72 -> 72 1.31x, 144 -> 144 1.18-1.40x, 192 -> 192 1.41-1.45x, 240 1.16-1.43x, 256 1.13-1.36x,
# 384 -> 384 at 16x32 1.57-1.72x, but 512 -> 512 at 8x16 0.99-1.10x: AMX_MAX_OUT is 384 (w48's
# widest; w64's 512 stays in oneDNN). Stride 2: 1.14-2.15x on every shape of w18 and w48 measured.
# 1x1: up to 144 outputs 1.11-2.10x at any size; wider ones win at the fuse step's small sizes
# (384 -> 336 at 16x32 1.38-1.40x, 512 -> 448 at 8x16 1.65x, 144 -> 270 1.61x) and lose on large
# outputs (64 -> 256 at 128x256 0.67-0.89x, the head's 126 -> 270 0.78x: memory-bound, where
# oneDNN's GEMM does better), so a 1x1 conv above AMX_1X1_ANY_SIZE_OUT outputs takes the kernel
# only while its output holds at most AMX_1X1_WIDE_MAX_VALUES values (the winners: at most 172k,
# the losers: 8.4M).
AMX_MAX_OUT = 384
AMX_1X1_ANY_SIZE_OUT = 144
AMX_1X1_WIDE_MAX_VALUES = 1 << 20
AMX_MAX_IN = 512  # the kernel's staging buffer (kMaxCi in csrc/cpu_conv_amx.cpp)


def amx_spec_fits(spec: ConvSpec) -> bool:
    """Whether a conv's spec suits the AMX kernel: 3x3 with padding 1 (at most AMX_MAX_OUT
    outputs) or 1x1 without, stride 1 or 2, an even input width (whole bf16 pairs) of at most
    AMX_MAX_IN (a ReLU on some channels only, as in batched stride-2 convs, is the kernel's too).
    Wide 1x1 convs also need a small output (amx_size_fits)."""
    w = spec.weight
    if w.dim() != 4 or tuple(w.shape[-2:]) not in ((3, 3), (1, 1)):
        return False
    k = w.shape[-1]
    return (spec.stride in (1, 2) and spec.padding == k // 2 and w.shape[1] % 2 == 0
            and w.shape[1] <= AMX_MAX_IN and (k == 1 or w.shape[0] <= AMX_MAX_OUT))


def amx_size_fits(x: torch.Tensor, spec: ConvSpec) -> bool:
    """A 1x1 conv wider than AMX_1X1_ANY_SIZE_OUT takes the kernel only for outputs of at most
    AMX_1X1_WIDE_MAX_VALUES values (large ones are memory-bound, and oneDNN wins there)."""
    w = spec.weight
    if w.shape[-1] != 1 or w.shape[0] <= AMX_1X1_ANY_SIZE_OUT:
        return True
    ho, wo = (x.shape[2] - 1) // spec.stride + 1, (x.shape[3] - 1) // spec.stride + 1
    return x.shape[0] * ho * wo * w.shape[0] <= AMX_1X1_WIDE_MAX_VALUES


def amx_input_fits(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the AMX kernel takes ``x``: dense channels_last bfloat16 on the CPU, no autograd,
    trace or export in progress, the kernel built and AMX offered. Builds the kernel on first use."""
    if (not _AMX["on"] or x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 4
            or not x.is_contiguous(memory_format=torch.channels_last) or in_side_path()):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    return cpu_ext.amx_conv_supported()


def amx_conv(x: torch.Tensor, spec: ConvSpec, packs: dict,
             residual: Optional[torch.Tensor] = None,
             into_residual: bool = False) -> Optional[torch.Tensor]:
    """The AMX kernel's result (a new channels_last tensor, or ``residual`` written in place with
    ``into_residual`` where it is a dense channels_last bf16 tensor apart from x), or None when it
    failed: then it is off for the process and the caller runs oneDNN, after one warning.
    ``packs`` keeps each conv's packed weight and float32 bias, by identity of its ConvSpec."""
    try:
        packed = packs.get(id(spec))
        if packed is None:
            bias = None if spec.bias is None else spec.bias.float()
            packed = packs[id(spec)] = (cpu_ext.conv_amx_pack(spec.weight), bias)
        into = False
        if residual is not None:
            if residual.dtype == x.dtype and residual.is_contiguous(memory_format=torch.channels_last):
                # the kernel refuses a residual sharing x's memory (and would then be switched off)
                into = into_residual and (residual.untyped_storage().data_ptr()
                                          != x.untyped_storage().data_ptr())
            else:
                residual = residual.to(x.dtype).contiguous(memory_format=torch.channels_last)
        ranges = spec.relu_ranges  # set: the ReLU on those channels only (spec.relu is False)
        return cpu_ext.conv_amx_cpu(x, packed[0], packed[1], residual,
                                    relu=spec.relu or ranges is not None,
                                    weight_size=spec.weight.shape[:2], stride=spec.stride,
                                    relu_ranges=ranges, into_residual=into)
    except RuntimeError as e:
        return kernel_failed(_AMX, "cpu-amx-conv", f"CPU AMX conv kernel failed ({e})",
                             "those convolutions run in oneDNN (same math in bfloat16, slower)")


_AMX_HEAD = {"on": True}  # False once the AMX seg head kernel failed in ordinary inference
_F32_HEAD = {"on": True}  # the same for the float32 one (csrc/cpu_head_f32.cpp)


def head_shapes_fit(x: torch.Tensor, projection: ConvSpec, contributions: Sequence[torch.Tensor],
                    weight: torch.Tensor) -> bool:
    """What both fused seg heads need: a dense channels_last x, a plain 1x1 projection (no ReLU), a
    1x1 classifier (``final_conv_kernel=3`` keeps the unfused head), and contributions of x's dtype
    and batch at the projection's width, at most x's size, with channel stride 1."""
    w = projection.weight
    if (x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last)
            or w.dim() != 4 or tuple(w.shape[-2:]) != (1, 1) or projection.stride != 1
            or projection.padding != 0 or projection.relu or projection.relu_ranges is not None
            or weight.dim() != 4 or tuple(weight.shape[-2:]) != (1, 1)
            or weight.shape[1] != w.shape[0] or w.shape[1] != x.shape[1]):
        return False
    return all(c.dtype == x.dtype and c.dim() == 4 and c.shape[0] == x.shape[0]
               and c.shape[1] == w.shape[0] and c.shape[2] <= x.shape[2]
               and c.shape[3] <= x.shape[3] and (c.shape[1] <= 1 or c.stride(1) == 1)
               for c in contributions)


def amx_head_fits(x: torch.Tensor, projection: ConvSpec, contributions: Sequence[torch.Tensor],
                  weight: torch.Tensor) -> bool:
    """Whether the AMX seg head (csrc/cpu_head_amx.cpp) takes this head: head_shapes_fit, bfloat16
    with an even channel count, and an x the AMX conv would take (amx_input_fits)."""
    return (_AMX_HEAD["on"] and x.dtype == torch.bfloat16 and x.dim() == 4 and x.shape[1] % 2 == 0
            and head_shapes_fit(x, projection, contributions, weight)
            and amx_input_fits(x, projection.weight, weight))


def f32_head_fits(x: torch.Tensor, projection: ConvSpec, contributions: Sequence[torch.Tensor],
                  weight: torch.Tensor) -> bool:
    """Whether the float32 seg head (csrc/cpu_head_f32.cpp) takes this head:
    head_shapes_fit, float32 weights, and an x the thin-layer kernel's rules take (float32 on the
    CPU, no autograd, trace or export) on an AVX-512 or AVX2 CPU."""
    return (_F32_HEAD["on"] and x.dtype == torch.float32
            and projection.weight.dtype == torch.float32 and weight.dtype == torch.float32
            and head_shapes_fit(x, projection, contributions, weight)
            and thin_input_fits(x, projection.weight, weight))


def f32_head(x: torch.Tensor, projection: ConvSpec, contributions: Sequence[torch.Tensor],
             weight: torch.Tensor, bias: Optional[torch.Tensor], mode: str,
             align_corners: bool) -> Optional[torch.Tensor]:
    """The float32 seg head's result, or None when it failed: then it is off for the process and
    the engine runs the head unfused, after one warning."""
    try:
        return cpu_ext.seg_head_f32_cpu(x, projection.weight, projection.bias, contributions,
                                        weight, bias, mode=mode, align_corners=align_corners)
    except RuntimeError as e:
        return kernel_failed(_F32_HEAD, "cpu-f32-head", f"CPU float32 seg head kernel failed ({e})",
                             "the seg head runs unfused (same results to float32 rounding, "
                             "slower)")


def amx_head(x: torch.Tensor, projection: ConvSpec, contributions: Sequence[torch.Tensor],
             weight: torch.Tensor, bias: Optional[torch.Tensor], mode: str, align_corners: bool,
             packs: dict) -> Optional[torch.Tensor]:
    """The AMX seg head's result, or None when it failed: then it is off for the process and the
    engine runs the head unfused, after one warning. ``packs`` keeps the packed weights and float32
    biases, by identity of the projection's ConvSpec and of the classifier's weight."""
    try:
        key = (id(projection), id(weight))
        packed = packs.get(key)
        if packed is None:
            pb = None if projection.bias is None else projection.bias.float()
            cb = None if bias is None else bias.float()
            packed = packs[key] = (cpu_ext.conv_amx_pack(projection.weight), pb,
                                   cpu_ext.conv_amx_pack(weight), cb)
        return cpu_ext.seg_head_amx_cpu(x, packed[0], packed[1], contributions, packed[2],
                                        packed[3], proj_size=projection.weight.shape[:2],
                                        cls_size=weight.shape[:2], mode=mode,
                                        align_corners=align_corners)
    except RuntimeError as e:
        return kernel_failed(_AMX_HEAD, "cpu-amx-head", f"CPU AMX seg head kernel failed ({e})",
                             "the seg head runs unfused (same math in bfloat16, slower)")


def _memo_fits(table: Dict[int, bool], rule, spec: ConvSpec) -> bool:
    """``rule(spec)``, remembered in ``table`` by identity of the spec (a plan's specs are fixed
    for its life: checked once instead of on every call)."""
    fits = table.get(id(spec))
    if fits is None:
        fits = table[id(spec)] = rule(spec)
    return fits


def dense_as(t: torch.Tensor, channels_last: bool) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)


def run_kernel(op, *args, **kwargs) -> Optional[torch.Tensor]:
    """``op(*args, **kwargs)`` (one of cpu_ext's kernel ops), or None when it failed: then the
    kernel is off for the process and the caller runs the composition, after one warning (a failure
    while tracing or exporting changes nothing)."""
    try:
        return op(*args, **kwargs)
    except RuntimeError as e:
        return kernel_failed(_FUSE, "cpu-fuse", f"CPU fuse kernel failed ({e})",
                             "the fuse step runs as the torch composition (same results, slower)")


def fuse_kernel(base: torch.Tensor, contributions: Sequence[torch.Tensor], mode: str,
                align_corners: bool, relu: bool) -> Optional[torch.Tensor]:
    """The CPU fuse kernel's result, or None when it failed (see :func:`run_kernel`)."""
    return run_kernel(cpu_ext.upsample_add_relu_cpu, base, contributions, mode=mode,
                      align_corners=align_corners, relu=relu)


# The seg head's fuse step writes over its base (the projection's output) instead of a new tensor.
HEAD_FUSE_INTO = True


class TorchCPU(Backend):
    """``backend="torch"`` on the CPU (and on any other non-CUDA device, where the oneDNN path
    steps aside and the plain compositions run).

    Seg head: on the CPU, resizing is the cost that matters (about 2 ns per resized value against
    0.013 ns per conv MAC, 2 cores, torch 2.13), so a branch narrower than half the head width
    (36 and 72 of w18's 270) is resized first and projected at full resolution, together with
    branch 0 as one conv over their concatenation (w18_small_v2 at 1x3x512x1024 fp32, 2 threads:
    244 -> 210 ms against one conv per branch, which wrote the 270-channel map three times)."""

    name = "torch"
    resize_narrow_head_branches = True

    @classmethod
    def available(cls, device: torch.device) -> Tuple[bool, str]:
        return (True, "") if device.type != "cuda" else (False, "CUDA devices use TorchCUDA")

    def __init__(self, plan, device, dtype, *, auto: bool = False) -> None:
        super().__init__(plan, device, dtype, auto=auto)
        if device.type == "cpu":
            keep_freed_memory()
        # oneDNN-reordered weights per conv (by identity of its ConvSpec) and input shape.
        self._caches: Dict[int, dict] = {}
        # The thin-layer kernel's packed weights per conv, and whether a conv's spec suits it (fixed
        # for the plan's life, checked once instead of on every call), by identity of its ConvSpec.
        self._thin_packs: Dict[int, torch.Tensor] = {}
        self._thin_specs: Dict[int, bool] = {}
        self._pointwise_packs: Dict[tuple, tuple] = {}  # the 1x1 kernel's (packed weight, bias)
        self._pointwise_specs: Dict[int, bool] = {}
        self._amx_packs: Dict[int, tuple] = {}  # the AMX kernel's (packed weight, float32 bias)
        self._amx_specs: Dict[int, bool] = {}
        self._amx_head_packs: dict = {}  # the AMX seg head's packed weights (amx_head)

    def _thin_spec(self, spec: ConvSpec) -> bool:
        return _memo_fits(self._thin_specs, thin_spec_fits, spec)

    def _thin_takes(self, x: torch.Tensor, specs: Sequence[ConvSpec]) -> bool:
        """Whether the thin-layer kernel runs these stride-1 convs of ``x`` (one conv or a chain)."""
        return (all(self._thin_spec(spec) for spec in specs)
                and all(thin_row_pays(x.shape, spec.weight.shape[1], spec.weight.shape[0])
                        for spec in specs)
                and thin_input_fits(x, *(spec.weight for spec in specs)))

    def _pointwise_takes(self, x: torch.Tensor, spec: ConvSpec,
                         residual: Optional[torch.Tensor] = None) -> bool:
        """Whether the 1x1 conv kernel runs this conv (and its residual, if any: float32, dense
        channels_last, of the output's shape)."""
        if not _memo_fits(self._pointwise_specs, pointwise_spec_fits, spec):
            return False
        if residual is not None and (
                residual.dtype != torch.float32 or residual.dim() != 4
                or residual.shape[0] != x.shape[0] or residual.shape[2:] != x.shape[2:]
                or not residual.is_contiguous(memory_format=torch.channels_last)):
            return False
        return pointwise_input_fits(x, spec.weight)

    def _amx(self, x: torch.Tensor, spec: ConvSpec, residual: Optional[torch.Tensor],
             into_residual: bool = False) -> Optional[torch.Tensor]:
        """The AMX kernel's result for a bf16 conv it takes, else None (the caller goes on)."""
        if (x.dtype != torch.bfloat16 or not _memo_fits(self._amx_specs, amx_spec_fits, spec)
                or not amx_size_fits(x, spec)):
            return None
        if (x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1
                and not x.is_contiguous(memory_format=torch.channels_last)):
            # A channel slice of a batched conv's output (the second conv of the fuse step's
            # stride-2 chains): a dense copy (tens of microseconds at w18's sizes) and the kernel
            # beat oneDNN on the slice (150-170 us of host work alone).
            x = x.contiguous(memory_format=torch.channels_last)
        if not amx_input_fits(x, spec.weight):
            return None
        return amx_conv(x, spec, self._amx_packs, residual, into_residual)

    def _weight_cache(self, owner) -> dict:
        """The reordered-weight cache of one conv (keyed by its ConvSpec, or by the weight tensor
        for the head's classifier, which has no spec); both live as long as the plan."""
        return self._caches.setdefault(id(owner), {})

    def conv(self, x: torch.Tensor, spec: ConvSpec, residual: Optional[torch.Tensor] = None):
        y = self._amx(x, spec, residual)
        if y is not None:
            return y
        if self._thin_takes(x, (spec,)):
            y = thin_conv(x, spec, self._thin_packs, residual)
            if y is not None:
                return y
        if self._pointwise_takes(x, spec, residual):
            y = pointwise_conv(x, spec, self._pointwise_packs, residual)
            if y is not None:
                return y
        cache = self._weight_cache(spec)
        ranges = spec.relu_ranges
        # A partial ReLU (batched stride-2 convs) is no oneDNN post-op: the conv runs with its
        # reordered weight and no activation, then the ReLU on its channel ranges in place (F.conv2d
        # would reorder the weight on every call).
        y = conv_fused(x, spec.weight, spec.bias, spec.stride, spec.padding, residual,
                       spec.relu and ranges is None, cache)
        if y is None:
            return conv2d_bias_act_torch(x, spec.weight, spec.bias, spec.stride, spec.padding,
                                         residual, spec.relu, ranges)
        for start, end in ranges or ():
            y[:, start:end].relu_()
        return y

    def conv_into_residual(self, x: torch.Tensor, spec: ConvSpec, residual: torch.Tensor):
        # oneDNN accumulates into the residual in place (its sum post-op) instead of reading it and
        # writing a new tensor: bit-identical, 2 threads: 64->256 1x1 at 128x256 5.8 -> 4.6 ms fp32,
        # 2.8 -> 1.6 ms bf16; 18->18 3x3 1.49 -> 1.33 ms fp32. The AMX kernel (bf16) is faster
        # still, and writes into the residual too (1.01-1.13x against a new tensor).
        y = self._amx(x, spec, residual, into_residual=True)
        if y is not None:
            return y
        if self._thin_takes(x, (spec,)):
            y = thin_conv(x, spec, self._thin_packs, residual,
                          into_residual=dense_as(residual, True))
            if y is not None:
                return y
        if (self._pointwise_takes(x, spec, residual)
                and residual.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()):
            y = pointwise_conv(x, spec, self._pointwise_packs, residual, into_residual=True)
            if y is not None:
                return y
        if (spec.relu_ranges is None and residual.dtype == x.dtype and residual.shape[0] == x.shape[0]
                and residual.is_contiguous(memory_format=torch.channels_last)):
            y = conv_fused(x, spec.weight, spec.bias, spec.stride, spec.padding, residual,
                           spec.relu, self._weight_cache(spec), into_residual=True)
            if y is not None:
                return y
        return self.conv(x, spec, residual)

    def conv_with_downsample(self, h: torch.Tensor, spec: ConvSpec, x: torch.Tensor,
                             downsample: ConvSpec) -> Optional[torch.Tensor]:
        # A bottleneck's last 1x1 conv and its 1x1 downsample as one GEMM over both inputs
        # (K = 64 + 64 in layer1): the downsample's output (w18 at 512x1024: 33.5 MB) is never
        # written and read back.
        if (not downsample.relu and downsample.weight.shape[0] == spec.weight.shape[0]
                and self._pointwise_takes(h, spec)
                and _memo_fits(self._pointwise_specs, pointwise_spec_fits, downsample)
                and x.dtype == h.dtype and x.shape[0] == h.shape[0] and x.shape[2:] == h.shape[2:]
                and pointwise_input_fits(x, downsample.weight)):
            return pointwise_conv(h, spec, self._pointwise_packs, x2=x, downsample=downsample)
        return None

    def blocks(self, x: torch.Tensor, blocks) -> Optional[torch.Tensor]:
        """A branch's BasicBlocks of thin 3x3 convs through the thin-layer kernel, with every
        intermediate planar (NCHW): only the chain's first input and its last output are transposed
        (from and to channels_last), not every conv's. The second conv of a block accumulates into
        the block's input where that input is already dense in its output layout. Where
        thin_rows_fit (AVX2, rows the kernel does not pack) the intermediates are in the row-pair
        format instead (``_blocks_rows``)."""
        specs = [spec for b in blocks for spec in b.convs]
        if (not blocks or any(b.downsample is not None or len(b.convs) != 2 for b in blocks)
                or not self._thin_takes(x, specs)):
            return None
        if thin_rows_fit(x):
            return self._blocks_rows(x, blocks)
        h = x
        for i, block in enumerate(blocks):
            last = i == len(blocks) - 1  # the chain's output goes back to channels_last
            first, second = block.convs
            t = thin_conv(h, first, self._thin_packs, channels_last=False)
            y = None if t is None else thin_conv(t, second, self._thin_packs, h,
                                                 channels_last=last,
                                                 into_residual=dense_as(h, last))
            if y is None:  # the kernel failed and is off now: the rest of the chain in oneDNN
                return self._blocks_onednn(h.contiguous(memory_format=torch.channels_last),
                                           blocks[i:])
            h = y
        return h

    def _blocks_rows(self, x: torch.Tensor, blocks) -> torch.Tensor:
        """``blocks`` with the block inputs in the row-pair format (thin_rows_fit): x converted
        once, each block's second conv accumulating into its input, the last one writing the
        chain's channels_last output."""
        width = x.shape[-1]
        try:
            h = cpu_ext.conv3x3_thin_rows_from(x)
        except RuntimeError as e:
            kernel_failed(_THIN, "cpu-thin-conv", f"CPU thin-layer conv kernel failed ({e})",
                          "those convolutions run in oneDNN (same results to float32 rounding, "
                          "slower)")
            return self._blocks_onednn(x.contiguous(memory_format=torch.channels_last), blocks)
        for i, block in enumerate(blocks):
            last = i == len(blocks) - 1
            first, second = block.convs
            t = thin_rows_conv(h, first, self._thin_packs, width=width, out_rows=True)
            y = None if t is None else thin_rows_conv(t, second, self._thin_packs, h, width=width,
                                                      out_rows=not last, into_residual=not last)
            if y is None:  # the kernel failed and is off now: the rest of the chain in oneDNN
                return self._blocks_onednn(cpu_ext.rows_to_tensor(h, width), blocks[i:])
            h = y
        return h

    def _blocks_onednn(self, h: torch.Tensor, blocks) -> torch.Tensor:
        for block in blocks:  # engine.run_block for downsample-free blocks
            h = self.conv_into_residual(self.conv(h, block.convs[0]), block.convs[1], h)
        return h

    def fuse(self, base, contributions, mode: str, align_corners: bool, relu: bool = True,
             bias: Optional[torch.Tensor] = None):
        # One pass over memory (csrc/cpu_fuse.cpp) instead of a full-size tensor per resized
        # contribution plus separate add and ReLU passes. CPU plans keep conv biases in the convs.
        if bias is None and fuse_kernel_fits(base, contributions, mode):
            out = fuse_kernel(base, contributions, mode, align_corners, relu)
            if out is not None:
                return out
        return super().fuse(base, contributions, mode, align_corners, relu, bias)

    def projected_head(self, x, projection, contributions, weight, bias, mode: str,
                       align_corners: bool):
        # Projection, fuse step and classifier in one pass, the head map never written: bfloat16
        # on AMX (csrc/cpu_head_amx.cpp), float32 on AVX-512 (csrc/cpu_head_f32.cpp); figures in
        # benchmarks/RESULTS.md.
        if amx_head_fits(x, projection, contributions, weight):
            return amx_head(x, projection, contributions, weight, bias, mode, align_corners,
                            self._amx_head_packs)
        if f32_head_fits(x, projection, contributions, weight):
            return f32_head(x, projection, contributions, weight, bias, mode, align_corners)
        return None

    def resize_concat(self, parts, size, mode: str, align_corners: bool):
        # One pass writing the concatenation (csrc/cpu_fuse.cpp) instead of resized intermediates
        # and torch.cat: w18's 18 + 36 + 72 channels at 128x256.
        if concat_kernel_fits(parts, size, mode):
            out = run_kernel(cpu_ext.resize_concat_cpu, parts, size, mode=mode,
                             align_corners=align_corners)
            if out is not None:
                return out
        return super().resize_concat(parts, size, mode, align_corners)

    def head(self, base, contributions, weight, bias, mode: str, align_corners: bool):
        # The fuse step of the seg head through the kernel too, then the classifier with its
        # reordered weight kept (F.conv2d would reorder it on every call). The fuse writes over
        # base: the engine's head calls pass a base it owns and reads no more (the seg head's
        # projection, the pose model's fused branch 0).
        act = None
        if HEAD_FUSE_INTO and fuse_kernel_fits(base, contributions, mode):
            act = run_kernel(cpu_ext.upsample_add_relu_into_cpu, base, contributions, mode=mode,
                             align_corners=align_corners, relu=True)
        if act is None:
            act = self.fuse(base, contributions, mode, align_corners, True)
        y = conv_fused(act, weight, bias, 1, weight.shape[-1] // 2, None, False,
                       self._weight_cache(weight))
        return y if y is not None else F.conv2d(act, weight, bias, 1, weight.shape[-1] // 2)
