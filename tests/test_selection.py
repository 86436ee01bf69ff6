"""Per-shape selection between implementations (the measuring itself runs on GPUs; here a fake
timer drives the logic)."""
import json

import pytest
import torch

from hrnet_fast.ops.selection import SelectingOp, cache_path


def _op(timings, calls, persist=False):
    def make(name):
        def fn(x, scale):
            calls.append(name)
            return x * scale
        return fn

    def timer(fn, device):
        fn()
        return timings[calls[-1]]

    return SelectingOp("demo_op", {"a": make("a"), "b": make("b")},
                       key_fn=lambda x, scale: (tuple(x.shape), scale), timer=timer, persist=persist)


def test_picks_fastest_once_per_key():
    calls = []
    op = _op({"a": 2.0, "b": 1.0}, calls)
    x = torch.ones(2, 3)
    assert torch.equal(op(x, 2.0), x * 2)
    assert op.choices[((2, 3), 2.0)] == "b"
    n = len(calls)
    op(x, 2.0)
    assert calls[n:] == ["b"]  # no new measurement
    op(torch.ones(4), 2.0)
    assert ((4,), 2.0) in op.timings


def test_force_override_and_bad_force(monkeypatch):
    calls = []
    op = _op({"a": 2.0, "b": 1.0}, calls)
    monkeypatch.setenv("HRNET_FAST_FORCE_DEMO_OP", "a")
    op(torch.ones(1), 1.0)
    assert calls == ["a"]
    monkeypatch.setenv("HRNET_FAST_FORCE_DEMO_OP", "zzz")
    with pytest.raises(ValueError, match="choose one of"):
        op(torch.ones(1), 1.0)


def test_failing_candidate_is_skipped_and_choice_persisted(monkeypatch, tmp_path):
    import hrnet_fast.ops.selection as sel
    monkeypatch.setenv("HRNET_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sel, "_DISK", None)

    def broken(x, scale):
        raise RuntimeError("no kernel for this shape")

    op = SelectingOp("demo_op2", {"broken": broken, "ok": lambda x, scale: x + scale},
                     key_fn=lambda x, scale: tuple(x.shape), timer=lambda fn, d: (fn(), 1.0)[1])
    assert torch.equal(op(torch.zeros(3), 1.0), torch.ones(3))
    saved = json.load(open(cache_path()))
    assert list(saved.values()) == ["ok"]
    monkeypatch.setattr(sel, "_DISK", None)  # a new process reads the choice back without timing
    op2 = SelectingOp("demo_op2", {"broken": broken, "ok": lambda x, scale: x + scale},
                      key_fn=lambda x, scale: tuple(x.shape), timer=lambda fn, d: 1 / 0)
    assert torch.equal(op2(torch.zeros(3), 1.0), torch.ones(3))
