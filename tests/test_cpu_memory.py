"""The CPU memory policy (backends/cpu_memory.py): warm calls fault in no new pages. Each case runs
in a fresh process, because malloc's policy is process-wide."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = r"""
import json, resource, torch
from hrnet_fast import HRNetConfig, optimize
from hrnet_fast.backends import cpu_memory
from hrnet_fast.reference import HighResolutionNet
torch.manual_seed(0)
torch.set_num_threads(2)  # the faults come from multi-threaded runs (one thread reuses its heap)
engine = optimize(HighResolutionNet(HRNetConfig.preset("w18_small_v1")).eval(), backend="torch")
x = torch.randn(1, 3, 256, 512)
with torch.no_grad():
    faults = []
    for _ in range(5):  # the first calls still shape the heap (caches, first outputs)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        engine(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    faults = min(faults[3:])
    got, want = engine(x), engine.source(x)
print(json.dumps({"faults": faults, "status": cpu_memory.status(), "same": bool((got - want).abs().max() < 1e-4)}))
"""


def _run(env_extra):
    # A clean environment: glibc's dynamic mmap threshold, and so the faults without the policy,
    # depend on what else the process allocated (e.g. TRITON_INTERPRET imports triton's interpreter).
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env = dict(keep, PYTHONPATH=ROOT, OMP_NUM_THREADS="2", **env_extra)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the policy is for glibc (Linux)")
def test_warm_calls_fault_in_no_new_pages():
    """Without the policy the faults per warm call depend on the process's memory layout: here 0,
    1,888 or 3,680 for w18_small_v1 at 256x512 as the environment's size changed (glibc's dynamic
    mmap threshold). With it they are 0 for every layout, which is what this checks."""
    for pad in (40, 1000):  # two layouts that fault without the policy here
        on = _run({"PAD": "x" * pad})
        assert on["status"] == "in force" and on["same"], on
        assert on["faults"] <= 100, (pad, on)
    off = _run({"HRNET_FAST_CPU_HEAP": "0"})
    assert off["status"] == "disabled by HRNET_FAST_CPU_HEAP=0" and off["same"], off
