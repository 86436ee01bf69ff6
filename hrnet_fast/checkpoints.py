"""Checkpoint loading: detect the format people hand us, map its keys to ours, load, report.

Formats (see hrnet-facts.md):

* ``plain``: our own / official keys, as ``model.state_dict()`` writes them;
* ``official-seg``: the official segmentation release, keys prefixed ``model.`` plus ``loss.*``;
* ``imagenet``: official or timm ImageNet weights (backbone keys plus ``incre_modules``,
  ``downsamp_modules``, ``final_layer``, ``classifier``);
* ``mmseg``: OpenMMLab, ``backbone.*`` plus ``decode_head.convs.0.{conv,bn}`` and
  ``decode_head.conv_seg`` (mapped to ``last_layer.0/1/3``, a zero bias where the source has none).

Any of them may come wrapped as ``{'state_dict': ...}`` or ``{'model': ...}`` (training checkpoints)
and with DataParallel's ``module.`` prefix. InPlaceABN-era BatchNorm weights (used as
``abs(w) + eps``) are converted when ``inplace_abn=True``.
"""
from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

CLASSIFICATION_HEAD_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
SEG_HEAD_PREFIXES = ("last_layer.",)
_MMSEG_HEAD_MAP = (
    ("decode_head.convs.0.conv.", "last_layer.0."),
    ("decode_head.convs.0.bn.", "last_layer.1."),
    ("decode_head.conv_seg.", "last_layer.3."),
)
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the given model; the message names the problem."""


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did: the detected format and the fate of every key."""

    format: str
    wrapper: Optional[str] = None
    loaded: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        where = f" (inside {{'{self.wrapper}': ...}})" if self.wrapper else ""
        lines = [f"checkpoint format: {self.format}{where}",
                 f"loaded {len(self.loaded)} tensors, skipped {len(self.skipped)}, "
                 f"missing {len(self.missing)}"]
        if self.skipped:
            lines.append("skipped: " + _abbrev(self.skipped))
        if self.missing:
            lines.append("missing (left as initialised): " + _abbrev(self.missing))
        return "\n".join(lines)


