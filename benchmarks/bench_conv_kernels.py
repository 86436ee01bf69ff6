"""A/B of the Triton conv kernels against cuDNN on every distinct conv shape of HRNet w18 / w48.

    python benchmarks/bench_conv_kernels.py                       # w18 and w48 at 1x3x1024x2048, fp16
    python benchmarks/bench_conv_kernels.py --presets w48 --json results/conv_ab.json
    python benchmarks/bench_conv_kernels.py --compile              # + torch.compile max-autotune (slow)
    python benchmarks/bench_conv_kernels.py --flat-k-ab            # + Triton with the other K walk

Variants per conv (same inputs, channels_last, the epilogue the inference plan needs):
  triton       hrnet_fast.kernels.conv.conv2d_bias_act (bias + residual + ReLU fused, one launch)
  cudnn        F.conv2d(x, w, b) then separate residual add and ReLU (what eager PyTorch does)
  cudnn_fused  torch.cudnn_convolution_relu / torch.cudnn_convolution_add_relu where the epilogue fits
               (ReLU on all channels); '-' otherwise
  compile      torch.compile(mode="max-autotune-no-cudagraphs") of the cudnn variant (--compile)
Chains (fuse-step stride-2 chains j -> i): triton strided_chain (one launch) vs the unfused F.conv2d
chain + add, and vs the per-step Triton conv chain.

Times (ms) are medians of triton.testing.do_bench_cudagraph (default: GPU time without launch overhead,
as in the engine's CUDA graph) or of triton.testing.do_bench (--timer events: eager calls, L2 flushed).
"vs best cudnn" = best cuDNN variant time / Triton time (> 1: Triton faster); "err~cudnn" = relative
difference of the Triton output to the cuDNN output in the same dtype (a sanity check, not the accuracy
test, which lives in tests/test_kernels_conv.py). TFLOP/s counts 2*MACs; GB/s counts the bytes of
input, weight, residual and output once each. Ceilings (H200 measurements): 761 TFLOP/s, 4.2 TB/s.
``build_shapes(preset, height, width, batch)`` and ``build_chains(...)`` are importable (no GPU needed).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:      # run as `python benchmarks/bench_conv_kernels.py` from anywhere
    sys.path.insert(0, _ROOT)

_DEVICE = "cuda"          # the --cpu-smoke option switches to "cpu" (Triton interpreter, tiny sizes)
_TIMER = "graph"          # --timer: "graph" (do_bench_cudagraph) or "events" (do_bench)

PEAK_TFLOPS = 761.0
PEAK_GBPS = 4200.0

WIDTHS = {"w18": 18, "w30": 30, "w32": 32, "w40": 40, "w44": 44, "w48": 48, "w64": 64}


@dataclass
class ConvShape:
    name: str                 # where it occurs in HRNet
    cin: int
    cout: int
    k: int
    stride: int
    h: int                    # input height
    w: int                    # input width
    residual: bool = False
    relu: bool = True
    relu_ranges: Optional[List[Tuple[int, int]]] = None
    batch: int = 1
    count: int = 1            # how many times it occurs in one forward pass (informational)

    @property
    def ho(self) -> int:
        return (self.h + 2 * (self.k // 2) - self.k) // self.stride + 1

    @property
    def wo(self) -> int:
        return (self.w + 2 * (self.k // 2) - self.k) // self.stride + 1

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

    def sizes(self) -> List[Tuple[int, int]]:
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


def _half(s: int) -> int:
    return (s + 1) // 2


def build_shapes(preset: str = "w48", height: int = 1024, width: int = 2048, batch: int = 1,
                 num_classes: int = 19) -> List[ConvShape]:
    """Every distinct conv of the BN-folded segmentation HRNet-``preset`` plan (wC presets: stage 1 one
    Bottleneck module of 4 blocks, stages 2-4 of 1/4/3 modules of 4 BasicBlocks per branch), with the
    plan's rewrites: horizontally stacked fuse convs, and the head 1x1 conv applied per branch."""
    C = WIDTHS[preset]
    chans = [C, 2 * C, 4 * C, 8 * C]
    h1, w1 = _half(height), _half(width)
    h2, w2 = _half(h1), _half(w1)
    res = [(h2, w2)]
    for _ in range(3):
        res.append((_half(res[-1][0]), _half(res[-1][1])))
    s: List[ConvShape] = []

    def add(*a, **kw):
        s.append(ConvShape(*a, batch=batch, **kw))

    add("stem.conv1", 3, 64, 3, 2, height, width)
    add("stem.conv2", 64, 64, 3, 2, h1, w1)
    H, W = res[0]
    add("layer1.conv1 (block 0)", 64, 64, 1, 1, H, W)
    add("layer1.conv2", 64, 64, 3, 1, H, W, count=4)
    add("layer1.conv3 +res", 64, 256, 1, 1, H, W, residual=True, count=4)
    add("layer1.downsample", 64, 256, 1, 1, H, W, relu=False)
    add("layer1.conv1 (blocks 1-3)", 256, 64, 1, 1, H, W, count=3)
    add("transition1.0", 256, C, 3, 1, H, W)
    add("transition1.1 s2", 256, 2 * C, 3, 2, H, W)
    add("transition2.2 s2", 2 * C, 4 * C, 3, 2, *res[1])
    add("transition3.3 s2", 4 * C, 8 * C, 3, 2, *res[2])
    blocks = {0: 4 * (1 + 4 + 3), 1: 4 * (1 + 4 + 3), 2: 4 * (4 + 3), 3: 4 * 3}
    for b in range(4):
        add(f"branch{b}.conv1", chans[b], chans[b], 3, 1, *res[b], count=blocks[b])
        add(f"branch{b}.conv2 +res", chans[b], chans[b], 3, 1, *res[b], residual=True, count=blocks[b])
    # Fuse 1x1 convs, stacked per source j over the targets i < j (no ReLU; upsample-add follows).
    add("fuse1x1 src1 (2C->C)", 2 * C, C, 1, 1, *res[1], relu=False, count=1 + 4 + 3)
    add("fuse1x1 src2 (4C->C+2C)", 4 * C, 3 * C, 1, 1, *res[2], relu=False, count=4 + 3)
    add("fuse1x1 src3 (8C->C+2C+4C)", 8 * C, 7 * C, 1, 1, *res[3], relu=False, count=3)
    # Fuse stride-2 convs: first convs of all chains leaving j, stacked; ReLU on the non-final ranges.
    add("fuse s2 src0->1 (stage 2)", C, 2 * C, 3, 2, *res[0], relu=False, count=1)
    add("fuse s2 src0 stacked (stage 3)", C, 2 * C + C, 3, 2, *res[0], relu_ranges=[(2 * C, 3 * C)], count=4)
    add("fuse s2 src0 stacked (stage 4)", C, 2 * C + 2 * C, 3, 2, *res[0],
        relu_ranges=[(2 * C, 4 * C)], count=3)
    add("fuse s2 src1->2", 2 * C, 4 * C, 3, 2, *res[1], relu=False, count=4)
    add("fuse s2 src1 stacked (stage 4)", 2 * C, 4 * C + 2 * C, 3, 2, *res[1],
        relu_ranges=[(4 * C, 6 * C)], count=3)
    add("fuse s2 src2->3", 4 * C, 8 * C, 3, 2, *res[2], relu=False, count=3)
    # Remaining chain steps (when not run by the chain kernel).
    add("chain step C->C s2 (0->3)", C, C, 3, 2, *res[1], count=3)
    add("chain last C->4C s2 (0->2)", C, 4 * C, 3, 2, *res[1], relu=False, count=4 + 3)
    add("chain last C->8C s2 (0->3)", C, 8 * C, 3, 2, *res[2], relu=False, count=3)
    add("chain last 2C->8C s2 (1->3)", 2 * C, 8 * C, 3, 2, *res[2], relu=False, count=3)
    # Head: the official last_layer on the concat, and the rewrite (1x1 per branch at its resolution).
    cs = sum(chans)
    add(f"head last_layer.0 concat ({cs}->{cs})", cs, cs, 1, 1, *res[0])
    for b in range(4):
        add(f"head rewrite branch{b} ({chans[b]}->{cs})", chans[b], cs, 1, 1, *res[b], relu=False)
    add(f"head classifier ({cs}->{num_classes})", cs, num_classes, 1, 1, *res[0], relu=False)
    # Deduplicate identical problems (keep the first name, add counts).
    out: Dict[Tuple, ConvShape] = {}
    for c in s:
        key = (c.cin, c.cout, c.k, c.stride, c.h, c.w, c.residual, c.relu,
               tuple(c.relu_ranges) if c.relu_ranges else None, c.batch)
        if key in out:
            out[key].count += c.count
            out[key].name += " = " + c.name
        else:
            out[key] = c
    return list(out.values())


