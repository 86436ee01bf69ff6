"""The ``hrnet-fast`` command line: ``demo`` and ``info``."""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch

from .config import PRESET_NAMES, HRNetConfig
from .model import HRNet
from .stats import count_macs, count_parameters


def parse_size(text: str) -> Tuple[int, int]:
    """``"512x1024"`` -> (512, 1024); a single number means a square."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HxW (e.g. 512x1024), got {text!r}")
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"size must look like HxW (e.g. 512x1024), got {text!r}")
    return dims[0], dims[1]


def pick_device(name: Optional[str]) -> torch.device:
    if name:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda was asked for but no CUDA GPU is available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def time_call(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA synchronised)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def print_table(headers: Sequence[str], rows: List[Sequence]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        print("  ".join(c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def cmd_demo(args) -> int:
    device = pick_device(args.device)
    size = args.size or ((1024, 2048) if device.type == "cuda" else (512, 1024))
    torch.manual_seed(0)
    model = HRNet(HRNetConfig.preset(args.preset, num_classes=args.num_classes)).to(device).eval()
    x = torch.randn(args.batch, 3, *size, device=device)
    print(f"hrnet-fast demo: {args.preset}, input {args.batch}x3x{size[0]}x{size[1]} fp32 on {device}")
    with torch.inference_mode():
        out = model(x)
        ms = time_call(lambda: model(x), device, args.repeats)
    print_table(["item", "value"], [
        ["output shape", "x".join(map(str, out.shape))],
        ["parameters", f"{count_parameters(model) / 1e6:.2f} M"],
        ["MACs (conv+linear)", f"{count_macs(model, size, args.batch) / 1e9:.1f} G"],
        ["reference forward", f"{ms:.1f} ms (median of {args.repeats})"],
    ])
    return 0


def cmd_info(args) -> int:
    size = args.size
    rows = []
    for name in PRESET_NAMES:
        with torch.device("meta"):  # shapes only: no memory, no weight initialisation
            model = HRNet(HRNetConfig.preset(name, num_classes=args.num_classes, head=args.head))
        rows.append([name, f"{count_parameters(model) / 1e6:.2f}",
                     f"{count_macs(model, size) / 1e9:.1f}",
                     "/".join(map(str, model.config.branch_channels))])
    print(f"HRNet presets, head={args.head}, {args.num_classes} classes, "
          f"MACs of conv+linear layers at 1x3x{size[0]}x{size[1]}")
    print_table(["preset", "params (M)", "MACs (G)", "branch channels"], rows)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hrnet-fast", description="Fast, exact HRNet inference.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="build a model, run it on a random image, print a table")
    d.add_argument("--preset", default="w18", choices=PRESET_NAMES)
    d.add_argument("--size", type=parse_size, default=None,
                   help="input HxW (default 1024x2048 on a GPU, 512x1024 on the CPU)")
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--num-classes", type=int, default=19)
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    d.add_argument("--repeats", type=int, default=3)
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="presets with parameter counts and MACs")
    i.add_argument("--size", type=parse_size, default=(1024, 2048))
    i.add_argument("--num-classes", type=int, default=19)
    i.add_argument("--head", default="seg", choices=("seg", "features", "classification"))
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
