"""Shared test setup.

Without a CUDA GPU, the Triton kernels run under the CPU interpreter: TRITON_INTERPRET must be set
before triton is first imported, which is why it happens here, before any test module loads.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist (``pytest -n``) the workers share the cores: one torch thread per core each,
# not torch's default of every core per worker. On 2 cores, -n 2 with 2 threads per worker ran the
# suite in 720 s, with 1 thread per worker in 495-596 s, against about 745 s serially (2-vCPU EPYC).
# Set before any test runs (thread-dependent paths read it); subprocesses inherit OMP_NUM_THREADS.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _XDIST_WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = max(1, _cores // _XDIST_WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _no_tf32():
    # fp32 comparisons at 1e-5 need exact fp32 matmuls and convolutions on the GPU.
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    yield
