"""Helpers for tests: random non-trivial BatchNorm statistics, relative error, poisoned buffers."""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
from typing import Optional

import pytest
import torch

from hrnet_fast.check import randomize_batchnorm as randomize_bn  # noqa: F401
from hrnet_fast.check import rel_err  # noqa: F401

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require_native_precision(dtype: torch.dtype, device=DEVICE) -> None:
    """Skip, saying so, where the CPU engine refuses ``dtype`` because this CPU would emulate it
    (bfloat16 without AVX512-BF16/AMX, float16 without AVX512-FP16/AMX-FP16): the engine is then
    NOT tested in that dtype here. The refusal itself is tested on every machine
    (tests/test_cpu_precision.py)."""
    if torch.device(device).type != "cpu" or dtype == torch.float32:
        return
    from hrnet_fast.backends.torch_cpu import native_precision
    ok, why = native_precision(dtype)
    if not ok:
        pytest.skip(f"{why}: the {dtype} CPU engine is NOT tested on this machine")


def seeded_cl(shape, seed: int) -> torch.Tensor:
    """A float32 standard-normal tensor from its own seeded generator, channels_last."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).contiguous(memory_format=torch.channels_last)


def spy_calls(monkeypatch, name: str, record) -> list:
    """Replaces ``cpu_ext.<name>`` (a kernel wrapper taking x first) by a spy that appends
    ``record(x, *args, **kwargs)`` to the returned list before calling the real wrapper."""
    from hrnet_fast import cpu_ext
    calls = []
    real = getattr(cpu_ext, name)

    def spy(x, *args, **kwargs):
        calls.append(record(x, *args, **kwargs))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(cpu_ext, name, spy)
    return calls


def planted_failure_messages(monkeypatch, name: str, failing, what: str) -> list:
    """The RuntimeWarning messages of two calls of a w18_small_v2 torch engine (1x3x64x80) with
    ``cpu_ext.<name>`` replaced by ``failing``; each call's output held to the float64 reference
    (runtime_warnings_over_two_calls), the backend's warn-once memory reset first."""
    from hrnet_fast import cpu_ext, optimize
    from hrnet_fast.backends import torch_cpu
    from hrnet_fast.reference import HighResolutionNet
    monkeypatch.setattr(torch_cpu, "_WARNED", set())
    model = bn_model("w18_small_v2")
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(13))
    with torch.inference_mode():
        ref64 = HighResolutionNet.forward(model.double(), x.double())
    model.float()
    monkeypatch.setattr(cpu_ext, name, failing)
    return runtime_warnings_over_two_calls(optimize(model, backend="torch"), x, ref64, what)


def bn_model(preset: str, mode: str = "bilinear", head: str = "seg", seed: int = 0):
    """A reference-only HRNet (``fast=False``) of ``preset`` with random weights and randomized
    BatchNorm statistics, in eval mode: what the engine tests optimize and compare."""
    from hrnet_fast import HRNet, HRNetConfig
    torch.manual_seed(seed)
    cfg = HRNetConfig.preset(preset, upsample=mode, head=head)
    return randomize_bn(HRNet(cfg, fast=False), seed).eval()


def hoisted_w18_small_v1(mode: str):
    """A w18_small_v1 seg reference (randomized BatchNorm, eval, on DEVICE), a 2x3x45x61
    channels_last input, and its CUDA-style plan (padded to 8 channels, biases hoisted) in float32
    channels_last: what the Triton backend's engine-level kernel tests run."""
    from hrnet_fast import HRNetConfig
    from hrnet_fast.plan import build_plan
    from hrnet_fast.reference import HighResolutionNet
    model = randomize_bn(HighResolutionNet(HRNetConfig.preset("w18_small_v1", upsample=mode)))
    model = model.eval().to(DEVICE)
    x = torch.randn(2, 3, 45, 61, device=DEVICE).contiguous(memory_format=torch.channels_last)
    plan = build_plan(model, channel_multiple=8, hoist_biases=True).map_tensors(
        lambda t: t.float().contiguous(memory_format=torch.channels_last) if t.dim() == 4
        else t.float().contiguous())
    return model, x, plan


