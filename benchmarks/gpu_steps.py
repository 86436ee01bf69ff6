"""The Python steps of ``benchmarks/gpu_check.py`` (each needs a CUDA GPU except ``--help``).

    python benchmarks/gpu_steps.py env          [--json PATH]   versions, copy and matmul ceilings
    python benchmarks/gpu_steps.py model_check  [--json PATH]   auto + graphs against the reference
    python benchmarks/gpu_steps.py profile      [--json PATH]   GPU time by kernel kind
    python benchmarks/gpu_steps.py ab_bias      [--json PATH]   the post-run-C bias changes, on/off
    python benchmarks/gpu_steps.py ab_lanes     [--json PATH]   branch lanes, on/off
    python benchmarks/gpu_steps.py overlap      [--json PATH]   kernel overlap in one replay
    python benchmarks/gpu_steps.py ab_pad       [--json PATH]   channel multiple 8 / 16 / 32
    python benchmarks/gpu_steps.py ab_head      [--json PATH]   projection inside the head, on/off
    python benchmarks/gpu_steps.py build_start | build_wait     the CUDA extension, in the background

Numbers are medians of CUDA-event timings after warm-up, on random data (never zeros).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from typing import Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BUILD_DIR = "/tmp/hrnet_fast_ext_build"


def _save(path, data) -> None:
    print(json.dumps(data, indent=1, default=str))
    path = path or os.environ.get("GPU_CHECK_JSON")
    if path:
        with open(path, "w") as f:
            json.dump(data, f, default=str)


def _events_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    import torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def step_env(args) -> None:
    import torch
    import triton
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    info = {"device": torch.cuda.get_device_name(dev), "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2 ** 30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "triton": triton.__version__, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    # Copy ceiling: 1 GiB device-to-device, counting bytes read + written (random data).
    n = 2 ** 30 // 2
    src = torch.randn(n, device=dev, dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = _events_ms(lambda: dst.copy_(src), repeats=30)
    info["copy_tbs"] = round(2 * src.numel() * 2 / ms / 1e9, 3)
    del src, dst
    # fp16 matmul ceiling: 8192^3 on random data.
    a = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    ms = _events_ms(lambda: a @ b, repeats=10)
    info["fp16_matmul_tflops"] = round(2 * 8192 ** 3 / ms / 1e9, 1)
    _save(args.json, info)


def step_build_start(args) -> None:
    """Build hrnet_fast._C into BUILD_DIR in the background (the checks go on meanwhile); the
    source tree gets the library only in build_wait, never half-written."""
    os.makedirs(BUILD_DIR, exist_ok=True)
    env = dict(os.environ, HRNET_FAST_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS="8")
    log = open(os.path.join(BUILD_DIR, "build.log"), "w")
    proc = subprocess.Popen([sys.executable, "setup.py", "build_ext", "-b", f"{BUILD_DIR}/lib",
                             "-t", f"{BUILD_DIR}/tmp"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    with open(os.path.join(BUILD_DIR, "pid"), "w") as f:
        f.write(str(proc.pid))
    print("build started, pid", proc.pid)


def step_build_wait(args) -> None:
    with open(os.path.join(BUILD_DIR, "pid")) as f:
        pid = int(f.read())
    t0 = time.time()
    while os.path.exists(f"/proc/{pid}") and not _zombie(pid):
        time.sleep(1)
    libs = glob.glob(f"{BUILD_DIR}/lib/hrnet_fast/_C*.so")
    print(open(os.path.join(BUILD_DIR, "build.log")).read()[-4000:])
    if not libs:
        raise SystemExit("the extension build produced no library")
    shutil.copy(libs[0], os.path.join(ROOT, "hrnet_fast", os.path.basename(libs[0])))
    print(f"extension ready after waiting {time.time() - t0:.0f} s: {os.path.basename(libs[0])}")


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _random_model(preset: str):
    import torch
    from hrnet_fast.check import randomize_batchnorm
    from hrnet_fast.config import HRNetConfig
    from hrnet_fast.reference import HighResolutionNet
    torch.manual_seed(0)
    return randomize_batchnorm(HighResolutionNet(HRNetConfig.preset(preset))).cuda().eval()


def step_model_check(args) -> None:
    """auto + CUDA graphs (the drop-in's defaults) against the eager engine and the reference:
    fp32 (TF32 off) within 1e-5; fp16/bf16 within 2x the reference's own error vs fp64."""
    import torch
    from hrnet_fast import optimize
    from hrnet_fast.check import clone_as, rel_err
    from hrnet_fast.backends import torch_cuda as conv_ops
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for preset in args.presets:
        model = _random_model(preset)
        x = torch.randn(1, 3, 1024, 2048, device="cuda")
        with torch.inference_mode():
            ref64 = clone_as(model, torch.float64)(x.double())
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                xd = x.to(dtype)
                if dtype == torch.float32:
                    own, bound = None, 1e-5
                    want = model(x)
                else:
                    own = rel_err(clone_as(model, dtype)(xd), ref64)
                    bound, want = 2 * own, ref64
                eager = optimize(model, dtype=dtype, cuda_graphs=False)
                graphed = optimize(model, dtype=dtype)
                before = dict(conv_ops.CAPTURED_EPILOGUES)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                e_out = eager(xd)  # first call: cuDNN measures its algorithms per shape
                torch.cuda.synchronize()
                first_call_s = time.perf_counter() - t0
                graphed(xd)  # eager call
                torch.cuda.synchronize()
                reserved0 = torch.cuda.memory_reserved()
                graphed(xd)  # capture + replay
                torch.cuda.synchronize()
                graph_mib = (torch.cuda.memory_reserved() - reserved0) / 2 ** 20
                y = torch.randn_like(x)
                g_out = graphed(y.to(dtype))
                e_out_y = eager(y.to(dtype))
                want_y = (clone_as(model, torch.float64)(y.double()) if dtype != torch.float32
                          else model(y))
                row = {"preset": preset, "dtype": str(dtype).replace("torch.", ""),
                       "backend": graphed.backend, "eager_err": rel_err(e_out, want),
                       "graph_err": rel_err(g_out, want_y), "graph_vs_eager": rel_err(g_out, e_out_y),
                       "own_err": own, "bound": bound, "first_call_s": round(first_call_s, 2),
                       "graph_pool_mib": round(graph_mib, 1),
                       "captured_fused": conv_ops.CAPTURED_EPILOGUES["fused"] - before["fused"],
                       "captured_unfused": conv_ops.CAPTURED_EPILOGUES["unfused"] - before["unfused"]}
                row["ok"] = bool(row["eager_err"] <= bound and row["graph_err"] <= bound)
                print(row, flush=True)
                rows.append(row)
                del eager, graphed
                torch.cuda.empty_cache()
    _save(args.json, {"rows": rows, "all_ok": all(r["ok"] for r in rows)})


KINDS = [  # (kind, pattern) in order; the first match wins
    ("fuse (ours)", r"upsample_add_relu"), ("head (ours)", r"seg_head"),
    ("bias-act (ours)", r"bias_relu_mask"),
    ("conv (triton)", r"conv2d_bias_act|strided_chain"),
    ("conv (cudnn)", r"conv|xmma|implicit|gemm|cudnn|sm90_|cutlass|fprop|winograd"),
    ("layout copy", r"nchw|nhwc|transpose|copy|Cat"),
    ("resize", r"upsample|interp|bilinear|nearest"),
    ("elementwise", r"elementwise|vectorized|add|relu|clamp|mul|fill|reduce"),
]


def step_profile(args) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from hrnet_fast import optimize
    out = {}
    for preset in args.presets:
        model = _random_model(preset).half()
        x = torch.randn(1, 3, 1024, 2048, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            eng = optimize(model, dtype=torch.float16, cuda_graphs=False)
            for _ in range(3):
                eng(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                eng(x)
                torch.cuda.synchronize()
        by_kind: Dict[str, list] = defaultdict(lambda: [0.0, 0])
        kernels = []
        for e in prof.key_averages():
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0)
            if t <= 0:
                continue
            kind = next((k for k, pat in KINDS if re.search(pat, e.key, re.I)), "other")
            by_kind[kind][0] += t / 1e3
            by_kind[kind][1] += e.count
            kernels.append((t / 1e3, e.count, kind, e.key[:110]))
        total = sum(v[0] for v in by_kind.values())
        print(f"== {preset} fp16 1x3x1024x2048, eager engine ({eng.backend}): GPU {total:.2f} ms, "
              f"{sum(v[1] for v in by_kind.values())} kernels")
        for k, (ms, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
            print(f"  {k:16s} {ms:7.3f} ms {100 * ms / total:5.1f}%  {n:5d} launches")
        for ms, n, kind, name in sorted(kernels, reverse=True)[:25]:
            print(f"  {ms:7.3f} ms {n:4d}x  [{kind}] {name}")
        # Wall time of one graph replay of the same engine, for the launch-overhead share.
        with torch.inference_mode():
            graphed = optimize(model, dtype=torch.float16)
            graph_ms = _events_ms(lambda: graphed(x), repeats=20)
            eager_ms = _events_ms(lambda: eng(x), repeats=20)
        print(f"  eager engine {eager_ms:.2f} ms/forward (events), graph replay {graph_ms:.2f} ms")
        out[preset] = {"gpu_ms": total, "eager_ms": eager_ms, "graph_ms": graph_ms,
                       "by_kind": {k: {"ms": v[0], "launches": v[1]} for k, v in by_kind.items()},
                       "top": kernels and sorted(kernels, reverse=True)[:40]}
    _save(args.json, out)


def step_ab_bias(args) -> None:
    """The bias changes made after run C (benchmarks/RESULTS.md), on against off in one process:
    a block downsample's and the head projection's bias moved (plan), and the ReLU-range convs'
    bias + ReLU as one Triton pass (backend). fp16, 1x3x1024x2048, CUDA graphs (the drop-in's
    defaults); graph replays of the two engines alternate, CUDA events per replay, 30 rounds."""
    import functools
    import torch
    from hrnet_fast import optimize, plan as plan_mod
    from hrnet_fast.backends import triton as triton_backend
    from hrnet_fast.check import rel_err
    out = {}
    for preset in args.presets:
        model = _random_model(preset).half()
        x = torch.randn(1, 3, 1024, 2048, device="cuda", dtype=torch.float16)
        saved = (plan_mod._block_plan, plan_mod._seg_head_plan,
                 set(triton_backend.RANGE_EPILOGUE_DEVICES))
        try:  # "off": the plan and backend as run C had them
            plan_mod._block_plan = functools.partial(_no_hoist, saved[0])
            plan_mod._seg_head_plan = functools.partial(_no_hoist, saved[1])
            triton_backend.RANGE_EPILOGUE_DEVICES.clear()
            engines = {"off": optimize(model, dtype=torch.float16)}
        finally:
            plan_mod._block_plan, plan_mod._seg_head_plan = saved[:2]
            triton_backend.RANGE_EPILOGUE_DEVICES.update(saved[2])
        engines["on"] = optimize(model, dtype=torch.float16)
        times, outs = _alternate(engines, x)
        row = {k: round(statistics.median(v), 3) for k, v in times.items()}
        row.update(speedup=_ratio(times, "off", "on"),
                   on_vs_off=rel_err(outs["on"], outs["off"]))
        print(f"{preset}: {row}", flush=True)
        out[preset] = row
        del engines
        torch.cuda.empty_cache()
    _save(args.json, out)


def _alternate(engines: Dict, x, rounds: int = 30):
    """Capture each engine's graph (three calls), then time ``rounds`` replays of each, the order
    alternating per round; CUDA events per replay. Returns ({name: [ms]}, {name: output})."""
    import torch
    times = {k: [] for k in engines}
    with torch.inference_mode():
        outs = {k: [e(x), e(x), e(x)][-1].clone() for k, e in engines.items()}  # capture
        names = list(engines)
        for r in range(rounds):
            for k in (names if r % 2 == 0 else names[::-1]):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                engines[k](x)
                b.record()
                b.synchronize()
                times[k].append(a.elapsed_time(b))
    return times, outs


def _ratio(times: Dict, base: str, other: str) -> float:
    """Median over rounds of ``base``'s time / ``other``'s (> 1: ``other`` is faster)."""
    return round(statistics.median([p / q for p, q in zip(times[base], times[other])]), 3)


def _fp16_model_and_reference(preset: str):
    """(the random-weight model in fp16, a 1x3x1024x2048 fp16 input, the fp64 reference output
    for that input)."""
    import torch
    from hrnet_fast.check import clone_as
    model = _random_model(preset)
    x = torch.randn(1, 3, 1024, 2048, device="cuda")
    with torch.inference_mode():
        ref64 = clone_as(model, torch.float64)(x.double())
    return model.half(), x.half(), ref64


def step_ab_lanes(args) -> None:
    """Branch lanes (hrnet_fast/lanes.py) on against off: the drop-in's defaults (auto, CUDA
    graphs, fp16) with and without ``branch_streams``, and lanes without the high-priority lane 0;
    graph replays alternating, 30 rounds; the outputs compared exactly; the growth of reserved
    memory at capture (noisy: the caching allocator reuses what earlier engines freed; model_check
    measures each graph alone). 1x3x1024x2048, then (not with ``--quick``) batch 8 at 512x1024 and
    the engines without graphs."""
    import torch
    from hrnet_fast import optimize
    from hrnet_fast.lanes import LanePool
    out = {}
    shapes = [(1, 3, 1024, 2048)] + ([] if args.quick else [(8, 3, 512, 1024)])
    for preset in args.presets:
        model = _random_model(preset).half()
        for shape in shapes:
            x = torch.randn(*shape, device="cuda", dtype=torch.float16)
            engines, pools = {}, {}
            for name, on in (("serial", False), ("lanes", True), ("lanes_one_priority", True)):
                engines[name] = optimize(model, dtype=torch.float16, branch_streams=on)
                if name == "lanes_one_priority":  # branch 0 not on a high-priority stream
                    engines[name]._lane_pool = LanePool(priority_first=False)
                with torch.inference_mode():
                    engines[name](x)
                torch.cuda.synchronize()
                before = torch.cuda.memory_reserved()
                with torch.inference_mode():
                    engines[name](x)  # captures
                torch.cuda.synchronize()
                pools[name] = round((torch.cuda.memory_reserved() - before) / 2 ** 20)
            times, outs = _alternate(engines, x)
            row = {k: round(statistics.median(v), 3) for k, v in times.items()}
            row.update(speedup=_ratio(times, "serial", "lanes"),
                       priority_gain=_ratio(times, "lanes_one_priority", "lanes"),
                       one_priority_equal=bool(torch.equal(outs["lanes_one_priority"],
                                                           outs["serial"])),
                       images_per_s=round(1000 * shape[0] / row["lanes"], 1),
                       equal=bool(torch.equal(outs["lanes"], outs["serial"])),
                       graph_pool_mib=pools)
            key = f"{preset} {'x'.join(map(str, shape))}"
            del engines
            if args.quick:
                print(f"{key}: {row}", flush=True)
                out[key] = row
                continue
            # without CUDA graphs (cuda_graphs=False): launch-bound, lanes add event calls
            eager = {name: optimize(model, dtype=torch.float16, branch_streams=on, cuda_graphs=False)
                     for name, on in (("serial", False), ("lanes", True))}
            times, _ = _alternate(eager, x, rounds=10)
            row["no_graphs"] = {k: round(statistics.median(v), 3) for k, v in times.items()}
            print(f"{key}: {row}", flush=True)
            out[key] = row
            del eager
            torch.cuda.empty_cache()
    _save(args.json, out)


def _alternate_row(engines, x, ref64):
    """Graph replays of ``engines`` alternating (``_alternate``): the per-variant times and a row of
    their medians (ms) with each output's relative error against ``ref64``."""
    from hrnet_fast.check import rel_err
    times, outs = _alternate(engines, x)
    row = {name: round(statistics.median(v), 3) for name, v in times.items()}
    row["err_vs_fp64"] = {name: rel_err(o, ref64) for name, o in outs.items()}
    return times, row


def step_ab_pad(args) -> None:
    """The CUDA plan's channel multiple (HRNET_FAST_CUDA_CHANNEL_MULTIPLE) 8 against 16 and 32, and
    8 with a 32-channel floor (HRNET_FAST_CUDA_MIN_CHANNELS): whether wider zero padding of the thin
    branches buys faster cuDNN kernels than the bytes it adds (w18: 24 -> 32 on branch 0).
    Drop-in defaults (auto, graphs, lanes, fp16), 1x3x1024x2048, graph replays alternating, 30
    rounds; each output against fp64."""
    import torch
    from hrnet_fast import optimize
    from hrnet_fast.backends.selection import CUDA_CHANNEL_MULTIPLE_ENV, CUDA_MIN_CHANNELS_ENV
    # name -> (channel multiple, minimum width): "min32" pads only the branches below 32 channels
    variants = {"m8": (8, 0), "m16": (16, 0), "m32": (32, 0), "min32": (8, 32)}
    out = {}
    for preset in args.presets:
        model, x, ref64 = _fp16_model_and_reference(preset)
        engines = {}
        try:
            for name, (multiple, floor) in variants.items():
                os.environ[CUDA_CHANNEL_MULTIPLE_ENV] = str(multiple)
                os.environ[CUDA_MIN_CHANNELS_ENV] = str(floor)
                engines[name] = optimize(model, dtype=torch.float16)
        finally:
            os.environ.pop(CUDA_CHANNEL_MULTIPLE_ENV, None)
            os.environ.pop(CUDA_MIN_CHANNELS_ENV, None)
        times, row = _alternate_row(engines, x, ref64)
        for name in list(variants)[1:]:
            row[f"{name}_speedup"] = _ratio(times, "m8", name)
        print(f"{preset}: {row}", flush=True)
        out[preset] = row
        del engines
        torch.cuda.empty_cache()
    _save(args.json, out)


def _on_off_rows(presets, build_off, build_on) -> Dict[str, dict]:
    """Per preset, the engines ``build_off(model)`` and ``build_on(model)`` (built in that order,
    each with its setting in force while it is built), graph replays alternating
    (``_alternate_row``); each row adds on's speedup over off."""
    import torch
    out = {}
    for preset in presets:
        model, x, ref64 = _fp16_model_and_reference(preset)
        engines = {"off": build_off(model)}
        engines["on"] = build_on(model)
        times, row = _alternate_row(engines, x, ref64)
        row["speedup"] = _ratio(times, "off", "on")
        print(f"{preset}: {row}", flush=True)
        out[preset] = row
        del engines
        torch.cuda.empty_cache()
    return out


def _drop_in_fp16(model):
    import torch
    from hrnet_fast import optimize
    return optimize(model, dtype=torch.float16)


def step_ab_head(args) -> None:
    """The seg head with branch 0's projection inside the head kernel (backends/triton.py
    PROJECTED_HEAD_DEVICES) on against off: the drop-in's defaults (fp16, graphs, lanes),
    1x3x1024x2048, graph replays alternating, 30 rounds; both outputs against fp64."""
    from hrnet_fast.backends import triton as triton_backend

    def projected(model):
        triton_backend.PROJECTED_HEAD_DEVICES.add("cuda")
        try:
            return _drop_in_fp16(model)
        finally:
            triton_backend.PROJECTED_HEAD_DEVICES.discard("cuda")

    _save(args.json, _on_off_rows(args.presets, _drop_in_fp16, projected))


def step_ab_pins(args) -> None:
    """``auto`` with the pinned Triton configs (kernels/conv.py PINNED_CONFIGS, kernels/
    basic_block.py PINNED_BLOCK_CONFIGS) against ``HRNET_FAST_CONV_PINS=0`` (every conv on cuDNN):
    the drop-in's defaults (fp16, graphs, lanes), 1x3x1024x2048, graph replays alternating, 30
    rounds; both outputs against fp64. Says so and measures nothing while neither table has an
    entry for this card."""
    import torch
    from hrnet_fast.kernels import basic_block as kblock
    from hrnet_fast.kernels import conv as kconv
    arch = kconv.device_arch(torch.device("cuda"))
    pins = {k: v for k, v in kconv.PINNED_CONFIGS.items() if k[0] == arch}
    block_pins = {k: v for k, v in kblock.PINNED_BLOCK_CONFIGS.items() if k[0] == arch}
    if not pins and not block_pins:
        print(f"ab_pins: no PINNED_CONFIGS or PINNED_BLOCK_CONFIGS entry for {arch}: nothing to "
              "compare", flush=True)
        _save(args.json, {"arch": arch, "pins": 0, "block_pins": 0})
        return

    def unpinned(model):
        # read when the engine's backend is built (which convs are offered to the Triton conv)
        os.environ["HRNET_FAST_CONV_PINS"] = "0"
        try:
            return _drop_in_fp16(model)
        finally:
            os.environ.pop("HRNET_FAST_CONV_PINS", None)

    rows = _on_off_rows(args.presets, unpinned, _drop_in_fp16)
    _save(args.json, {"arch": arch, "pins": len(pins), "block_pins": len(block_pins), **rows})


def step_overlap(args) -> None:
    """How much the branch streams overlap kernels in one graph replay of the drop-in's defaults
    (fp16, 1x3x1024x2048), serial against lanes: torch.profiler traces of one replay each,
    read by benchmarks/trace_overlap.py (span, busy and idle time, mean concurrency, per stream).
    The traces are saved under $OUT (or the JSON's folder) as overlap_<preset>_<variant>.json."""
    import tempfile
    import torch
    from torch.profiler import ProfilerActivity, profile
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import trace_overlap
    from hrnet_fast import optimize
    folder = os.environ.get("OUT") or tempfile.gettempdir()
    out = {}
    for preset in args.presets:
        model = _random_model(preset).half()
        x = torch.randn(1, 3, 1024, 2048, device="cuda", dtype=torch.float16)
        for name, on in (("serial", False), ("lanes", True)):
            eng = optimize(model, dtype=torch.float16, branch_streams=on)
            with torch.inference_mode():
                eng(x), eng(x), eng(x)  # eager, capture, replay
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    eng(x)
                    torch.cuda.synchronize()
            path = os.path.join(folder, f"overlap_{preset}_{name}.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                stats = trace_overlap.kernel_overlap(trace_overlap.kernels(json.load(f)))
            stats.pop("streams")
            print(f"{preset} {name}: {stats}", flush=True)
            out[f"{preset} {name}"] = stats
            del eng
            torch.cuda.empty_cache()
    _save(args.json, out)


def _no_hoist(build, *args, **kwargs):
    """``build`` (plan._block_plan or plan._seg_head_plan) with its ``hoist`` argument off."""
    args = list(args)
    if len(args) > 2:
        args[2] = False
    kwargs.pop("hoist", None)
    return build(*args, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=["env", "build_start", "build_wait", "model_check", "profile",
                                    "ab_bias", "ab_lanes", "overlap", "ab_pad", "ab_head",
                                    "ab_pins"])
    p.add_argument("--json", default=None)
    p.add_argument("--presets", nargs="+", default=["w18", "w48"])
    p.add_argument("--quick", action="store_true", help="ab_lanes: batch 1 with graphs only")
    args = p.parse_args()
    globals()[f"step_{args.step}"](args)


if __name__ == "__main__":
    main()
