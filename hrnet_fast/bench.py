"""Model-level benchmark (``hrnet-fast bench``): hrnet_fast backends against peers, same run.

Peers (rows ``ref:NAME``): ``eager`` (the reference forward, BatchNorm unfolded, as users run it)
and torch.compile of the reference in modes ``compile`` (default), ``compile-ro`` (reduce-overhead)
and ``compile-max`` (max-autotune; minutes of compilation). Implementations (rows ``fast:NAME``):
engine backends, optionally with ``+graphs`` (CUDA-graph replay), e.g. ``triton+graphs``.
"""
from __future__ import annotations

import itertools
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .check import randomize_batchnorm
from .config import HRNetConfig
from .engine import optimize
from .ops.registry import BackendUnavailable
from .reference import HighResolutionNet
from .timing import environment, measure

COMPILE_MODES = {"compile": "default", "compile-ro": "reduce-overhead", "compile-max": "max-autotune"}
PEERS = ("eager",) + tuple(COMPILE_MODES)


def default_peers(device: torch.device) -> List[str]:
    return ["eager", "compile", "compile-ro"] if device.type == "cuda" else ["eager"]


def default_impls(device: torch.device) -> List[str]:
    if device.type == "cuda":
        return ["torch", "torch+graphs", "triton", "triton+graphs", "compile"]
    return ["torch"]


def _peer_fn(name: str, ref: HighResolutionNet) -> Callable:
    if name == "eager":
        return ref
    return torch.compile(ref, mode=COMPILE_MODES[name])


def _impl_fn(name: str, ref: HighResolutionNet) -> Callable:
    backend, _, extra = name.partition("+")
    if extra not in ("", "graphs"):
        raise ValueError(f"unknown implementation {name!r} (use BACKEND or BACKEND+graphs)")
    # Explicit both ways: "torch" is the engine without graphs, "torch+graphs" with them.
    return optimize(ref, backend=backend, cuda_graphs=extra == "graphs")


def run_bench(presets: Sequence[str], sizes: Sequence[Tuple[int, int]], batches: Sequence[int],
              dtypes: Sequence[torch.dtype], impls: Sequence[str], peers: Sequence[str],
              device: torch.device, *, warmup: int = 3, repeats: int = 10,
              progress: Optional[Callable[[str], None]] = None,
              on_row: Optional[Callable[[Dict, List[Dict]], None]] = None) -> Dict:
    """All combinations; returns {"environment": ..., "rows": [...]} with one row per implementation
    or peer, each with median/min/max ms, images/s and speedups against every peer.

    ``on_row(row, rows)`` is called as each row is measured (before the case's speedups exist), so
    a caller can save partial results: a run killed by a time limit keeps what it measured."""
    rows: List[Dict] = []
    cases = list(itertools.product(presets, sizes, batches, dtypes))
    for n, (preset, size, batch, dtype) in enumerate(cases, 1):
        torch.manual_seed(0)
        ref = randomize_batchnorm(HighResolutionNet(HRNetConfig.preset(preset)))
        ref = ref.to(device=device, dtype=dtype).eval()
        x = torch.randn(batch, 3, *size, device=device, dtype=dtype)
        case = {"preset": preset, "size": f"{size[0]}x{size[1]}", "batch": batch,
                "dtype": str(dtype).replace("torch.", "")}
        peer_ms: Dict[str, float] = {}
        timed: List[Dict] = []
        for kind, names in (("peer", peers), ("impl", impls)):
            for name in names:
                if progress:
                    progress(f"[{n}/{len(cases)}] {preset} {case['size']} b{batch} {case['dtype']}: {name}")
                row = dict(case, kind=kind, name=name)
                try:
                    with torch.inference_mode():
                        fn = _peer_fn(name, ref) if kind == "peer" else _impl_fn(name, ref)
                        row.update(measure(lambda: fn(x), device, warmup=warmup, repeats=repeats))
                except BackendUnavailable as e:
                    row["skipped"] = str(e)
                    rows.append(row)
                    if on_row:
                        on_row(row, rows)
                    continue
                row["images_per_s"] = batch * 1e3 / row["median_ms"]
                if kind == "peer":
                    peer_ms[name] = row["median_ms"]
                rows.append(row)
                timed.append(row)
                if on_row:
                    on_row(row, rows)
        for row in timed:  # this case's rows only: speedups against its own peers
            row["speedup"] = {p: ms / row["median_ms"] for p, ms in peer_ms.items()}
    return {"environment": environment(device), "rows": rows}


def format_table(result: Dict) -> List[List[str]]:
    peers = sorted({p for r in result["rows"] for p in r.get("speedup", {})}, key=PEERS.index)
    header = (["preset", "size", "batch", "dtype", "model", "median ms", "img/s"]
              + [f"x ref:{p}" for p in peers])
    table = [header]
    for r in result["rows"]:
        label = f"ref:{r['name']}" if r["kind"] == "peer" else f"fast:{r['name']}"
        base = [r["preset"], r["size"], str(r["batch"]), r["dtype"], label]
        if "skipped" in r:
            table.append(base + ["skipped", r["skipped"][:60]] + [""] * len(peers))
            continue
        table.append(base + [f"{r['median_ms']:.2f}", f"{r['images_per_s']:.1f}"]
                     + [f"{r['speedup'][p]:.2f}" if p in r.get("speedup", {}) else "" for p in peers])
    return table


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
