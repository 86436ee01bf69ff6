"""The CPU table of issue 12: hrnet_fast against eager PyTorch, torch.compile, ONNX Runtime and
OpenVINO, in one process.

    python benchmarks/bench_cpu_peers.py [--presets w18_small_v2 w18] [--repeats 10] [--compile]
                                         [--threads 2] [--json results/cpu_peers.json]
    python benchmarks/bench_cpu_peers.py --head pose --presets w32 --size 256x192 --batch 8

Per model: the same weights (random, with random BatchNorm statistics) and one fp32 input
(default 1x3x512x1024, segmentation head; ``--head pose`` is the top-down keypoint model with
17 joints) for every row; each row built and warmed up, then all rows timed round robin (one call of
each in turn, an idle gap before each call), median of ``--repeats``: ``hrnet_fast.bench.run_bench``.
Rows: the reference in eager mode, the hrnet_fast engine (torch backend), torch.compile of the
reference (``--compile``: minutes of compilation), ONNX Runtime (ORT_ENABLE_ALL), OpenVINO with
fp32 forced and OpenVINO at its default precision (bf16 on CPUs with AVX512-BF16/AMX), each with
its relative error against the reference's output. ONNX Runtime and OpenVINO need
``pip install -e '.[peers]'``; without them their rows say so.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hrnet_fast.bench import paired_speedup, run_bench, stderr_progress  # noqa: E402
from hrnet_fast.cli import parse_size, print_table  # noqa: E402
from hrnet_fast.config import PRESET_NAMES  # noqa: E402
from hrnet_fast.peers import ONNX_PEERS  # noqa: E402

# (kind, name) in run_bench's rows -> the wording, in the order.
ROWS = [
    (("peer", "eager"), "reference eager"),
    (("impl", "torch"), "hrnet_fast torch backend"),
    (("peer", "compile"), "torch.compile of the reference"),
    (("peer", "onnxruntime"), "ONNX Runtime (export of the reference, ORT_ENABLE_ALL)"),
    (("peer", "openvino-fp32"), "OpenVINO, fp32 forced"),
    (("peer", "openvino"), "OpenVINO default"),
]
FP32_PEERS = ("onnxruntime", "openvino-fp32")
GOAL = 1.2  # issue 12: at least 1.2x faster than the faster fp32 peer


def cell(row) -> str:
    if row is None:
        return "-"
    if "skipped" in row:
        return "skipped: " + row["skipped"].splitlines()[0][:60]
    text = f"{row['median_ms']:.0f}"
    if row.get("precision", "f32") != "f32":
        text += f" ({row['precision']}, rel. err {row['rel_err']:.1e})"
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["w18_small_v2", "w18"], choices=PRESET_NAMES)
    p.add_argument("--size", type=parse_size, default=(512, 1024), help="HxW (default 512x1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--head", default="seg", choices=["seg", "pose", "classification", "features"])
    p.add_argument("--threads", type=int, default=2, help="torch's, ONNX Runtime's and OpenVINO's")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="add torch.compile of the reference (slow)")
    p.add_argument("--json", default="results/cpu_peers.json",
                   help="where to write all rows (results/ is git-ignored)")
    args = p.parse_args()
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--threads, --repeats and --batch must be at least 1, --warmup at least 0")

    torch.set_num_threads(args.threads)
    peers = ["eager"] + (["compile"] if args.compile else []) + list(ONNX_PEERS)
    result = run_bench(args.presets, [args.size], [args.batch], [torch.float32], ["torch"], peers,
                       torch.device("cpu"), warmup=args.warmup, repeats=args.repeats,
                       head=args.head, num_classes=17 if args.head == "pose" else None,
                       progress=stderr_progress)
    by_key = {(r["preset"], r["kind"], r["name"]): r for r in result["rows"]}

    env = result["environment"]
    print(f"{env['device_name']}; {env['threads']} threads; torch {env['torch']}, onnxruntime "
          f"{env.get('onnxruntime', 'absent')}, openvino {env.get('openvino', 'absent')}")
    print(f"{args.batch}x3x{args.size[0]}x{args.size[1]} fp32, head {args.head}, round robin, "
          f"median of {args.repeats}, ms:")
    table = [[label] + [cell(by_key.get((preset, kind, name))) for preset in args.presets]
             for (kind, name), label in ROWS if kind == "impl" or name in peers]
    print_table(["implementation"] + args.presets, table)

    for preset in args.presets:
        ours = by_key.get((preset, "impl", "torch"), {})
        fp32 = [by_key.get((preset, "peer", n), {}) for n in FP32_PEERS]
        fp32 = [r for r in fp32 if "median_ms" in r]
        if "median_ms" in ours and fp32:
            speedup = min(r["median_ms"] for r in fp32) / ours["median_ms"]
            # Per round: the faster fp32 peer of that round against ours (steadier on a machine
            # whose speed drifts; see hrnet_fast.bench.paired_speedup).
            faster = [min(s) for s in zip(*(r["samples_ms"] for r in fp32))]
            paired = paired_speedup(faster, ours["samples_ms"])
            print(f"{preset}: hrnet_fast torch is {speedup:.2f}x the faster fp32 peer by medians, "
                  f"{paired:.2f}x by the median of per-round ratios "
                  f"(goal >= {GOAL}x: {'met' if min(speedup, paired) >= GOAL else 'not met'})")

    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
