"""The ``hrnet-fast`` command line: ``demo``, ``bench``, ``check``, ``segment``, ``pose``, ``eval`` and
``info``.

Errors never show a traceback: ``main`` reports each as one line ``hrnet-fast: error: ...`` on stderr
and returns 1 (argparse's usage errors, and arguments that contradict each other, exit with 2, as
argparse does; ``segment`` returns 3 when it skipped unreadable images). Under torchrun only rank 0
prints results and errors that every rank sees alike. ``HRNET_FAST_DEBUG=1`` lets the
exception through, traceback and all. Arguments are checked when they are parsed, and paths before any
model is built; outputs are written to temporary files beside their targets and moved into place only
when every output of the command is complete.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import uuid
from typing import List, Optional, Sequence, Tuple

import torch

from .bench import PEERS, default_impls, default_peers, format_table, run_bench, stderr_progress
from .check import clone_as, randomize_batchnorm, rel_err, run_check
from .checkpoints import CheckpointError
from .config import PRESET_NAMES, UPSAMPLE_MODES, HRNetConfig
from .distributed import Group, LaunchError, RankFailed, rank_device, ranks_from_env
from .engine import ENGINE_BACKENDS, optimize, parse_dtype
from .evaluate import LABEL_MAPS, MAX_CLASSES, DatasetError
from .imageio import ImageReadError
# IMAGENET_MEAN / IMAGENET_STD: still importable from here, as before they moved to infer.py.
from .infer import EXIT_SKIPPED, IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, InputError  # noqa: F401
from .model import HRNet
from .backends import BackendUnavailable
from .reference import HighResolutionNet
from .stats import count_macs, count_parameters
from .timing import environment, measure
from .tta import TTA


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


class UsageError(CLIError):
    """Arguments that parse one by one but contradict each other: argparse's usage error, exit 2.
    The message starts with "argument OPTION:" as argparse's own do."""


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


def eval_classes(text: str) -> int:
    value = positive_int(text)
    if value > MAX_CLASSES:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_CLASSES}, got {value}")
    return value


def scales_arg(text: str) -> Tuple[float, ...]:
    """``"0.5,0.75,1"`` -> (0.5, 0.75, 1.0); every scale a positive number."""
    try:
        scales = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be comma-separated numbers, got {text!r}") from None
    if not all(0 < v < float("inf") for v in scales):
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text!r}")
    return scales


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


# Heads that demo, bench and check run, with their default class (joint) counts and input sizes:
# Cityscapes' 19 classes, COCO's 17 joints at the published 256x192 crop.
BENCH_HEADS = ("seg", "pose")
DEFAULT_CLASSES = {"seg": 19, "pose": 17}
POSE_SIZE = (256, 192)


def num_classes_of(args) -> int:
    return args.num_classes if args.num_classes is not None else DEFAULT_CLASSES[args.head]


