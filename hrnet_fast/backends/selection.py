"""Which implementation runs: the only place that chooses, and the only reader of the
``HRNET_FAST_*`` environment variables.

Engine backends (``resolve_backend``): ``torch``, ``compile``, ``triton``, ``cuda`` and ``auto``, an
ordered list per device type (``AUTO_ORDER``: on CUDA the Triton kernels, then the CUDA extension,
then torch; on the CPU torch). ``backend=None`` means the process default, ``HRNET_FAST_BACKEND``,
else ``auto``. Asking for a backend that cannot run here raises one :class:`BackendUnavailable`
saying why; when nothing in ``auto``'s list fits, the error lists every backend's reason.

Public ops (``resolve_op``): the same names per op (``hrnet_fast.ops.*``' ``backend=`` argument).

Measured choices (``SelectingOp``): per-shape choice between implementations of one op, by
measurement. ``SelectingOp`` wraps several implementations with the same signature. The first call
for a new problem key (shapes, dtype, flags) times every candidate on the real arguments and
remembers the fastest; later calls go straight to it. Choices are cached per process and on disk
(``~/.cache/hrnet_fast/selection.json``, or ``HRNET_FAST_CACHE_DIR``), keyed by device name and
hrnet_fast/torch/triton versions, so a plan builds in seconds the next time. A cache file that
cannot be read, or entries that are not names, are ignored (and rewritten on the next save); a
cached name that is not a candidate is measured again. A save re-reads the file and merges its
entries with ours under an exclusive ``fcntl.flock`` on ``selection.json.lock`` (where fcntl
exists; elsewhere without a lock), then replaces the file atomically, so processes measuring at
the same time keep each other's choices. A cache that cannot be written is said once per process
(``RuntimeWarning``): every new process then measures again. ``HRNET_FAST_FORCE_<OP>=<name>``
(e.g. ``HRNET_FAST_FORCE_CONV2D_BIAS_ACT=torch``) overrides the choice. No measurement happens
during CUDA-graph capture: an unmeasured key then uses the first candidate, which is not
remembered as a choice.

What is timed (:func:`cuda_timer`): a candidate runs the way the engine runs it, inside a CUDA
graph. After two eager warm-up calls on a side stream (lazy initialisation, Triton autotuning and
compilation, none of which may happen during capture), ``n`` back-to-back calls are captured into
one graph, the graph is replayed a few times between CUDA events, and the median time per call is
returned. Graphs remove the host launch overhead; timing single eager launches would rank
kernels of a few microseconds by that host time instead of by their GPU time. A candidate that
refuses capture cannot run in a graph either, so it is timed as it will run: ``n`` back-to-back
eager launches between two events (median of several repeats, per call).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import threading
import warnings
from typing import Callable, Dict, Hashable, Iterator, Optional, Sequence, Tuple

import torch

try:
    import fcntl
except ImportError:  # Windows has no fcntl: saves go unlocked there
    fcntl = None

logger = logging.getLogger(__name__)
_LOCK = threading.Lock()
_DISK: Optional[Dict[str, str]] = None
_WARNED: set = set()  # cache paths whose failed save was already warned about


# ----------------------------------------------------------------------- environment variables

BACKEND_ENV = "HRNET_FAST_BACKEND"


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def default_backend() -> str:
    """``HRNET_FAST_BACKEND``, else ``"auto"``."""
    return _env(BACKEND_ENV).lower() or "auto"


def forced_choice(op: str) -> Optional[str]:
    """``HRNET_FAST_FORCE_<OP>``: the implementation a measured choice must take (tests, A/B)."""
    return _env(f"HRNET_FAST_FORCE_{op.upper()}") or None


def cache_dir() -> Optional[str]:
    """``HRNET_FAST_CACHE_DIR``: where the selection cache and JIT builds live, if set."""
    return _env("HRNET_FAST_CACHE_DIR") or None


def cuda_ext_mode() -> str:
    """``HRNET_FAST_CUDA_EXT``: "0" (off), "prebuilt" (no JIT build) or "" (default)."""
    return _env("HRNET_FAST_CUDA_EXT").lower()


def cpu_ext_mode() -> str:
    """``HRNET_FAST_CPU_EXT``: "0" turns the CPU fuse kernel off (no build); "" builds it at first
    use (hrnet_fast/cpu_ext.py)."""
    return _env("HRNET_FAST_CPU_EXT").lower()


CUDA_CHANNEL_MULTIPLE_ENV = "HRNET_FAST_CUDA_CHANNEL_MULTIPLE"


def cuda_channel_multiple() -> int:
    """``HRNET_FAST_CUDA_CHANNEL_MULTIPLE``: the channel multiple CUDA plans pad every branch to
    (default 8: the tensor-core width; 16 or 32 for an A/B of cuDNN's kernel choice on the thin
    branches, exact zero channels either way). A multiple of 8, or ValueError naming the variable."""
    raw = _env(CUDA_CHANNEL_MULTIPLE_ENV)
    if not raw:
        return 8
    try:
        m = int(raw)
    except ValueError:
        m = 0
    if m < 8 or m % 8:
        raise ValueError(f"{CUDA_CHANNEL_MULTIPLE_ENV}={raw!r}: must be a positive multiple of 8 "
                         "(tensor-core widths and 16-byte aligned channel slices)")
    return m


CUDA_MIN_CHANNELS_ENV = "HRNET_FAST_CUDA_MIN_CHANNELS"


def cuda_min_channels() -> int:
    """``HRNET_FAST_CUDA_MIN_CHANNELS``: CUDA plans also pad every narrower branch up to this width
    (default 0: none; e.g. 32 pads w18's 18-channel branch to 32 and leaves the others at the
    multiple of 8). A non-negative integer, or ValueError naming the variable."""
    raw = _env(CUDA_MIN_CHANNELS_ENV)
    if not raw:
        return 0
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"{CUDA_MIN_CHANNELS_ENV}={raw!r}: must be a non-negative integer")
    return n


def conv_tma_requested() -> bool:
    """``HRNET_FAST_CONV_TMA``: "1" lets the Triton conv feed eligible 3x3 convs with TMA copies
    (``kernels/conv_tma.py``; off by default until measured on a GPU)."""
    return _env("HRNET_FAST_CONV_TMA").lower() in ("1", "on", "true", "yes")


def verbose_build() -> bool:
    return _env("HRNET_FAST_VERBOSE_BUILD") == "1"


def cpu_heap_enabled() -> bool:
    """``HRNET_FAST_CPU_HEAP``: "0" leaves malloc's policy alone (backends/cpu_memory.py)."""
    return _env("HRNET_FAST_CPU_HEAP").lower() not in ("0", "off", "false", "no")