def _abbrev(keys: List[str], n: int = 6) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def read_checkpoint(path: Union[str, os.PathLike]) -> Mapping:
    """``torch.load`` on the CPU with ``weights_only=True``, with errors that say what went wrong."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights_only" in msg or "Unsupported global" in msg:
            raise CheckpointError(
                f"{path} holds Python objects that weights_only=True refuses to load ({msg.splitlines()[0]}). "
                "If you trust the file, load it yourself with torch.load(path, weights_only=False) "
                "and pass the resulting dict to load_checkpoint.") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {msg.splitlines()[0]}") from None
    except Exception as e:  # the unpickler raises many types on files that are not checkpoints
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {first}") from None
    return obj


def _unwrap(obj) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"a checkpoint must be a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    wrapper = None
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj, wrapper = inner, key
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"not a state dict: entries {_abbrev([str(k) for k in bad], 3)} are not tensors "
            f"(known wrappers: {', '.join(repr(k) for k in _WRAPPER_KEYS)})")
    if not obj:
        raise CheckpointError("the checkpoint is empty: no tensors in it")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, wrapper


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    keys = list(state_dict)
    if any(k.startswith("backbone.") for k in keys):
        return "mmseg"
    if any(k.startswith("model.") for k in keys):
        return "official-seg"
    if any(k.startswith(CLASSIFICATION_HEAD_PREFIXES) for k in keys):
        return "imagenet"
    return "plain"


def _to_model_keys(sd: Dict[str, torch.Tensor], fmt: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename to our keys; returns (mapped, dropped) where dropped are keys with no place in HRNet."""
    mapped: Dict[str, torch.Tensor] = {}
    dropped: List[str] = []
    if fmt == "official-seg":
        for k, v in sd.items():
            if k.startswith("model."):
                mapped[k[len("model."):]] = v
            else:  # loss.* (class weights of the criterion) and anything else of the wrapper
                dropped.append(k)
    elif fmt == "mmseg":
        for k, v in sd.items():
            if k.startswith("backbone."):
                mapped[k[len("backbone."):]] = v
                continue
            for src, dst in _MMSEG_HEAD_MAP:
                if k.startswith(src):
                    mapped[dst + k[len(src):]] = v
                    break
            else:
                dropped.append(k)  # auxiliary heads, other decode-head parts
        w = mapped.get("last_layer.0.weight")
        if w is not None and "last_layer.0.bias" not in mapped:
            # mmseg's ConvModule has no conv bias when a norm follows: the equivalent bias is zero.
            mapped["last_layer.0.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    else:
        mapped = dict(sd)
    return mapped, dropped


def guess_preset(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The preset a (model-keyed) state dict looks like, from its layer widths; None if unclear."""
    t = state_dict.get("transition1.0.0.weight")
    if t is None or t.dim() != 4:
        return None
    width = t.shape[0]
    layer1_blocks = len({k.split(".")[1] for k in state_dict if k.startswith("layer1.")})
    if width == 16:
        return "w18_small_v1"
    if width == 18 and layer1_blocks == 2:
        return "w18_small_v2"
    return f"w{width}"


def _preset_hint(state_dict, model: nn.Module) -> str:
    ckpt_preset = guess_preset(state_dict)
    model_preset = getattr(getattr(model, "config", None), "name", None)
    if ckpt_preset and model_preset and ckpt_preset != model_preset:
        return f"the checkpoint looks like preset {ckpt_preset}, the model is {model_preset}"
    return ""


def _head_keys(keys, prefixes) -> List[str]:
    return [k for k in keys if k.startswith(prefixes)]


def load_checkpoint(model: nn.Module, source, strict: bool = True, *,
                    inplace_abn: bool = False, verbose: bool = False) -> LoadReport:
    """Load a checkpoint (a path or a state dict) of any supported format into ``model``.

    ``strict=True`` requires every backbone tensor to be present and every checkpoint tensor to have
    a place; head tensors that the checkpoint does not carry at all (ImageNet weights into a
    segmentation model) are reported as missing with a warning rather than raising. Shape mismatches
    always raise, naming the key and both shapes. ``inplace_abn=True`` converts BatchNorm weights of
    InPlaceABN-era checkpoints (``w -> abs(w) + eps``). Returns a :class:`LoadReport`.
    """
    obj = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    sd, wrapper = _unwrap(obj)
    fmt = detect_format(sd)
    mapped, dropped = _to_model_keys(sd, fmt)
    report = LoadReport(format=fmt, wrapper=wrapper)

    target = model.state_dict()
    target_keys = set(target)
    head_prefix_of_model = {
        "seg": SEG_HEAD_PREFIXES, "classification": CLASSIFICATION_HEAD_PREFIXES, "features": (),
    }.get(getattr(getattr(model, "config", None), "head", "seg"), ())
    other_heads = tuple(p for p in CLASSIFICATION_HEAD_PREFIXES + SEG_HEAD_PREFIXES
                        if p not in head_prefix_of_model)

    to_load: Dict[str, torch.Tensor] = {}
    unexpected: List[str] = []
    for k, v in mapped.items():
        if k in target_keys:
            to_load[k] = v
        elif k.startswith(other_heads):
            report.skipped.append(k)  # a head this model does not have (e.g. ImageNet classifier)
        else:
            unexpected.append(k)
    report.skipped.extend(dropped)

    mismatches = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in to_load.items()
                  if tuple(v.shape) != tuple(target[k].shape)]
    if mismatches:
        k, got, want = mismatches[0]
        hint = _preset_hint(mapped, model)
        more = f" (and {len(mismatches) - 1} more mismatched tensors)" if len(mismatches) > 1 else ""
        raise CheckpointError(
            f"shape mismatch for {k}: checkpoint has {list(got)}, model has {list(want)}{more}{'; ' + hint if hint else ''}")

    missing = sorted(target_keys - set(to_load))
    # BatchNorm's step counter does not affect inference; old checkpoints lack it.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    model_head_missing = _head_keys(missing, head_prefix_of_model) if head_prefix_of_model else []
    ckpt_has_model_head = bool(_head_keys(to_load, head_prefix_of_model)) if head_prefix_of_model else False
    absent_head = model_head_missing if not ckpt_has_model_head else []
    hard_missing = [k for k in missing if k not in set(absent_head)]

    if strict and (unexpected or hard_missing):
        parts = []
        if hard_missing:
            parts.append(f"missing from the checkpoint: {_abbrev(hard_missing)}")
        if unexpected:
            parts.append(f"no place in the model: {_abbrev(unexpected)}")
        hint = _preset_hint(mapped, model)
        hint = f" ({hint})" if hint else ""
        raise CheckpointError(f"checkpoint ({fmt}) does not fit the model{hint}: " + "; ".join(parts))
    report.skipped.extend(unexpected)
    report.missing = missing

    if inplace_abn:
        bn_eps = {name: m.eps for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
        for k in list(to_load):
            mod, _, leaf = k.rpartition(".")
            if leaf == "weight" and mod in bn_eps:
                to_load[k] = to_load[k].abs() + bn_eps[mod]

    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    if absent_head:
        warnings.warn(
            f"the checkpoint ({fmt}) carries no weights for this model's head; "
            f"{len(absent_head)} head tensors keep their initial values: {_abbrev(absent_head, 3)}",
            stacklevel=2)
    if verbose:
        print(report)
    return report
