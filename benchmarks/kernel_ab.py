"""What the kernel A/B scripts (``bench_fuse_kernels.py``, ``bench_conv_kernels.py``) share.

* Shapes: :func:`recorded` runs a preset's plan on the ``meta`` device with the shape-recording
  backend (``hrnet_fast/backends/recording.py``) and returns every problem one forward hands the
  backend. Nothing here re-derives HRNet's branch arithmetic; :func:`channel_slice` and
  :func:`fuse_modules` only read the recorded layouts and call order.
* Timing: :func:`median_ms`, the median of ``triton.testing.do_bench_cudagraph`` (``"graph"``: CUDA
  graph replays, no launch cost, L2 not flushed) or ``do_bench`` (``"events"``: eager calls, L2
  flushed before each); on the CPU (smoke runs) one timed call.
* Running and results: :func:`measure_case` runs every implementation of one case once (its
  relative error to the reference, ``||out - ref|| / ||ref||``: a sanity check, not a test) and
  times it; a failing implementation is recorded, not fatal. :func:`write_results` saves one JSON
  format for both scripts: ``{"bench", "settings", "rows"}``, one row per (case, implementation)
  with the keys of :data:`ROW_KEYS`.

Triton is imported lazily: a ``--cpu-smoke`` run must set ``TRITON_INTERPRET=1`` first.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from hrnet_fast.backends.recording import (FuseProblem, Problem, TensorInfo,  # noqa: E402
                                           record_problems)
from hrnet_fast.check import rel_err  # noqa: E402
from hrnet_fast.config import PRESET_NAMES, HRNetConfig  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ROW_KEYS = ("bench", "case", "kind", "preset", "input", "shape", "calls_per_forward", "impl",
            "median_ms", "gbps", "tflops", "rel_err", "error", "dtype", "timer", "card", "torch",
            "triton", "command")


# ------------------------------------------------------------------------------------------ shapes
def parse_input(text: str) -> Tuple[int, int, int, int]:
    """'1x3x1024x2048' -> (1, 3, 1024, 2048)."""
    try:
        parts = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"input size must be NxCxHxW (positive ints), got {text!r}")
    return parts  # type: ignore[return-value]


def check_presets(presets: Sequence[str]) -> List[str]:
    """The preset names, checked: one error naming every unknown one."""
    bad = []
    for name in presets:
        try:
            HRNetConfig.preset(name)
        except ValueError:
            bad.append(name)
    if bad or not presets:
        raise ValueError(f"unknown presets {bad or list(presets)}; choose from "
                         f"{', '.join(PRESET_NAMES)}")
    return list(presets)


def recorded(preset: str, batch: int, height: int, width: int, channel_multiple: int = 8,
             num_classes: int = 19, in_channels: int = 3) -> Tuple[Problem, ...]:
    """Every problem of one forward of the ``preset`` seg model (fp16, channels_last), in order.
    ``channel_multiple`` 8 is the CUDA plan's padding, 1 the raw widths. Cached: both scripts'
    shape lists of one preset and size share one recording."""
    return _recorded(preset, batch, height, width, channel_multiple, num_classes, in_channels)


@functools.lru_cache(maxsize=None)
def _recorded(preset, batch, height, width, channel_multiple, num_classes, in_channels):
    config = HRNetConfig.preset(preset, num_classes=num_classes, in_channels=in_channels)
    return tuple(record_problems(config, batch, height, width, channel_multiple=channel_multiple))


def channel_slice(t: TensorInfo) -> Optional[Tuple[int, int]]:
    """``(channels of the tensor t is a slice of, first channel)`` for a channel slice of a
    channels_last [N, C, H, W] tensor (a split of a batched conv's output); None for a dense one.

    In channels_last the channel stride is 1, the W stride is the parent's channel count and the
    storage offset is the first channel."""
    n, c, h, w = t.shape
    sn, _, sh, sw = t.stride
    total = sw if w > 1 else sh // w if h > 1 else sn // (h * w) if n > 1 else c + t.offset
    start = t.offset
    expected = (h * w * total, 1, w * total, total)
    # size-1 dims may carry any stride
    if (any(size > 1 and s != e for size, s, e in zip(t.shape, t.stride, expected))
            or start + c > total):
        raise ValueError(f"not a channel slice of a channels_last tensor: {t}")
    return None if (total, start) == (c, 0) else (total, start)


def fuse_modules(problems: Sequence[Problem]) -> List[List[FuseProblem]]:
    """The fuse calls grouped by module, each group in target order (0, 1, ...): the engine issues
    one module's fuse calls back to back, and every module runs convs before its own."""
    groups: List[List[FuseProblem]] = []
    previous = None
    for p in problems:
        if isinstance(p, FuseProblem):
            if not isinstance(previous, FuseProblem):
                groups.append([])
            groups[-1].append(p)
        previous = p
    return groups


def branch_shapes(problems: Sequence[Problem]) -> List[Tuple[int, int, int]]:
    """(C, H, W) of every branch, read from the fuse bases of the widest module."""
    widest = max(fuse_modules(problems), key=len, default=[])
    return [tuple(f.base.shape[1:]) for f in widest]


def branch_of(shape: Sequence[int], branches: Sequence[Tuple[int, int, int]]) -> Optional[int]:
    """The branch an [N, C, H, W] tensor belongs to: the one of the same channels and size, else
    the first of the same size (tiny inputs give several branches one size); None: no branch has
    its size (the stem, above branch 0's resolution)."""
    c, h, w = shape[1:]
    for match in ((c, h, w), (h, w)):
        for i, b in enumerate(branches):
            if b[-len(match):] == match:
                return i
    return None


def size_tag(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


# ------------------------------------------------------------------------------------------ timing
def median_ms(fn: Callable[[], object], timer: str = "graph", rep: int = 100,
              device: str = "cuda") -> float:
    """Median time of ``fn`` in ms (module docstring); ``fn`` has run once already (warm-up)."""
    if torch.device(device).type != "cuda":  # smoke run: one timed call, no statistics
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing
    if timer == "graph":
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
        except Exception as exc:  # capture failed: say so and time eager calls instead
            print(f"  (CUDA graph timing failed: {type(exc).__name__}: {str(exc)[:120]}; "
                  "using events)")
    elif timer != "events":
        raise ValueError(f"timer must be 'graph' or 'events', got {timer!r}")
    return float(triton.testing.do_bench(fn, warmup=max(rep // 4, 5), rep=rep,
                                         return_mode="median"))


# -------------------------------------------------------------------------------------- measuring
@dataclass
class CaseResult:
    """One case's measurements: ms, rel_err and errors per implementation. ``info`` (kind,
    preset, input, shape, calls_per_forward) goes into every JSON row of the case."""

    case: str
    info: Dict[str, object]
    bytes: float
    flops: float = 0.0
    ms: Dict[str, float] = field(default_factory=dict)
    rel_err: Dict[str, float] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)

    def gbps(self, impl: str) -> float:
        return self.bytes / (self.ms[impl] * 1e-3) / 1e9

    def tflops(self, impl: str) -> float:
        return self.flops / (self.ms[impl] * 1e-3) / 1e12


def measure_case(case: str, info: Dict[str, object], bytes_moved: float, flops: float,
                 impls: Dict[str, Callable[[], torch.Tensor]], reference: Callable[[], torch.Tensor],
                 *, timer: str, rep: int, device: str) -> CaseResult:
    """Run each implementation once (warm-up, JIT and autotuning happen here), compare it with
    ``reference()``, then time it. An implementation that raises is recorded in ``errors``."""
    result = CaseResult(case, dict(info), bytes_moved, flops)
    ref = reference()
    for name, fn in impls.items():
        try:
            out = fn()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            result.rel_err[name] = rel_err(out, ref)
            result.ms[name] = median_ms(fn, timer, rep, device)
        except Exception as e:  # report and go on: one failing column must not hide the rest
            result.errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return result


# ---------------------------------------------------------------------------------------- results
def environment(device: str, argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """The card, versions, date and command line that go with every row."""
    from hrnet_fast.timing import environment as versions
    info = versions(torch.device(device))
    args = list(sys.argv[1:] if argv is None else argv)
    return {"card": info["device_name"], "torch": info["torch"], "triton": info["triton"],
            "cuda": info.get("cuda"), "cudnn": info.get("cudnn"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.argv[0] or "python")] + args)}


def json_rows(bench: str, results: Sequence[CaseResult], env: Dict[str, str],
              settings: Dict[str, object]) -> List[Dict[str, object]]:
    """One flat row per (case, implementation), keys :data:`ROW_KEYS` (None where not measured)."""
    rows = []
    for r in results:
        for impl in list(r.ms) + [n for n in r.errors if n not in r.ms]:
            timed = impl in r.ms
            row = dict.fromkeys(ROW_KEYS)
            row.update(r.info)
            row.update(bench=bench, case=r.case, impl=impl, median_ms=r.ms.get(impl),
                       gbps=r.gbps(impl) if timed else None,
                       tflops=r.tflops(impl) if timed and r.flops else None,
                       rel_err=r.rel_err.get(impl), error=r.errors.get(impl),
                       dtype=settings.get("dtype"), timer=settings.get("timer"),
                       card=env["card"], torch=env["torch"], triton=env["triton"],
                       command=env["command"])
            rows.append(row)
    return rows


def write_results(path: str, bench: str, results: Sequence[CaseResult], env: Dict[str, str],
                  settings: Dict[str, object]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = {"bench": bench, "env": env, "settings": settings,
            "rows": json_rows(bench, results, env, settings)}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"saved {path}")