def debug_cli() -> bool:
    """``HRNET_FAST_DEBUG``: the CLI shows tracebacks."""
    return _env("HRNET_FAST_DEBUG").lower() not in ("", "0", "false", "no", "off")


# ------------------------------------------------------------------------------ engine backends

ENGINE_BACKENDS = ("auto", "torch", "compile", "triton", "cuda")
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("torch",)}


def backend_class(name: str, device: torch.device):
    """The Backend class that ``name`` means on ``device`` (``torch``: oneDNN or cuDNN)."""
    from .compile import Compile
    from .cuda import CudaExt
    from .torch_cpu import TorchCPU
    from .torch_cuda import TorchCUDA
    from .triton import Triton
    if name == "torch":
        return TorchCUDA if device.type == "cuda" else TorchCPU
    return {"compile": Compile, "triton": Triton, "cuda": CudaExt}[name]


def _status(name: str, device: torch.device) -> Tuple[bool, str]:
    if name == "compile":
        return backend_class("torch", device).available(device)
    if name == "cuda" and device.type == "cuda":
        from .cuda import cuda_ext_ready
        if not cuda_ext_ready():  # auto never starts a minutes-long JIT build
            return False, "the CUDA extension is not built (auto does not JIT-build it)"
    return backend_class(name, device).available(device)


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The concrete engine backend for ``backend`` on ``device``; BackendUnavailable says why not."""
    from .base import BackendUnavailable
    name = (backend or default_backend()).lower()
    if name not in ENGINE_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {ENGINE_BACKENDS}")
    if name == "auto":
        reasons = []
        for cand in AUTO_ORDER.get(device.type, ("torch",)):
            ok, why = _status(cand, device)
            if ok:
                return cand
            reasons.append(f"{cand}: {why}")
        raise BackendUnavailable(f"no backend can run on {device}: " + "; ".join(reasons))
    ok, why = backend_class(name, device).available(device)
    if not ok:
        raise BackendUnavailable(f"backend {name!r} is not available on {device.type}: {why}")
    return name


def candidates(op: str, always: Dict[str, Callable], optional: Dict[str, Callable],
               device: torch.device) -> Dict[str, Callable]:
    """Candidates of a measured choice. On the CPU nothing can be timed, so the optional (Triton)
    candidates join only when ``HRNET_FAST_FORCE_<OP>`` names one (tests, interpreter)."""
    if device.type == "cuda":
        return {**always, **optional}
    forced = forced_choice(op)
    return {**always, **({forced: optional[forced]} if forced in optional else {})}


# ---------------------------------------------------------------------------------- public ops

OP_BACKENDS = ("torch", "triton", "cuda")
# ``auto`` on CUDA, per op: the fused Triton kernels first for the memory-bound fuse ops;
# convolutions stay on cuDNN (the engine's explicit triton backend measures per layer).
_OP_AUTO_ORDER = {"upsample_add_relu": ("triton", "cuda", "torch"),
                  "seg_head": ("triton", "torch"), "conv2d_bias_act": ("torch",)}


def _op_table(op: str) -> Dict[str, Tuple[Callable, Callable]]:
    """{backend: (function, status(device))} for one public op."""
    from ..ops.fuse import seg_head_torch, upsample_add_relu_torch
    from . import cuda, torch_cuda, triton

    def always(_device):
        return True, ""

    def kernels(module):
        return lambda device: triton.kernels_status(device, module)

    return {
        "upsample_add_relu": {"torch": (upsample_add_relu_torch, always),
                              "triton": (triton.fuse_triton, kernels("upsample_add_relu")),
                              "cuda": (cuda.fuse_cuda, cuda.CudaExt.available)},
        "seg_head": {"torch": (seg_head_torch, always),
                     "triton": (triton.seg_head_triton, kernels("seg_head"))},
        "conv2d_bias_act": {"torch": (torch_cuda.conv2d_bias_act_cudnn, always),
                            "triton": (triton.conv2d_bias_act_triton, kernels("conv"))},
    }[op]


def op_status(op: str, backend: str, device) -> Tuple[bool, str]:
    table = _op_table(op)
    if backend not in table:
        if backend not in OP_BACKENDS:
            return False, f"unknown backend {backend!r}; choose one of {('auto',) + OP_BACKENDS}"
        return False, f"op {op} has no {backend} implementation"
    return table[backend][1](torch.device(device))


def resolve_op(op: str, backend: Optional[str], device) -> Tuple[str, Callable]:
    """(backend name, function) for public op ``op`` on ``device``; BackendUnavailable says why."""
    from .base import BackendUnavailable
    name = (backend or default_backend()).lower()
    device = torch.device(device)
    table = _op_table(op)
    if name == "auto":
        order = _OP_AUTO_ORDER[op] if device.type == "cuda" else ("torch",)
        for cand in order:
            if table[cand][1](device)[0]:
                return cand, table[cand][0]
        return "torch", table["torch"][0]
    ok, why = op_status(op, name, device)
    if not ok:
        raise BackendUnavailable(f"backend {name!r} is not available for {op} on {device.type}: {why}")
    return name, table[name][0]


# ------------------------------------------------------------------------------ measured choices

def cache_path() -> str:
    root = cache_dir() or os.path.join(os.path.expanduser("~"), ".cache", "hrnet_fast")
    return os.path.join(root, "selection.json")


def _read_disk() -> Dict[str, str]:
    """The cache file's ``{key: name}`` entries; anything unreadable or not a name is dropped."""
    try:
        with open(cache_path(), "rb") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return {}
    except Exception as e:  # not JSON, not UTF-8, unreadable: start afresh, rewrite on save
        logger.info("ignoring the selection cache %s: %s", cache_path(), e)
        return {}
    if not isinstance(raw, dict):
        logger.info("ignoring the selection cache %s: not a JSON object", cache_path())
        return {}
    return {k: v for k, v in raw.items() if isinstance(v, str)}