def failing_from_call(calls: list, real, fail_at: int):
    """A stand-in for a kernel wrapper: ``real(...)`` until the spy's call log ``calls`` holds
    ``fail_at - 1`` calls, then RuntimeError("planted failure") on every call."""
    def failing(*args, **kwargs):
        if len(calls) + 1 >= fail_at:
            raise RuntimeError("planted failure")
        return real(*args, **kwargs)
    return failing


def require_cpu_kernels(what: str, avx: bool = True) -> None:
    """Skips the calling test (or fixture) unless the CPU kernels are built here and, with ``avx``,
    torch's CPU capability is AVX-512 or AVX2 (what the AVX kernels need): ``what`` is then NOT
    tested, and the skip says why."""
    from hrnet_fast import cpu_ext
    ok, why = cpu_ext.cpu_ext_status()
    if not ok:
        pytest.skip(f"the CPU kernels could not be built here ({why}): {what} is NOT tested")
    if avx and not cpu_ext.thin_conv_supported():
        pytest.skip(f"torch's CPU capability is neither AVX-512 nor AVX2 here: {what} is NOT tested")


def runtime_warnings_over_two_calls(engine, x, ref64, what: str) -> list:
    """The RuntimeWarning messages of two calls of ``engine(x)`` (inference mode), each call's
    output held to the float64 reference ``ref64`` at the float32 model bound."""
    import warnings

    from oracles import assert_model_close
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with torch.inference_mode():
                out = engine(x)
            assert_model_close(out, ref64, dtype=torch.float32, what=what)
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def once_per_session(tmp_path_factory, name: str, compute):
    """``compute()`` (a JSON-able result) run once per test session, also under pytest-xdist: the
    workers share it through a file in the session's common temporary folder, under a file lock, so
    an expensive module fixture (the sm_90 compile: 60-150 s on 2 cores) is not built once per worker
    that happens to get one of its tests. Without xdist it simply runs ``compute()``."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return compute()
    from filelock import FileLock  # a torch dependency
    shared = tmp_path_factory.getbasetemp().parent / f"{name}.json"  # this session's, not older ones'
    with FileLock(str(shared) + ".lock"):
        if shared.is_file():
            return json.loads(shared.read_text())
        result = compute()
        shared.write_text(json.dumps(result))
        return result


@contextlib.contextmanager
def poisoned_allocations(monkeypatch):
    """Within the block, ``torch.empty`` / ``torch.empty_like`` return NaN-filled memory, so an output
    element that an implementation allocates but never writes shows up as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", empty)
        m.setattr(torch, "empty_like", empty_like)
        yield


@contextlib.contextmanager
def poisoned_malloc():
    """Within the block, fresh C/C++ heap memory (the kernel's ``at::empty``) holds the bytes 0x7f:
    3.4e38 in float32 and bfloat16, NaN in float16, so an output value the kernel never writes
    fails the oracle (``torch.empty`` in Python is covered by poisoned_allocations). glibc only (``mallopt(M_PERTURB)``)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        pytest.skip("no mallopt (not glibc): the kernel's own allocation is NOT poisoned here")
    m_perturb = -6
    mallopt(m_perturb, 0x80)  # glibc fills allocations with 0x80 ^ 0xff = 0x7f
    try:
        probe = torch.empty(3, 17, 9, 11)
        if not bool((probe.view(torch.int32) == 0x7F7F7F7F).all()):
            pytest.skip("mallopt(M_PERTURB) did not poison torch's allocations here")
        yield
    finally:
        mallopt(m_perturb, 0)


def assert_graph_replay_equal(fn, x: torch.Tensor) -> None:
    """``fn(x)`` captured in a CUDA graph (after one eager warm-up call), replayed on a fresh input
    written into ``x``, equals an eager call on that input bit for bit."""
    fn(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, fn(x))


def spy_triton_launches(monkeypatch, args: Optional[list] = None):
    """Record the constexpr keyword arguments of every Triton launch made through wrap_triton (and
    its positional arguments into ``args``, if given)."""
    seen = []
    real = torch.library.wrap_triton

    def spy(kernel):
        launcher = real(kernel)

        class _Grid:
            def __getitem__(self, grid):
                run = launcher[grid]

                def call(*positional, **kwargs):
                    seen.append(kwargs)
                    if args is not None:
                        args.append(positional)
                    return run(*positional, **kwargs)
                return call
        return _Grid()

    monkeypatch.setattr(torch.library, "wrap_triton", spy)
    return seen
