"""The ``hrnet-fast`` command line: ``demo``, ``bench``, ``check``, ``segment`` and ``info``.

Errors never show a traceback: ``main`` reports each as one line ``hrnet-fast: error: ...`` on stderr
and returns 1 (argparse's usage errors exit with 2, as argparse does). ``HRNET_FAST_DEBUG=1`` lets the
exception through, traceback and all. Arguments are checked when they are parsed, and paths before any
model is built; outputs are written to temporary files beside their targets and moved into place only
when every output of the command is complete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from typing import List, Optional, Sequence, Tuple

import torch

from .bench import PEERS, default_impls, default_peers, format_table, run_bench, stderr_progress
from .check import clone_as, randomize_batchnorm, rel_err, run_check
from .checkpoints import CheckpointError
from .config import PRESET_NAMES, HRNetConfig
from .engine import ENGINE_BACKENDS, optimize, parse_dtype
from .imageio import ImageReadError
from .model import HRNet
from .backends import BackendUnavailable
from .reference import HighResolutionNet
from .stats import count_macs, count_parameters
from .timing import environment, measure


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


DEBUG_ENV = "HRNET_FAST_DEBUG"


class CLIError(Exception):
    """A problem with the command's input that the user can fix: reported as one line, no traceback."""


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def label_classes(text: str) -> int:
    """``segment --num-classes``: 1..256, since the class ids are written as an 8-bit PNG."""
    value = positive_int(text)
    if value > 256:
        raise argparse.ArgumentTypeError(f"must be 1..256 (class ids are written as 8-bit PNG), got {value}")
    return value


def dtype_arg(text: str) -> torch.dtype:
    try:
        return parse_dtype(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}: choose fp32, fp16 or bf16") from None


def device_arg(text: str) -> torch.device:
    """A torch device that exists here: ``cpu``, ``cuda`` or ``cuda:N`` (only with a CUDA GPU)."""
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (use cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}: use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} was asked for but no CUDA GPU is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def pick_device(name) -> torch.device:
    """``--device`` (already checked by ``device_arg``), or cuda when there is a GPU, else cpu."""
    if isinstance(name, torch.device):
        return name
    if name:
        try:
            return device_arg(name)
        except argparse.ArgumentTypeError as e:
            raise CLIError(f"--device: {e}") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_input_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise CLIError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise CLIError(f"{what} {path}: is a directory, not a file")
    if not os.path.isfile(path):
        raise CLIError(f"{what} {path}: not a regular file")


