"""Model-level benchmark (``hrnet-fast bench``): hrnet_fast backends against peers, same run.

Peers (rows ``ref:NAME``) all run the same reference model (same weights, same input):
``eager`` (its forward, BatchNorm unfolded, as users run it); torch.compile of it in modes
``compile`` (default), ``compile-ro`` (reduce-overhead) and ``compile-max`` (max-autotune; minutes
of compilation); and, on the CPU in fp32, its ONNX export run by ``onnxruntime``, ``openvino-fp32``
and ``openvino`` (default precision: bf16 where the CPU has it), see ``peers.py``; these need
``pip install -e '.[peers]'`` and are skipped rows, with the reason, where they cannot run.
Implementations (rows ``fast:NAME``): engine backends, optionally with ``+graphs`` (CUDA-graph
replay), e.g. ``triton+graphs``.

Every row records its relative error against the reference's output (``rel_err``, as in
``hrnet-fast check``). Rows of one case are timed round robin: one call of each in turn, so that
load from other processes on a shared machine falls on all of them alike.
"""
from __future__ import annotations

import itertools
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .backends import BackendUnavailable
from .check import randomize_batchnorm, rel_err
from .config import HRNetConfig
from .engine import optimize
from .peers import ONNX_PEERS, OnnxExport, build_peer, versions as peer_versions
from .reference import HighResolutionNet
from .timing import environment

# Idle time before each timed call when several CPU rows alternate. The runtimes' worker threads
# spin-wait after a call before they sleep (libgomp for torch, TBB for OpenVINO, ONNX Runtime's own
# pool): spinning into the next row's call would take cores from it, on a 2-core machine the whole
# difference between rows. After the gap every row starts from sleeping threads alike.
CPU_ROUND_ROBIN_GAP_S = 0.05
COMPILE_MODES = {"compile": "default", "compile-ro": "reduce-overhead", "compile-max": "max-autotune"}
PEERS = ("eager",) + tuple(COMPILE_MODES) + ONNX_PEERS


def default_peers(device: torch.device) -> List[str]:
    return ["eager", "compile", "compile-ro"] if device.type == "cuda" else ["eager"]


def default_impls(device: torch.device) -> List[str]:
    if device.type == "cuda":
        return ["torch", "torch+graphs", "triton", "triton+graphs", "compile"]
    return ["torch"]


def _peer_fn(name: str, ref: HighResolutionNet, export: OnnxExport, device: torch.device,
             dtype: torch.dtype) -> Tuple[Callable, Dict]:
    if name in ONNX_PEERS:
        return build_peer(name, export, device, dtype)
    if name == "eager":
        return ref, {}
    if name not in COMPILE_MODES:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    return torch.compile(ref, mode=COMPILE_MODES[name]), {}


def _impl_fn(name: str, ref: HighResolutionNet) -> Tuple[Callable, Dict]:
    backend, _, extra = name.partition("+")
    if extra not in ("", "graphs"):
        raise ValueError(f"unknown implementation {name!r} (use BACKEND or BACKEND+graphs)")
    # Explicit both ways: "torch" is the engine without graphs, "torch+graphs" with them.
    return optimize(ref, backend=backend, cuda_graphs=extra == "graphs"), {}