def cmd_demo(args) -> int:
    device = pick_device(args.device)
    seg_size = (1024, 2048) if device.type == "cuda" else (512, 1024)
    size = args.size or (seg_size if args.head == "seg" else POSE_SIZE)
    num_classes = num_classes_of(args)
    torch.manual_seed(0)
    cfg = HRNetConfig.preset(args.preset, num_classes=num_classes, head=args.head)
    ref = randomize_batchnorm(HighResolutionNet(cfg)).to(device).eval()
    x = torch.randn(args.batch, 3, *size, device=device)
    head = " pose" if args.head == "pose" else ""
    print(f"hrnet-fast demo: {args.preset}{head} ({count_parameters(ref) / 1e6:.2f} M parameters, "
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
    what = "logits" if args.head == "seg" else "heatmaps (one per joint)"
    print(f"output: {args.batch}x{num_classes}x{ref_out.shape[-2]}x{ref_out.shape[-1]} {what} "
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

    sizes = args.size or ([(512, 1024)] if args.head == "seg" else [POSE_SIZE])
    result = run_bench(args.preset, sizes, args.batch, args.dtype, impls, peers, device,
                       warmup=args.warmup, repeats=args.repeats, head=args.head,
                       num_classes=num_classes_of(args),
                       progress=None if args.quiet else stderr_progress, on_row=on_row)
    env = result["environment"]
    if args.head != "seg":
        print(f"head: {args.head}, {num_classes_of(args)} joints")
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
    size = args.size or ((257, 385) if args.head == "seg" else POSE_SIZE)
    num_classes = num_classes_of(args)
    head = "" if args.head == "seg" else f", head={args.head} ({num_classes} joints)"
    failed = False
    for mode in args.upsample:
        rows = run_check(args.preset, size, args.batch, device, upsample=mode, head=args.head,
                         num_classes=num_classes, backends=backends, dtypes=args.dtype)
        print(f"{args.preset}, {args.batch}x3x{size[0]}x{size[1]}{head}, upsample={mode}, on {device}")
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


def tta_from_args(args) -> TTA:
    """The TTA of ``--scales --flip --crop --stride --crop-batch``; contradictions are usage errors."""
    if args.stride is not None and args.crop is None:
        raise UsageError("argument --stride: needs --crop (sliding windows are off without a crop)")
    try:
        return TTA(scales=args.scales, flip=args.flip, crop=args.crop, stride=args.stride,
                   crop_batch=args.crop_batch)
    except ValueError as e:
        raise UsageError(f"argument --stride: {e}") from None


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    if dtype != torch.float32 and device.type != "cuda":
        name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
        raise CLIError(f"--dtype {name} needs a CUDA GPU; use fp32 on the CPU")


def build_model(args, device: torch.device, verbose: bool = True) -> HRNet:
    """The preset with ``--checkpoint``'s weights, or random ones (the same on every rank: seed 0)."""
    from .checkpoints import load_checkpoint

    cfg = HRNetConfig.preset(args.preset, num_classes=args.num_classes, align_corners=args.align_corners)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = HRNet(cfg, fast_backend=args.backend)
    if args.checkpoint:
        report = load_checkpoint(model, args.checkpoint)
        if verbose:
            print(report)
    elif verbose:
        print("warning: no --checkpoint given: random weights, the segmentation is meaningless",
              file=sys.stderr)
    return model.to(device=device, dtype=args.dtype).eval()


def default_workers() -> int:
    """Decoding processes per rank: up to 4, sharing the CPU cores with the other ranks of the node."""
    per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(4, (os.cpu_count() or 1) // per_node))


def _several_images(args) -> Optional[str]:
    """Why ``segment`` writes a folder of outputs (None: one image to one file, as before)."""
    folders = [p for p in args.inputs if os.path.isdir(p)]
    if folders:
        return f"{folders[0]} is a directory of images"
    patterns = [p for p in args.inputs if glob.has_magic(p) and not os.path.exists(p)]
    if patterns:
        return f"{patterns[0]} is a pattern"
    if len(args.inputs) > 1:
        return f"{len(args.inputs)} images were given"
    if args.out and args.out.endswith(("/", os.sep)):
        return "--out ends with a separator"
    return None


def cmd_segment(args) -> int:
    tta = tta_from_args(args)
    reason = _several_images(args)
    if reason:
        return _segment_many(args, tta, reason)
    return _segment_one(args, tta)


def _segment_one(args, tta: TTA) -> int:
    import numpy as np

    from .imageio import CITYSCAPES_CLASSES, palette, read_rgb, write_png
    from .infer import predict_labels

    # Every path and argument first: a mistake costs no model build and leaves no output.
    image_path = args.inputs[0]
    args.out = args.out or "segmentation.png"
    check_input_file(image_path, "image")
    if args.checkpoint:
        check_input_file(args.checkpoint, "--checkpoint")
    outputs = [("--out", args.out)] + ([("--labels", args.labels)] if args.labels else [])
    for option, path in outputs:
        check_output_file(path, option)
        if _same_file(path, image_path):
            raise CLIError(f"{option} {path} would overwrite the input image")
    if args.labels and _same_file(args.labels, args.out):
        raise CLIError(f"--labels {args.labels} is the same file as --out")
    ranks = ranks_from_env()
    device = rank_device(ranks, args.device)
    check_dtype(args.dtype, device)
    if not ranks.is_main:  # one image under torchrun: rank 0 does it all
        return 0
    if args.resume and all(os.path.exists(p) for _, p in outputs):
        print(f"{args.out} exists: nothing to do (--resume)")
        return 0
    image = read_rgb(image_path)
    model = build_model(args, device)
    with torch.inference_mode():
        images = torch.from_numpy(np.require(image, requirements="W")).to(device)[None]  # Pillow: read-only
        labels = predict_labels(model, images, tta, model.config.align_corners, args.dtype)
        labels = labels[0].to(torch.uint8).cpu().numpy()
    colours = palette(model.config.num_classes)[labels]
    if args.overlay:
        colours = (0.5 * colours + 0.5 * image).astype(np.uint8)
    with StagedOutputs() as staged:  # all outputs or none
        write_png(staged.stage(args.out), colours)
        if args.labels:
            write_png(staged.stage(args.labels), labels)
        staged.commit()
    num_classes = model.config.num_classes
    counts = np.bincount(labels.ravel(), minlength=num_classes)
    names = CITYSCAPES_CLASSES if num_classes == len(CITYSCAPES_CLASSES) else None
    top = np.argsort(counts)[::-1][:5]
    print(f"{image.shape[1]}x{image.shape[0]} image -> {args.out}"
          + (f" (class ids in {args.labels})" if args.labels else ""))
    print_table(["class", "pixels"], [[names[c] if names else str(c), f"{100 * counts[c] / labels.size:.1f}%"]
                                      for c in top if counts[c]])
    return 0


def check_output_folder_name(out: str, reason: str) -> None:
    """``--out`` for several images must name a folder, not a file."""
    if os.path.isfile(out):
        raise CLIError(f"--out {out}: is a file, but {reason}: give an output folder")
    if not os.path.isdir(out) and os.path.splitext(out)[1].lower() in IMAGE_EXTENSIONS:
        raise CLIError(f"--out {out} names an image file, but {reason}: give an output folder "
                       f"(end it with {os.sep} to make that clear)")


def make_output_folder(out: str) -> None:
    """The folder exists (made if needed) and takes new files."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out {out}: cannot create the folder: {e.strerror or e}") from None
    check_output_file(os.path.join(out, "probe.png"), "--out")


def _segment_many(args, tta: TTA, reason: str) -> int:
    from .infer import check_outputs, expand_inputs, segment_files

    if args.labels:
        raise CLIError(f"--labels names one file, but {reason}: label-id PNGs are written into --out")
    if not args.out:
        raise CLIError(f"{reason}: give an output folder with --out DIR")
    check_output_folder_name(args.out, reason)
    if args.checkpoint:
        check_input_file(args.checkpoint, "--checkpoint")
    items = expand_inputs(args.inputs, args.out)
    check_outputs(items, args.out, args.colour, args.overlay)
    ranks = ranks_from_env()
    device = rank_device(ranks, args.device)
    check_dtype(args.dtype, device)
    make_output_folder(args.out)
    workers = default_workers() if args.workers is None else args.workers
    with Group(ranks, device) as group:
        model = build_model(args, device, verbose=ranks.is_main)
        result = segment_files(items, args.out, model, tta=tta, batch_size=args.batch, workers=workers,
                               colour=args.colour, overlay=args.overlay, resume=args.resume,
                               progress=not args.quiet, sync_timing=args.timing, group=group)
    if ranks.is_main:
        for path, message in result.skipped:
            print(f"hrnet-fast: skipped {message}", file=sys.stderr)
        print(f"{len(result.written)} of {len(items)} images segmented -> {args.out}"
              + (f"; {len(result.existing)} already done (--resume)" if result.existing else "")
              + (f"; {len(result.skipped)} skipped" if result.skipped else "")
              + (f"; {ranks.world_size} ranks" if ranks.distributed else ""))
        print(result.timings.summary(ranks.world_size))
        if result.skipped:
            print(f"hrnet-fast: {len(result.skipped)} image(s) could not be read and were skipped "
                  f"(exit status {result.exit_status})", file=sys.stderr)
    return result.exit_status


def box_arg(text: str) -> Tuple[float, float, float, float]:
    from .pose_io import parse_box

    try:
        return parse_box(text)
    except ValueError as e:
        hint = " (give IMAGE before --box)" if "," not in text else ""
        raise argparse.ArgumentTypeError(f"{e}{hint}") from None


def score_threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value != value:
        raise argparse.ArgumentTypeError("must be a number, got NaN")
    return value


POSE_OUT_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _check_pose_outputs(args) -> List[Tuple[str, str]]:
    """(option, path) of each output, checked before any work: writable, distinct, not the input."""
    if args.out is None and args.json is None:
        args.out = "pose.png"
    outputs = [(o, p) for o, p in (("--out", args.out), ("--json", args.json)) if p is not None]
    for option, path in outputs:
        check_output_file(path, option)
        if _same_file(path, args.image):
            raise CLIError(f"{option} {path} would overwrite the input image")
    if args.out and args.json and _same_file(args.out, args.json):
        raise CLIError(f"--json {args.json} is the same file as --out")
    if args.out:
        ext = os.path.splitext(args.out)[1].lower()
        if ext not in POSE_OUT_EXTENSIONS:
            raise CLIError(f"--out {args.out}: the drawing is written as PNG or JPEG; end the name with "
                           f"{', '.join(POSE_OUT_EXTENSIONS)}")
        if ext != ".png":
            try:
                import PIL.Image  # noqa: F401
            except ImportError:
                raise CLIError(f"--out {args.out}: writing JPEG needs Pillow (pip install Pillow); "
                               "PNG is written without it") from None
    return outputs


def _pose_flip_pairs(args, num_joints: int):
    """The flip test's left/right pairs, None without the flip test; says so when none are known."""
    from .pose_io import flip_pairs_for

    pairs = flip_pairs_for(num_joints)
    if args.flip is False:
        return None
    if pairs is None:
        if args.flip is None:
            print(f"note: no left/right joint pairs are known for {num_joints} joints (COCO has 17, "
                  "MPII 16): flip test off (--flip mirrors without swapping joints)", file=sys.stderr)
            return None
        print(f"note: flip test without swapping joints: no left/right pairs are known for "
              f"{num_joints} joints", file=sys.stderr)
        return ()
    return pairs


def build_pose_model(args, device: torch.device) -> HRNet:
    """The pose preset with ``--checkpoint``'s weights (a pose checkpoint: its head must be there), or
    random ones (seed 0)."""
    import warnings

    from .checkpoints import head_of_key, load_checkpoint

    cfg = HRNetConfig.preset(args.preset, head="pose", num_classes=args.num_joints)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = HRNet(cfg, fast_backend=args.backend)
    if args.checkpoint:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                report = load_checkpoint(model, args.checkpoint)
            except CheckpointError as e:
                if "shape mismatch for final_layer." not in str(e):
                    raise
                raise CheckpointError(f"{args.checkpoint}: {e}; --num-joints ({args.num_joints}) must "
                                      "match the checkpoint's joints") from None
        if any(head_of_key(k) == "pose" for k in report.missing):
            raise CLIError(f"--checkpoint {args.checkpoint} has no pose head (final_layer): it is not a "
                           f"pose model's checkpoint (format {report.format})")
        print(report)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    else:
        print("warning: --random-weights: the keypoints are meaningless", file=sys.stderr)
    return model.to(device=device, dtype=args.dtype).eval()


def cmd_pose(args) -> int:
    import numpy as np

    from .imageio import read_rgb
    from .pose_io import box_outside_image, draw_pose, pose_record, predict_keypoints

    # Every argument and path first: a mistake costs no model build and leaves no output.
    if args.checkpoint and args.random_weights:
        raise UsageError("argument --random-weights: not allowed with --checkpoint")
    if not args.checkpoint and not args.random_weights:
        raise UsageError("argument --checkpoint: required (or --random-weights to try the pipeline "
                         "with random weights; the keypoints are then meaningless)")
    check_input_file(args.image, "image")
    if args.checkpoint:
        check_input_file(args.checkpoint, "--checkpoint")
    _check_pose_outputs(args)
    device = pick_device(args.device)
    check_dtype(args.dtype, device)
    image = read_rgb(args.image)
    height, width = image.shape[:2]
    boxes = args.box or [(0.0, 0.0, float(width), float(height))]
    for box in boxes:
        if box_outside_image(box, height, width):
            raise CLIError(f"--box {','.join(f'{v:g}' for v in box)} lies outside the "
                           f"{width}x{height} image")
    flip_pairs = _pose_flip_pairs(args, args.num_joints)
    refine = None if args.refine == "none" else args.refine
    model = build_pose_model(args, device)
    with torch.inference_mode():
        regions, keypoints, scores = predict_keypoints(
            model, torch.tensor(image, device=device), torch.tensor(boxes, dtype=torch.float64),
            args.input_size, flip_pairs=flip_pairs, refine=refine, batch_size=args.batch,
            dtype=args.dtype)
    with StagedOutputs() as staged:  # all outputs or none
        if args.out:
            drawn = draw_pose(image, keypoints.numpy(), scores.numpy(), args.min_score)
            _write_image(staged.stage(args.out), drawn, args.out)
        if args.json:
            record = pose_record(boxes, regions, keypoints, scores, image=args.image,
                                 image_size=(height, width), preset=args.preset,
                                 input_size=args.input_size, flip=flip_pairs is not None, refine=refine)
            with open(staged.stage(args.json), "w") as f:
                json.dump(record, f, indent=1)
        staged.commit()
    shown = int((scores.numpy() >= args.min_score).sum())
    print(f"{width}x{height} image, {len(boxes)} box{'es' if len(boxes) != 1 else ''}: "
          f"{shown} of {scores.numel()} joints with score >= {args.min_score:g}"
          + (", flip test" if flip_pairs is not None else "") + " -> "
          + " and ".join(p for p in (args.out, args.json) if p))
    for n, person in enumerate(scores.numpy()):
        print(f"  box {n}: mean score {float(np.mean(person)):.3f}")
    return 0


def _write_image(tmp_path: str, image, target: str) -> None:
    """PNG with the standard library; JPEG (by ``target``'s extension) with Pillow."""
    from .imageio import write_png

    if os.path.splitext(target)[1].lower() == ".png":
        write_png(tmp_path, image)
        return
    from PIL import Image  # checked before any work

    Image.fromarray(image).save(tmp_path, format="JPEG", quality=95)


def cmd_eval(args) -> int:
    import json

    from .evaluate import (evaluate_files, format_percent, metrics_table, pair_images_and_labels)

    tta = tta_from_args(args)
    if args.checkpoint and args.random_weights:
        raise UsageError("argument --random-weights: not allowed with --checkpoint")
    if not args.checkpoint and not args.random_weights:
        raise UsageError("argument --checkpoint: required (or --random-weights to try the pipeline "
                         "with random weights; the metrics are then meaningless)")
    if args.checkpoint:
        check_input_file(args.checkpoint, "--checkpoint")
    ranks = ranks_from_env()
    if args.json and ranks.is_main:
        check_output_file(args.json, "--json")
    items = pair_images_and_labels(args.images, args.labels)
    device = rank_device(ranks, args.device)
    check_dtype(args.dtype, device)
    workers = default_workers() if args.workers is None else args.workers
    with Group(ranks, device) as group:
        model = build_model(args, device, verbose=ranks.is_main)
        result = evaluate_files(items, model, num_classes=args.num_classes, ignore_index=args.ignore_index,
                                label_map=args.label_map, tta=tta, batch_size=args.batch, workers=workers,
                                progress=not args.quiet, sync_timing=args.timing, group=group)
    if not ranks.is_main:
        return 0
    m = result.metrics
    print(f"{args.preset}{' (random weights)' if args.random_weights else ''}: {m['images']} images, "
          f"scales {','.join(f'{v:g}' for v in tta.scales)}{', flip' if tta.flip else ''}"
          + (f", {tta.crop[0]}x{tta.crop[1]} windows every {tta.stride[0]}x{tta.stride[1]}" if tta.crop else "")
          + (f", {ranks.world_size} ranks" if ranks.distributed else ""))
    headers, rows = metrics_table(m)
    print_table(headers, rows)
    print(f"mIoU {format_percent(m['miou'])}, pixel accuracy {format_percent(m['pixel_accuracy'])}, "
          f"mean accuracy {format_percent(m['mean_accuracy'])}")
    print(result.timings.summary(ranks.world_size))
    if args.json:
        with StagedOutputs() as staged:
            with open(staged.stage(args.json), "w") as f:
                json.dump(m, f, indent=1)
            staged.commit()
        print(f"saved {args.json}")
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


DTYPE_HELP = "fp32; fp16/bf16 on a GPU, or on a CPU that runs them natively (bf16: AVX512-BF16/AMX)"


def _model_options(p, default_classes: int, classes_type, classes_help: str) -> None:
    p.add_argument("--checkpoint", default=None, help="weights in any format load_checkpoint reads")
    p.add_argument("--preset", default="w48", choices=PRESET_NAMES)
    p.add_argument("--num-classes", type=classes_type, default=default_classes, help=classes_help)
    p.add_argument("--align-corners", action="store_true")
    p.add_argument("--backend", default=None, choices=ENGINE_BACKENDS)
    p.add_argument("--dtype", type=dtype_arg, default="fp32", help=DTYPE_HELP)
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK, or cpu)")


def _data_options(p) -> None:
    p.add_argument("--scales", type=scales_arg, default=(1.0,),
                   help="multi-scale test, e.g. 0.5,0.75,1,1.25,1.5,1.75 (logits summed; default 1)")
    p.add_argument("--flip", action="store_true", help="add the logits of the mirrored image")
    p.add_argument("--crop", type=parse_size, default=None,
                   help="sliding windows of HxW (e.g. 1024x1024) over each scaled image")
    p.add_argument("--stride", type=parse_size, default=None,
                   help="window step HxW (default: 2/3 of --crop, rounded up)")
    p.add_argument("--crop-batch", type=positive_int, default=8, help="windows per model call")
    p.add_argument("--batch", type=positive_int, default=1, help="images of one size per model call")
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="decoding processes (default: up to 4 per rank; 0 decodes in the main process)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--timing", action="store_true",
                   help="synchronise the GPU between phases so the decode/copy/model/write split is exact")


def _head_options(p) -> None:
    p.add_argument("--head", default="seg", choices=BENCH_HEADS,
                   help="seg (segmentation) or pose (top-down keypoint heatmaps)")
    p.add_argument("--num-classes", "--num-joints", dest="num_classes", type=positive_int, default=None,
                   metavar="N", help="classes of seg (default 19) or joints of pose (default 17, COCO)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hrnet-fast", description="Fast, exact HRNet inference.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="reference vs hrnet_fast on a random image: error, time, speedup")
    d.add_argument("--preset", default="w18", choices=PRESET_NAMES)
    d.add_argument("--size", type=parse_size, default=None,
                   help="input HxW (default: seg 1024x2048 on a GPU, 512x1024 on the CPU; pose 256x192)")
    d.add_argument("--batch", type=positive_int, default=1)
    _head_options(d)
    d.add_argument("--backend", default="auto", choices=ENGINE_BACKENDS)
    d.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available)")
    d.add_argument("--repeats", type=positive_int, default=5)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="presets x sizes x batch x dtype x backends, against peers")
    b.add_argument("--preset", nargs="+", default=["w18"], choices=PRESET_NAMES)
    b.add_argument("--size", nargs="+", type=parse_size, default=None,
                   help="input sizes HxW (default: seg 512x1024, pose 256x192)")
    b.add_argument("--batch", nargs="+", type=positive_int, default=[1])
    _head_options(b)
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
    c.add_argument("--size", type=parse_size, default=None,
                   help="input HxW (default: seg 257x385, pose 256x192)")
    c.add_argument("--batch", type=positive_int, default=2)
    _head_options(c)
    c.add_argument("--upsample", nargs="+", default=["bilinear", "nearest"], choices=UPSAMPLE_MODES)
    c.add_argument("--backends", nargs="+", default=None, choices=[b for b in ENGINE_BACKENDS if b != "auto"])
    c.add_argument("--dtype", nargs="+", type=dtype_arg, default=None, help="fp32 fp16 bf16")
    c.add_argument("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N")
    c.set_defaults(func=cmd_check)

    g = sub.add_parser(
        "segment", help="segment images: one to a colour PNG, or files/folders/globs into a folder",
        description="One image: --out FILE gets a colour PNG (--labels FILE: the class ids too). Several "
                    "images, a folder, a glob or --out ending with /: --out DIR gets one label-id PNG per "
                    "image (DIR/<name>.png, folders keep their subfolders), plus <name>_colour.png with "
                    "--colour and <name>_overlay.png with --overlay. Unreadable images are reported and "
                    f"skipped; the exit status is then {EXIT_SKIPPED}.")
    g.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files (PNG/JPEG need Pillow; PPM P6 and .npy HxWx3 uint8 work without), "
                        "folders or glob patterns")
    _model_options(g, default_classes=19, classes_type=label_classes,
                   classes_help="1..256 (class ids are written as 8-bit PNG; default 19)")
    g.add_argument("--out", default=None,
                   help="one image: the colour PNG (default segmentation.png); several: the output folder")
    g.add_argument("--overlay", action="store_true", help="blend the colours over the image")
    g.add_argument("--colour", "--color", dest="colour", action="store_true",
                   help="several images: also write <name>_colour.png")
    g.add_argument("--labels", default=None, help="one image: also write the class ids as a grey PNG")
    g.add_argument("--resume", action="store_true", help="skip images whose outputs already exist")
    _data_options(g)
    g.set_defaults(func=cmd_segment, command_parser=g)

    q = sub.add_parser(
        "pose", help="top-down human pose: keypoints of the people in given boxes, drawn and as JSON",
        description="Each --box (x1,y1,x2,y2 in pixels; default: the whole image) is cropped as the "
                    "published top-down test does (centred, widened or heightened to the input's "
                    "aspect ratio, padded by 1.25, warped bilinearly to --input-size), normalised "
                    "as the official pose models (RGB / 255, ImageNet mean and std), run with the "
                    "flip test (COCO left/right pairs for 17 joints, MPII for 16; off for other "
                    "counts unless --flip), and its heatmaps decoded and mapped back into the image. "
                    "--out gets the image with the skeleton drawn (COCO limbs for 17 joints, MPII for "
                    "16, points only otherwise; joints under --min-score left out), --json the boxes, "
                    "keypoints [[x, y], ...] and scores.")
    q.add_argument("image", metavar="IMAGE",
                   help="image file (PNG/JPEG need Pillow; PPM P6 and .npy HxWx3 uint8 work without)")
    q.add_argument("--checkpoint", default=None,
                   help="pose weights: official, mmpose 0.x/1.x or hrnet_fast (head='pose')")
    q.add_argument("--random-weights", action="store_true",
                   help="no checkpoint: random weights (seed 0), to try the pipeline")
    q.add_argument("--preset", default="w32", choices=PRESET_NAMES)
    q.add_argument("--num-joints", type=positive_int, default=17, help="17 (COCO, default) or 16 (MPII)")
    q.add_argument("--input-size", type=parse_size, default=POSE_SIZE,
                   help="model input HxW (default 256x192; the published models also use 384x288)")
    q.add_argument("--box", nargs="+", action="extend", type=box_arg, default=None, metavar="x1,y1,x2,y2",
                   help="person boxes in pixels (several after one --box, or --box repeated)")
    q.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the mirrored crop's heatmaps (default: on for 17 and 16 joints)")
    q.add_argument("--refine", default="quarter", choices=("quarter", "dark", "none"),
                   help="sub-pixel refinement of each heatmap peak (default quarter, as published)")
    q.add_argument("--min-score", type=score_threshold, default=0.3,
                   help="joints scoring less are not drawn (default 0.3)")
    q.add_argument("--out", default=None,
                   help="the image with the skeleton, .png (or .jpg with Pillow); default pose.png "
                        "unless only --json is given")
    q.add_argument("--json", default=None, help="write boxes, keypoints and scores to this file")
    q.add_argument("--batch", type=positive_int, default=32, help="boxes per model call (default 32)")
    q.add_argument("--backend", default=None, choices=ENGINE_BACKENDS)
    q.add_argument("--dtype", type=dtype_arg, default="fp32", help=DTYPE_HELP)
    q.add_argument("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N")
    # A box may start with a minus (-8,20,30,70): take any "-<digit>" word as a value, not as an
    # option (argparse's own pattern takes only plain negative numbers on older Pythons).
    if hasattr(q, "_negative_number_matcher"):
        q._negative_number_matcher = re.compile(r"^-\.?\d")
    q.set_defaults(func=cmd_pose, command_parser=q)

    e = sub.add_parser(
        "eval", help="mIoU of a checkpoint on a folder of images and label maps",
        description="Pairs images with label maps by name (a trailing _leftImg8bit / _gtFine_labelIds is "
                    "ignored, so the Cityscapes layout works as it is), predicts every image and prints "
                    "per-class IoU. Under torchrun each rank evaluates its share; rank 0 prints.")
    e.add_argument("--images", required=True, help="folder of images (searched recursively)")
    e.add_argument("--labels", required=True, help="folder of label maps (class ids, one channel)")
    _model_options(e, default_classes=19, classes_type=eval_classes, classes_help="default 19")
    e.add_argument("--random-weights", action="store_true",
                   help="no checkpoint: random weights (seed 0), to try the pipeline; meaningless metrics")
    e.add_argument("--ignore-index", type=int, default=255, help="label value left out (default 255)")
    e.add_argument("--label-map", default="none", choices=LABEL_MAPS,
                   help="cityscapes: label ids (0..33, *_labelIds.png) -> the 19 train ids")
    e.add_argument("--json", default=None, help="write the metrics to this file")
    _data_options(e)
    e.set_defaults(func=cmd_eval, command_parser=e)

    i = sub.add_parser("info", help="presets with parameter counts and MACs")
    i.add_argument("--size", type=parse_size, default=(1024, 2048))
    i.add_argument("--num-classes", type=positive_int, default=19)
    i.add_argument("--head", default="seg", choices=("seg", "features", "classification"))
    i.set_defaults(func=cmd_info)
    return p


