"""Helpers for tests: random non-trivial BatchNorm statistics, relative error, poisoned buffers."""
from __future__ import annotations

import contextlib

import torch

from hrnet_fast.check import randomize_batchnorm as randomize_bn  # noqa: F401
from hrnet_fast.check import rel_err  # noqa: F401

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