def time_round_robin(fns: Sequence[Callable[[], object]], device: torch.device, repeats: int,
                     gap_s: float = 0.0) -> List[Dict[str, float]]:
    """{"median_ms", "min_ms", "max_ms", "samples_ms"} of each (already warm) fn, timed in turns:
    fn0, fn1, ..., fn0, fn1, ... (``samples_ms[r]`` is round r's call). The whole call is timed, CUDA
    work synchronised (see timing.py). ``gap_s`` of idle time before each call lets the previous
    call's thread pool stop spinning first."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times: List[List[float]] = [[] for _ in fns]
    sync()
    for _ in range(repeats):
        for fn, samples in zip(fns, times):
            if gap_s:
                time.sleep(gap_s)
            t0 = time.perf_counter()
            fn()
            sync()
            samples.append((time.perf_counter() - t0) * 1e3)
    return [{"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "samples_ms": t}
            for t in times]


def paired_speedup(peer_samples: Sequence[float], samples: Sequence[float]) -> float:
    """The median over rounds of ``peer_samples[r] / samples[r]``: two rows timed round robin
    compared within each round. A machine whose speed drifts over seconds (the 2-core development
    machine: up to 1.5x within minutes) moves both calls of a round together, so this ratio is
    steadier than the ratio of the two medians."""
    if len(peer_samples) != len(samples) or not samples:
        raise ValueError("paired_speedup needs two equally long, non-empty sample lists")
    return statistics.median(p / s for p, s in zip(peer_samples, samples))


def run_bench(presets: Sequence[str], sizes: Sequence[Tuple[int, int]], batches: Sequence[int],
              dtypes: Sequence[torch.dtype], impls: Sequence[str], peers: Sequence[str],
              device: torch.device, *, warmup: int = 3, repeats: int = 10, round_robin: bool = True,
              head: str = "seg", num_classes: Optional[int] = None,
              progress: Optional[Callable[[str], None]] = None,
              on_row: Optional[Callable[[Dict, List[Dict]], None]] = None) -> Dict:
    """All combinations; returns {"environment": ..., "rows": [...]} with one row per implementation
    or peer, each with median/min/max ms and every call's time (samples_ms), images/s, rel_err
    against the reference's output and speedups against every peer (the ratio of medians; with
    round robin also ``paired_speedup``, the median of per-round ratios); ONNX peer rows add their
    precision, threads and version.

    Each row is built and warmed up in turn, then a case's rows are timed round robin
    (``round_robin=False``: each row timed on its own, right after its warm-up). ``on_row(row,
    rows)`` is called as each row is done (before the case's speedups exist), so a caller can save
    partial results: a run killed by a time limit keeps what it measured (with round robin, the
    cases it completed)."""
    env = environment(device)
    if any(p in ONNX_PEERS for p in peers):
        env.update(peer_versions())
    rows: List[Dict] = []
    cases = list(itertools.product(presets, sizes, batches, dtypes))
    for n, (preset, size, batch, dtype) in enumerate(cases, 1):
        torch.manual_seed(0)
        extra = {} if num_classes is None else {"num_classes": num_classes}
        ref = randomize_batchnorm(HighResolutionNet(HRNetConfig.preset(preset, head=head, **extra)))
        ref = ref.to(device=device, dtype=dtype).eval()
        x = torch.randn(batch, 3, *size, device=device, dtype=dtype)
        with torch.inference_mode():
            expected = ref(x)
        case = {"preset": preset, "size": f"{size[0]}x{size[1]}", "batch": batch,
                "dtype": str(dtype).replace("torch.", "")}
        entries = [(kind, name) for kind, names in (("peer", peers), ("impl", impls)) for name in names]
        first = len(rows)

        def done(row: Dict) -> None:
            rows.append(row)
            if on_row:
                on_row(row, rows)

        with OnnxExport(ref, x) as export:  # exported on first use, by the first ONNX peer
            for group in ([entries] if round_robin else [[e] for e in entries]):
                ready: List[Tuple[Dict, Callable]] = []
                for kind, name in group:
                    if progress:
                        progress(f"[{n}/{len(cases)}] {preset} {case['size']} b{batch} "
                                 f"{case['dtype']}: {name}")
                    row = dict(case, kind=kind, name=name)
                    try:
                        with torch.inference_mode():
                            fn, info = (_peer_fn(name, ref, export, device, dtype) if kind == "peer"
                                        else _impl_fn(name, ref))
                            row.update(info)
                            row["rel_err"] = rel_err(fn(x), expected)
                            for _ in range(warmup):
                                fn(x)
                    except BackendUnavailable as e:
                        done(dict(row, skipped=str(e)))
                        continue
                    ready.append((row, fn))
                if progress and len(ready) > 1:
                    progress(f"[{n}/{len(cases)}] timing {len(ready)} rows round robin, "
                             f"{repeats} rounds")
                with torch.inference_mode():
                    gap = CPU_ROUND_ROBIN_GAP_S if device.type == "cpu" and len(ready) > 1 else 0.0
                    stats = time_round_robin([lambda fn=fn: fn(x) for _, fn in ready], device, repeats,
                                             gap_s=gap)
                for (row, _), stat in zip(ready, stats):
                    row.update(stat, images_per_s=batch * 1e3 / stat["median_ms"])
                    done(row)
        order = {(kind, name): i for i, (kind, name) in enumerate(entries)}
        rows[first:] = sorted(rows[first:], key=lambda r: order[(r["kind"], r["name"])])
        peer_ms = {r["name"]: r["median_ms"] for r in rows[first:]
                   if r["kind"] == "peer" and "median_ms" in r}
        peer_samples = {r["name"]: r["samples_ms"] for r in rows[first:]
                        if r["kind"] == "peer" and "samples_ms" in r}
        for row in rows[first:]:  # this case's rows only: speedups against its own peers
            if "median_ms" in row:
                row["speedup"] = {p: ms / row["median_ms"] for p, ms in peer_ms.items()}
                if round_robin:  # the same rounds: per-round ratios (paired_speedup)
                    row["paired_speedup"] = {p: paired_speedup(s, row["samples_ms"])
                                             for p, s in peer_samples.items()}
    timing = {"warmup": warmup, "repeats": repeats, "round_robin": round_robin,
              "cpu_gap_s": CPU_ROUND_ROBIN_GAP_S if device.type == "cpu" and round_robin else 0.0}
    return {"environment": env, "timing": timing, "rows": rows}


def _label(row: Dict) -> str:
    label = f"ref:{row['name']}" if row["kind"] == "peer" else f"fast:{row['name']}"
    # A peer that chose its own precision says which (OpenVINO's default: bf16 on AVX512-BF16/AMX).
    if row.get("precision", "f32") != "f32":
        label += f" ({row['precision']})"
    return label


def format_table(result: Dict) -> List[List[str]]:
    peers = sorted({p for r in result["rows"] for p in r.get("speedup", {})}, key=PEERS.index)
    header = (["preset", "size", "batch", "dtype", "model", "median ms", "img/s"]
              + [f"x ref:{p}" for p in peers] + ["rel. err"])
    table = [header]
    for r in result["rows"]:
        base = [r["preset"], r["size"], str(r["batch"]), r["dtype"], _label(r)]
        if "skipped" in r:
            reason = (r["skipped"].splitlines() or [""])[0][:80]  # the JSON keeps all of it
            table.append(base + ["skipped", reason] + [""] * len(peers) + [""])
            continue
        table.append(base + [f"{r['median_ms']:.2f}", f"{r['images_per_s']:.1f}"]
                     + [f"{r['speedup'][p]:.2f}" if p in r.get("speedup", {}) else "" for p in peers]
                     + [f"{r['rel_err']:.1e}"])
    return table


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
