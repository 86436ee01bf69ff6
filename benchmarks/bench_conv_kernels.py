"""A/B of the Triton conv kernels against cuDNN on every distinct conv of HRNet presets (default w18 and w48).

    python benchmarks/bench_conv_kernels.py                       # w18 and w48 at 1x3x1024x2048, fp16
    python benchmarks/bench_conv_kernels.py --presets w48 --json results/conv_ab.json
    python benchmarks/bench_conv_kernels.py --compile              # + torch.compile max-autotune (slow)
    python benchmarks/bench_conv_kernels.py --flat-k-ab            # + Triton with the other K walk
    python benchmarks/bench_conv_kernels.py --tile-ab --min-count 12  # + Triton without 2-D tiles
    python benchmarks/bench_conv_kernels.py --split-ab --min-count 12 # + Triton with another split-K
    python benchmarks/bench_conv_kernels.py --tma-ab --min-count 12   # + the TMA-fed 3x3 conv
    python benchmarks/bench_conv_kernels.py --kinds block --min-count 12   # the one-launch BasicBlock
    python benchmarks/bench_conv_kernels.py --list --presets w18_small_v2   # the shapes, no GPU
    python benchmarks/bench_conv_kernels.py --cpu-smoke --presets w18_small_v1 --size 32x32

Shapes are the convs the engine runs in one forward of the preset's plan (``--channel-multiple`` 8,
the CUDA plan's padding, by default), recorded on the ``meta`` device (``benchmarks/kernel_ab.py``);
a conv that reads a channel slice of a batched conv's output (the later steps of a stride-2 chain)
reads the same slice here. The head's classifier (inside the fused head op) is listed as a conv too.
Chains are the stride-2 fuse chains of 2 or more convs of the plan's fuse steps (``down_chains``).

Variants per conv (same inputs, channels_last, the epilogue the inference plan needs):
  triton       hrnet_fast.kernels.conv.conv2d_bias_act (bias + residual + ReLU fused, one launch)
  cudnn        F.conv2d(x, w, b) then separate residual add and ReLU (what eager PyTorch does)
  cudnn_fused  torch.cudnn_convolution_relu / torch.cudnn_convolution_add_relu where the epilogue fits
               (ReLU on all channels); '-' otherwise
  compile      torch.compile(mode="max-autotune-no-cudagraphs") of the cudnn variant (--compile)
  triton_untiled  (--tile-ab, thin 3x3 convs) the Triton conv autotuned without the 2-D tiled
               configs (``kernels.conv.TILED_CONFIGS = "off"``): triton_untiled / triton is their gain;
               each row's ``triton_configs`` says which config the default list chose
  triton_nosplit  (--split-ab, convs that ``kernels.conv.split_k_for`` splits on this card) the
               Triton conv without split-K; triton_split2 (--split-ab, the others with fewer output
               tiles of 128 x 64 than 3 per SM and 8 or more K steps) split in two: is the estimate's
               line in the right place
  triton_tma   (--tma-ab, convs ``kernels.conv_tma.eligible`` takes) the TMA-fed 3x3 conv
               (``conv_tma.TMA_MODE = "on"``, off by default)
Chains (fuse-step stride-2 chains j -> i): triton strided_chain (one launch) vs the unfused F.conv2d
chain + add, and vs the per-step Triton conv chain.
Blocks (--kinds with block; the branch bodies' plain BasicBlocks, found by their residual 3x3 conv):
  triton_block  hrnet_fast.kernels.basic_block (both convs, biases, residual and ReLUs, one launch)
  triton_block_pinned  the same with the width's pinned config (``PINNED_BLOCK_CONFIGS``), if any
  cudnn         F.conv2d + ReLU, F.conv2d + residual add + ReLU (eager PyTorch)
  cudnn_fused   torch.cudnn_convolution_relu then torch.cudnn_convolution_add_relu (the engine's
                two convs)

Times (ms) are medians of triton.testing.do_bench_cudagraph (default: GPU time without launch overhead,
as in the engine's CUDA graph) or of triton.testing.do_bench (--timer events: eager calls, L2 flushed).
"vs best cudnn" = best cuDNN variant time / Triton time (> 1: Triton faster); "err~cudnn" = relative
difference of the Triton output to the cuDNN output in the same dtype (a sanity check, not the accuracy
test, which lives in tests/test_kernels_conv.py). TFLOP/s counts 2*MACs; GB/s counts the bytes of
input, weight, residual and output once each. Ceilings (H200 measurements): 761 TFLOP/s, 4.2 TB/s.
``build_shapes(preset, height, width, batch)``, ``build_chains(...)`` and ``build_blocks(...)`` are
importable (no GPU needed).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # kernel_ab, beside this file
import kernel_ab  # noqa: E402  (puts the repository root on sys.path)
from hrnet_fast.backends.recording import ConvProblem, FuseProblem, HeadProblem  # noqa: E402

_DEVICE = "cuda"          # the --cpu-smoke option switches to "cpu" (Triton interpreter, tiny sizes)
_TIMER = "graph"          # --timer: "graph" (do_bench_cudagraph) or "events" (do_bench)

PEAK_TFLOPS = 761.0
PEAK_GBPS = 4200.0


@dataclass
class ConvShape:
    name: str                 # where it occurs in HRNet (stages, branch of its input)
    cin: int
    cout: int
    k: int
    stride: int
    h: int                    # input height
    w: int                    # input width
    residual: bool = False
    relu: bool = True
    relu_ranges: Optional[Tuple[Tuple[int, int], ...]] = None
    batch: int = 1
    count: int = 1            # how many times it occurs in one forward pass
    padding: Optional[int] = None  # None: k // 2
    # (channels of the batched conv output x is a slice of, first channel); None: dense x
    x_slice: Optional[Tuple[int, int]] = None

    @property
    def pad(self) -> int:
        return self.k // 2 if self.padding is None else self.padding

    @property
    def ho(self) -> int:
        return (self.h + 2 * self.pad - self.k) // self.stride + 1

    @property
    def wo(self) -> int:
        return (self.w + 2 * self.pad - self.k) // self.stride + 1

    def flops(self) -> float:
        return 2.0 * self.batch * self.ho * self.wo * self.cout * self.cin * self.k * self.k

    def bytes(self, elem: int) -> float:
        n = self.batch * self.cin * self.h * self.w + self.cin * self.cout * self.k * self.k
        n += self.batch * self.cout * self.ho * self.wo * (2 if self.residual else 1)
        return float(n * elem)


@dataclass
class ChainShape:
    name: str
    cj: int
    ci: int
    steps: int
    h: int
    w: int
    batch: int = 1
    accumulate: bool = True
    count: int = 1            # how many times it occurs in one forward pass

    def sizes(self) -> List[Tuple[int, int]]:
        """Input size, then the output size of each 3x3 stride-2 conv (padding 1)."""
        s = [(self.h, self.w)]
        for _ in range(self.steps):
            s.append(((s[-1][0] + 1) // 2, (s[-1][1] + 1) // 2))
        return s

    def flops(self) -> float:
        sz = self.sizes()
        f = 0.0
        for k in range(self.steps):
            co = self.ci if k == self.steps - 1 else self.cj
            f += 2.0 * self.batch * sz[k + 1][0] * sz[k + 1][1] * co * self.cj * 9
        return f

    def bytes(self, elem: int) -> float:
        """Fused floor: input, weights, accumulate_into and output once (intermediates on chip)."""
        sz = self.sizes()
        n = self.batch * self.cj * sz[0][0] * sz[0][1]
        n += (self.steps - 1) * 9 * self.cj * self.cj + 9 * self.cj * self.ci
        n += self.batch * self.ci * sz[-1][0] * sz[-1][1] * (2 if self.accumulate else 1)
        return float(n * elem)


def _sections(problems) -> List[str]:
    """Per recorded call, the part of the forward it belongs to: "stageS" for every call after
    stage S-1's fuse step up to stage S's (stage S fuses S branches; this includes the transition
    into it, and layer1 for stage 2), "head" after the last fuse step."""
    labels, label = [], "head"
    for p in reversed(problems):
        if isinstance(p, FuseProblem):
            label = f"stage{len(p.contributions) + 1}"
        labels.append(label)
    return labels[::-1]


def _merge(found: Dict[tuple, tuple], key: tuple, shape, section: str) -> None:
    """Count a repeat of ``key`` and remember every section it occurs in."""
    if key in found:
        old, sections = found[key]
        found[key] = (replace(old, count=old.count + 1),
                      sections + [section] if section not in sections else sections)
    else:
        found[key] = (shape, [section])


def build_shapes(preset: str = "w48", height: int = 1024, width: int = 2048, batch: int = 1,
                 num_classes: int = 19, channel_multiple: int = 8) -> List[ConvShape]:
    """Every distinct conv of one forward of the BN-folded segmentation HRNet-``preset`` plan at
    ``batch x 3 x height x width``, in order of first use, ``count`` = how often it runs; names say
    where (:func:`_sections`; ``bK``: its input is branch K's, ``kernel_ab.branch_of``)."""
    problems = kernel_ab.recorded(preset, batch, height, width, channel_multiple, num_classes)
    branches = kernel_ab.branch_shapes(problems)
    found: Dict[tuple, tuple] = {}
    for p, section in zip(problems, _sections(problems)):
        if isinstance(p, ConvProblem):
            n, cin, h, w = p.x.shape
            cout, _, k, _ = p.weight
            ranges = tuple(tuple(r) for r in p.relu_ranges) if p.relu_ranges else None
            shape = ConvShape("", cin, cout, k, p.stride, h, w, p.residual, p.relu, ranges, n, 1,
                              p.padding, kernel_ab.channel_slice(p.x))
            b = kernel_ab.branch_of(p.x.shape, branches)
            where = "" if b is None else f"b{b}"
            section = section if where else "stem"  # above branch 0's resolution
        elif isinstance(p, HeadProblem):  # the classifier of the fused head, as a conv
            n, cin, h, w = p.base.shape
            cout, _, k, _ = p.weight
            shape = ConvShape("", cin, cout, k, 1, h, w, relu=False, batch=n, padding=k // 2)
            where = "classifier"
        else:
            continue
        key = tuple(getattr(shape, f) for f in ("cin", "cout", "k", "stride", "h", "w", "residual",
                                                 "relu", "relu_ranges", "batch", "padding",
                                                 "x_slice"))
        _merge(found, key, replace(shape, name=where), section)
    return [replace(s, name=" ".join(filter(None, ("/".join(sections), s.name, _flags(s)))))
            for s, sections in found.values()]


def _flags(c: ConvShape) -> str:
    relu = (" relu[" + ",".join(f"{a}:{e}" for a, e in c.relu_ranges) + "]" if c.relu_ranges
            else " relu" if c.relu else "")
    sliced = f" x=[{c.x_slice[1]}:{c.x_slice[1] + c.cin} of {c.x_slice[0]}]" if c.x_slice else ""
    return ((" +res" if c.residual else "") + relu + sliced).strip()


@functools.lru_cache(maxsize=None)
def _meta_plan(preset: str, channel_multiple: int):
    """The preset's plan on the ``meta`` device (shapes only), as the recording builds it."""
    import torch
    from hrnet_fast.config import HRNetConfig
    from hrnet_fast.plan import build_plan
    from hrnet_fast.reference import HighResolutionNet
    with torch.device("meta"):
        model = HighResolutionNet(HRNetConfig.preset(preset))
    return build_plan(model.eval(), channel_multiple=channel_multiple)


def build_chains(preset: str = "w48", height: int = 1024, width: int = 2048, batch: int = 1,
                 channel_multiple: int = 8) -> List[ChainShape]:
    """The plan's stride-2 fuse chains of 2 or more convs (``FusePlan.down_chains``; one-conv chains
    are plain convs, in :func:`build_shapes`), ``count`` = modules that run it. A chain j -> i reads
    branch j: its size is that of the recorded fuse into target j of the same module."""
    problems = kernel_ab.recorded(preset, batch, height, width, channel_multiple)
    plan = _meta_plan(preset, channel_multiple)
    fuses = [m.fuse for stage in plan.stages for m in stage if m.fuse is not None]
    groups = kernel_ab.fuse_modules(problems)
    if [f.num_outputs for f in fuses] != [len(g) for g in groups]:
        raise RuntimeError(f"{preset}: the plan's fuse steps {[f.num_outputs for f in fuses]} do "
                           f"not match the recorded fuse calls {[len(g) for g in groups]}")
    found: Dict[tuple, tuple] = {}
    for fuse, group in zip(fuses, groups):
        stage = f"stage{len(group[0].contributions) + 1}"
        for (j, i), chain in sorted(fuse.down_chains.items()):
            if len(chain) < 2:
                continue
            cj, ci = chain[0].weight.shape[1], chain[-1].weight.shape[0]
            geometry = {(tuple(s.weight.shape[1:]), s.stride, s.padding) for s in chain}
            if geometry != {((cj, 3, 3), 2, 1)} or any(s.weight.shape[0] != cj for s in chain[:-1]):
                raise ValueError(f"{preset} chain {j}->{i}: not 3x3 stride-2 convs {cj} -> ... -> "
                                 f"{ci} channels: {[tuple(s.weight.shape) for s in chain]}")
            n, _, h, w = group[j].base.shape
            shape = ChainShape(f"chain {j}->{i}", cj, ci, len(chain), h, w, batch=n)
            _merge(found, (cj, ci, len(chain), h, w, n), shape, stage)
    return [replace(c, name=f"{c.name} ({'/'.join(sections)})") for c, sections in found.values()]


@dataclass
class BlockShape:
    name: str
    c: int
    h: int
    w: int
    batch: int = 1
    count: int = 1            # how many times it occurs in one forward pass

    def flops(self) -> float:
        return 2 * 2.0 * self.batch * self.h * self.w * self.c * self.c * 9

    def bytes(self, elem: int) -> float:
        """Fused floor: input, both weights and output once (the intermediate on chip)."""
        return float((2 * self.batch * self.c * self.h * self.w + 2 * 9 * self.c * self.c) * elem)


def build_blocks(preset: str = "w48", height: int = 1024, width: int = 2048, batch: int = 1,
                 channel_multiple: int = 8) -> List[BlockShape]:
    """The plain BasicBlocks of one forward (two 3x3 stride-1 C -> C convs with ReLU, the block's
    input as residual: ``backends.triton.fusable_basic_block``), found as their second conv (the
    recorded 3x3 stride-1 C -> C conv with a residual and a ReLU on every channel, on a dense input);
    ``count`` = how often each (C, H, W) runs."""
    problems = kernel_ab.recorded(preset, batch, height, width, channel_multiple)
    found: Dict[tuple, tuple] = {}
    for p, section in zip(problems, _sections(problems)):
        if not isinstance(p, ConvProblem):
            continue
        n, cin, h, w = p.x.shape
        cout, _, k, _ = p.weight
        if (p.residual and p.relu and not p.relu_ranges and cin == cout and k == 3 and p.stride == 1
                and p.padding == 1 and kernel_ab.channel_slice(p.x) is None):
            _merge(found, (cin, h, w, n), BlockShape(f"block {cin}", cin, h, w, batch=n), section)
    return [replace(b, name=f"{b.name} ({'/'.join(sections)})") for b, sections in found.values()]


# --------------------------------------------------------------------------------------------------
# Measuring (GPU only)
# --------------------------------------------------------------------------------------------------

def _with_setting(module, name: str, value, fn):
    """``fn`` run with ``module.name = value`` for the call (a kernel knob's A/B variant)."""
    def run():
        old = getattr(module, name)
        setattr(module, name, value)
        try:
            return fn()
        finally:
            setattr(module, name, old)
    return run


def _autotuners() -> list:
    from hrnet_fast.kernels import basic_block, conv, conv_tma
    return (list(conv._TUNED.values()) + list(conv_tma._TUNED.values())
            + list(basic_block._TUNED.values()))


def _recording_tuning(fn, sink: Dict[str, Dict[str, float]], name: str):
    """``fn``, which also keeps in ``sink[name]`` the median time (ms) of every config the Triton
    autotuner timed when ``fn``'s first call tuned a problem (which tiles were close, not only
    which won)."""
    def run():
        before = {id(k): set(getattr(k, "cache", {})) for k in _autotuners()}
        out = fn()
        for k in _autotuners():
            if set(getattr(k, "cache", {})) - before.get(id(k), set()):
                timings = getattr(k, "configs_timings", None) or {}
                sink[name] = {str(cfg): round(float(t[0] if isinstance(t, (list, tuple)) else t), 5)
                              for cfg, t in timings.items()}
        return out
    return run


def _conv_variants(c: ConvShape, dtype, use_compile: bool, flat_k_ab: bool, tile_ab: bool = False,
                   split_ab: bool = False, tma_ab: bool = False):
    import torch
    import torch.nn.functional as F
    from hrnet_fast.kernels import conv as kconv

    dev = torch.device(_DEVICE)
    cl = torch.channels_last
    total, start = c.x_slice or (c.cin, 0)  # the engine's layout: maybe a slice of a wider tensor
    x = torch.randn(c.batch, total, c.h, c.w, device=dev).to(dtype).contiguous(memory_format=cl)
    x = x[:, start:start + c.cin]
    wt = (torch.randn(c.cout, c.cin, c.k, c.k, device=dev) / math.sqrt(c.cin * c.k * c.k)).to(dtype)
    wt = wt.contiguous(memory_format=cl)
    b = (torch.randn(c.cout, device=dev) * 0.1).to(dtype)
    r = (torch.randn(c.batch, c.cout, c.ho, c.wo, device=dev).to(dtype).contiguous(memory_format=cl)
         if c.residual else None)
    wp = kconv.pack_weight(wt)
    pad = c.pad
    mask = kconv.relu_mask(c.relu_ranges, c.cout, dev) if c.relu_ranges else None

    def triton_fn():
        return kconv.conv2d_bias_act(x, wp, b, stride=c.stride, padding=pad, residual=r, relu=c.relu,
                                     relu_ranges=mask)

    def cudnn_fn():
        y = F.conv2d(x, wt, b, stride=c.stride, padding=pad)
        if r is not None:
            y = y + r
        if c.relu_ranges:
            for a, e in c.relu_ranges:
                y[:, a:e].relu_()
        elif c.relu:
            y = torch.relu(y)
        return y

    variants = {"triton": triton_fn, "cudnn": cudnn_fn}
    if c.relu and not c.relu_ranges and dev.type == "cuda":
        if r is None:
            variants["cudnn_fused"] = lambda: torch.cudnn_convolution_relu(
                x, wt, b, (c.stride, c.stride), (pad, pad), (1, 1), 1)
        else:
            variants["cudnn_fused"] = lambda: torch.cudnn_convolution_add_relu(
                x, wt, r, 1.0, b, (c.stride, c.stride), (pad, pad), (1, 1), 1)
    if use_compile:
        variants["compile"] = torch.compile(cudnn_fn, mode="max-autotune-no-cudagraphs")
    if flat_k_ab and c.cin >= kconv.FLAT_K_MAX_CIN and kconv.use_flat_k(c.cin):
        # flat by default (Cin a multiple of 8, not of 32): A/B against the per-tap walk
        variants["triton_taps"] = _with_setting(kconv, "FLAT_K_ALIGNED", False, triton_fn)
    elif flat_k_ab and c.cin % 16 and c.cin < 64:
        variants["triton_flatk"] = _with_setting(kconv, "FLAT_K_MAX_CIN", 64, triton_fn)
    if tile_ab and c.k == 3 and c.cin <= kconv.TILED_MAX_CIN:
        variants["triton_untiled"] = _with_setting(kconv, "TILED_CONFIGS", "off", triton_fn)
    if split_ab:
        m, kdim = c.batch * c.ho * c.wo, c.k * c.k * c.cin
        sms = kconv._sm_count(dev) if dev.type == "cuda" else 132
        auto = kconv._split_k(m, c.cout, kdim, dev)      # what the default does here (CPU: 1)
        tiles = -(-m // 128) * -(-c.cout // 64)
        other = 1 if auto > 1 else 2 if tiles < 3 * sms and kdim >= 8 * 32 else None
        if other is not None:
            variants["triton_nosplit" if other == 1 else "triton_split2"] = _with_setting(
                kconv, "SPLIT_K_MODE", other, triton_fn)
    if _with_setting(kconv, "PINNED_MODE", "on",
                     lambda: kconv.pinned_config(dev, dtype, c.cin, c.cout, c.k, c.stride))():
        # the class's pinned config alone (what ``auto`` would offer), beside the autotuned list
        variants["triton_pinned"] = _with_setting(kconv, "PINNED_MODE", "on", triton_fn)
    if tma_ab:
        from hrnet_fast.kernels import conv_tma
        if _with_setting(conv_tma, "TMA_MODE", "on",
                         lambda: conv_tma.eligible(x, wp, c.k, c.stride, pad))():
            variants["triton_tma"] = _with_setting(conv_tma, "TMA_MODE", "on", triton_fn)
    return variants, cudnn_fn


def _chain_variants(ch: ChainShape, dtype):
    import torch
    import torch.nn.functional as F
    from hrnet_fast.kernels import conv as kconv
    from hrnet_fast.kernels import conv_chain as kchain

    dev = torch.device(_DEVICE)
    cl = torch.channels_last
    x = torch.randn(ch.batch, ch.cj, ch.h, ch.w, device=dev).to(dtype).contiguous(memory_format=cl)
    ws, bs = [], []
    for k in range(ch.steps):
        co = ch.ci if k == ch.steps - 1 else ch.cj
        ws.append((torch.randn(co, ch.cj, 3, 3, device=dev) / math.sqrt(9 * ch.cj)).to(dtype)
                  .contiguous(memory_format=cl))
        bs.append((torch.randn(co, device=dev) * 0.1).to(dtype))
    hf, wf = ch.sizes()[-1]
    acc = torch.randn(ch.batch, ch.ci, hf, wf, device=dev).to(dtype).contiguous(memory_format=cl)
    wps = [kconv.pack_weight(w) for w in ws]

    def fused():
        return kchain.strided_chain(x, wps, bs, accumulate_into=acc)

    def unfused_cudnn():
        y = x
        for k in range(ch.steps):
            y = F.conv2d(y, ws[k], bs[k], stride=2, padding=1)
            if k < ch.steps - 1:
                y = torch.relu(y)
        return y + acc

    def per_step_triton():
        y = x
        for k in range(ch.steps):
            last = k == ch.steps - 1
            y = kconv.conv2d_bias_act(y, wps[k], bs[k], stride=2, padding=1,
                                      residual=acc if last else None, relu=not last)
        return y

    return {"triton_chain": fused, "cudnn": unfused_cudnn, "triton_per_step": per_step_triton}, unfused_cudnn


def _block_variants(b: BlockShape, dtype):
    import torch
    import torch.nn.functional as F
    from hrnet_fast.kernels import basic_block as kblock
    from hrnet_fast.kernels import conv as kconv

    dev = torch.device(_DEVICE)
    cl = torch.channels_last
    x = torch.randn(b.batch, b.c, b.h, b.w, device=dev).to(dtype).contiguous(memory_format=cl)
    ws = [(torch.randn(b.c, b.c, 3, 3, device=dev) / math.sqrt(9 * b.c)).to(dtype)
          .contiguous(memory_format=cl) for _ in range(2)]
    bs = [(torch.randn(b.c, device=dev) * 0.1).to(dtype) for _ in range(2)]
    wps = [kconv.pack_weight(w) for w in ws]

    def fused():
        return kblock.basic_block(x, wps[0], bs[0], wps[1], bs[1])

    def unfused_cudnn():
        h = torch.relu(F.conv2d(x, ws[0], bs[0], padding=1))
        return torch.relu(F.conv2d(h, ws[1], bs[1], padding=1) + x)

    variants = {"triton_block": fused, "cudnn": unfused_cudnn}
    if _with_setting(kconv, "PINNED_MODE", "on",
                     lambda: kblock.pinned_block_config(dev, dtype, b.c))():
        # the width's pinned config alone (what ``auto`` would offer), beside the autotuned list
        variants["triton_block_pinned"] = _with_setting(kconv, "PINNED_MODE", "on", fused)
    if dev.type == "cuda":
        one = (1, 1)
        variants["cudnn_fused"] = lambda: torch.cudnn_convolution_add_relu(
            torch.cudnn_convolution_relu(x, ws[0], bs[0], one, one, one, 1), ws[1], x, 1.0, bs[1],
            one, one, one, 1)
    return variants, unfused_cudnn


def run(presets, height, width, batch, dtype_name, use_compile, flat_k_ab,
        channel_multiple: int = 8, min_count: int = 1, tile_ab: bool = False,
        split_ab: bool = False, tma_ab: bool = False,
        kinds: Sequence[str] = ("conv", "chain")) -> List[kernel_ab.CaseResult]:
    """Measure every conv, chain and BasicBlock (those of ``kinds``) of every preset
    (``kernel_ab.measure_case``)."""
    import torch
    from hrnet_fast.kernels import triton_status

    ok, why = triton_status(_DEVICE)
    if not ok:
        raise SystemExit(f"bench_conv_kernels: {why}")
    from hrnet_fast.kernels import conv as conv_kernels
    dtype = kernel_ab.DTYPES[dtype_name]
    # the "triton" variant autotunes the whole list even where a config is pinned (the A/B is
    # what pins are made from); "triton_pinned" runs the pin (the block kernel's pins too)
    conv_kernels.PINNED_MODE = "off"
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    elem = torch.empty((), dtype=dtype).element_size()
    results: List[kernel_ab.CaseResult] = []
    for preset in presets:
        work = []
        for kind, build in (("conv", build_shapes), ("chain", build_chains), ("block", build_blocks)):
            if kind in kinds:
                work += [(kind, c) for c in build(preset, height, width, batch,
                                                  channel_multiple=channel_multiple)]
        work = [(kind, c) for kind, c in work if c.count >= min_count]
        for kind, c in work:
            torch.manual_seed(0)
            if kind == "conv":
                variants, ref_fn = _conv_variants(c, dtype, use_compile, flat_k_ab, tile_ab, split_ab,
                                                  tma_ab)
                desc = f"{c.cin}->{c.cout} k{c.k} s{c.stride} {c.h}x{c.w}"
            elif kind == "chain":
                variants, ref_fn = _chain_variants(c, dtype)
                desc = f"{c.cj}->{c.ci} x{c.steps} s2 {c.h}x{c.w}"
            else:
                variants, ref_fn = _block_variants(c, dtype)
                desc = f"block {c.c} {c.h}x{c.w}"
            info = {"kind": kind, "preset": preset, "input": f"{batch}x3x{height}x{width}",
                    "shape": desc, "calls_per_forward": c.count}
            if kind == "conv":
                info["problem_class"] = [c.cin, c.cout, c.k, c.stride]
            elif kind == "block":
                info["block_class"] = [c.c]
            before = conv_kernels.chosen_configs()
            tuning: Dict[str, Dict[str, float]] = {}
            variants = {name: _recording_tuning(fn, tuning, name) if name.startswith("triton") else fn
                        for name, fn in variants.items()}
            r = kernel_ab.measure_case(c.name, info, c.bytes(elem), c.flops(), variants, ref_fn,
                                       timer=_TIMER, rep=100, device=_DEVICE)
            # the Triton conv's autotuned choice for this case (to pin it later without timing)
            r.info["triton_configs"] = sorted(v for k, v in conv_kernels.chosen_configs().items()
                                              if k not in before)
            r.info["config_ms"] = tuning
            results.append(r)
            _print_row(r, header=len(results) == 1)
            sys.stdout.flush()
    return results


def _print_row(r: kernel_ab.CaseResult, header: bool = False) -> None:
    if header:
        print(f"{'preset':6} {'shape':32} {'variant ms':60} {'TFLOP/s':>8} {'GB/s':>7} {'%roof':>6} "
              f"{'vs best cudnn':>13} {'err~cudnn':>9}  name")
    parts = [f"{k}={v:.4f}" for k, v in r.ms.items()]
    tri = next((k for k in ("triton", "triton_chain", "triton_block") if k in r.ms), None)
    cud = [v for k, v in r.ms.items() if k.startswith("cudnn")]
    worst = max([v for k, v in r.rel_err.items() if k.startswith("triton")], default=float("nan"))
    head = f"{r.info['preset']:6} {r.info['shape']:32} {' '.join(parts):60}"
    if tri:
        tfl, gbs = r.tflops(tri), r.gbps(tri)
        roof = max(tfl / PEAK_TFLOPS, gbs / PEAK_GBPS) * 100
        sp = f"{min(cud) / r.ms[tri]:.2f}x" if cud else "-"
        print(f"{head} {tfl:8.1f} {gbs:7.0f} {roof:5.0f}% {sp:>13} {worst:9.1e}  {r.case}")
    else:
        print(f"{head}  (triton failed: {r.errors})  {r.case}")


def _summary(results: List[kernel_ab.CaseResult]) -> None:
    print("\nWeighted by occurrence count (convs and blocks), sum of medians in ms:")
    for preset in sorted({r.info["preset"] for r in results}):
        for kind, tri in (("conv", "triton"), ("block", "triton_block")):
            tot: Dict[str, float] = {}
            for r in results:
                if r.info["preset"] != preset or r.info["kind"] != kind:
                    continue
                best_cudnn = min([v for k, v in r.ms.items() if k.startswith("cudnn")], default=None)
                for k, v in ((tri, r.ms.get(tri)), ("cudnn", r.ms.get("cudnn")),
                             ("best_cudnn", best_cudnn)):
                    if v is not None:
                        tot[k] = tot.get(k, 0.0) + v * r.info["calls_per_forward"]
            if tot:
                print(f"  {preset} {kind}s: " + "  ".join(f"{k}={v:.3f}" for k, v in tot.items()))


_CONFIG_FIELDS = re.compile(r"BLOCK_M: (\d+), BLOCK_N: (\d+), BLOCK_K: (\d+), TILE_W: (\d+), "
                            r"num_warps: (\d+),.*num_stages: (\d+)")


_BLOCK_CONFIG_FIELDS = re.compile(r"TH: (\d+), TW: (\d+), BLOCK_M: (\d+), BLOCK_K: (\d+), "
                                  r"num_warps: (\d+),.*num_stages: (\d+)")
# per kind: the Triton variant, the row's class, how its config prints
_PIN_KINDS = {"conv": ("triton", "problem_class", _CONFIG_FIELDS),
              "block": ("triton_block", "block_class", _BLOCK_CONFIG_FIELDS)}


def pin_suggestions(results: List[kernel_ab.CaseResult], arch: str, dtype_name: str,
                    kind: str = "conv") -> List[str]:
    """Lines for the pinned-config table of ``kind``: ``PINNED_CONFIGS`` (kernels/conv.py) for the
    conv classes where the autotuned Triton conv ("triton") beat the best cuDNN variant,
    ``PINNED_BLOCK_CONFIGS`` (kernels/basic_block.py) for the block widths where the block kernel
    ("triton_block") beat cuDNN's two convs; the config the autotuner timed fastest there. A class
    seen at several sizes is suggested only where it won at every size, with its most frequent
    winner. The runtime still measures cuDNN against the pin per shape."""
    variant, class_field, fields = _PIN_KINDS[kind]
    wins: Dict[tuple, List[Tuple[tuple, float, float, int]]] = {}
    for r in results:
        cls = r.info.get(class_field)
        timed = (r.info.get("config_ms") or {}).get(variant) or {}
        cud = [v for k, v in r.ms.items() if k.startswith("cudnn")]
        if cls is None or variant not in r.ms or not cud:
            continue
        best_cfg = min(timed, key=timed.get) if timed else None
        m = fields.search(best_cfg or "")
        entry = (tuple(int(v) for v in m.groups()) if m else None, r.ms[variant], min(cud),
                 int(r.info.get("calls_per_forward", 1)))
        wins.setdefault(tuple(cls), []).append(entry)
    lines = []
    for cls, rows in sorted(wins.items()):
        if any(cfg is None or tri >= cud for cfg, tri, cud, _ in rows):
            continue
        votes: Dict[tuple, int] = {}
        for cfg, _, _, n in rows:
            votes[cfg] = votes.get(cfg, 0) + n
        cfg = max(votes, key=votes.get)
        ratio = min(cud / tri for _, tri, cud, _ in rows)
        lines.append(f"    ({arch!r}, {kernel_ab.DTYPES[dtype_name]}, {', '.join(map(str, cls))}): "
                     f"{cfg},  # best cuDNN / Triton >= {ratio:.2f}x")
    return lines


def list_shapes(presets: Sequence[str], height: int, width: int, batch: int,
                channel_multiple: int = 8, min_count: int = 1) -> List[str]:
    """The ``--list`` lines: one per conv, chain and BasicBlock (preset, then the shape's fields)."""
    lines = []
    for pr in kernel_ab.check_presets(presets):
        shapes = (build_shapes(pr, height, width, batch, channel_multiple=channel_multiple)
                  + build_chains(pr, height, width, batch, channel_multiple=channel_multiple)
                  + build_blocks(pr, height, width, batch, channel_multiple=channel_multiple))
        lines += [f"{pr} {asdict(c)}" for c in shapes if c.count >= min_count]
    return lines


def main(argv=None) -> int:
    global _DEVICE, _TIMER
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="w18,w48",
                   help="comma list of preset names (w18_small_v1 ... w64)")
    p.add_argument("--size", default="1024x2048", help="input HxW")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="fp16", choices=list(kernel_ab.DTYPES))
    p.add_argument("--compile", action="store_true", help="add torch.compile max-autotune-no-cudagraphs (slow)")
    p.add_argument("--flat-k-ab", action="store_true",
                   help="add Triton with the other K walk: per-tap where flat K is the default "
                        "(Cin %% 8 == 0, Cin %% 32 != 0), flat K for other Cin %% 16 != 0, Cin < 64")
    p.add_argument("--tile-ab", action="store_true",
                   help="add Triton autotuned without the 2-D tiled configs (thin 3x3 convs)")
    p.add_argument("--split-ab", action="store_true",
                   help="add Triton without split-K where it splits, split in two where it could")
    p.add_argument("--tma-ab", action="store_true",
                   help="add the TMA-fed 3x3 conv (kernels/conv_tma.py) where it applies")
    p.add_argument("--kinds", default="conv,chain",
                   help="comma list of what to measure: conv, chain, block (the plain BasicBlocks: "
                        "the one-launch block kernel, kernels/basic_block.py, against two cuDNN convs)")
    p.add_argument("--channel-multiple", type=int, default=8,
                   help="branch width padding of the plan (8 on CUDA; 1 = the raw widths)")
    p.add_argument("--min-count", type=int, default=1,
                   help="only the convs and chains that run at least this often per forward "
                        "(12: the branch bodies' 3x3 convs, most of the conv time)")
    p.add_argument("--json", default=None, help="save the results as JSON (kernel_ab format)")
    p.add_argument("--list", action="store_true", help="print the shape list and exit (no GPU needed)")
    p.add_argument("--timer", default="graph", choices=["graph", "events"],
                   help="graph: median GPU time of CUDA-graph replays (default); events: do_bench on eager "
                        "calls with L2 flush (includes launch overhead for short kernels)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="exercise this script on the CPU (Triton interpreter; use a tiny --size): no timings")
    a = p.parse_args(argv)
    try:
        h, w = (int(v) for v in a.size.lower().split("x"))
    except ValueError:
        p.error(f"--size must be HxW, got {a.size!r}")
    presets = [s.strip() for s in a.presets.split(",") if s.strip()]
    kinds = [s.strip() for s in a.kinds.split(",") if s.strip()]
    if not kinds or set(kinds) - {"conv", "chain", "block"}:
        p.error(f"--kinds takes a comma list of conv, chain, block; got {a.kinds!r}")
    if a.cpu_smoke:
        # The kernels must be defined under the interpreter: before triton is first imported.
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("bench_conv_kernels: --cpu-smoke needs triton not imported yet", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
        _DEVICE = "cpu"
    import torch
    if not (a.list or a.cpu_smoke) and not torch.cuda.is_available():
        print("bench_conv_kernels: no CUDA GPU available; this A/B needs one (use --list to see the shapes).",
              file=sys.stderr)
        return 2
    try:
        listing = list_shapes(presets, h, w, a.batch, a.channel_multiple, a.min_count)
    except ValueError as e:
        p.error(str(e))
    if a.list:
        print("\n".join(listing))
        return 0
    _TIMER = a.timer
    t0 = time.time()
    results = run(presets, h, w, a.batch, a.dtype, a.compile, a.flat_k_ab, a.channel_multiple,
                  a.min_count, a.tile_ab, a.split_ab, a.tma_ab, kinds)
    _summary(results)
    from hrnet_fast.kernels import conv as conv_kernels
    arch = conv_kernels.device_arch(torch.device(_DEVICE))
    pins = pin_suggestions(results, arch, a.dtype)
    print("\nPINNED_CONFIGS entries where the autotuned Triton conv won (kernels/conv.py):")
    print("\n".join(pins) if pins else "    none")
    block_pins = pin_suggestions(results, arch, a.dtype, kind="block")
    if "block" in kinds:
        print("\nPINNED_BLOCK_CONFIGS entries where the block kernel won (kernels/basic_block.py):")
        print("\n".join(block_pins) if block_pins else "    none")
    env = kernel_ab.environment(_DEVICE, argv)
    settings = {"size": a.size, "batch": a.batch, "dtype": a.dtype, "memory_format": "channels_last",
                "timer": _TIMER if _DEVICE == "cuda" else "cpu smoke: one call",
                "channel_multiple": a.channel_multiple, "min_count": a.min_count, "tile_ab": a.tile_ab,
                "split_ab": a.split_ab, "tma_ab": a.tma_ab, "kinds": list(kinds),
                "pin_suggestions": pins, "block_pin_suggestions": block_pins,
                "ceilings": {"tflops": PEAK_TFLOPS, "gbps": PEAK_GBPS},
                "seconds": round(time.time() - t0, 1)}
    print(f"\n{env['card']}  torch {env['torch']}  triton {env['triton']}  cuDNN {env['cudnn']}  "
          f"({settings['seconds']:.0f} s)")
    if a.json:
        kernel_ab.write_results(a.json, "conv", results, env, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
