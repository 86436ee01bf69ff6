"""The CPU 1x1 conv kernel (csrc/cpu_conv1x1.cpp) against oneDNN, per conv and per model.

    python benchmarks/bench_cpu_conv1x1.py [--threads 2] [--rounds 15]
    python benchmarks/bench_cpu_conv1x1.py --models w18 w32 [--rounds 8]

Per conv: layer1's shapes at 1x3x512x1024 (64 -> 256 written into its residual as the engine does,
256 -> 64, 64 -> 64, the downsample merged with the block's last conv against oneDNN's two convs),
w32 pose's layer1 at 8x3x256x192, and the fuse steps' batched 1x1s of w18, w32 and w48. float32,
channels_last, one process, oneDNN's fused conv as the torch backend runs it (weights reordered
once) and the kernel (weights packed once) called in turn; medians and the median per-round ratio.

Per model (``--models``): one engine at 1x3x512x1024 with the kernel on and off in alternate calls
(``torch_cpu._POINTWISE``), the median of per-round ratios.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hrnet_fast import HRNet, cpu_ext  # noqa: E402
from hrnet_fast.backends import torch_cpu  # noqa: E402
from hrnet_fast.backends.cpu_memory import keep_freed_memory  # noqa: E402

# (N, Ci, Ci2, Co, H, W, residual): Ci2 > 0 is the downsample merge
LAYER1 = [(1, 64, 0, 256, 128, 256, True), (1, 256, 0, 64, 128, 256, False),
          (1, 64, 0, 64, 128, 256, False), (1, 64, 64, 256, 128, 256, False),
          (8, 64, 0, 256, 64, 48, True)]
FUSE = [(1, ci, 0, co, h, w, False) for ci, co, h, w in [
    (36, 18, 64, 128), (72, 54, 32, 64), (144, 126, 16, 32), (64, 32, 64, 128), (128, 96, 32, 64),
    (256, 224, 16, 32), (96, 48, 64, 128), (192, 144, 32, 64), (384, 336, 16, 32)]]


def cl(shape):
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


def pair(n, ci, ci2, co, h, w, residual):
    """(oneDNN, kernel) callables for one shape, as the engine calls them."""
    x, x2 = cl((n, ci, h, w)), (cl((n, ci2, h, w)) if ci2 else None)
    wt, b = torch.randn(co, ci + ci2, 1, 1) / (ci + ci2) ** 0.5, torch.randn(co)
    packed = cpu_ext.conv1x1_pack(wt)
    caches = ({}, {})
    if ci2:  # oneDNN: the downsample, then the last conv accumulated into its output
        wa, wd = wt[:, :ci].contiguous(), wt[:, ci:].contiguous()

        def onednn():
            d = torch_cpu.conv_fused(x2, wd, b, 1, 0, None, False, caches[1])
            return torch_cpu.conv_fused(x, wa, None, 1, 0, d, True, caches[0], into_residual=True)
        return onednn, lambda: cpu_ext.conv1x1_cpu(x, packed, co, b, relu=True, x2=x2)
    if residual:
        r1, r2 = cl((n, co, h, w)), cl((n, co, h, w))
        return (lambda: torch_cpu.conv_fused(x, wt, b, 1, 0, r1, True, caches[0], into_residual=True),
                lambda: cpu_ext.conv1x1_cpu(x, packed, co, b, r2, relu=True, into_residual=True))
    return (lambda: torch_cpu.conv_fused(x, wt, b, 1, 0, None, True, caches[0]),
            lambda: cpu_ext.conv1x1_cpu(x, packed, co, b, relu=True))


def per_conv(rounds: int) -> None:
    for shape in LAYER1 + FUSE:
        onednn, kernel = pair(*shape)
        for f in (onednn, kernel, onednn, kernel):
            f()
        times = {"oneDNN": [], "kernel": []}
        for _ in range(rounds):
            for name, f in (("oneDNN", onednn), ("kernel", kernel)):
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
        n, ci, ci2, co, h, w, residual = shape
        flop = 2 * n * h * w * co * (ci + ci2)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = statistics.median(a / b for a, b in zip(times["oneDNN"], times["kernel"]))
        name = f"{n}x{ci}{'+' + str(ci2) if ci2 else ''}->{co} {h}x{w}{' +res' if residual else ''}"
        print(f"{name:28s} oneDNN {med['oneDNN'] * 1e3:7.3f} ms ({flop / med['oneDNN'] / 1e9:4.0f} "
              f"GFLOP/s)  kernel {med['kernel'] * 1e3:7.3f} ms ({flop / med['kernel'] / 1e9:4.0f})  "
              f"per round {ratio:.2f}x", flush=True)


def per_model(presets, rounds: int) -> None:
    x = torch.randn(1, 3, 512, 1024)
    for preset in presets:
        model = HRNet(preset).eval()
        times = {True: [], False: []}
        with torch.inference_mode():
            for on in (True, False, True, False):
                torch_cpu._POINTWISE["on"] = on
                model(x)
            for r in range(rounds):
                for on in ((True, False) if r % 2 == 0 else (False, True)):
                    torch_cpu._POINTWISE["on"] = on
                    t = time.perf_counter()
                    model(x)
                    times[on].append(time.perf_counter() - t)
        torch_cpu._POINTWISE["on"] = True
        ratio = statistics.median(a / b for a, b in zip(times[False], times[True]))
        print(f"{preset} seg 1x3x512x1024: kernel {statistics.median(times[True]) * 1e3:.1f} ms, "
              f"oneDNN {statistics.median(times[False]) * 1e3:.1f} ms, per round {ratio:.3f}x",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--models", nargs="*", help="presets for the whole-model A/B")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    if not cpu_ext.load_extension():
        sys.exit(f"the CPU kernels are unavailable: {cpu_ext.cpu_ext_status()[1]}")
    if torch.backends.cpu.get_cpu_capability() != "AVX2":
        print("note: this CPU is not AVX2; the engine keeps oneDNN for 1x1 convs here")
    if args.models:
        per_model(args.models, args.rounds)
    else:
        per_conv(args.rounds)


if __name__ == "__main__":
    main()
