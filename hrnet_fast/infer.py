"""Dataset-scale segmentation: ``segment_files(inputs, out_dir, model)`` and the pipeline it shares
with ``hrnet_fast.evaluate``.

A ``torch.utils.data.DataLoader`` decodes images in worker processes, and batches of decoded images
are grouped by size (images of one size run through the model together; a batch holding several
sizes runs as several smaller batches). On CUDA the batches arrive in pinned memory and are copied
to the GPU as uint8 with ``non_blocking=True`` on a side stream while the previous batch computes;
normalisation runs on the device. Label-id PNGs (and colour / overlay PNGs on request) are written by
a small thread pool, each to a temporary file moved into place, so ``resume`` never mistakes a
half-written file for a result. An image that cannot be decoded is reported by name and skipped.

Output names: an input file ``dir/x.jpg`` gives ``OUT/x.png``; the images found in a folder (or
matched by a glob) keep their path below that folder (or below the glob's fixed leading folders):
``frames/a/x.jpg`` given as ``frames`` gives ``OUT/a/x.png``. ``colour`` adds ``OUT/x_colour.png``,
``overlay`` adds ``OUT/x_overlay.png`` (colours blended half-and-half over the image).
"""
from __future__ import annotations

import concurrent.futures
import glob
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .distributed import Group, single_process
from .imageio import ImageReadError, palette, read_rgb, write_png
from .tta import TTA, predict_logits

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The official test pads windows with black: 0 in pixels, -mean/std after normalisation.
BLACK = tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pnm", ".npy")
EXIT_SKIPPED = 3  # segment's exit status when some images could not be read and were skipped


class InputError(ValueError):
    """The inputs or outputs of a run are unusable (missing, empty, colliding): one message says why."""


@dataclass(frozen=True)
class Item:
    """One image to process: its path, its output name (relative, no extension) and, for evaluation,
    its label map's path."""

    path: str
    name: str
    label: Optional[str] = None


# ---------------------------------------------------------------------------------------------------
# Inputs and outputs

def _has_glob(text: str) -> bool:
    return glob.has_magic(text)


def _images_below(folder: str) -> List[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files)
                  if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return found


def _name_below(path: str, base: str) -> str:
    return os.path.splitext(os.path.relpath(path, base))[0]


def _glob_base(pattern: str) -> str:
    """The leading folders of ``pattern`` without glob characters: output names are relative to it."""
    parts = pattern.split(os.sep)
    fixed = []
    for p in parts[:-1]:
        if _has_glob(p):
            break
        fixed.append(p)
    return os.sep.join(fixed) or "."


def expand_inputs(inputs: Sequence[str], out_dir: Optional[str] = None) -> List[Item]:
    """Files, folders (searched recursively for ``IMAGE_EXTENSIONS``) and glob patterns -> items in a
    stable order. A file given twice counts once; two different files with one output name, a missing
    path, an empty folder or a pattern matching nothing raise ``InputError``. Images found in folders
    below ``out_dir`` are earlier outputs, not inputs: left out."""
    items: List[Item] = []
    for spec in inputs:
        if os.path.isfile(spec):
            items.append(Item(spec, os.path.splitext(os.path.basename(spec))[0]))
        elif os.path.isdir(spec):
            found = _without_outputs(_images_below(spec), spec, out_dir)
            if not found:
                raise InputError(f"no images in directory {spec} (looked for {', '.join(IMAGE_EXTENSIONS)})")
            items += [Item(p, _name_below(p, spec)) for p in found]
        elif _has_glob(spec):
            base = _glob_base(spec)
            matches = sorted(glob.glob(spec, recursive=True))
            found = []
            for m in matches:
                found += _images_below(m) if os.path.isdir(m) else [m] if os.path.isfile(m) else []
            found = _without_outputs(found, base, out_dir)
            if not found:
                raise InputError(f"no image matches {spec}")
            items += [Item(p, _name_below(p, base)) for p in found]
        elif os.path.exists(spec):
            raise InputError(f"{spec}: not a regular file or folder")
        else:
            raise InputError(f"image not found: {spec}")
    return _unique(items)


