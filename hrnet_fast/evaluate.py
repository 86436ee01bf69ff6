"""Evaluation of a segmentation model on a folder of images and label maps: confusion matrix, IoU.

Pairing: images and label maps are found recursively in their two folders and paired by key, the file
name without its extension and without a trailing ``_leftImg8bit`` (images) or ``_gtFine_labelIds``
(label maps), so Cityscapes' ``leftImg8bit/val/<city>/<x>_leftImg8bit.png`` pairs with
``gtFine/val/<city>/<x>_gtFine_labelIds.png``, and ``a.jpg`` with ``a.png``. Other files in the label
folder (Cityscapes' ``_gtFine_color.png``, ``_instanceIds.png``...) keep their suffix and match no
image. Every image needs exactly one label map of its size; extra label maps are ignored.

Label maps hold class ids; ``label_map="cityscapes"`` first maps Cityscapes label ids (0..33) to the 19
train ids through a lookup table (ids that Cityscapes does not evaluate become ``ignore_index``).
Pixels labelled ``ignore_index`` are left out; any other id outside 0..num_classes-1 is an error.

The confusion matrix (rows: label, columns: prediction) is accumulated exactly in int64 with
``torch.bincount`` on the model's device; under torchrun the ranks' matrices are summed. Metrics:
``iou[c] = tp / (tp + fp + fn)``, None for a class absent from both labels and predictions;
``miou`` is the mean over the classes that have an IoU; ``pixel_accuracy = sum(tp) / labelled
pixels``; ``mean_accuracy`` is the mean of ``tp / labelled pixels`` over the classes present in the
labels (None where nothing qualifies).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .distributed import Group, single_process
from .imageio import CITYSCAPES_CLASSES, read_label
from .infer import (Item, Progress, Timings, _images_below, device_batches, make_loader,
                    model_device_dtype, predict_labels)
from .tta import TTA

IMAGE_SUFFIX = "_leftImg8bit"
LABEL_SUFFIX = "_gtFine_labelIds"
LABEL_EXTENSIONS = (".png", ".npy", ".bmp", ".tif", ".tiff")
METRIC_KEYS = ("miou", "iou", "pixel_accuracy", "mean_accuracy", "confusion_matrix", "images")
MAX_CLASSES = 32767  # labels travel as int16 with -1 for ignored pixels

# Cityscapes label id -> train id (the 19 evaluated classes, in CITYSCAPES_CLASSES order); every other
# id in 0..33 (unlabeled, ego vehicle, parking, rail track, guard rail, caravan, ...) is ignored.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                        24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_NUM_IDS = 34
LABEL_MAPS = ("none", "cityscapes")


class DatasetError(ValueError):
    """The images and label maps do not fit together: the message names the files and the problem."""


def label_lookup_table(name: str, ignore_index: int) -> Optional[np.ndarray]:
    """The id -> train id table of a label map (None for "none"); ignored ids map to ``ignore_index``."""
    if name in (None, "none"):
        return None
    if name != "cityscapes":
        raise DatasetError(f"unknown label map {name!r}: choose one of {', '.join(LABEL_MAPS)}")
    table = np.full(CITYSCAPES_NUM_IDS, ignore_index, dtype=np.int64)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        table[label_id] = train_id
    return table


def _strip(stem: str, suffix: str) -> str:
    return stem[:-len(suffix)] if stem.endswith(suffix) and len(stem) > len(suffix) else stem


def image_key(path: str) -> str:
    return _strip(os.path.splitext(os.path.basename(path))[0], IMAGE_SUFFIX)


def label_key(path: str) -> str:
    return _strip(os.path.splitext(os.path.basename(path))[0], LABEL_SUFFIX)


def _labels_below(folder: str) -> Dict[str, List[str]]:
    found: Dict[str, List[str]] = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            if os.path.splitext(f)[1].lower() in LABEL_EXTENSIONS:
                path = os.path.join(root, f)
                found.setdefault(label_key(path), []).append(path)
    return found


def pair_images_and_labels(images_dir: str, labels_dir: str) -> List[Item]:
    """Items (image, key, label map) for every image below ``images_dir``, in a stable order."""
    for what, folder in (("images", images_dir), ("labels", labels_dir)):
        if not os.path.isdir(folder):
            raise DatasetError(f"{what} folder {folder}: " + ("not a folder" if os.path.exists(folder)
                                                                else "not found"))
    images = _images_below(images_dir)
    if not images:
        raise DatasetError(f"no images in {images_dir}")
    labels = _labels_below(labels_dir)
    items, seen, missing = [], {}, []
    for path in images:
        key = image_key(path)
        if key in seen:
            raise DatasetError(f"{seen[key]} and {path} have the same key {key!r}: image names must be "
                               "unique across the folder")
        seen[key] = path
        found = labels.get(key, [])
        if not found:
            missing.append(path)
        elif len(found) > 1:
            raise DatasetError(f"image {path} matches several label maps: {', '.join(found)}")
        else:
            items.append(Item(path, key, found[0]))
    if missing:
        key = image_key(missing[0])
        raise DatasetError(f"{len(missing)} of {len(images)} images have no label map in {labels_dir}: "
                           f"first {missing[0]} (looked for {key}.png or {key}{LABEL_SUFFIX}.png, "
                           f"any of {', '.join(LABEL_EXTENSIONS)})")
    return items


class LabelPreparer:
    """Reads an item's label map in a loader worker and returns int16 targets (-1 = ignored) after the
    label map's lookup table; a wrong size or an id out of range is a ``DatasetError``."""

    def __init__(self, num_classes: int, ignore_index: int = 255, label_map: Optional[str] = None):
        if not 1 <= num_classes <= MAX_CLASSES:
            raise DatasetError(f"num_classes must be 1..{MAX_CLASSES}, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.label_map = label_map or "none"
        self.table = label_lookup_table(self.label_map, ignore_index)

    def __call__(self, item: Item, image_size) -> np.ndarray:
        raw = read_label(item.label)
        if raw.shape != tuple(image_size):
            raise DatasetError(f"label map {item.label} is {raw.shape[1]}x{raw.shape[0]} (WxH) but its "
                               f"image {item.path} is {image_size[1]}x{image_size[0]}")
        ids = raw.astype(np.int64)
        if self.table is not None:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= len(self.table):
                bad = low if low < 0 else high
                raise DatasetError(f"label map {item.label}: id {bad} is not a {self.label_map} label id "
                                   f"(0..{len(self.table) - 1}); are these train ids? then leave out "
                                   "--label-map")
            ids = self.table[ids]
        ignored = ids == self.ignore_index
        bad = ~ignored & ((ids < 0) | (ids >= self.num_classes))
        if bad.any():
            value = int(ids[bad][0])
            raise DatasetError(f"label map {item.label}: class id {value} is outside 0..{self.num_classes - 1} "
                               f"and is not the ignore index {self.ignore_index}")
        return np.where(ignored, -1, ids).astype(np.int16)


def accumulate_confusion(confusion: torch.Tensor, predictions: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """Adds (label, prediction) pair counts of the labelled pixels to the C x C int64 ``confusion``."""
    c = confusion.shape[0]
    labelled = targets >= 0
    pairs = targets[labelled].long() * c + predictions[labelled].long()
    counts = torch.bincount(pairs, minlength=c * c)
    if counts.numel() != c * c:  # bincount grows past minlength only for a prediction id >= c
        raise DatasetError(f"a prediction is outside the {c} classes evaluated")
    confusion += counts.view(c, c)
    return confusion


def metrics_from_confusion(confusion, images: int) -> dict:
    """The metrics dict (``METRIC_KEYS``) of an int64 confusion matrix (rows: label, columns:
    prediction), computed from exact integer counts."""
    cm = [[int(v) for v in row] for row in torch.as_tensor(confusion).tolist()]
    n = len(cm)
    tp = [cm[c][c] for c in range(n)]
    labelled = [sum(cm[c]) for c in range(n)]
    predicted = [sum(cm[r][c] for r in range(n)) for c in range(n)]
    iou = [tp[c] / (labelled[c] + predicted[c] - tp[c]) if labelled[c] + predicted[c] else None
           for c in range(n)]
    present = [v for v in iou if v is not None]
    accuracy = [tp[c] / labelled[c] for c in range(n) if labelled[c]]
    total = sum(labelled)
    return {
        "miou": sum(present) / len(present) if present else None,
        "iou": iou,
        "pixel_accuracy": sum(tp) / total if total else None,
        "mean_accuracy": sum(accuracy) / len(accuracy) if accuracy else None,
        "confusion_matrix": cm,
        "images": images,
    }


def class_names(num_classes: int) -> List[str]:
    """Cityscapes' names for 19 classes, else the ids."""
    if num_classes == len(CITYSCAPES_CLASSES):
        return list(CITYSCAPES_CLASSES)
    return [str(c) for c in range(num_classes)]


def metrics_table(metrics: dict, names: Optional[Sequence[str]] = None):
    """(headers, rows) per class: name, IoU, accuracy, share of labelled pixels; "-" where undefined."""
    cm = metrics["confusion_matrix"]
    names = names or class_names(len(cm))
    total = sum(map(sum, cm))
    rows = []
    for c, name in enumerate(names):
        labelled = sum(cm[c])
        iou = metrics["iou"][c]
        rows.append([name, "-" if iou is None else f"{100 * iou:.2f}",
                     f"{100 * cm[c][c] / labelled:.2f}" if labelled else "-",
                     f"{100 * labelled / total:.2f}" if total else "-"])
    return ["class", "IoU %", "accuracy %", "labelled pixels %"], rows


def format_percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


@dataclass
class EvalResult:
    """``metrics`` (the JSON object), the ``names`` of the images evaluated (all ranks) and timings."""

    metrics: dict
    names: List[str] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)


def evaluate_files(items: Sequence[Item], model, *, num_classes: Optional[int] = None,
                   ignore_index: int = 255, label_map: Optional[str] = None, tta: TTA = TTA(),
                   batch_size: int = 1, workers: int = 0, progress: bool = True,
                   sync_timing: bool = False, group: Optional[Group] = None) -> EvalResult:
    """Evaluate ``model`` on ``items`` (from ``pair_images_and_labels``). ``num_classes`` defaults to
    the model's. Any unreadable image or label map, or one that does not fit, stops the run with a
    ``DatasetError``. Under torchrun pass the command's ``group``: each rank evaluates its shard and
    every rank returns the metrics of the whole set."""
    device, dtype = model_device_dtype(model)
    group = group or single_process(device)
    config = getattr(model, "config", None)
    num_classes = num_classes or getattr(config, "num_classes", None)
    if not num_classes:
        raise DatasetError("num_classes is needed for a model without a config")
    if getattr(config, "num_classes", num_classes) != num_classes:
        raise DatasetError(f"num_classes={num_classes} but the model predicts {config.num_classes} classes")
    prepare = LabelPreparer(num_classes, ignore_index, label_map)
    align_corners = bool(getattr(config, "align_corners", False))
    confusion = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    mine = group.ranks.shard(list(items))
    local = EvalResult(metrics={})
    start = time.perf_counter()
    def work() -> None:
        if mine:
            _evaluate_shard(mine, model, prepare, tta, align_corners, dtype, device, batch_size,
                            workers, progress and group.ranks.is_main, sync_timing, confusion, local)

    group.run_all(work)  # a failure is held until every rank is done
    local.timings.images = len(local.names)
    local.timings.wall = time.perf_counter() - start
    group.all_reduce_sum(confusion)
    result = EvalResult(metrics={})
    for part in group.gather(local):
        result.names += part.names
        result.timings.add(part.timings)
    result.metrics = metrics_from_confusion(confusion.cpu(), len(result.names))
    return result


def _evaluate_shard(items: List[Item], model, prepare: LabelPreparer, tta: TTA, align_corners: bool,
                    dtype: torch.dtype, device: torch.device, batch_size: int, workers: int,
                    progress: bool, sync_timing: bool, confusion: torch.Tensor, result: EvalResult) -> None:
    bar = Progress(len(items), progress, "eval")
    try:
        loader = make_loader(items, batch_size, workers, device, prepare_label=prepare)
        with torch.inference_mode():
            for batch, groups in device_batches(loader, device, result.timings, sync_timing):
                if batch["failed"]:
                    raise DatasetError(batch["failed"][0][1])
                for g in groups:
                    t0 = time.perf_counter()
                    predictions = predict_labels(model, g["images"], tta, align_corners, dtype)
                    accumulate_confusion(confusion, predictions, g["labels"])
                    if sync_timing and device.type == "cuda":
                        torch.cuda.synchronize(device)
                    result.timings.model += time.perf_counter() - t0
                    result.names += [items[i].name for i in g["indices"]]
                bar.update(sum(len(g["indices"]) for g in groups))
    finally:
        bar.close()
