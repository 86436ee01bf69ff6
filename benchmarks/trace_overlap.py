"""How much GPU kernels overlap in a torch.profiler (Kineto) chrome trace: for the branch streams.

    python benchmarks/trace_overlap.py trace.json      # a table; --json PATH saves the numbers

With branch streams (``hrnet_fast/lanes.py``) a graph replay can run kernels of several branches at
once. Summed kernel time alone cannot say whether they did: this reads every kernel's start,
duration and stream from the trace and reports

* ``span_us``: first kernel start to last kernel end;
* ``busy_us``: time with at least one kernel running (``span - busy`` is idle GPU time);
* ``kernel_us``: summed kernel durations; ``kernel_us / busy_us`` is the mean concurrency;
* ``active_us``: time with exactly 1, 2, 3, ... kernels running;
* ``streams``: kernels and summed time per stream.

Pure Python (no GPU): ``gpu_steps.py overlap`` writes the trace on the GPU machine and calls
:func:`kernel_overlap`.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Dict, Iterable, List, Tuple


def kernels(trace: Dict) -> List[Tuple[float, float, str]]:
    """(start us, duration us, stream) of every GPU kernel in a chrome trace."""
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or str(e.get("cat", "")).lower() != "kernel":
            continue
        stream = str(e.get("args", {}).get("stream", e.get("tid", "?")))
        out.append((float(e["ts"]), float(e.get("dur", 0.0)), stream))
    return out


def kernel_overlap(events: Iterable[Tuple[float, float, str]]) -> Dict:
    """The overlap figures of the module docstring for (start, duration, stream) triples."""
    events = [e for e in events if e[1] > 0]
    if not events:
        raise ValueError("the trace holds no GPU kernels")
    # +1 at each start, -1 at each end; ties add zero-length intervals only
    edges = sorted([(s, 1) for s, d, _ in events] + [(s + d, -1) for s, d, _ in events])
    active: Dict[int, float] = defaultdict(float)
    running, last = 0, edges[0][0]
    for t, step in edges:
        if running:
            active[running] += t - last
        running, last = running + step, t
    per_stream: Dict[str, List[float]] = defaultdict(lambda: [0, 0.0])
    for _, d, stream in events:
        per_stream[stream][0] += 1
        per_stream[stream][1] += d
    start = min(s for s, _, _ in events)
    end = max(s + d for s, d, _ in events)
    busy = sum(active.values())
    total = sum(d for _, d, _ in events)
    return {"kernels": len(events), "span_us": round(end - start, 1), "busy_us": round(busy, 1),
            "idle_us": round(end - start - busy, 1), "kernel_us": round(total, 1),
            "mean_concurrency": round(total / busy, 3) if busy else 0.0,
            "active_us": {k: round(v, 1) for k, v in sorted(active.items())},
            "streams": {s: {"kernels": n, "us": round(us, 1)}
                        for s, (n, us) in sorted(per_stream.items(), key=lambda kv: -kv[1][1])}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", help="a chrome trace (torch.profiler's export_chrome_trace)")
    p.add_argument("--json", default=None, help="save the figures as JSON")
    a = p.parse_args(argv)
    with open(a.trace) as f:
        stats = kernel_overlap(kernels(json.load(f)))
    print(f"{stats['kernels']} kernels: span {stats['span_us']} us, busy {stats['busy_us']} us, "
          f"idle {stats['idle_us']} us, kernel time {stats['kernel_us']} us, mean concurrency "
          f"{stats['mean_concurrency']}")
    print("time with n kernels running:", stats["active_us"])
    for s, v in stats["streams"].items():
        print(f"  stream {s}: {v['kernels']} kernels, {v['us']} us")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(stats, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