def _inside(path: str, folder: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


def _without_outputs(paths: List[str], folder: str, out_dir: Optional[str]) -> List[str]:
    """``paths`` found below ``folder``, less those in ``out_dir`` when it is a subfolder of it."""
    if out_dir is None or not _inside(out_dir, folder):
        return paths
    return [p for p in paths if not _inside(p, out_dir)]


def _unique(items: List[Item]) -> List[Item]:
    by_name: Dict[str, Item] = {}
    out = []
    for item in items:
        seen = by_name.get(item.name)
        if seen is None:
            by_name[item.name] = item
            out.append(item)
        elif os.path.realpath(seen.path) != os.path.realpath(item.path):
            raise InputError(f"{seen.path} and {item.path} would both be written as {item.name}.png; "
                             "give them in separate runs or folders")
    return out


def output_paths(item: Item, out_dir: str, colour: bool = False, overlay: bool = False) -> Dict[str, str]:
    """{"labels": ..., "colour": ..., "overlay": ...} (the last two only when asked for)."""
    stem = os.path.join(out_dir, item.name)
    paths = {"labels": stem + ".png"}
    if colour:
        paths["colour"] = stem + "_colour.png"
    if overlay:
        paths["overlay"] = stem + "_overlay.png"
    return paths


def check_outputs(items: Sequence[Item], out_dir: str, colour: bool, overlay: bool) -> None:
    """No output may overwrite an input image or another output (``x_colour`` beside an input
    ``x_colour``)."""
    inputs = {os.path.realpath(i.path): i.path for i in items}
    owner: Dict[str, str] = {}
    for item in items:
        for path in output_paths(item, out_dir, colour, overlay).values():
            real = os.path.realpath(path)
            if real in inputs:
                raise InputError(f"the output {path} would overwrite the input image {inputs[real]}")
            if real in owner:
                raise InputError(f"{owner[real]} and {item.path} would both write {path}")
            owner[real] = item.path


# ---------------------------------------------------------------------------------------------------
# Decoding in DataLoader workers, batches grouped by size

class ImageDataset(torch.utils.data.Dataset):
    """Decodes ``items[i]`` (and its label map through ``prepare_label``); never raises for a bad
    file: the sample carries the error message instead, so that one bad file cannot stop a worker."""

    def __init__(self, items: Sequence[Item], prepare_label: Optional[Callable] = None):
        self.items = list(items)
        self.prepare_label = prepare_label

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        start = time.perf_counter()
        sample = {"index": index, "image": None, "label": None, "error": None}
        try:
            image = read_rgb(item.path)
            if self.prepare_label is not None:
                sample["label"] = torch.from_numpy(self.prepare_label(item, image.shape[:2]))
            sample["image"] = torch.from_numpy(np.require(image, requirements="W"))
        except (ImageReadError, ValueError, OSError) as e:
            sample["error"] = str(e)
        sample["decode_s"] = time.perf_counter() - start
        return sample


def collate_by_size(samples: List[dict]) -> dict:
    """{"groups": [{"indices", "images" N x H x W x 3 uint8, "labels" N x H x W or None}], "failed":
    [(index, message)], "decode_s": seconds}; groups in order of first appearance."""
    groups: Dict[Tuple[int, int], List[dict]] = {}
    failed = []
    for s in samples:
        if s["error"] is not None:
            failed.append((s["index"], s["error"]))
        else:
            groups.setdefault(tuple(s["image"].shape[:2]), []).append(s)
    out = []
    for members in groups.values():
        labels = [m["label"] for m in members]
        out.append({"indices": [m["index"] for m in members],
                    "images": torch.stack([m["image"] for m in members]),
                    "labels": None if labels[0] is None else torch.stack(labels)})
    return {"groups": out, "failed": failed, "decode_s": sum(s["decode_s"] for s in samples)}


def make_loader(items: Sequence[Item], batch_size: int, workers: int, device: torch.device,
                prepare_label: Optional[Callable] = None) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ImageDataset(items, prepare_label), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate_by_size, pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None, persistent_workers=False)


# ---------------------------------------------------------------------------------------------------
# Host -> device, timing

