"""Per-shape choice between implementations of one op, by measurement.

``SelectingOp`` wraps several implementations with the same signature. The first call for a new
problem key (shapes, dtype, flags) times every candidate on the real arguments and remembers the
fastest; later calls go straight to it. Choices are cached per process and on disk
(``~/.cache/hrnet_fast/selection.json``, or ``HRNET_FAST_CACHE_DIR``), keyed by device name and
library versions, so a plan builds in seconds the next time. ``HRNET_FAST_FORCE_<OP>=<name>``
(e.g. ``HRNET_FAST_FORCE_CONV2D_BIAS_ACT=torch``) overrides the choice. No measurement happens
during CUDA-graph capture: an unmeasured key then uses the first candidate.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import threading
from typing import Callable, Dict, Hashable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)
_LOCK = threading.Lock()
_DISK: Optional[Dict[str, str]] = None


def cache_path() -> str:
    root = os.environ.get("HRNET_FAST_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "hrnet_fast")
    return os.path.join(root, "selection.json")


def _disk() -> Dict[str, str]:
    global _DISK
    if _DISK is None:
        try:
            with open(cache_path()) as f:
                _DISK = dict(json.load(f))
        except (OSError, ValueError):
            _DISK = {}
    return _DISK


def _save_disk() -> None:
    try:
        os.makedirs(os.path.dirname(cache_path()), exist_ok=True)
        tmp = cache_path() + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(_DISK, f, indent=0, sort_keys=True)
        os.replace(tmp, cache_path())
    except OSError as e:  # a read-only home must not break inference
        logger.info("could not save the selection cache: %s", e)


def _device_tag(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "none"
    return f"{name}|torch {torch.__version__}|triton {tv}"


def cuda_timer(fn: Callable[[], object], device: torch.device, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream (after two warm-up calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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
        name = os.environ.get(f"HRNET_FAST_FORCE_{self.op.upper()}")
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
            return first
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


def fuse_key(base, contributions, mode, align_corners, relu) -> Hashable:
    return (tuple(base.shape), tuple(tuple(c.shape[-2:]) for c in contributions), str(base.dtype),
            mode, bool(align_corners), bool(relu),
            base.is_contiguous(memory_format=torch.channels_last))
