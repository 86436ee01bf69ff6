"""Kernel-level A/B of the fused fuse-step (``upsample_add_relu``) and segmentation-head (``seg_head``)
kernels against the torch composition and torch.compile of it, for every distinct fuse-step and head
shape of HRNet w18 and w48 at 1x3x1024x2048 and 8x3x512x1024 (fp16, channels_last by default).

    python benchmarks/bench_fuse_kernels.py                        # full table
    python benchmarks/bench_fuse_kernels.py --no-compile --json results/fuse.json
    python benchmarks/bench_fuse_kernels.py --presets w48 --inputs 1x3x1024x2048 --impls torch,triton

Shapes (see :func:`build_cases`): branch b of a wC model has C * 2**b channels at 1/4, 1/8, 1/16,
1/32 of the input ((s + 1) // 2 per halving). The fuse step into target branch i of a module with B
branches reads base x_i and one contribution per source j != i, already converted to C_i channels:
j > i at branch j's size (resized), j < i at branch i's size (added as is). The head (after the
head rewrite) reads base W0 x0 + b at branch 0's size with Cs = 15C channels and the per-branch
projections at their own sizes (also Cs channels), then the 19-class 1x1 classifier.

Timing: ``triton.testing.do_bench`` median (it clears L2 before every call: cold-cache figures), or
``do_bench_cudagraph`` with ``--graphs`` (launch overhead removed). GB/s counts every input byte read
once and every output byte written once; the ceiling is the device copy rate, measured on the card
at start (a 1 GiB copy; 4.19-4.21 TB/s on an H200) unless ``--ceiling-tbs`` gives it. Inputs
have the layout the engine feeds the kernels on CUDA: branch widths padded to multiples of 8 and
contributions that are channel slices of batched conv outputs (``--dense`` for dense tensors). Implementations are entries of ``IMPLEMENTATIONS``
(name -> factory(case, tensors) -> zero-argument callable); a ``cuda`` column is one more entry.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch._dynamo
import torch.nn.functional as F

try:  # run as a plain script from the repository root or from benchmarks/
    import hrnet_fast  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# wC presets: stage 2..4 have 2..4 branches; modules per stage (how often each fuse shape runs).
PRESET_WIDTHS = {"w18": 18, "w48": 48}
MODULES_PER_STAGE = {2: 1, 3: 4, 4: 3}  # branches -> modules (wC presets)
DEFAULT_INPUTS = ((1, 3, 1024, 2048), (8, 3, 512, 1024))
HEAD_CHANNEL_FACTOR = 15  # C + 2C + 4C + 8C
COPY_CEILING_TBS = 4.2


@dataclass(frozen=True)
class Case:
    """One kernel shape. base/contributions are [N, C, H, W]; classes > 0 makes it a head case."""
    kind: str                                   # "fuse" | "head"
    preset: str
    input: Tuple[int, int, int, int]
    name: str
    base: Tuple[int, int, int, int]
    contributions: Tuple[Tuple[int, int, int, int], ...]
    classes: int = 0
    calls_per_forward: int = 1
    # Per contribution, (channels of the batched conv output it is a slice of, first channel), or
    # None for a dense tensor: the layout the engine's plan really feeds the kernel.
    slices: Tuple[Optional[Tuple[int, int]], ...] = ()

    @property
    def out_shape(self) -> Tuple[int, int, int, int]:
        n, c, h, w = self.base
        return (n, self.classes, h, w) if self.kind == "head" else self.base

    def bytes_moved(self, elem_size: int) -> int:
        """Bytes read once (base, contributions, classifier) + bytes written once (output)."""
        def numel(s):
            out = 1
            for x in s:
                out *= x
            return out
        total = numel(self.base) + sum(numel(c) for c in self.contributions) + numel(self.out_shape)
        if self.kind == "head":
            total += self.classes * self.base[1] + self.classes
        return total * elem_size


def branch_sizes(height: int, width: int, branches: int = 4) -> List[Tuple[int, int]]:
    """Spatial size of each branch: the stem halves twice, every further branch once ((s+1)//2)."""
    h, w = (height + 1) // 2, (width + 1) // 2
    h, w = (h + 1) // 2, (w + 1) // 2
    sizes = [(h, w)]
    for _ in range(branches - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


def _round_up(c: int, m: int) -> int:
    return (c + m - 1) // m * m


def _stacked(widths: Sequence[int], m: int) -> Tuple[int, List[int]]:
    """Channels and split starts of a horizontally batched conv whose splits have ``widths``,
    each split starting at a multiple of m (the plan's aligned stacking)."""
    starts, end = [], 0
    for w in widths:
        start = _round_up(end, m)
        starts.append(start)
        end = start + w
    return end, starts


def model_slices(chans: Sequence[int], nb: int, i: int, m: int) -> List[Optional[Tuple[int, int]]]:
    """How the engine's plan hands the fuse into target i (of nb branches) its contributions, in
    the order j != i: j > i is a slice of source j's batched 1x1 convs (targets 0..j-1); j = i-1 is
    the first slice of source j's batched stride-2 convs (targets j+1..nb-1; the chains to j+2 and
    beyond carry C_j channels); a longer chain ends in a conv of its own (dense)."""
    out: List[Optional[Tuple[int, int]]] = []
    for j in range(nb):
        if j == i:
            continue
        if j > i:
            total, starts = _stacked([chans[t] for t in range(j)], m)
            out.append((total, starts[i]))
        elif j == i - 1:
            widths = [chans[j + 1]] + [chans[j]] * (nb - j - 2)
            total, starts = _stacked(widths, m)
            out.append((total, starts[0]))
        else:
            out.append(None)
    return out


def build_cases(presets: Sequence[str] = ("w18", "w48"),
                inputs: Sequence[Tuple[int, int, int, int]] = DEFAULT_INPUTS,
                num_classes: int = 19, channel_multiple: int = 8,
                model_layout: bool = True) -> List[Case]:
    """Every distinct fuse-step and head shape of the given wC presets at the given input sizes.

    ``channel_multiple`` pads branch widths as the engine's plan does on CUDA (8: w18's 18/36
    channels run as 24/40); ``model_layout`` makes contributions the channel slices of batched
    conv outputs that the plan produces (dense tensors otherwise, which flatter the kernel)."""
    cases: List[Case] = []
    seen = set()
    for preset in presets:
        if preset not in PRESET_WIDTHS:
            raise ValueError(f"unknown preset {preset!r} (choose from {sorted(PRESET_WIDTHS)})")
        c = PRESET_WIDTHS[preset]
        for inp in inputs:
            n, _, height, width = inp
            sizes = branch_sizes(height, width)
            chans = [_round_up(c * 2 ** b, channel_multiple) for b in range(4)]
            tag = f"{preset} {n}x{inp[1]}x{height}x{width}"
            for nb in (2, 3, 4):
                for i in range(nb):
                    base = (n, chans[i]) + sizes[i]
                    contribs = tuple((n, chans[i]) + (sizes[j] if j > i else sizes[i])
                                     for j in range(nb) if j != i)
                    key = ("fuse", base, contribs)
                    if key in seen:
                        continue
                    seen.add(key)
                    slices = tuple(model_slices(chans, nb, i, channel_multiple)) if model_layout else ()
                    cases.append(Case("fuse", preset, tuple(inp), f"{tag} stage{nb} ->b{i}", base,
                                      contribs, 0, MODULES_PER_STAGE[nb], slices))
            cs = _round_up(HEAD_CHANNEL_FACTOR * c, channel_multiple)
            base = (n, cs) + sizes[0]
            contribs = tuple((n, cs) + sizes[j] for j in range(1, 4))
            key = ("head", base, contribs, num_classes)
            if key not in seen:
                seen.add(key)
                cases.append(Case("head", preset, tuple(inp), f"{tag} head", base, contribs,
                                  num_classes, 1))
    return cases


# ------------------------------------------------------------------------------------------------
# tensors and implementations
# ------------------------------------------------------------------------------------------------
@dataclass
class CaseTensors:
    base: torch.Tensor
    contributions: List[torch.Tensor]
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    mode: str = "bilinear"
    align_corners: bool = False


def make_tensors(case: Case, dtype: torch.dtype, channels_last: bool, device="cuda",
                 mode: str = "bilinear", align_corners: bool = False, seed: int = 0) -> CaseTensors:
    """Random inputs (never zeros: they hide unwritten outputs)."""
    g = torch.Generator(device=device).manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rnd(shape):
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype) \
            .contiguous(memory_format=fmt)

    def contribution(shape, where):
        if where is None:
            return rnd(shape)
        total, start = where  # a channel slice of a wider batched conv output
        n, c, h, w = shape
        return rnd((n, total, h, w))[:, start:start + c]

    slices = case.slices or (None,) * len(case.contributions)
    t = CaseTensors(rnd(case.base), [contribution(s, w) for s, w in zip(case.contributions, slices)],
                    mode=mode, align_corners=align_corners)
    if case.kind == "head":
        cs = case.base[1]
        t.weight = (torch.randn((case.classes, cs, 1, 1), generator=g, device=device)
                    / cs ** 0.5).to(dtype)
        t.bias = torch.randn((case.classes,), generator=g, device=device).to(dtype)
    return t


def torch_composition(base, contributions, weight=None, bias=None, mode="bilinear",
                      align_corners=False):
    """The unfused reference: F.interpolate + add + ReLU (+ 1x1 classifier for the head)."""
    kw = {} if mode == "nearest" else {"align_corners": align_corners}
    out = base
    size = base.shape[-2:]
    for c in contributions:
        if c.shape[-2:] != size:
            c = F.interpolate(c, size=size, mode=mode, **kw)
        out = out + c
    out = torch.relu(out)
    if weight is not None:
        out = F.conv2d(out, weight, bias)
    return out


def impl_torch(case: Case, t: CaseTensors) -> Callable[[], torch.Tensor]:
    return lambda: torch_composition(t.base, t.contributions, t.weight, t.bias, t.mode,
                                     t.align_corners)


COMPILE_MODE: Optional[str] = None  # torch.compile mode (--compile-mode)


def impl_compile(case: Case, t: CaseTensors) -> Callable[[], torch.Tensor]:
    # Every case recompiles the same function: start from a clean Dynamo cache so the recompile
    # limit never silently turns this column into eager.
    torch._dynamo.reset()
    fn = torch.compile(torch_composition, dynamic=False, mode=COMPILE_MODE)
    return lambda: fn(t.base, t.contributions, t.weight, t.bias, t.mode, t.align_corners)


def impl_triton(case: Case, t: CaseTensors) -> Callable[[], torch.Tensor]:
    if case.kind == "head":
        from hrnet_fast.kernels.seg_head import seg_head
        return lambda: seg_head(t.base, t.contributions, t.weight, t.bias, mode=t.mode,
                                align_corners=t.align_corners)
    from hrnet_fast.kernels.upsample_add_relu import upsample_add_relu
    return lambda: upsample_add_relu(t.base, t.contributions, mode=t.mode,
                                     align_corners=t.align_corners)


def impl_cuda(case: Case, t: CaseTensors) -> Optional[Callable[[], torch.Tensor]]:
    """The CUDA extension (csrc/): the fuse op directly; for the head its resize-sum-ReLU followed by
    the classifier as a cuDNN 1x1 conv (the extension has no fused classifier). None when the
    extension cannot load here (the reason is printed once)."""
    from hrnet_fast import cuda_ext
    ok, why = cuda_ext.cuda_ext_status()
    if not ok:
        if not getattr(impl_cuda, "warned", False):
            print(f"cuda column skipped: {why}")
            impl_cuda.warned = True
        return None
    run = cuda_ext.upsample_add_relu_cuda
    if case.kind == "head":
        return lambda: F.conv2d(run(t.base, t.contributions, mode=t.mode,
                                    align_corners=t.align_corners, relu=True), t.weight, t.bias)
    return lambda: run(t.base, t.contributions, mode=t.mode, align_corners=t.align_corners,
                       relu=True)


def triton_variant(kind: str, config: Tuple[int, ...]):
    """A factory running the Triton kernel of ``kind`` ("fuse" | "head") with a fixed block config
    (fuse: BLOCK_P,BLOCK_C,num_warps; head: BLOCK_P,BLOCK_C,BLOCK_K,num_warps,num_stages), straight
    into a preallocated output (the torch.library op is bypassed). Returns None for other cases."""
    def factory(case: Case, t: CaseTensors) -> Optional[Callable[[], torch.Tensor]]:
        if case.kind != kind:
            return None
        from hrnet_fast.kernels.upsample_add_relu import _launch, output_like
        if kind == "fuse":
            out = output_like(t.base)

            def run():
                _launch(out, t.base, t.contributions, t.mode, t.align_corners, True,
                        config=tuple(config))
                return out
            return run
        from hrnet_fast.kernels.seg_head import _launch_head
        k, c = t.weight.shape[:2]
        out = output_like(t.base, channels=k)
        w2 = t.weight.reshape(k, c).contiguous()

        def run_head():
            _launch_head(out, t.base, t.contributions, w2, t.bias, t.mode, t.align_corners,
                         t.base.dtype == torch.float32, config=tuple(config))
            return out
        return run_head
    return factory


def parse_variant(spec: str) -> Tuple[str, Callable]:
    """'fuse:64,64,8' or 'head:64,32,32,8,1' -> (column name, factory)."""
    kind, _, nums = spec.partition(":")
    config = tuple(int(x) for x in nums.split(",") if x)
    if kind not in ("fuse", "head") or len(config) != (3 if kind == "fuse" else 5):
        raise ValueError(f"bad --triton-configs entry {spec!r}: use fuse:BLOCK_P,BLOCK_C,WARPS or "
                         "head:BLOCK_P,BLOCK_C,BLOCK_K,WARPS,STAGES")
    return f"tr[{spec}]", triton_variant(kind, config)


# name -> factory(case, tensors) -> zero-argument callable returning the output (or None where the
# implementation does not apply to the case).
IMPLEMENTATIONS: Dict[str, Callable[[Case, CaseTensors], Optional[Callable[[], torch.Tensor]]]] = {
    "torch": impl_torch,
    "compile": impl_compile,
    "triton": impl_triton,
    "cuda": impl_cuda,
}
REFERENCE_IMPL = "torch"


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    case: Case
    bytes: int
    ms: Dict[str, float] = field(default_factory=dict)
    rel_err: Dict[str, float] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def measure(cases: Sequence[Case], impls: Sequence[str], dtype: torch.dtype, channels_last: bool,
            mode: str, align_corners: bool, graphs: bool, rep: int, device: str = "cuda",
            verbose: bool = True) -> List[Row]:
    """Time every implementation on every case; also records each output's relative error against
    the torch composition (a sanity check, not a test)."""
    import triton.testing

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    rows = []
    for case in cases:
        t = make_tensors(case, dtype, channels_last, device=device, mode=mode,
                         align_corners=align_corners)
        row = Row(case, case.bytes_moved(t.base.element_size()))
        ref = impl_torch(case, t)()
        for name in impls:
            try:
                fn = IMPLEMENTATIONS[name](case, t)
                if fn is None:
                    continue
                out = fn()  # warm-up / compile
                sync()
                row.rel_err[name] = _rel_err(out, ref)
                if graphs:
                    ms = triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
                else:
                    ms = triton.testing.do_bench(fn, warmup=max(rep // 4, 5), rep=rep,
                                                 return_mode="median")
                row.ms[name] = float(ms)
            except Exception as e:  # report and go on: one failing column must not hide the rest
                row.errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        rows.append(row)
        if verbose:
            print(_format_row(row, impls), flush=True)
        del t, ref
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _shape_str(case: Case) -> str:
    n, c, h, w = case.base
    src = ",".join(f"{s[2]}x{s[3]}" for s in case.contributions) or "-"
    cls = f" K{case.classes}" if case.kind == "head" else ""
    return f"C{c} {h}x{w} <- [{src}]{cls}"


_CEILING_TBS = COPY_CEILING_TBS


def _width(name: str) -> int:
    return max(10, len(name) + 3)


def _speedup_cols(impls: Sequence[str]) -> List[str]:
    """Speedup of "triton" over every non-Triton column (torch, compile, a future cuda)."""
    if "triton" not in impls:
        return []
    return [n for n in impls if n != "triton" and not n.startswith("tr[")]


def _format_header(impls: Sequence[str]) -> str:
    cols = "".join(f" | {n + ' ms':>{_width(n)}} {'GB/s':>6} {'%ceil':>5}" for n in impls)
    sp = "".join(f" | {'x vs ' + n:>12}" for n in _speedup_cols(impls))
    return f"{'case':<34} {'shape':<44} {'MB':>7}{cols}{sp}"


def _format_row(row: Row, impls: Sequence[str]) -> str:
    s = f"{row.case.name:<34} {_shape_str(row.case):<44} {row.bytes / 1e6:7.1f}"
    for n in impls:
        w = _width(n)
        if n in row.ms:
            gbs = row.bytes / (row.ms[n] * 1e-3) / 1e9
            s += f" | {row.ms[n]:{w}.4f} {gbs:6.0f} {100 * gbs / (_CEILING_TBS * 1e3):5.1f}"
        else:
            s += f" | {'ERR' if n in row.errors else '-':>{w}} {'':>6} {'':>5}"
    for n in _speedup_cols(impls):
        if n in row.ms and "triton" in row.ms:
            s += f" | {row.ms[n] / row.ms['triton']:12.2f}"
        else:
            s += f" | {'-':>12}"
    return s


def _summary(rows: Sequence[Row], impls: Sequence[str]) -> List[str]:
    """Time per forward pass (each shape times how often it runs) per preset/input and impl."""
    lines = ["", "per forward (sum of shape time x calls per forward), ms:"]
    groups: Dict[Tuple[str, Tuple[int, ...]], List[Row]] = {}
    for r in rows:
        groups.setdefault((r.case.preset, r.case.input), []).append(r)
    for (preset, inp), rs in groups.items():
        parts = []
        for n in impls:
            if all(n in r.ms for r in rs):
                parts.append(f"{n} {sum(r.ms[n] * r.case.calls_per_forward for r in rs):.3f}")
        lines.append(f"  {preset} {'x'.join(map(str, inp))}: " + ", ".join(parts))
    errs = [(r.case.name, n, e) for r in rows for n, e in r.errors.items()]
    if errs:
        lines.append("errors:")
        lines += [f"  {c} [{n}]: {e}" for c, n, e in errs]
    bad = [(r.case.name, n, v) for r in rows for n, v in r.rel_err.items() if not v <= 5e-3]
    if bad:
        lines.append("WARNING, outputs that differ from the torch composition (rel err > 5e-3):")
        lines += [f"  {c} [{n}]: {v:.3g}" for c, n, v in bad]
    return lines


def _parse_input(s: str) -> Tuple[int, int, int, int]:
    parts = tuple(int(x) for x in s.lower().split("x"))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"input size must be NxCxHxW, got {s!r}")
    return parts  # type: ignore[return-value]


def measure_copy_tbs() -> float:
    """The card's device-to-device copy rate in TB/s (bytes read + written), 1 GiB, median."""
    import triton.testing
    src = torch.randn(2 ** 29, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12


def main(argv: Optional[Sequence[str]] = None) -> int:
    global _CEILING_TBS, COMPILE_MODE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="w18,w48")
    p.add_argument("--inputs", default=",".join("x".join(map(str, i)) for i in DEFAULT_INPUTS))
    p.add_argument("--impls", default=",".join(IMPLEMENTATIONS),
                   help=f"comma list from {list(IMPLEMENTATIONS)}")
    p.add_argument("--no-compile", action="store_true", help="drop the torch.compile column")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the compile column (default: torch's default)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--nchw", action="store_true", help="contiguous NCHW instead of channels_last")
    p.add_argument("--mode", default="bilinear", choices=["bilinear", "nearest"])
    p.add_argument("--align-corners", action="store_true")
    p.add_argument("--graphs", action="store_true", help="time CUDA-graph replays (no launch cost)")
    p.add_argument("--rep", type=int, default=100, help="ms of timed repetitions per measurement")
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--kind", choices=["all", "fuse", "head"], default="all")
    p.add_argument("--ceiling-tbs", type=float, default=None,
                   help="copy ceiling in TB/s (default: measured on this card, 1 GiB copy)")
    p.add_argument("--dense", action="store_true",
                   help="dense contributions instead of the plan's batched-conv channel slices")
    p.add_argument("--channel-multiple", type=int, default=8,
                   help="branch width padding of the plan (8 on CUDA; 1 = the raw widths)")
    p.add_argument("--triton-configs", default="", metavar="SPECS",
                   help="extra Triton columns with fixed blocks, ';'-separated: "
                        "fuse:BLOCK_P,BLOCK_C,WARPS or head:BLOCK_P,BLOCK_C,BLOCK_K,WARPS,STAGES")
    p.add_argument("--json", metavar="PATH", help="save the results as JSON")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_fuse_kernels: needs a CUDA GPU and none is available; nothing was measured.",
              file=sys.stderr)
        return 2
    if args.mode == "nearest" and args.align_corners:
        p.error("--align-corners only applies to --mode bilinear")
    impls = [s for s in args.impls.split(",") if s]
    if args.no_compile:
        impls = [s for s in impls if s != "compile"]
    for spec in (x.strip() for x in args.triton_configs.split(";")):
        if spec:
            try:
                name, factory = parse_variant(spec)
            except ValueError as e:
                p.error(str(e))
            IMPLEMENTATIONS[name] = factory
            impls.append(name)
    unknown = [s for s in impls if s not in IMPLEMENTATIONS]
    if unknown:
        p.error(f"unknown implementations {unknown}; known: {list(IMPLEMENTATIONS)}")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    _CEILING_TBS = args.ceiling_tbs or measure_copy_tbs()
    args.ceiling_tbs = _CEILING_TBS
    COMPILE_MODE = args.compile_mode
    cases = build_cases([s for s in args.presets.split(",") if s],
                        [_parse_input(s) for s in args.inputs.split(",") if s], args.classes,
                        channel_multiple=args.channel_multiple, model_layout=not args.dense)
    if args.kind != "all":
        cases = [c for c in cases if c.kind == args.kind]

    import triton
    props = torch.cuda.get_device_properties(0)
    meta = {
        "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + list(argv if argv is not None
                                                                     else sys.argv[1:])),
        "dtype": args.dtype, "memory_format": "nchw" if args.nchw else "channels_last",
        "mode": args.mode, "align_corners": args.align_corners,
        "timer": "do_bench_cudagraph median" if args.graphs else "do_bench median (L2 cleared)",
        "ceiling_tbs": args.ceiling_tbs, "reference": REFERENCE_IMPL,
        "compile_mode": args.compile_mode or "default",
    }
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    print(_format_header(impls))
    rows = measure(cases, impls, dtype, not args.nchw, args.mode, args.align_corners, args.graphs,
                   args.rep)
    for line in _summary(rows, impls):
        print(line)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        out = {"meta": meta, "rows": []}
        for r in rows:
            d = {"case": asdict(r.case), "bytes": r.bytes, "ms": r.ms, "rel_err": r.rel_err,
                 "errors": r.errors,
                 "gbps": {n: r.bytes / (v * 1e-3) / 1e9 for n, v in r.ms.items()}}
            if "triton" in r.ms:
                d["speedup_triton_vs"] = {n: v / r.ms["triton"] for n, v in r.ms.items()
                                          if n != "triton"}
            out["rows"].append(d)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
