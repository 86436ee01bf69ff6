"""hrnet_fast's bfloat16 CPU engine against OpenVINO at its default precision (bf16 on CPUs with
AVX512-BF16/AMX), in one process: same weights (random, random BatchNorm statistics), same
1x3x512x1024 input, round robin with a 50 ms idle gap before each call, median of --rounds (7),
2 threads.

    python benchmarks/bench_cpu_bf16.py [--rounds 7] [w18_small_v2 w18]

Needs ``pip install -e '.[peers]'``. Prints each row's time and its relative error against an fp64
reference, with the reference model's own bf16 error for scale.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hrnet_fast import HRNetConfig, optimize  # noqa: E402
from hrnet_fast.bench import paired_speedup  # noqa: E402
from hrnet_fast.check import clone_as, randomize_batchnorm, rel_err  # noqa: E402
from hrnet_fast.peers import OnnxExport, build_peer  # noqa: E402
from hrnet_fast.reference import HighResolutionNet  # noqa: E402


def main(presets, rounds: int) -> None:
    torch.set_num_threads(2)
    for preset in presets:
        ref = randomize_batchnorm(HighResolutionNet(HRNetConfig.preset(preset))).eval()
        x = torch.randn(1, 3, 512, 1024)
        with torch.inference_mode():
            ref64 = clone_as(ref, torch.float64)(x.double())
            own = rel_err(clone_as(ref, torch.bfloat16)(x.bfloat16()), ref64)
        engine = optimize(ref, backend="torch", dtype=torch.bfloat16)
        with OnnxExport(ref, x) as export, torch.inference_mode():
            openvino, info = build_peer("openvino", export, torch.device("cpu"), torch.float32)
            rows = {"hrnet_fast bf16": lambda: engine(x.bfloat16()), "OpenVINO default": lambda: openvino(x)}
            outs = {name: fn() for name, fn in rows.items()}
            times = {name: [] for name in rows}
            for _ in range(rounds):
                for name, fn in rows.items():
                    time.sleep(0.05)
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(1e3 * (time.perf_counter() - t0))
        for name in rows:
            print(f"{preset}  {name:18s} {statistics.median(times[name]):7.0f} ms  rel. err "
                  f"{rel_err(outs[name].float(), ref64):.2e} (reference in bf16 {own:.2e})"
                  + (f"  [{info.get('precision')}]" if name.startswith("OpenVINO") else ""))
        ratio = paired_speedup(times["OpenVINO default"], times["hrnet_fast bf16"])
        ratios = sorted(p / o for p, o in zip(times["OpenVINO default"], times["hrnet_fast bf16"]))
        print(f"{preset}  hrnet_fast bf16 is {ratio:.2f}x OpenVINO's default by the median of "
              f"per-round ratios (goal >= 1.0); rounds from {ratios[0]:.2f}x to {ratios[-1]:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("presets", nargs="*", default=["w18_small_v2", "w18"])
    args = parser.parse_args()
    main(args.presets, args.rounds)
