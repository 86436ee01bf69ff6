"""The CPU thin-layer conv kernel (csrc/cpu_conv_thin.cpp) against oneDNN, per conv and per model.

    python benchmarks/bench_cpu_thin.py [--threads 2] [--rounds 15]
    python benchmarks/bench_cpu_thin.py --models w18_small_v2 w18 [--rounds 8]
    python benchmarks/bench_cpu_thin.py --narrow [--rounds 11]

Per conv: w18's 3x3 stride-1 shapes (and layer1's 64 channels), float32, channels_last input and
output, one process, the implementations called in turn (round robin) and the median of each
reported as GFLOP/s counted as direct convolution: oneDNN's fused conv as the torch backend runs it
(weights reordered once), the kernel's direct algorithm and its Winograd F(2x2, 3x3), each with
its packed weight cached as the backend does, plus both algorithms planar (NCHW) in and out, as
inside a branch's chain.

Narrow rows (``--narrow``): pose-crop shapes at batch 1-8, oneDNN against the kernel's Winograd
(packed where it packs), and the row rule's pick for each.

Per model (``--models``): one engine at 1x3x512x1024 with the kernel on and off in alternate calls
(``torch_cpu._THIN``), the median of per-round ratios. ``--switch rows`` switches the row-pair
chains instead (``torch_cpu._ROWS``, AVX2; off = planar chains); a model may name its head and
input, e.g. ``w32:pose:8x3x256x192``.

Chains (``--chains``, AVX2): four blocks of two convs as the engine runs a branch, the planar chain
against the row-pair chain (``conv3x3_thin_rows``), per-round ratios.

    python benchmarks/bench_cpu_thin.py --chains [--rounds 21]
    python benchmarks/bench_cpu_thin.py --switch rows --models w18 w32 w32:pose:8x3x256x192
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hrnet_fast import cpu_ext  # noqa: E402
from hrnet_fast.backends import torch_cpu  # noqa: E402
from hrnet_fast.backends.cpu_memory import keep_freed_memory  # noqa: E402

SHAPES = [(18, 18, 128, 256), (36, 36, 64, 128), (72, 72, 32, 64), (144, 144, 16, 32),
          (256, 18, 128, 256), (64, 64, 128, 256)]


def round_robin(fns, rounds):
    for f in fns.values():
        f()
        f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def per_conv(rounds: int) -> None:
    for ci, co, h, w in SHAPES:
        x = torch.randn(1, ci, h, w).contiguous(memory_format=torch.channels_last)
        xp = x.contiguous()
        wt, b = torch.randn(co, ci, 3, 3) / (3 * ci ** 0.5), torch.randn(co)
        direct = cpu_ext.conv3x3_thin_pack(wt, winograd=False)
        wino = cpu_ext.conv3x3_thin_pack(wt, winograd=True)
        cache: dict = {}
        fns = {
            "oneDNN": lambda: torch_cpu.conv_fused(x, wt, b, 1, 1, None, True, cache),
            "direct": lambda: cpu_ext.conv3x3_thin_cpu(x, direct, b, relu=True),
            "Winograd": lambda: cpu_ext.conv3x3_thin_cpu(x, wino, b, relu=True),
            "direct planar": lambda: cpu_ext.conv3x3_thin_cpu(xp, direct, b, relu=True,
                                                              channels_last=False),
            "Winograd planar": lambda: cpu_ext.conv3x3_thin_cpu(xp, wino, b, relu=True,
                                                                channels_last=False),
        }
        times = round_robin(fns, rounds)
        flop = 2 * h * w * ci * co * 9
        cells = [f"{k} {flop / statistics.median(t) / 1e9:.0f}" for k, t in times.items()]
        print(f"{ci:>3} -> {co:<3} at {h}x{w}: " + " | ".join(cells) + " GFLOP/s")


# Narrow rows, batch > 1 (pose crops: 8x3x256x192 leaves 64x48 .. 8x6 per branch; w48 at 384x288;
# 17x17 and 9x9 rows): (N, Ci, Co, H, W).
NARROW_SHAPES = [(8, 32, 32, 64, 48), (8, 64, 64, 32, 24), (8, 128, 128, 16, 12),
                 (8, 256, 256, 8, 6), (1, 256, 256, 8, 6), (8, 144, 144, 8, 6),
                 (8, 72, 72, 16, 12), (4, 192, 192, 24, 18), (4, 384, 384, 12, 9),
                 (1, 144, 144, 17, 17), (2, 256, 256, 9, 9)]


def narrow(rounds: int) -> None:
    """oneDNN against the kernel's Winograd on narrow rows (channels_last in and out), and whether
    the engine's row rule (``torch_cpu.thin_row_pays``) gives the conv to the kernel."""
    for n, ci, co, h, w in NARROW_SHAPES:
        x = torch.randn(n, ci, h, w).contiguous(memory_format=torch.channels_last)
        wt, b = torch.randn(co, ci, 3, 3) / (3 * ci ** 0.5), torch.randn(co)
        wino = cpu_ext.conv3x3_thin_pack(wt, winograd=True)
        cache: dict = {}
        times = round_robin({
            "oneDNN": lambda: torch_cpu.conv_fused(x, wt, b, 1, 1, None, True, cache),
            "Winograd": lambda: cpu_ext.conv3x3_thin_cpu(x, wino, b, relu=True)}, rounds)
        one, kernel = (1e3 * statistics.median(times[k]) for k in ("oneDNN", "Winograd"))
        rule = "kernel" if torch_cpu.thin_row_pays(x.shape, ci, co) else "oneDNN"
        print(f"{n}x{ci}->{co} at {h}x{w}: oneDNN {one:.2f} ms, Winograd {kernel:.2f} ms "
              f"({one / kernel:.2f}x); the row rule picks {rule}")