@dataclass
class Timings:
    """Seconds per phase. decode and write are summed over the workers / writer threads that run them
    in parallel; wait is the main thread waiting for decoded batches. On a GPU, copy and model are only
    exact with ``sync=True`` (the phases otherwise overlap)."""

    images: int = 0
    wall: float = 0.0
    decode: float = 0.0
    wait: float = 0.0
    copy: float = 0.0
    model: float = 0.0
    write: float = 0.0

    def add(self, other: "Timings") -> None:
        for f in ("images", "decode", "wait", "copy", "model", "write"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.wall = max(self.wall, other.wall)

    def summary(self, ranks: int = 1) -> str:
        rate = self.images / self.wall if self.wall > 0 else 0.0
        return (f"{self.images} images in {self.wall:.2f} s ({rate:.2f} images/s): decode {self.decode:.2f} s "
                f"(in the loader), wait {self.wait:.2f} s, copy {self.copy:.2f} s, model {self.model:.2f} s, "
                f"write {self.write:.2f} s (in writer threads)"
                + (f"; phases summed over {ranks} ranks" if ranks > 1 else ""))


def _sync(device: torch.device, enabled: bool) -> None:
    if enabled and device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_device(group: dict, device: torch.device) -> dict:
    moved = dict(group)
    moved["images"] = group["images"].to(device, non_blocking=True)
    if group["labels"] is not None:
        moved["labels"] = group["labels"].to(device, non_blocking=True)
    return moved


def device_batches(loader: Iterable[dict], device: torch.device, timings: Timings,
                   sync: bool = False) -> Iterator[Tuple[dict, dict]]:
    """(batch, its groups on ``device``) for each loader batch. On CUDA the copies of the next batch are
    issued on a side stream before this one is handed out, so they overlap its compute."""
    it = iter(loader)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def fetch():
        t0 = time.perf_counter()
        batch = next(it, None)
        t1 = time.perf_counter()
        timings.wait += t1 - t0
        if batch is None:
            return None
        timings.decode += batch["decode_s"]
        if stream is None:
            groups = [_to_device(g, device) for g in batch["groups"]]
        else:
            with torch.cuda.stream(stream):
                groups = [_to_device(g, device) for g in batch["groups"]]
            if sync:
                stream.synchronize()
        timings.copy += time.perf_counter() - t1
        return batch, groups

    nxt = fetch()
    while nxt is not None:
        current = nxt
        if stream is not None:
            compute = torch.cuda.current_stream(device)
            compute.wait_stream(stream)
            for g in current[1]:  # allocated on the side stream, used on the compute stream
                for t in (g["images"], g["labels"]):
                    if t is not None:
                        t.record_stream(compute)
        nxt = fetch()
        yield current


def normalize(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """N x H x W x 3 uint8 RGB -> N x 3 x H x W in ``dtype``: x / 255, minus the ImageNet mean, over its
    std, as the official models expect."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def model_device_dtype(model) -> Tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def predict_labels(model, images: torch.Tensor, tta: TTA, align_corners: bool,
                   dtype: torch.dtype) -> torch.Tensor:
    """N x H x W int64 class ids for N x H x W x 3 uint8 images on the model's device."""
    x = normalize(images, dtype)
    logits = predict_logits(model, x, tta, align_corners=align_corners, pad_value=BLACK)
    return logits.argmax(1)


# ---------------------------------------------------------------------------------------------------
# Progress

class Progress:
    """A tqdm bar when tqdm is installed, else a plain line on stderr every tenth of the way."""

    def __init__(self, total: int, enabled: bool, what: str):
        self.total, self.done, self.what = total, 0, what
        self._bar = None
        self._next_line = 0
        self.enabled = enabled and total > 0
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, unit="img", desc=what, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        elif self.done >= self._next_line or self.done == self.total:
            print(f"{self.what}: {self.done}/{self.total} images", file=sys.stderr, flush=True)
            step = max(1, self.total // 10)
            self._next_line = (self.done // step + 1) * step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ---------------------------------------------------------------------------------------------------
# segment_files

@dataclass
class SegmentResult:
    """What a run did, over all ranks: ``written`` names, ``skipped`` (path, reason) of unreadable
    images, ``existing`` names left alone by ``resume``, and the ``timings``."""

    written: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    existing: List[str] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)

    @property
    def exit_status(self) -> int:
        return EXIT_SKIPPED if self.skipped else 0


def _write_atomically(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    head, tail = os.path.split(os.path.abspath(path))
    tmp = os.path.join(head, f".{tail}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write_png(tmp, image)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _write_outputs(paths: Dict[str, str], labels: np.ndarray, image: np.ndarray,
                   colours_of: np.ndarray) -> float:
    start = time.perf_counter()
    colours = colours_of[labels] if ("colour" in paths or "overlay" in paths) else None
    if "colour" in paths:
        _write_atomically(paths["colour"], colours)
    if "overlay" in paths:
        _write_atomically(paths["overlay"], (0.5 * colours + 0.5 * image).astype(np.uint8))
    _write_atomically(paths["labels"], labels)  # last: its presence means the image is done
    return time.perf_counter() - start


def segment_files(inputs: Sequence, out_dir: str, model, *, tta: TTA = TTA(), batch_size: int = 1,
                  workers: int = 0, colour: bool = False, overlay: bool = False, resume: bool = False,
                  progress: bool = True, sync_timing: bool = False,
                  group: Optional[Group] = None) -> SegmentResult:
    """Segment ``inputs`` (paths, folders, glob patterns, or ``Item``s) into ``out_dir``: one label-id
    PNG per image (class ids as 8-bit grey, so at most 256 classes), plus colour / overlay PNGs.

    ``model``: an HRNet (or any module mapping N x 3 x H x W to N x C x h x w logits) in eval mode on
    its device and dtype. ``resume`` skips images whose outputs all exist. Unreadable images are
    skipped and listed in the result (``exit_status`` 3). Under torchrun, pass the command's ``group``:
    each rank segments its shard and the result (on every rank) covers all ranks.
    """
    device, dtype = model_device_dtype(model)
    group = group or single_process(device)
    if inputs and all(isinstance(i, Item) for i in inputs):
        items = list(inputs)
    else:
        items = expand_inputs([os.fspath(i) for i in inputs], out_dir)
    check_outputs(items, out_dir, colour, overlay)
    config = getattr(model, "config", None)
    num_classes = getattr(config, "num_classes", None)
    if num_classes is not None and num_classes > 256:
        raise InputError(f"label-id PNGs are 8-bit: at most 256 classes, the model has {num_classes}")
    align_corners = bool(getattr(config, "align_corners", False))

    mine = group.ranks.shard(items)
    done = {i.name for i in mine if resume and all(
        os.path.exists(p) for p in output_paths(i, out_dir, colour, overlay).values())}
    todo = [i for i in mine if i.name not in done]
    local = SegmentResult(existing=[i.name for i in mine if i.name in done])
    start = time.perf_counter()
    def work() -> None:
        if todo:
            _segment_shard(todo, out_dir, model, tta, align_corners, dtype, device, batch_size,
                           workers, colour, overlay, progress and group.ranks.is_main, sync_timing,
                           local, palette(num_classes or 256))

    group.run_all(work)  # a failure is held until every rank is done
    local.timings.images = len(local.written)
    local.timings.wall = time.perf_counter() - start
    merged = SegmentResult()
    for part in group.gather(local):
        merged.written += part.written
        merged.skipped += part.skipped
        merged.existing += part.existing
        merged.timings.add(part.timings)
    return merged


def _segment_shard(todo: List[Item], out_dir: str, model, tta: TTA, align_corners: bool,
                   dtype: torch.dtype, device: torch.device, batch_size: int, workers: int, colour: bool,
                   overlay: bool, progress: bool, sync_timing: bool, result: SegmentResult,
                   colours_of: np.ndarray) -> None:
    writers = max(1, min(4, os.cpu_count() or 1))
    bar = Progress(len(todo), progress, "segment")
    pending: List[concurrent.futures.Future] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=writers) as pool:
        try:
            loader = make_loader(todo, batch_size, workers, device)
            with torch.inference_mode():
                for batch, groups in device_batches(loader, device, result.timings, sync_timing):
                    result.skipped += [(todo[i].path, message) for i, message in batch["failed"]]
                    for host, g in zip(batch["groups"], groups):
                        t0 = time.perf_counter()
                        labels = predict_labels(model, g["images"], tta, align_corners, dtype)
                        labels = labels.to(torch.uint8).cpu().numpy()
                        result.timings.model += time.perf_counter() - t0
                        for k, index in enumerate(g["indices"]):
                            paths = output_paths(todo[index], out_dir, colour, overlay)
                            pending.append(pool.submit(_write_outputs, paths, labels[k],
                                                       host["images"][k].numpy(), colours_of))
                            result.written.append(todo[index].name)
                    # Writes run behind the model; a long queue waits, so memory stays bounded.
                    pending = _collect(pending, result.timings, wait=len(pending) > 4 * writers)
                    bar.update(sum(len(g["indices"]) for g in groups) + len(batch["failed"]))
            _collect(pending, result.timings, wait=True)
        finally:
            for f in pending:
                f.cancel()
            bar.close()


def _collect(pending: List[concurrent.futures.Future], timings: Timings, wait: bool):
    """Finished writes (all of them with ``wait``): their time is added, their errors raised."""
    keep = []
    for f in pending:
        if wait or f.done():
            timings.write += f.result()
        else:
            keep.append(f)
    return keep
