"""Kernel-level A/B of the fused fuse-step (``upsample_add_relu``) and segmentation-head (``seg_head``)
kernels against the torch composition and torch.compile of it, for every distinct fuse-step and head
shape of HRNet presets (default w18 and w48) at 1x3x1024x2048 and 8x3x512x1024 (fp16,
channels_last by default).

    python benchmarks/bench_fuse_kernels.py                        # full table
    python benchmarks/bench_fuse_kernels.py --no-compile --json results/fuse.json
    python benchmarks/bench_fuse_kernels.py --presets w48 --inputs 1x3x1024x2048 --impls torch,triton
    python benchmarks/bench_fuse_kernels.py --list --presets w18_small_v2     # the cases, no GPU
    python benchmarks/bench_fuse_kernels.py --cpu-smoke --presets w18_small_v1 --inputs 1x3x32x32

Shapes (:func:`build_cases`) are the fuse and head calls the engine makes in one forward of the
preset's plan, recorded on the ``meta`` device (``benchmarks/kernel_ab.py``); each distinct call is
one case, ``calls_per_forward`` says how often it runs. Inputs have the layout the engine feeds the
kernels on CUDA: branch widths padded to multiples of 8 (``--channel-multiple``) and contributions
that are channel slices of batched conv outputs (``--dense`` for dense tensors).

Timing (``benchmarks/kernel_ab.py``): ``triton.testing.do_bench`` median (it clears L2 before every
call: cold-cache figures), or ``do_bench_cudagraph`` with ``--graphs`` (launch overhead removed).
GB/s counts every input byte read once and every output byte written once; the ceiling is the
device copy rate, measured on the card at start (a 1 GiB copy; 4.19-4.21 TB/s on an H200) unless
``--ceiling-tbs`` gives it. Implementations are entries of ``IMPLEMENTATIONS`` (name ->
factory(case, tensors) -> zero-argument callable).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # kernel_ab, beside this file
import kernel_ab  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hrnet_fast.backends.recording import HeadProblem  # noqa: E402

DEFAULT_PRESETS = ("w18", "w48")
DEFAULT_INPUTS = ((1, 3, 1024, 2048), (8, 3, 512, 1024))
COPY_CEILING_TBS = 4.2
Shape = Tuple[int, int, int, int]


@dataclass(frozen=True)
class Case:
    """One kernel shape. base/contributions are [N, C, H, W]; classes > 0 makes it a head case."""
    kind: str                                   # "fuse" | "head"
    preset: str
    input: Shape
    name: str
    base: Shape
    contributions: Tuple[Shape, ...]
    classes: int = 0
    calls_per_forward: int = 1
    # Per contribution, (channels of the batched conv output it is a slice of, first channel), or
    # None for a dense tensor: the layout the engine's plan really feeds the kernel.
    slices: Tuple[Optional[Tuple[int, int]], ...] = ()

    @property
    def out_shape(self) -> Shape:
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


def _case(kind: str, preset: str, inp: Shape, name: str, p, classes: int,
          model_layout: bool) -> Case:
    """A Case from a recorded FuseProblem / HeadProblem."""
    if kernel_ab.channel_slice(p.base) is not None:
        raise ValueError(f"{name}: the base is a channel slice ({p.base}); cases have dense bases")
    slices = tuple(kernel_ab.channel_slice(c) for c in p.contributions)
    return Case(kind, preset, inp, name, p.base.shape, tuple(c.shape for c in p.contributions),
                classes, 1, slices if model_layout else ())


def build_cases(presets: Sequence[str] = DEFAULT_PRESETS,
                inputs: Sequence[Shape] = DEFAULT_INPUTS,
                num_classes: int = 19, channel_multiple: int = 8,
                model_layout: bool = True) -> List[Case]:
    """Every distinct fuse-step and head call of one forward of each preset at each input size,
    with ``calls_per_forward`` = how often the engine makes it.

    ``channel_multiple`` pads branch widths as the engine's plan does on CUDA (8: w18's 18/36
    channels run as 24/40; 1: the raw widths); ``model_layout`` keeps contributions the channel
    slices of batched conv outputs that the plan produces (dense tensors otherwise, which flatter
    the kernel). Names: preset, input, stage (stage s fuses s branches) and target branch."""
    cases: List[Case] = []
    for preset in kernel_ab.check_presets(presets):
        for inp in inputs:
            n, c, height, width = inp
            problems = kernel_ab.recorded(preset, n, height, width, channel_multiple, num_classes, c)
            tag = f"{preset} {kernel_ab.size_tag(inp)}"
            found: Dict[tuple, Case] = {}

            def add(case: Case) -> None:
                key = (case.kind, case.base, case.contributions, case.slices, case.classes)
                old = found.get(key)
                found[key] = case if old is None else replace(
                    old, calls_per_forward=old.calls_per_forward + 1)

            for module in kernel_ab.fuse_modules(problems):
                for target, p in enumerate(module):
                    stage = len(p.contributions) + 1
                    add(_case("fuse", preset, tuple(inp), f"{tag} stage{stage} ->b{target}", p, 0,
                              model_layout))
            for p in problems:
                if isinstance(p, HeadProblem):
                    add(_case("head", preset, tuple(inp), f"{tag} head", p, p.weight[0],
                              model_layout))
            cases.extend(found.values())
    return cases


def describe_case(case: Case) -> str:
    """One line for ``--list``: name, calls per forward, base and contributions (slices)."""
    parts = []
    for shape, where in zip(case.contributions, case.slices or (None,) * len(case.contributions)):
        layout = f"[{where[1]}:{where[1] + shape[1]} of {where[0]}]" if where else ""
        parts.append(kernel_ab.size_tag(shape) + layout)
    cls = f" K{case.classes}" if case.kind == "head" else ""
    return (f"{case.name:<36} x{case.calls_per_forward:<2} base {kernel_ab.size_tag(case.base)}"
            f"{cls} <- {', '.join(parts) or '-'}")


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
    import torch._dynamo  # imports triton: not before a --cpu-smoke run sets the interpreter
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
Result = Tuple[Case, kernel_ab.CaseResult]


def measure(cases: Sequence[Case], impls: Sequence[str], dtype: torch.dtype, channels_last: bool,
            mode: str, align_corners: bool, timer: str, rep: int, device: str = "cuda",
            verbose: bool = True) -> List[Result]:
    """Time every implementation on every case (``kernel_ab.measure_case``); each output's
    relative error is against the torch composition (a sanity check, not a test)."""
    results = []
    for case in cases:
        t = make_tensors(case, dtype, channels_last, device=device, mode=mode,
                         align_corners=align_corners)
        fns = {}
        for name in impls:
            fn = IMPLEMENTATIONS[name](case, t)
            if fn is not None:
                fns[name] = fn
        info = {"kind": case.kind, "preset": case.preset, "input": kernel_ab.size_tag(case.input),
                "shape": _shape_str(case), "calls_per_forward": case.calls_per_forward}
        r = kernel_ab.measure_case(case.name, info, case.bytes_moved(t.base.element_size()), 0.0,
                                   fns, impl_torch(case, t), timer=timer, rep=rep, device=device)
        results.append((case, r))
        if verbose:
            print(_format_row(case, r, impls), flush=True)
        del t
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return results


def _shape_str(case: Case) -> str:
    n, c, h, w = case.base
    src = ",".join(f"{s[2]}x{s[3]}" for s in case.contributions) or "-"
    cls = f" K{case.classes}" if case.kind == "head" else ""
    return f"C{c} {h}x{w} <- [{src}]{cls}"


_CEILING_TBS = COPY_CEILING_TBS


def _width(name: str) -> int:
    return max(10, len(name) + 3)


def _speedup_cols(impls: Sequence[str]) -> List[str]:
    """Speedup of "triton" over every non-Triton column (torch, compile, cuda)."""
    if "triton" not in impls:
        return []
    return [n for n in impls if n != "triton" and not n.startswith("tr[")]


def _format_header(impls: Sequence[str]) -> str:
    cols = "".join(f" | {n + ' ms':>{_width(n)}} {'GB/s':>6} {'%ceil':>5}" for n in impls)
    sp = "".join(f" | {'x vs ' + n:>12}" for n in _speedup_cols(impls))
    return f"{'case':<34} {'shape':<44} {'MB':>7}{cols}{sp}"


def _format_row(case: Case, r: kernel_ab.CaseResult, impls: Sequence[str]) -> str:
    s = f"{case.name:<34} {_shape_str(case):<44} {r.bytes / 1e6:7.1f}"
    for n in impls:
        w = _width(n)
        if n in r.ms:
            gbs = r.gbps(n)
            s += f" | {r.ms[n]:{w}.4f} {gbs:6.0f} {100 * gbs / (_CEILING_TBS * 1e3):5.1f}"
        else:
            s += f" | {'ERR' if n in r.errors else '-':>{w}} {'':>6} {'':>5}"
    for n in _speedup_cols(impls):
        if n in r.ms and "triton" in r.ms:
            s += f" | {r.ms[n] / r.ms['triton']:12.2f}"
        else:
            s += f" | {'-':>12}"
    return s


def _summary(results: Sequence[Result], impls: Sequence[str]) -> List[str]:
    """Time per forward pass (each shape times how often it runs) per preset/input and impl."""
    lines = ["", "per forward (sum of shape time x calls per forward), ms:"]
    groups: Dict[Tuple[str, Tuple[int, ...]], List[Result]] = {}
    for case, r in results:
        groups.setdefault((case.preset, case.input), []).append((case, r))
    for (preset, inp), rs in groups.items():
        parts = []
        for n in impls:
            if all(n in r.ms for _, r in rs):
                parts.append(f"{n} {sum(r.ms[n] * c.calls_per_forward for c, r in rs):.3f}")
        lines.append(f"  {preset} {kernel_ab.size_tag(inp)}: " + ", ".join(parts))
    errs = [(c.name, n, e) for c, r in results for n, e in r.errors.items()]
    if errs:
        lines.append("errors:")
        lines += [f"  {c} [{n}]: {e}" for c, n, e in errs]
    bad = [(c.name, n, v) for c, r in results for n, v in r.rel_err.items() if not v <= 5e-3]
    if bad:
        lines.append("WARNING, outputs that differ from the torch composition (rel err > 5e-3):")
        lines += [f"  {c} [{n}]: {v:.3g}" for c, n, v in bad]
    return lines


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
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                   help="comma list of preset names (w18_small_v1 ... w64)")
    p.add_argument("--inputs", default=",".join(kernel_ab.size_tag(i) for i in DEFAULT_INPUTS),
                   help="comma list of NxCxHxW input sizes")
    p.add_argument("--impls", default=None,
                   help=f"comma list from {list(IMPLEMENTATIONS)} (default: all; torch,triton "
                        "with --cpu-smoke)")
    p.add_argument("--no-compile", action="store_true", help="drop the torch.compile column")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the compile column (default: torch's default)")
    p.add_argument("--dtype", default="fp16", choices=list(kernel_ab.DTYPES))
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
    p.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="exercise this script on the CPU (Triton interpreter; use a tiny preset "
                        "and input): timings mean nothing")
    p.add_argument("--json", metavar="PATH", help="save the results as JSON (kernel_ab format)")
    args = p.parse_args(argv)

    if args.mode == "nearest" and args.align_corners:
        p.error("--align-corners only applies to --mode bilinear")
    if args.cpu_smoke:
        # The kernels must be defined under the interpreter: before triton is first imported.
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("bench_fuse_kernels: --cpu-smoke needs triton not imported yet", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    elif not args.list and not torch.cuda.is_available():
        print("bench_fuse_kernels: needs a CUDA GPU and none is available; nothing was measured "
              "(--list shows the cases, --cpu-smoke exercises the script).", file=sys.stderr)
        return 2
    try:
        inputs = [kernel_ab.parse_input(s) for s in args.inputs.split(",") if s]
        cases = build_cases([s for s in args.presets.split(",") if s], inputs, args.classes,
                            channel_multiple=args.channel_multiple, model_layout=not args.dense)
    except (ValueError, argparse.ArgumentTypeError) as e:
        p.error(str(e))
    if args.kind != "all":
        cases = [c for c in cases if c.kind == args.kind]
    if args.list:
        for c in cases:
            print(describe_case(c))
        return 0
    device = "cpu" if args.cpu_smoke else "cuda"

    default_impls = ["torch", "triton"] if args.cpu_smoke else list(IMPLEMENTATIONS)
    impls = [s for s in args.impls.split(",") if s] if args.impls else default_impls
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
    dtype = kernel_ab.DTYPES[args.dtype]
    if dtype == torch.float32 and not args.cpu_smoke:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    _CEILING_TBS = args.ceiling_tbs or (COPY_CEILING_TBS if args.cpu_smoke else measure_copy_tbs())
    COMPILE_MODE = args.compile_mode
    timer = "graph" if args.graphs else "events"  # on the CPU (smoke run): one call

    env = kernel_ab.environment(device, argv)
    settings = {
        "dtype": args.dtype, "memory_format": "nchw" if args.nchw else "channels_last",
        "mode": args.mode, "align_corners": args.align_corners, "timer": timer,
        "timer_detail": ("cpu smoke: one call" if args.cpu_smoke else "do_bench_cudagraph median"
                         if args.graphs else "do_bench median (L2 cleared)"),
        "ceiling_tbs": _CEILING_TBS, "reference": REFERENCE_IMPL,
        "compile_mode": args.compile_mode or "default", "channel_multiple": args.channel_multiple,
        "layout": "dense" if args.dense else "plan slices",
    }
    print(" ".join(f"{k}={v}" for k, v in {**env, **settings}.items()))
    print(_format_header(impls))
    results = measure(cases, impls, dtype, not args.nchw, args.mode, args.align_corners, timer,
                      args.rep, device=device)
    for line in _summary(results, impls):
        print(line)
    if args.json:
        kernel_ab.write_results(args.json, "fuse", [r for _, r in results], env, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