def _disk() -> Dict[str, str]:
    global _DISK
    if _DISK is None:
        _DISK = _read_disk()
    return _DISK


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed) for the block; no lock without fcntl
    or where the file system refuses one (then concurrent saves may drop entries, as before)."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # e.g. a network file system without locks
            logger.info("saving the selection cache without a lock: %s", e)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _save_disk() -> None:
    """Merge the file's current entries into ours (ours win on a clash) and write the union
    atomically, all under the file lock. Called with ``_LOCK`` held."""
    path = cache_path()
    ours = _disk()
    tmp = path + f".{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _file_lock(path + ".lock"):
            merged = _read_disk()  # what other processes saved since we read it
            merged.update(ours)
            ours.update(merged)
            with open(tmp, "w") as f:
                json.dump(merged, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
    except OSError as e:  # a read-only home must not break inference
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if path not in _WARNED:
            _WARNED.add(path)
            warnings.warn(
                f"hrnet_fast: could not save the selection cache {path} ({e}): the selection "
                "cache is not writable, so every new process measures its implementation choices "
                "again (slower start). Set HRNET_FAST_CACHE_DIR to a writable directory.",
                RuntimeWarning, stacklevel=4)


def _package_version() -> str:
    import hrnet_fast  # at call time: the package is imported by then (no import cycle)
    version = getattr(hrnet_fast, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version
        return dist_version("hrnet_fast")
    except Exception:
        return "unknown"


def _device_tag(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "none"
    return f"{name}|hrnet_fast {_package_version()}|torch {torch.__version__}|triton {tv}"


def _per_call_ms(run: Callable[[], object], calls: int, repeats: int,
                 event: Callable[[], object]) -> float:
    """Median over ``repeats`` of the milliseconds between two events around ``run()``, divided
    by the ``calls`` that one ``run()`` makes."""
    times = []
    for _ in range(repeats):
        start, end = event(), event()
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def time_calls(fn: Callable[[], object], n: int, repeats: int,
               capture: Callable[[Callable[[], None]], object],
               event: Callable[[], object]) -> float:
    """Milliseconds per call of ``fn`` (already warmed up). ``capture(body)`` records ``body``
    (``n`` calls of ``fn``) into a graph with ``replay()`` and ``reset()``; the graph is replayed
    once untimed (upload), then timed ``repeats`` times, then reset. If capture raises, ``n``
    back-to-back eager calls are timed ``repeats`` times instead. ``event()`` makes a timing event
    (``record``, ``synchronize``, ``elapsed_time``)."""
    def body() -> None:
        for _ in range(n):
            fn()

    try:
        graph = capture(body)
    except Exception as e:  # an op that refuses capture (host sync, unsupported call, ...)
        logger.info("timing without a CUDA graph (capture failed: %s)", e)
        return _per_call_ms(body, n, repeats, event)
    try:
        graph.replay()
        return _per_call_ms(graph.replay, n, repeats, event)
    finally:
        graph.reset()  # frees the graph and its memory pool


def _capture_cuda_graph(body: Callable[[], None]) -> "torch.cuda.CUDAGraph":
    graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
    stream = torch.cuda.current_stream()
    try:
        # thread_local: other threads' CUDA calls neither fail nor invalidate this capture.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            body()
    except BaseException:
        _clean_up_failed_capture(stream, pool)
        raise
    return graph


def _clean_up_failed_capture(stream: "torch.cuda.Stream", pool) -> None:
    """Undo what a failed capture leaves behind (seen with torch 2.11): the capture stream stays
    current, the caching allocator keeps routing to the graph's pool, and the CUDA RNG stays in
    capture mode, so that every later random op raises "Offset increment outside graph capture".
    A tiny capture that succeeds takes the RNG out of capture mode."""
    torch.cuda.set_stream(stream)
    device = torch.cuda.current_device()
    try:
        torch._C._cuda_endAllocateToPool(device, pool)
    except Exception:  # torch already ended it: the pool is the graph's to release
        pass
    else:
        torch._C._cuda_releasePool(device, pool)
    try:
        x, graph = torch.zeros(1, device=device), torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x.add_(1)
        graph.reset()
    except Exception as e:
        logger.warning("could not restore the CUDA state after a failed graph capture: %s", e)


def _timing_event() -> "torch.cuda.Event":
    return torch.cuda.Event(enable_timing=True)


def cuda_timer(fn: Callable[[], object], device: torch.device, n: int = 20,
               repeats: int = 5) -> float:
    """Median milliseconds per call of ``fn()`` as it runs in a CUDA graph (module docstring)."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy init, Triton autotuning/compilation
                fn()
        torch.cuda.current_stream().wait_stream(side)
        return time_calls(fn, n, repeats, _capture_cuda_graph, _timing_event)


class SelectingOp:
    """Calls the fastest of ``candidates`` for each problem key (see module docstring)."""

    def __init__(self, op: str, candidates: Dict[str, Callable], key_fn: Callable[..., Hashable],
                 timer: Callable[[Callable[[], object], torch.device], float] = cuda_timer,
                 persist: bool = True) -> None:
        if not candidates:
            raise ValueError(f"no candidates for {op}")
        self.op = op
        self.candidates = dict(candidates)
        self.key_fn = key_fn
        self.timer = timer
        self.persist = persist
        self.choices: Dict[Hashable, str] = {}
        self.timings: Dict[Hashable, Dict[str, float]] = {}

    def forced(self) -> Optional[str]:
        name = forced_choice(self.op)
        if name and name not in self.candidates:
            raise ValueError(f"HRNET_FAST_FORCE_{self.op.upper()}={name!r}: choose one of "
                             f"{sorted(self.candidates)}")
        return name

    def choose(self, device: torch.device, key: Hashable, args: Sequence, kwargs: dict) -> str:
        forced = self.forced()
        if forced:
            return forced
        if key in self.choices:
            return self.choices[key]
        first = next(iter(self.candidates))
        if len(self.candidates) == 1:
            return first
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return first  # no timing inside a capture; not remembered, so measured later
        disk_key = f"{_device_tag(device)}|{self.op}|{key}"
        with _LOCK:
            cached = _disk().get(disk_key) if self.persist else None
        if cached in self.candidates:
            self.choices[key] = cached
            return cached
        timings = {}
        for name, fn in self.candidates.items():
            try:
                timings[name] = self.timer(lambda: fn(*args, **kwargs), device)
            except Exception as e:  # a candidate that cannot run this problem is not chosen
                logger.info("%s: candidate %s failed on %s: %s", self.op, name, key, e)
        if not timings:
            raise RuntimeError(f"{self.op}: no implementation could run problem {key}")
        best = min(timings, key=timings.get)
        self.choices[key], self.timings[key] = best, timings
        if self.persist:
            with _LOCK:
                _disk()[disk_key] = best
                _save_disk()
        return best

    def __call__(self, *args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        key = self.key_fn(*args, **kwargs)
        name = self.choose(device, key, args, kwargs)
        return self.candidates[name](*args, **kwargs)


def fuse_key(base, contributions, mode, align_corners, relu, bias=None) -> Hashable:
    return (tuple(base.shape), tuple(tuple(c.shape[-2:]) for c in contributions), str(base.dtype),
            mode, bool(align_corners), bool(relu),
            base.is_contiguous(memory_format=torch.channels_last), bias is not None)