EPILOG = f"""\
exit status:
  0 done; 1 an error; 2 bad arguments (argparse's usage message); 3 segment skipped unreadable images
  (each named on stderr, the others were written); 130 interrupted.

errors:
  Every error is one line, "hrnet-fast: error: ...", on stderr. Arguments and paths are checked before
  any model is built. Outputs are written to temporary files beside their targets and moved into place
  only when all of them are complete: a failed command leaves no partial output (bench --json excepted:
  it saves partial results as it goes, marked "complete": false, so that a killed run keeps them;
  segment into a folder keeps the images it finished, so that --resume can go on from there).
  Set {DEBUG_ENV}=1 to get the full Python traceback instead of the one-line message.

torchrun:
  torchrun --nproc-per-node N -m hrnet_fast eval|segment ... shards the images across the ranks (each
  image once), each rank on cuda:LOCAL_RANK (NCCL) or the CPU (gloo); rank 0 prints and writes --json.
"""

# Errors whose message says all there is to say; any other exception is unexpected (a bug, or a
# failure deep in a library) and its one-line report names its type and suggests the traceback.
KNOWN_ERRORS = (CLIError, ImageReadError, CheckpointError, BackendUnavailable, OSError, InputError,
                DatasetError, LaunchError, RankFailed)


def _debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _rank() -> int:
    try:
        return ranks_from_env().rank
    except LaunchError:
        return 0


def _error(message: str, every_rank: bool = False) -> int:
    """One line on stderr. Under torchrun only rank 0 reports, since every rank meets the same input
    errors (and errors of other ranks reach rank 0 as RankFailed), unless ``every_rank``."""
    rank = _rank()
    if rank == 0 or every_rank:
        prefix = f"[rank {rank}] " if rank else ""
        print(f"hrnet-fast: error: {prefix}{' '.join(str(message).split())}", file=sys.stderr)
    return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status. Usage errors exit via argparse (status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if _debugging():
            raise
        _error("interrupted")
        return 130
    except UsageError as e:
        if _debugging():
            raise
        getattr(args, "command_parser", parser).error(str(e))  # exits with 2, as argparse does
    except KNOWN_ERRORS as e:
        if _debugging():
            raise
        return _error(str(e) or type(e).__name__)
    except Exception as e:
        if _debugging():
            raise
        detail = str(e)
        return _error(f"unexpected {type(e).__name__}{': ' + detail if detail.strip() else ''} "
                      f"(rerun with {DEBUG_ENV}=1 to see the traceback)", every_rank=True)


if __name__ == "__main__":
    sys.exit(main())