def build_chains(preset: str = "w48", height: int = 1024, width: int = 2048, batch: int = 1) -> List[ChainShape]:
    """The fuse-step stride-2 chains of 2 and 3 steps: 0->2, 1->3, 0->3."""
    C = WIDTHS[preset]
    chans = [C, 2 * C, 4 * C, 8 * C]
    h, w = _half(_half(height)), _half(_half(width))
    res = [(h, w)]
    for _ in range(3):
        res.append((_half(res[-1][0]), _half(res[-1][1])))
    return [
        ChainShape("chain 0->2", chans[0], chans[2], 2, *res[0], batch=batch),
        ChainShape("chain 1->3", chans[1], chans[3], 2, *res[1], batch=batch),
        ChainShape("chain 0->3", chans[0], chans[3], 3, *res[0], batch=batch),
    ]


# --------------------------------------------------------------------------------------------------
# Measuring (GPU only)
# --------------------------------------------------------------------------------------------------

def _bench(fn) -> float:
    if _DEVICE != "cuda":  # smoke run: one timed call, no statistics
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing
    if _TIMER == "graph":
        # GPU time of back-to-back replays in one CUDA graph: no launch / dispatch overhead (the engine
        # runs the network as a CUDA graph too); L2 is not flushed between replays.
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
        except Exception as exc:  # capture failed: fall back to event timing and say so
            print(f"  (CUDA graph timing failed: {type(exc).__name__}: {str(exc)[:120]}; using events)")
    # Event timing around eager calls, L2 flushed before each call; includes launch overhead when the
    # kernel is shorter than the host-side dispatch.
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _conv_variants(c: ConvShape, dtype, use_compile: bool, flat_k_ab: bool):
    import torch
    import torch.nn.functional as F
    from hrnet_fast.kernels import conv as kconv

    dev = torch.device(_DEVICE)
    cl = torch.channels_last
    x = torch.randn(c.batch, c.cin, c.h, c.w, device=dev).to(dtype).contiguous(memory_format=cl)
    wt = (torch.randn(c.cout, c.cin, c.k, c.k, device=dev) / math.sqrt(c.cin * c.k * c.k)).to(dtype)
    wt = wt.contiguous(memory_format=cl)
    b = (torch.randn(c.cout, device=dev) * 0.1).to(dtype)
    r = (torch.randn(c.batch, c.cout, c.ho, c.wo, device=dev).to(dtype).contiguous(memory_format=cl)
         if c.residual else None)
    wp = kconv.pack_weight(wt)
    pad = c.k // 2
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
    if c.relu and not c.relu_ranges:
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
        def taps_fn():
            old = kconv.FLAT_K_ALIGNED
            kconv.FLAT_K_ALIGNED = False
            try:
                return triton_fn()
            finally:
                kconv.FLAT_K_ALIGNED = old
        variants["triton_taps"] = taps_fn
    elif flat_k_ab and c.cin % 16 and c.cin < 64:
        def flat_fn():
            old = kconv.FLAT_K_MAX_CIN
            kconv.FLAT_K_MAX_CIN = 64
            try:
                return triton_fn()
            finally:
                kconv.FLAT_K_MAX_CIN = old
        variants["triton_flatk"] = flat_fn
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


