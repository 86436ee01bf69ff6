"""Per-call CPU cost of the drop-in's safety checks (weight watch + reference-path conditions).

    python benchmarks/bench_dropin_checks.py [--preset w48] [--calls 300]

Median of ``--calls`` timed calls after 20 warm-up calls, under ``torch.no_grad()`` (the engine's
condition), on a freshly built model in eval mode.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hrnet_fast import HRNet  # noqa: E402
from hrnet_fast.engine import WeightWatch  # noqa: E402


def median_ms(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="w48")
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    model = HRNet(args.preset).eval()
    watch = WeightWatch(model)
    with torch.no_grad():
        assert model._engine_blocker() is None
        print(f"{args.preset}: weight watch {median_ms(watch.changed, args.calls):.3f} ms, "
              f"reference-path conditions {median_ms(model._engine_blocker, args.calls):.3f} ms "
              "per call (median)")


if __name__ == "__main__":
    main()
