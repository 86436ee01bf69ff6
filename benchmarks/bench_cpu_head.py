"""The CPU seg head in one pass (csrc/cpu_head_f32.cpp in float32, csrc/cpu_head_amx.cpp in
bfloat16) against the unfused head as the engine ran it (projection conv, the fuse kernel written
over it, the classifier), in one process; then whole engines with the fused head on and off.

    python benchmarks/bench_cpu_head.py [--dtypes fp32 bf16] [--rounds 40] [--models w18_small_v2 w18]

Head alone: w18's head at 1x3x512x1024 (126 -> 270 -> 19 at 128x256, branch 3's projection at
16x32, bilinear), 2 threads, a 256 MB buffer written before each call (the head's inputs are then
touched again, as the engine has just written them), fused and unfused alternating, medians and
the median of per-round ratios. Models: ``bench_cpu_amx.per_model`` with the head's switch. bf16
needs AMX, fp32 AVX-512.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hrnet_fast.backends.torch_cpu as torch_cpu  # noqa: E402
from bench_cpu_amx import per_model  # noqa: E402
from hrnet_fast import cpu_ext  # noqa: E402
from hrnet_fast.backends.cpu_memory import keep_freed_memory  # noqa: E402
from hrnet_fast.bench import paired_speedup  # noqa: E402
from hrnet_fast.plan import ConvSpec  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def head_alone(dtype, rounds):
    torch.manual_seed(0)
    cl = torch.channels_last
    ci, h, w, cm, co = 126, 128, 256, 270, 19
    x = torch.randn(1, ci, h, w).to(dtype).contiguous(memory_format=cl)
    spec = ConvSpec((torch.randn(cm, ci, 1, 1) / ci ** 0.5).to(dtype), torch.randn(cm).to(dtype),
                    1, 0, relu=False)
    wc, bc = (torch.randn(co, cm, 1, 1) / cm ** 0.5).to(dtype), torch.randn(co).to(dtype)
    cs = [torch.randn(1, cm, 16, 32).to(dtype).contiguous(memory_format=cl)]
    be = torch_cpu.TorchCPU(None, torch.device("cpu"), dtype)
    flush = torch.empty(64 * 2 ** 20)

    def fused():
        return be.projected_head(x, spec, cs, wc, bc, "bilinear", False)

    def unfused():
        return be.head(be.conv(x, spec), cs, wc, bc, "bilinear", False)

    times = {"fused": [], "unfused": []}
    with torch.inference_mode():
        if fused() is None:
            print(f"{dtype}: the fused head does not run here (no AMX / AVX-512 or no build)")
            return
        diff = float((fused().float() - unfused().float()).norm() / unfused().float().norm())
        for r in range(rounds):
            for name in (("fused", "unfused") if r % 2 else ("unfused", "fused")):
                flush.fill_(r)
                x.add_(0)
                for c in cs:
                    c.add_(0)
                t0 = time.perf_counter()
                (fused if name == "fused" else unfused)()
                times[name].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(f"w18 head {str(dtype)[6:]}: fused {ms['fused']:.2f} ms, unfused {ms['unfused']:.2f} "
          f"ms, {paired_speedup(times['unfused'], times['fused']):.2f}x by per-round ratios "
          f"(rel. difference {diff:.2e})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--models", nargs="*", default=[])
    args = parser.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()  # as the engine runs: warm calls reuse heap memory (no page faults)
    if not cpu_ext.load_extension():
        sys.exit(f"the CPU kernels did not build: {cpu_ext.cpu_ext_status()[1]}")
    for name in args.dtypes:
        head_alone(DTYPES[name], args.rounds)
    for name in args.dtypes:
        switch = torch_cpu._F32_HEAD if name == "fp32" else torch_cpu._AMX_HEAD
        for preset in args.models:
            per_model(preset, max(4, args.rounds // 2), switch, DTYPES[name])


if __name__ == "__main__":
    main()