def run(presets, height, width, batch, dtype_name, use_compile, flat_k_ab, check=True) -> List[dict]:
    import torch
    from hrnet_fast.kernels import triton_status

    ok, why = triton_status(_DEVICE)
    if not ok:
        raise SystemExit(f"bench_conv_kernels: {why}")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    elem = torch.empty((), dtype=dtype).element_size()
    rows: List[dict] = []
    for preset in presets:
        work = [("conv", c) for c in build_shapes(preset, height, width, batch)]
        work += [("chain", c) for c in build_chains(preset, height, width, batch)]
        for kind, c in work:
            torch.manual_seed(0)
            if kind == "conv":
                variants, ref_fn = _conv_variants(c, dtype, use_compile, flat_k_ab)
                desc = f"{c.cin}->{c.cout} k{c.k} s{c.stride} {c.h}x{c.w}"
            else:
                variants, ref_fn = _chain_variants(c, dtype)
                desc = f"{c.cj}->{c.ci} x{c.steps} s2 {c.h}x{c.w}"
            row = {"preset": preset, "kind": kind, "name": c.name, "shape": desc, "dtype": dtype_name,
                   "flops": c.flops(), "bytes": c.bytes(elem), "ms": {}, "max_rel_err": None}
            if kind == "conv":
                row["count"] = c.count
            ref = ref_fn().float()
            worst = 0.0
            for vname, fn in variants.items():
                try:
                    out = fn()          # warm-up: JIT compile + autotune happen here, not in the timing
                    if check:
                        e = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
                        worst = max(worst, e) if vname.startswith("triton") else worst
                    row["ms"][vname] = _bench(fn)
                except Exception as exc:  # a variant that does not apply / fails is reported, not fatal
                    row["ms"][vname] = None
                    row.setdefault("errors", {})[vname] = f"{type(exc).__name__}: {exc}"[:200]
            row["max_rel_err"] = worst
            rows.append(row)
            _print_row(row, header=len(rows) == 1)
            sys.stdout.flush()
    return rows


