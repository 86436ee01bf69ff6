"""The bfloat16 AMX conv kernel (csrc/cpu_conv_amx.cpp) against oneDNN's fused conv as the engine
calls it (``torch_cpu.conv_fused``: reordered weight, ReLU and residual fused), per conv, and the
bf16 engine with the kernel on and off, in one process; with ``--switch head``, the engine with the
AMX seg head (csrc/cpu_head_amx.cpp) on and off instead (no per-conv part).

    python benchmarks/bench_cpu_amx.py [--models w18_small_v2 w18] [--rounds 40] [--switch head]

Per conv: 2 threads, channels_last bf16, w18's widths and sizes at 1x3x512x1024 (stride 1 and
2), residual + ReLU where the widths match at stride 1, else ReLU, alternating calls, medians;
GFLOP/s counted as direct convolution. Per model: one bf16 engine, the kernel switched on and off in alternate calls (30 ms idle before
each), median of per-round ratios, and each variant's error against the float64 reference.
Needs a CPU with AMX (Intel Xeon from Sapphire Rapids on).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hrnet_fast.backends.torch_cpu as torch_cpu  # noqa: E402
from hrnet_fast import HRNetConfig, cpu_ext, optimize  # noqa: E402
from hrnet_fast.bench import paired_speedup  # noqa: E402
from hrnet_fast.backends.cpu_memory import keep_freed_memory  # noqa: E402
from hrnet_fast.check import randomize_batchnorm  # noqa: E402
from hrnet_fast.reference import HighResolutionNet  # noqa: E402

# (Ci, Co, H, W, stride), H x W the input's size: w18's 3x3 stride-1 convs at 512x1024 (72 and
# 144 outputs: the kernel's 2 x 2 tile order), wider layers of w32/w48/w64 (96, 128, 192, 384; 512
# stays in oneDNN: AMX_MAX_OUT), then w18's stride-2 convs (the stem's second, transitions, the
# fuse step's batched downsampling convs: 18 -> 36 + 18 = 54, 18 -> 72 ...).
CONVS = [(18, 18, 128, 256, 1), (36, 36, 64, 128, 1), (64, 64, 128, 256, 1), (256, 18, 128, 256, 1),
         (72, 72, 32, 64, 1), (144, 144, 16, 32, 1), (96, 96, 64, 128, 1), (128, 128, 32, 64, 1),
         (192, 192, 32, 64, 1), (384, 384, 16, 32, 1), (512, 512, 8, 16, 1),
         (64, 64, 256, 512, 2), (256, 36, 128, 256, 2), (18, 54, 128, 256, 2), (18, 72, 64, 128, 2),
         (36, 108, 64, 128, 2), (72, 144, 32, 64, 2), (18, 144, 32, 64, 2)]


def per_conv(rounds):
    for ci, co, h, w, stride in CONVS:
        x = torch.randn(1, ci, h, w).bfloat16().contiguous(memory_format=torch.channels_last)
        wt = (torch.randn(co, ci, 3, 3) / (3 * ci ** 0.5)).bfloat16()
        b = torch.randn(co).bfloat16()
        res = (torch.randn(1, co, h, w).bfloat16().contiguous(memory_format=torch.channels_last)
               if ci == co and stride == 1 else None)
        packed, bf, cache = cpu_ext.conv_amx_pack(wt), b.float(), {}
        calls = {"oneDNN": lambda: torch_cpu.conv_fused(x, wt, b, stride, 1, res, True, cache),
                 "AMX": lambda: cpu_ext.conv_amx_cpu(x, packed, bf, res, relu=True,
                                                     weight_size=wt.shape[:2], stride=stride)}
        times = {k: [] for k in calls}
        with torch.inference_mode():
            diff = float((calls["oneDNN"]().float() - calls["AMX"]().float()).abs().max())
            for _ in range(rounds):
                for k, f in calls.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
        gflop = 2 * ci * co * 9 * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) / 1e9
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(f"{ci:>3} -> {co:<3} s{stride} at {h}x{w}: oneDNN {ms['oneDNN']:.3f} ms "
              f"({gflop / ms['oneDNN'] * 1e3:.0f} GFLOP/s), AMX {ms['AMX']:.3f} ms "
              f"({gflop / ms['AMX'] * 1e3:.0f}), {ms['oneDNN'] / ms['AMX']:.2f}x, "
              f"max |diff| {diff:.3g}")


def per_model(preset, rounds, switch, dtype=torch.bfloat16):
    """The ``dtype`` engine with ``switch`` (torch_cpu._AMX, _AMX_HEAD or _F32_HEAD) on and off."""
    ref = randomize_batchnorm(HighResolutionNet(HRNetConfig.preset(preset))).eval()
    x = torch.randn(1, 3, 512, 1024)
    engine = optimize(ref, backend="torch", dtype=dtype)
    times = {True: [], False: []}
    name = {id(torch_cpu._AMX_HEAD): "AMX head", id(torch_cpu._F32_HEAD): "fp32 head"}.get(
        id(switch), "AMX")
    with torch.inference_mode():
        e64 = ref.double()(x.double())
        ref.float()
        for on in (True, False):
            switch["on"] = on
            y = engine(x.to(dtype)).double()
            print(f"{preset} {name} {'on ' if on else 'off'}: rel. err {float((y - e64).norm() / e64.norm()):.2e}")
        for _ in range(rounds):
            for on in (True, False):
                switch["on"] = on
                time.sleep(0.03)
                t0 = time.perf_counter()
                engine(x.to(dtype))
                times[on].append(time.perf_counter() - t0)
    switch["on"] = True
    ratio = paired_speedup(times[False], times[True])
    print(f"{preset} {str(dtype)[6:]} 1x3x512x1024: {name} on "
          f"{1e3 * statistics.median(times[True]):.1f} ms, off "
          f"{1e3 * statistics.median(times[False]):.1f} ms, {ratio:.2f}x by per-round ratios")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["w18_small_v2", "w18"])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--switch", choices=("conv", "head"), default="conv",
                        help="what the model rounds switch on and off: the AMX conv kernel "
                             "(default) or the AMX seg head")
    args = parser.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()  # as the engine runs: warm calls reuse heap memory (no page faults)
    if not cpu_ext.amx_conv_supported():
        sys.exit("this CPU (or its OS) offers no AMX-BF16 tiles, or the CPU kernels did not build")
    switch = torch_cpu._AMX if args.switch == "conv" else torch_cpu._AMX_HEAD
    if args.switch == "conv":
        per_conv(args.rounds)
    for preset in args.models:
        per_model(preset, max(4, args.rounds // 5), switch)


if __name__ == "__main__":
    main()