def check_output_file(path: str, option: str) -> None:
    """Before any work: ``path`` is not a directory and its directory exists and takes new files."""
    if not path:
        raise CLIError(f"{option}: empty path")
    if os.path.isdir(path):
        raise CLIError(f"{option} {path}: is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(parent):
        raise CLIError(f"{option} {path}: directory {parent} does not exist")
    if not os.path.isdir(parent):
        raise CLIError(f"{option} {path}: {parent} is not a directory")
    probe = os.path.join(parent, f".hrnet-fast-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(probe, "xb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise CLIError(f"{option} {path}: cannot write in {parent}: {e.strerror or e}") from None


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


class StagedOutputs:
    """All-or-nothing outputs: ``stage(path)`` names a temporary file beside ``path`` to write instead;
    ``commit()`` moves every staged file into place (``os.replace``). Leaving the ``with`` block without a
    commit, or a commit that fails half-way, removes the temporary files and any output this command
    already moved into place, so a failure leaves no partial output."""

    def __init__(self):
        self._staged: List[Tuple[str, str]] = []

    def stage(self, path: str) -> str:
        head, tail = os.path.split(os.path.abspath(path))
        tmp = os.path.join(head, f".{tail}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        self._staged.append((tmp, path))
        return tmp

    def commit(self) -> None:
        done = []
        try:
            for tmp, path in self._staged:
                os.replace(tmp, path)
                done.append(path)
        except BaseException:
            for path in done:
                _remove_quietly(path)
            raise
        finally:
            self.discard()

    def discard(self) -> None:
        for tmp, _ in self._staged:
            _remove_quietly(tmp)
        self._staged = []

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, *exc) -> bool:
        self.discard()
        return False


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _is_number(cell: str) -> bool:
    try:
        float(cell.rstrip("x%"))
        return True
    except ValueError:
        return False


def print_table(headers: Sequence[str], rows: List[Sequence]) -> None:
    """A plain-text table: numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        line = "  ".join(c.rjust(w) if n and _is_number(c) else c.ljust(w) for c, w in zip(r, widths))
        print(line.rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def cmd_demo(args) -> int:
    device = pick_device(args.device)
    size = args.size or ((1024, 2048) if device.type == "cuda" else (512, 1024))
    torch.manual_seed(0)
    cfg = HRNetConfig.preset(args.preset, num_classes=args.num_classes)
    ref = randomize_batchnorm(HighResolutionNet(cfg)).to(device).eval()
    x = torch.randn(args.batch, 3, *size, device=device)
    print(f"hrnet-fast demo: {args.preset} ({count_parameters(ref) / 1e6:.2f} M parameters, "
          f"{count_macs(ref, size, args.batch) / 1e9:.1f} G MACs), input {args.batch}x3x{size[0]}x{size[1]} "
          f"on {environment(device)['device_name']}, random weights with random BatchNorm statistics")
    dtypes = [torch.float32] + ([torch.float16] if device.type == "cuda" else [])
    rows = []
    with torch.inference_mode():
        ref_out = ref(x)
        t_ref = measure(lambda: ref(x), device, warmup=1, repeats=args.repeats)["median_ms"]
        rows.append(["reference (eager)", "fp32", f"{t_ref:.1f}", "1.00", "-"])
        for dtype in dtypes:
            model = ref if dtype == torch.float32 else clone_as(ref, dtype)
            fast = optimize(model, backend=args.backend)  # CUDA graphs by default on CUDA
            xd = x.to(dtype)
            t = measure(lambda: fast(xd), device, warmup=2, repeats=args.repeats)["median_ms"]
            out = fast(xd)  # checked as served: a graph replay on CUDA
            rows.append([f"hrnet_fast ({fast.backend}{'+graphs' if fast.cuda_graphs else ''})",
                         str(dtype).replace("torch.float", "fp"), f"{t:.1f}", f"{t_ref / t:.2f}",
                         f"{rel_err(out.float(), ref_out):.2e}"])
    print_table(["model", "dtype", "median ms", "speedup", "rel. error vs reference"], rows)
    print(f"output: {args.batch}x{args.num_classes}x{ref_out.shape[-2]}x{ref_out.shape[-1]} logits "
          "at 1/4 of the input size (median of "
          f"{args.repeats} runs each)")
    return 0


def cmd_bench(args) -> int:
    device = pick_device(args.device)
    if args.json:
        check_output_file(args.json, "--json")
    impls = args.impls or default_impls(device)
    peers = args.peers if args.peers is not None else default_peers(device)
    def save(result: dict, complete: bool) -> None:
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(dict(result, complete=complete), f, indent=2)
            os.replace(args.json + ".tmp", args.json)

    def on_row(row: dict, rows: list) -> None:  # partial results survive a killed run
        if not args.quiet and "median_ms" in row:
            stderr_progress(f"    {row['name']}: {row['median_ms']:.2f} ms")
        save({"environment": environment(device), "rows": rows}, complete=False)

    result = run_bench(args.preset, args.size, args.batch, args.dtype, impls, peers, device,
                       warmup=args.warmup, repeats=args.repeats,
                       progress=None if args.quiet else stderr_progress, on_row=on_row)
    env = result["environment"]
    print(f"device: {env['device_name']}; torch {env['torch']}, triton {env['triton']}"
          + (f", cuDNN {env['cudnn']}" if "cudnn" in env else f", {env['threads']} threads"))
    table = format_table(result)
    print_table(table[0], table[1:])
    if args.json:
        save(result, complete=True)
        print(f"saved {args.json}")
    return 0


def cmd_check(args) -> int:
    device = pick_device(args.device)
    backends = args.backends or (["torch", "triton", "cuda", "compile"] if device.type == "cuda"
                                 else ["torch", "triton", "cuda"])
    failed = False
    for mode in args.upsample:
        rows = run_check(args.preset, args.size, args.batch, device, upsample=mode, backends=backends,
                         dtypes=args.dtype)
        print(f"{args.preset}, {args.batch}x3x{args.size[0]}x{args.size[1]}, upsample={mode}, on {device}")
        table = []
        for r in rows:
            if r["status"] == "unavailable":
                table.append([r["backend"], r["dtype"], "-", "-", "unavailable: " + r["note"]])
                continue
            failed |= r["status"] != "ok"
            table.append([r["backend"], r["dtype"], f"{r['err']:.2e}", f"{r['bound']:.2e}", r["status"]])
        print_table(["backend", "dtype", "rel. error", "bound", "status"], table)
        print()
    return 1 if failed else 0


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cmd_segment(args) -> int:
    import numpy as np
    import torch.nn.functional as F

    from .checkpoints import load_checkpoint
    from .imageio import CITYSCAPES_CLASSES, palette, read_rgb, write_png

    # Every path and argument first: a mistake costs no model build and leaves no output.
    check_input_file(args.image, "image")
    if args.checkpoint:
        check_input_file(args.checkpoint, "--checkpoint")
    outputs = [("--out", args.out)] + ([("--labels", args.labels)] if args.labels else [])
    for option, path in outputs:
        check_output_file(path, option)
        if _same_file(path, args.image):
            raise CLIError(f"{option} {path} would overwrite the input image")
    if args.labels and _same_file(args.labels, args.out):
        raise CLIError(f"--labels {args.labels} is the same file as --out")
    device = pick_device(args.device)
    dtype = args.dtype
    if dtype != torch.float32 and device.type != "cuda":
        name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
        raise CLIError(f"--dtype {name} needs a CUDA GPU; use fp32 on the CPU")
    image = read_rgb(args.image)
    cfg = HRNetConfig.preset(args.preset, num_classes=args.num_classes,
                             align_corners=args.align_corners)
    model = HRNet(cfg, fast_backend=args.backend)
    if args.checkpoint:
        print(load_checkpoint(model, args.checkpoint))
    else:
        print("warning: no --checkpoint given: random weights, the segmentation is meaningless",
              file=sys.stderr)
    model = model.to(device=device, dtype=dtype).eval()
    x = torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = ((x - mean) / std).to(dtype)
    with torch.inference_mode():
        logits = model(x)
        # Logits come at 1/4 of the input: resize to the image as the official evaluation does.
        logits = F.interpolate(logits.float(), size=image.shape[:2], mode="bilinear",
                               align_corners=cfg.align_corners)
        labels = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
    colours = palette(cfg.num_classes)[labels]
    if args.overlay:
        colours = (0.5 * colours + 0.5 * image).astype(np.uint8)
    with StagedOutputs() as staged:  # all outputs or none
        write_png(staged.stage(args.out), colours)
        if args.labels:
            write_png(staged.stage(args.labels), labels)
        staged.commit()
    counts = np.bincount(labels.ravel(), minlength=cfg.num_classes)
    names = CITYSCAPES_CLASSES if cfg.num_classes == len(CITYSCAPES_CLASSES) else None
    top = np.argsort(counts)[::-1][:5]
    print(f"{image.shape[1]}x{image.shape[0]} image -> {args.out}"
          + (f" (class ids in {args.labels})" if args.labels else ""))
    print_table(["class", "pixels"], [[names[c] if names else str(c), f"{100 * counts[c] / labels.size:.1f}%"]
                                      for c in top if counts[c]])
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
    p = argparse.ArgumentParser(
        prog="hrnet-fast", description="Fast, exact HRNet inference.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="reference vs hrnet_fast on a random image: error, time, speedup")
    d.add_argument("--preset", default="w18", choices=PRESET_NAMES)
    d.add_argument("--size", type=parse_size, default=None,
                   help="input HxW (default 1024x2048 on a GPU, 512x1024 on the CPU)")
    d.add_argument("--batch", type=positive_int, default=1)
    d.add_argument("--num-classes", type=positive_int, default=19)
    d.add_argument("--backend", default="auto", choices=ENGINE_BACKENDS)
    d.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available)")
    d.add_argument("--repeats", type=positive_int, default=5)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="presets x sizes x batch x dtype x backends, against peers")
    b.add_argument("--preset", nargs="+", default=["w18"], choices=PRESET_NAMES)
    b.add_argument("--size", nargs="+", type=parse_size, default=[(512, 1024)])
    b.add_argument("--batch", nargs="+", type=positive_int, default=[1])
    b.add_argument("--dtype", nargs="+", type=dtype_arg, default=[torch.float32],
                   help="fp32 fp16 bf16")
    b.add_argument("--impls", nargs="+", default=None,
                   help="engine backends, optionally BACKEND+graphs (default: torch on the CPU; "
                        "torch, torch+graphs, triton, triton+graphs, compile on a GPU)")
    b.add_argument("--peers", nargs="*", default=None, choices=PEERS,
                   help="default: eager on the CPU; eager, compile, compile-ro on a GPU")
    b.add_argument("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N")
    b.add_argument("--warmup", type=non_negative_int, default=3)
    b.add_argument("--repeats", type=positive_int, default=10)
    b.add_argument("--json", default=None, help="save all rows and the environment to this file")
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("check", help="numerical report of every backend against the reference")
    c.add_argument("--preset", default="w18_small_v2", choices=PRESET_NAMES)
    c.add_argument("--size", type=parse_size, default=(257, 385))
    c.add_argument("--batch", type=positive_int, default=2)
    c.add_argument("--upsample", nargs="+", default=["bilinear", "nearest"],
                   choices=["bilinear", "nearest"])
    c.add_argument("--backends", nargs="+", default=None, choices=[b for b in ENGINE_BACKENDS if b != "auto"])
    c.add_argument("--dtype", nargs="+", type=dtype_arg, default=None, help="fp32 fp16 bf16")
    c.add_argument("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N")
    c.set_defaults(func=cmd_check)

    g = sub.add_parser("segment", help="segment one image and write a colour PNG")
    g.add_argument("image", help="PNG/JPEG (needs Pillow), PPM (P6) or .npy (HxWx3 uint8)")
    g.add_argument("--checkpoint", default=None, help="weights in any format load_checkpoint reads")
    g.add_argument("--preset", default="w48", choices=PRESET_NAMES)
    g.add_argument("--num-classes", type=label_classes, default=19, help="1..256 (default 19)")
    g.add_argument("--align-corners", action="store_true")
    g.add_argument("--backend", default=None, choices=ENGINE_BACKENDS)
    g.add_argument("--dtype", type=dtype_arg, default="fp32", help="fp32, or fp16/bf16 on a GPU")
    g.add_argument("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N")
    g.add_argument("--out", default="segmentation.png", help="colour PNG of the classes")
    g.add_argument("--overlay", action="store_true", help="blend the colours over the image")
    g.add_argument("--labels", default=None, help="also write the class ids as a grey PNG")
    g.set_defaults(func=cmd_segment)

    i = sub.add_parser("info", help="presets with parameter counts and MACs")
    i.add_argument("--size", type=parse_size, default=(1024, 2048))
    i.add_argument("--num-classes", type=positive_int, default=19)
    i.add_argument("--head", default="seg", choices=("seg", "features", "classification"))
    i.set_defaults(func=cmd_info)
    return p


EPILOG = f"""\
errors:
  Every error is one line, "hrnet-fast: error: ...", on stderr, with exit status 1 (bad arguments:
  exit status 2 with argparse's usage message). Arguments and paths are checked before any model is
  built. Outputs are written to temporary files beside their targets and moved into place only when
  all of them are complete: a failed command leaves no partial output (bench --json excepted: it
  saves partial results as it goes, marked "complete": false, so that a killed run keeps them).
  Set {DEBUG_ENV}=1 to get the full Python traceback instead of the one-line message.
"""

# Errors whose message says all there is to say; any other exception is unexpected (a bug, or a
# failure deep in a library) and its one-line report names its type and suggests the traceback.
KNOWN_ERRORS = (CLIError, ImageReadError, CheckpointError, BackendUnavailable, OSError)


def _debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _error(message: str) -> int:
    print(f"hrnet-fast: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status. Usage errors exit via argparse (status 2)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if _debugging():
            raise
        _error("interrupted")
        return 130
    except KNOWN_ERRORS as e:
        if _debugging():
            raise
        return _error(str(e) or type(e).__name__)
    except Exception as e:
        if _debugging():
            raise
        detail = str(e)
        return _error(f"unexpected {type(e).__name__}{': ' + detail if detail.strip() else ''} "
                      f"(rerun with {DEBUG_ENV}=1 to see the traceback)")


if __name__ == "__main__":
    sys.exit(main())
