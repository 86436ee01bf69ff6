"""Wall-clock measurement shared by the CLI and the benchmarks: warm-up, then the median of
``repeats`` timed calls; CUDA work is synchronised (events would hide host-side launch overhead,
which is exactly what HRNet suffers from, so we time the whole call)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 2,
            repeats: int = 5) -> Dict[str, float]:
    """{"median_ms", "min_ms", "max_ms"} of ``fn()``."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def environment(device: torch.device) -> Dict[str, str]:
    """Versions and the device name, recorded with every figure."""
    info = {"torch": torch.__version__, "device": str(device), "threads": str(torch.get_num_threads())}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = "absent"
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cudnn"] = str(torch.backends.cudnn.version())
        info["cuda"] = str(torch.version.cuda)
    else:
        info["device_name"] = _cpu_name()
    return info


def _cpu_name() -> str:
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()