# (N, C, H, W) of a branch chain: w18's four seg branches at 512x1024, w32's and w48's widest,
# w32 pose's widest at batch 8 (unpacked), w18's narrowest.
CHAIN_SHAPES = [(1, 18, 128, 256), (1, 36, 64, 128), (1, 72, 32, 64), (1, 144, 16, 32),
                (1, 32, 128, 256), (1, 64, 64, 128), (1, 48, 128, 256), (8, 32, 64, 48)]


def planar_chain(x, convs):
    """TorchCPU.blocks' planar chain: intermediates NCHW, block outputs into the block input."""
    h = x
    for i, ((p1, b1), (p2, b2)) in enumerate(convs):
        last = i == len(convs) - 1
        t = cpu_ext.conv3x3_thin_cpu(h, p1, b1, relu=True, channels_last=False)
        h = cpu_ext.conv3x3_thin_cpu(t, p2, b2, h, relu=True, channels_last=last,
                                     into_residual=0 < i < len(convs) - 1)
    return h


def rows_chain(x, convs):
    """TorchCPU._blocks_rows: the block inputs in the row-pair format."""
    width = x.shape[-1]
    h = cpu_ext.conv3x3_thin_rows_from(x)
    for i, ((p1, b1), (p2, b2)) in enumerate(convs):
        last = i == len(convs) - 1
        t = cpu_ext.conv3x3_thin_rows_cpu(h, p1, b1, relu=True, width=width, out_rows=True)
        h = cpu_ext.conv3x3_thin_rows_cpu(t, p2, b2, h, relu=True, width=width,
                                          out_rows=not last, into_residual=not last)
    return h


def chains(rounds: int) -> None:
    if not cpu_ext.thin_rows_supported():
        sys.exit("the row-pair format is the AVX2 variant's; this CPU's capability is "
                 f"{torch.backends.cpu.get_cpu_capability()}")
    for n, c, h, w in CHAIN_SHAPES:
        x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
        convs = [[(cpu_ext.conv3x3_thin_pack(torch.randn(c, c, 3, 3) / (3 * c ** 0.5),
                                             winograd=True), torch.randn(c) * 0.1)
                  for _ in range(2)] for _ in range(4)]
        diff = float((planar_chain(x, convs) - rows_chain(x, convs)).abs().max())
        times = round_robin({"planar": lambda: planar_chain(x, convs),
                             "rows": lambda: rows_chain(x, convs)}, rounds)
        ratio = statistics.median(a / b for a, b in zip(times["planar"], times["rows"]))
        print(f"{n}x{c}x{h}x{w}: planar chain {statistics.median(times['planar']) * 1e3:.2f} ms, "
              f"row-pair chain {statistics.median(times['rows']) * 1e3:.2f} ms, {ratio:.3f}x per "
              f"round (max abs difference {diff:.1e})")


def per_model(models, rounds: int, switch: str) -> None:
    from hrnet_fast import HRNet, optimize
    from hrnet_fast.check import randomize_batchnorm
    flag = {"thin": torch_cpu._THIN, "rows": torch_cpu._ROWS}[switch]
    names = {"thin": ("kernel on", "all oneDNN"), "rows": ("row-pair chains", "planar chains")}
    for spec in models:
        preset, head, size = (spec.split(":") + ["seg", "1x3x512x1024"])[:3]
        torch.manual_seed(0)
        model = randomize_batchnorm(HRNet(preset, head=head, fast=False)).eval()
        engine = optimize(model, backend="torch")
        x = torch.randn(*(int(v) for v in size.split("x")))

        def run(on):
            flag["on"] = on
            engine(x)

        with torch.inference_mode():
            times = round_robin({"on": lambda: run(True), "off": lambda: run(False)}, rounds)
        flag["on"] = True
        ratio = statistics.median(b / a for a, b in zip(times["on"], times["off"]))
        on_name, off_name = names[switch]
        print(f"{preset} {head} {size}: {on_name} {statistics.median(times['on']) * 1e3:.0f} ms, "
              f"{off_name} {statistics.median(times['off']) * 1e3:.0f} ms, {ratio:.3f}x per round")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--models", nargs="*", help="time whole engines instead (e.g. w18_small_v2 w18)")
    p.add_argument("--narrow", action="store_true",
                   help="narrow rows with batch > 1 (pose crops) instead, and the row rule's pick")
    p.add_argument("--chains", action="store_true",
                   help="planar against row-pair chains of four blocks (AVX2)")
    p.add_argument("--switch", choices=["thin", "rows"], default="thin",
                   help="with --models: switch the thin kernel (against oneDNN) or its row-pair "
                        "chains (against planar chains)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the engine runs: warm calls reuse heap memory (no page faults)
    ok, why = cpu_ext.cpu_ext_status()
    if not (ok and cpu_ext.thin_conv_supported()):
        sys.exit(f"the thin conv kernel is unavailable here: {why if not ok else 'no AVX-512 or AVX2'}")
    print(f"{args.threads} threads; torch {torch.__version__}; capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    if args.models:
        per_model(args.models, args.rounds, args.switch)
    elif args.chains:
        chains(args.rounds)
    elif args.narrow:
        narrow(args.rounds)
    else:
        per_conv(args.rounds)


if __name__ == "__main__":
    main()