def _print_row(row: dict, header: bool = False) -> None:
    if header:
        print(f"{'preset':6} {'shape':32} {'variant ms':60} {'TFLOP/s':>8} {'GB/s':>7} {'%roof':>6} "
              f"{'vs best cudnn':>13} {'err~cudnn':>9}  name")
    ms = row["ms"]
    parts = [f"{k}={v:.4f}" for k, v in ms.items() if v is not None]
    tri = ms.get("triton", ms.get("triton_chain"))
    cud = [v for k, v in ms.items() if k.startswith("cudnn") and v is not None]
    if tri:
        tfl = row["flops"] / tri / 1e9
        gbs = row["bytes"] / tri / 1e6
        roof = max(tfl / PEAK_TFLOPS, gbs / PEAK_GBPS) * 100
        sp = f"{min(cud) / tri:.2f}x" if cud else "-"
        print(f"{row['preset']:6} {row['shape']:32} {' '.join(parts):60} {tfl:8.1f} {gbs:7.0f} {roof:5.0f}% "
              f"{sp:>13} {row['max_rel_err']:9.1e}  {row['name']}")
    else:
        print(f"{row['preset']:6} {row['shape']:32} {' '.join(parts):60}  (triton failed: "
              f"{row.get('errors')})  {row['name']}")


def _summary(rows: List[dict]) -> None:
    print("\nWeighted by occurrence count (convs only), sum of medians in ms:")
    for preset in sorted({r["preset"] for r in rows}):
        tot: Dict[str, float] = {}
        for r in rows:
            if r["preset"] != preset or r["kind"] != "conv":
                continue
            best_cudnn = min([v for k, v in r["ms"].items() if k.startswith("cudnn") and v], default=None)
            for k, v in (("triton", r["ms"].get("triton")), ("cudnn", r["ms"].get("cudnn")),
                         ("best_cudnn", best_cudnn)):
                if v is not None:
                    tot[k] = tot.get(k, 0.0) + v * r.get("count", 1)
        print(f"  {preset}: " + "  ".join(f"{k}={v:.3f}" for k, v in tot.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="w18,w48")
    p.add_argument("--size", default="1024x2048", help="input HxW")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--compile", action="store_true", help="add torch.compile max-autotune-no-cudagraphs (slow)")
    p.add_argument("--flat-k-ab", action="store_true",
                   help="add Triton with the other K walk: per-tap where flat K is the default "
                        "(Cin %% 8 == 0, Cin %% 32 != 0), flat K for other Cin %% 16 != 0, Cin < 64")
    p.add_argument("--json", default=None, help="write the rows and the environment to this JSON file")
    p.add_argument("--list", action="store_true", help="print the shape list and exit (no GPU needed)")
    p.add_argument("--timer", default="graph", choices=["graph", "events"],
                   help="graph: median GPU time of CUDA-graph replays (default); events: do_bench on eager "
                        "calls with L2 flush (includes launch overhead for short kernels)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="exercise this script on the CPU (Triton interpreter; use a tiny --size): no timings")
    a = p.parse_args(argv)
    h, w = (int(v) for v in a.size.lower().split("x"))
    presets = [s.strip() for s in a.presets.split(",") if s.strip()]
    if a.list:
        for pr in presets:
            for c in build_shapes(pr, h, w, a.batch):
                print(pr, asdict(c))
            for c in build_chains(pr, h, w, a.batch):
                print(pr, asdict(c))
        return 0
    global _TIMER
    _TIMER = a.timer
    if a.cpu_smoke:
        global _DEVICE
        _DEVICE = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported (hrnet_fast.kernels.conv)
        if "triton" in sys.modules:
            print("bench_conv_kernels: --cpu-smoke needs triton not imported yet", file=sys.stderr)
            return 2
    import torch
    if not a.cpu_smoke and not torch.cuda.is_available():
        print("bench_conv_kernels: no CUDA GPU available; this A/B needs one (use --list to see the shapes).",
              file=sys.stderr)
        return 2
    t0 = time.time()
    rows = run(presets, h, w, a.batch, a.dtype, a.compile, a.flat_k_ab)
    _summary(rows)
    import triton
    env = {"device": torch.cuda.get_device_name() if _DEVICE == "cuda" else "cpu (interpreter smoke run)",
           "torch": torch.__version__, "triton": triton.__version__,
           "cudnn": torch.backends.cudnn.version() if _DEVICE == "cuda" else None,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "command": " ".join(sys.argv), "size": a.size, "batch": a.batch, "dtype": a.dtype,
           "memory_format": "channels_last", "seconds": time.time() - t0, "timer": _TIMER,
           "ceilings": {"tflops": PEAK_TFLOPS, "gbps": PEAK_GBPS}}
    print(f"\n{env['device']}  torch {env['torch']}  triton {env['triton']}  cuDNN {env['cudnn']}  "
          f"({env['seconds']:.0f} s)")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
