"""Which implementation runs each fused op.

Backends: ``torch`` (aten compositions, run anywhere; the oracle), ``triton`` (``hrnet_fast/kernels``),
``cuda`` (the ``hrnet_fast._C`` extension). ``backend=None`` means the process default: the
``HRNET_FAST_BACKEND`` environment variable, else ``"auto"``. ``auto`` picks, per op and device, the
first available implementation in the op's preference list (on the CPU: torch).
Asking for a backend that cannot run gives one :class:`BackendUnavailable` saying why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

OP_BACKENDS = ("torch", "triton", "cuda")
BACKEND_ENV = "HRNET_FAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why (no GPU, no Triton, no extension)."""


@dataclass
class Implementation:
    fn: Callable
    status: Callable[[torch.device], Tuple[bool, str]]


_REGISTRY: Dict[str, Dict[str, Implementation]] = {}
# Preference of ``auto`` on CUDA, per op; the CPU always prefers torch (the interpreter is for tests).
_AUTO_CUDA_ORDER: Dict[str, List[str]] = {}


def _always(_device) -> Tuple[bool, str]:
    return True, ""


def register(op: str, backend: str, fn: Callable,
             status: Callable[[torch.device], Tuple[bool, str]] = _always) -> None:
    if backend not in OP_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {OP_BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = Implementation(fn, status)


def set_auto_order(op: str, order: List[str]) -> None:
    _AUTO_CUDA_ORDER[op] = list(order)


def default_backend() -> str:
    return os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"


def status(op: str, backend: str, device) -> Tuple[bool, str]:
    impls = _REGISTRY.get(op)
    if impls is None:
        raise KeyError(f"unknown op {op!r}")
    if backend not in impls:
        if backend not in OP_BACKENDS:
            return False, f"unknown backend {backend!r}; choose one of {('auto',) + OP_BACKENDS}"
        return False, f"op {op} has no {backend} implementation"
    return impls[backend].status(torch.device(device))


def resolve(op: str, backend: Optional[str], device) -> Tuple[str, Callable]:
    """(backend name, function) for ``op`` on ``device``; raises BackendUnavailable with the reason."""
    name = (backend or default_backend()).lower()
    device = torch.device(device)
    impls = _REGISTRY[op]
    if name == "auto":
        order = _AUTO_CUDA_ORDER.get(op, ["triton", "torch"]) if device.type == "cuda" else ["torch"]
        for cand in order:
            if cand in impls and impls[cand].status(device)[0]:
                return cand, impls[cand].fn
        return "torch", impls["torch"].fn
    ok, why = status(op, name, device)
    if not ok:
        raise BackendUnavailable(f"backend {name!r} is not available for {op} on {device.type}: {why}")
    return name, impls[name].fn
