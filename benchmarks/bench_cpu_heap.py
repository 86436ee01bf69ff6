"""The CPU memory policy (hrnet_fast/backends/cpu_memory.py) on and off, each in fresh processes
(malloc's policy is process-wide), alternating: median ms of 7 warm calls, system time and minor
page faults per call; torch backend, fp32, 1x3x512x1024, 2 threads.

    python benchmarks/bench_cpu_heap.py [w18_small_v2 w18]
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = r'''
import json, resource, statistics, sys, time, torch
from hrnet_fast import HRNetConfig, optimize
from hrnet_fast.check import randomize_batchnorm
from hrnet_fast.reference import HighResolutionNet
torch.set_num_threads(2)
engine = optimize(randomize_batchnorm(HighResolutionNet(HRNetConfig.preset(sys.argv[1]))).eval(),
                  backend="torch")
x = torch.randn(1, 3, 512, 1024)
times = []
with torch.inference_mode():
    engine(x)
    engine(x)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(7):
        t0 = time.perf_counter()
        engine(x)
        times.append(1e3 * (time.perf_counter() - t0))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"ms": statistics.median(times), "sys_ms": 1e3 * (r1.ru_stime - r0.ru_stime) / 7,
                  "faults": (r1.ru_minflt - r0.ru_minflt) / 7}))
'''


def run(preset: str, on: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    if not on:
        env["HRNET_FAST_CPU_HEAP"] = "0"
    out = subprocess.run([sys.executable, "-c", SCRIPT, preset], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(presets) -> None:
    for preset in presets:
        for _ in range(2):
            for on in (True, False):
                r = run(preset, on)
                print(f"{preset}  policy {'on ' if on else 'off'}  {r['ms']:6.0f} ms  system "
                      f"{r['sys_ms']:4.0f} ms  minor faults {r['faults']:7.0f} per call")


if __name__ == "__main__":
    main(sys.argv[1:] or ["w18_small_v2", "w18"])
