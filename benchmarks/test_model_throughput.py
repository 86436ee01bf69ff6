"""Model throughput, hrnet_fast vs the reference (pytest-benchmark).

    pytest benchmarks --benchmark-only                       # all cases this machine can run
    pytest benchmarks --benchmark-only --benchmark-json out.json

CPU cases: w18_small_v2 at 1x3x512x1024 fp32 (reference eager vs the torch backend).
GPU cases: w18 and w48 at 1x3x1024x2048 fp16 (reference eager, torch.compile of the reference,
and the engine backends with and without CUDA graphs). GPU timings are synchronised.
Every result carries the device name and versions in ``extra_info``.
"""
import pytest
import torch

from hrnet_fast import HRNetConfig, optimize
from hrnet_fast.check import randomize_batchnorm
from hrnet_fast.backends import BackendUnavailable
from hrnet_fast.reference import HighResolutionNet
from hrnet_fast.timing import environment

HAS_GPU = torch.cuda.is_available()
CPU_CASES = [("w18_small_v2", (512, 1024), 1, torch.float32, impl) for impl in ("reference", "torch")]
GPU_CASES = [(p, (1024, 2048), 1, torch.float16, impl) for p in ("w18", "w48")
             for impl in ("reference", "compile-reference", "torch", "torch+graphs", "triton",
                          "triton+graphs", "compile")]


def _build(preset, dtype, device, impl):
    torch.manual_seed(0)
    ref = randomize_batchnorm(HighResolutionNet(HRNetConfig.preset(preset)))
    ref = ref.to(device=device, dtype=dtype).eval()
    if impl == "reference":
        return ref
    if impl == "compile-reference":
        return torch.compile(ref)
    backend, _, graphs = impl.partition("+")
    return optimize(ref, backend=backend, cuda_graphs=True if graphs else None)


def _run_case(benchmark, preset, size, batch, dtype, impl, device):
    try:
        fn = _build(preset, dtype, device, impl)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    x = torch.randn(batch, 3, *size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        fn(x)
        sync()

    with torch.inference_mode():
        for _ in range(3):
            step()
        benchmark.extra_info.update(environment(device))
        benchmark.extra_info.update(preset=preset, size=f"{size[0]}x{size[1]}", batch=batch,
                                    dtype=str(dtype), impl=impl)
        benchmark.pedantic(step, rounds=10 if device.type == "cuda" else 5, iterations=1)


@pytest.mark.parametrize("preset,size,batch,dtype,impl", CPU_CASES,
                         ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}-{c[4]}" for c in CPU_CASES])
def test_cpu_throughput(benchmark, preset, size, batch, dtype, impl):
    benchmark.group = f"cpu {preset} {size[0]}x{size[1]} fp32"
    _run_case(benchmark, preset, size, batch, dtype, impl, torch.device("cpu"))


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset,size,batch,dtype,impl", GPU_CASES,
                         ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}-{c[4]}" for c in GPU_CASES])
def test_gpu_throughput(benchmark, preset, size, batch, dtype, impl):
    benchmark.group = f"gpu {preset} {size[0]}x{size[1]} fp16"
    _run_case(benchmark, preset, size, batch, dtype, impl, torch.device("cuda"))
