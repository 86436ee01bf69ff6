"""benchmarks/trace_overlap.py: kernel overlap figures from a chrome trace (pure Python)."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import trace_overlap  # noqa: E402


def _event(ts, dur, stream, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": "k", "ts": ts, "dur": dur, "args": {"stream": stream}}


TRACE = {"traceEvents": [
    _event(0, 10, 7), _event(20, 10, 7), _event(5, 20, 8),  # overlapping lanes
    _event(30, 5, 8),                                        # starts as stream 7's kernel ends
    _event(45, 5, 7),                                        # after a 10 us idle gap
    _event(0, 100, 7, cat="cuda_runtime"), _event(0, 100, 9, cat="gpu_memcpy"),  # not kernels
    {"ph": "i", "cat": "kernel", "ts": 1, "name": "instant"},
]}


def test_overlap_figures():
    stats = trace_overlap.kernel_overlap(trace_overlap.kernels(TRACE))
    assert stats["kernels"] == 5
    assert stats["span_us"] == 50 and stats["busy_us"] == 40 and stats["idle_us"] == 10
    assert stats["kernel_us"] == 50 and stats["mean_concurrency"] == 1.25
    # [0,5) 1, [5,10) 2, [10,20) 1, [20,25) 2, [25,35) 1, [45,50) 1
    assert stats["active_us"] == {1: 30, 2: 10}
    assert stats["streams"] == {"7": {"kernels": 3, "us": 25}, "8": {"kernels": 2, "us": 25}}


def test_cli_and_empty_trace(tmp_path, capsys):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(TRACE))
    out = tmp_path / "stats.json"
    assert trace_overlap.main([str(path), "--json", str(out)]) == 0
    assert "mean concurrency 1.25" in capsys.readouterr().out
    assert json.loads(out.read_text())["busy_us"] == 40
    with pytest.raises(ValueError, match="no GPU kernels"):
        trace_overlap.kernel_overlap(trace_overlap.kernels({"traceEvents": []}))
