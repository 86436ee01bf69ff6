"""Checkpoint loading: detect the format people hand us, map its keys to ours, load, report.

Formats:

* ``plain``: our own / official keys, as ``model.state_dict()`` writes them;
* ``official-seg``: the official segmentation release, keys prefixed ``model.`` plus ``loss.*``;
* ``imagenet``: official or timm ImageNet weights (backbone keys plus ``incre_modules``,
  ``downsamp_modules``, ``final_layer``, ``classifier``);
* ``mmseg``: OpenMMLab, ``backbone.*`` plus ``decode_head.convs.0.{conv,bn}`` and
  ``decode_head.conv_seg`` (mapped to ``last_layer.0/1/3``, a zero bias where the source has none);
* ``official-pose``: the official top-down pose release (``final_layer.weight`` / ``.bias``, the keys
  of ``head="pose"`` too);
* ``mmpose-0.x``: ``backbone.*`` plus ``keypoint_head.final_layer.*``;
* ``mmpose-1.x``: ``backbone.*`` plus ``head.final_layer.*``.

Any of them may come wrapped as ``{'state_dict': ...}`` or ``{'model': ...}`` (training checkpoints)
and with DataParallel's ``module.`` prefix. InPlaceABN-era BatchNorm weights (used as
``abs(w) + eps``) are converted when ``inplace_abn=True``. Files are read with
``weights_only=True``; the inert bookkeeping objects of training runners (mmengine's
``HistoryBuffer``, numpy arrays and scalars) load as placeholders (``RunnerPlaceholder``).
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

CLASSIFICATION_HEAD_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
SEG_HEAD_PREFIXES = ("last_layer.",)
# The pose head is one conv named final_layer; the classification head's final_layer is a
# Sequential (final_layer.0.*, final_layer.1.*), so the exact names tell the two apart.
POSE_HEAD_KEYS = ("final_layer.weight", "final_layer.bias")
# OpenMMLab formats: backbone.* is ours without the prefix; these head prefixes map to our head.
_OPENMMLAB_HEAD_MAPS = {
    "mmseg": (("decode_head.convs.0.conv.", "last_layer.0."),
              ("decode_head.convs.0.bn.", "last_layer.1."),
              ("decode_head.conv_seg.", "last_layer.3.")),
    "mmpose-0.x": (("keypoint_head.final_layer.", "final_layer."),),
    "mmpose-1.x": (("head.final_layer.", "final_layer."),),
}
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


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (.+?) was not an allowed global")
_BLOCKED_MODULE = re.compile(r"GLOBAL (.+?) whose module (.+?) is blocked")
# Terminal escape sequences (torch makes part of its advice bold; a file's class names may carry
# any), then any control character left: messages are plain text.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f]")


def _plain(text: str) -> str:
    return _ESCAPES.sub("", text)


def _short_reason(e: BaseException) -> str:
    """Torch's own reason for a failed load, without its advice: one line, at most ~150 chars."""
    msg = _plain(str(e))
    inner = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", msg, re.S)
    if inner:  # the weights-only unpickler wraps the reason in advice about weights_only=False
        msg = inner.group(1)
    line = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    line = re.split(r"(?<=\.) (?=This is an internal|If you are seeing)", line)[0]  # miniz advice
    if isinstance(e, EOFError):
        return "the file ends too early"
    if not line or "weights_only" in line:
        return type(e).__name__
    if not isinstance(e, RuntimeError):  # "KeyError: 101" says more than "101"
        line = f"{type(e).__name__}: {line}"
    return line if len(line) <= 150 else line[:147] + "..."


class RunnerPlaceholder:
    """Stands in for a training runner's bookkeeping object (``stands_for`` names it) that a
    checkpoint holds next to the weights: it keeps what the file gave it (``args``, ``state``) and
    runs no code of the library it stands for, which need not be installed."""

    stands_for = ""

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args = args
        return self

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:  # what the file's BUILD gives: kept, never interpreted
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.stands_for}>"


# The few globals that training runners pickle outside the weights, all inert: mmengine's MessageHub
# keeps HistoryBuffer objects (numpy arrays of logged values and counts) and runners record numpy
# scalars (a best score). weights_only=True refuses them; the weights never depend on them.
RUNNER_GLOBALS = (
    "mmengine.logging.history_buffer.HistoryBuffer",
    "numpy.ndarray", "numpy.dtype",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",  # numpy 1.x, 2.x
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
)
# torch's safe-globals entries (placeholder class, the exact path the pickle names): the unpickler
# then creates, calls (REDUCE) and fills (BUILD) placeholders where the file names these paths.
_RUNNER_SAFE_GLOBALS = [
    (type(path.rpartition(".")[2], (RunnerPlaceholder,), {"stands_for": path}), path)
    for path in RUNNER_GLOBALS
]


def read_checkpoint(path: Union[str, os.PathLike]) -> Mapping:
    """``torch.load`` on the CPU with ``weights_only=True``, with errors that say what went wrong.

    The names in ``RUNNER_GLOBALS`` load as :class:`RunnerPlaceholder` objects (allowed only during
    this call), so that training-runner checkpoints (mmengine's ``message_hub``) load safely.
    A corrupt or foreign file is "not a readable PyTorch checkpoint" (with torch's reason, short);
    only a file that really holds other pickled Python objects, which the weights-only loader
    refuses, is said to, with the warning that loading it otherwise runs code from the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        with torch.serialization.safe_globals(_RUNNER_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises many types on files that are not checkpoints
        msg = str(e)
        found = _UNSAFE_GLOBAL.search(msg) or _BLOCKED_MODULE.search(msg)
        if isinstance(e, pickle.UnpicklingError) and found:
            raise CheckpointError(
                f"{path} holds arbitrary Python objects (a pickled {_plain(found.group(1))}), which "
                "the safe weights_only=True loading refuses. Loading it with torch.load(path, "
                "weights_only=False) runs code from the file: do that only for a file from a trusted "
                "source, then pass the resulting dict to load_checkpoint.") from None
        if "TorchScript archive" in msg:
            raise CheckpointError(
                f"{path} is a TorchScript archive (a whole scripted model), not a state dict. "
                "torch.jit.load(path) runs the model's code: only for a file from a trusted source; "
                "then pass its .state_dict() to load_checkpoint.") from None
        if "legacy .tar format" in msg:
            raise CheckpointError(
                f"{path} is in the legacy .tar format of PyTorch before 0.4, which the safe "
                "weights_only=True loading cannot read; loading it with weights_only=False runs code "
                "from the file: only for a file from a trusted source (re-save its state dict with a "
                "current PyTorch).") from None
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({_short_reason(e)}); the file may be "
            "corrupt, truncated or of another format.") from None
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
    while all(k.startswith("module.") for k in sd):  # DataParallel, once or nested
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, wrapper


# The resize in the fuse step each format's models were trained with: the official
# and timm ImageNet models and the official and mmpose pose models nearest, the official
# segmentation release bilinear. Other formats (plain: our own; mmseg) imply nothing.
_FORMAT_UPSAMPLE = {"imagenet": ("nearest", "the official / timm ImageNet weights"),
                    "official-seg": ("bilinear", "the official segmentation release"),
                    "official-pose": ("nearest", "the official pose release"),
                    "mmpose-0.x": ("nearest", "an mmpose 0.x pose model"),
                    "mmpose-1.x": ("nearest", "an mmpose 1.x pose model"),
                    "mmseg": ("mmseg", "an OpenMMLab mmseg segmentation model")}


def head_of_key(key: str) -> Optional[str]:
    """The head a (model-keyed) tensor belongs to: "seg", "classification" or "pose"; None for the
    backbone."""
    if key.startswith(SEG_HEAD_PREFIXES):
        return "seg"
    if key in POSE_HEAD_KEYS:
        return "pose"
    if key.startswith(CLASSIFICATION_HEAD_PREFIXES):
        return "classification"
    return None


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    keys = list(state_dict)
    if any(k.startswith("backbone.") for k in keys):
        if any(k.startswith("keypoint_head.final_layer.") for k in keys):
            return "mmpose-0.x"
        if any(k.startswith("head.final_layer.") for k in keys):
            return "mmpose-1.x"
        return "mmseg"
    if any(k.startswith("model.") for k in keys):
        return "official-seg"
    heads = {head_of_key(k) for k in keys}
    if "classification" in heads:
        return "imagenet"
    if "pose" in heads:
        return "official-pose"
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
    elif fmt in _OPENMMLAB_HEAD_MAPS:
        for k, v in sd.items():
            if k.startswith("backbone."):
                mapped[k[len("backbone."):]] = v
                continue
            for src, dst in _OPENMMLAB_HEAD_MAPS[fmt]:
                if k.startswith(src):
                    mapped[dst + k[len(src):]] = v
                    break
            else:
                dropped.append(k)  # auxiliary heads, other head parts
        w = mapped.get("last_layer.0.weight")
        if fmt == "mmseg" and w is not None and "last_layer.0.bias" not in mapped:
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


_FUSE_OUTPUT = re.compile(r"(stage\d+\.\d+\.fuse_layers\.)\d+\.")


def _unused_fuse_outputs(target_keys) -> Callable[[str], bool]:
    """Whether a key belongs to a fuse output that the model's module does not compute: the last
    module of a pose model fuses only output 0, so multi-scale checkpoints (ImageNet, the usual
    start of pose training) carry fuse layers it has no place for and no use for."""
    outputs = {m.group(0) for m in map(_FUSE_OUTPUT.match, target_keys) if m}
    modules = {m.group(1) for m in map(_FUSE_OUTPUT.match, target_keys) if m}

    def unused(key: str) -> bool:
        m = _FUSE_OUTPUT.match(key)
        return bool(m) and m.group(1) in modules and m.group(0) not in outputs
    return unused


def _common_prefix(keys: List[str]) -> str:
    """The longest dotted prefix (ending in ".") that all ``keys`` share; "" if none."""
    if not keys:
        return ""
    common = os.path.commonprefix(keys)
    return common[: common.rfind(".") + 1]


def _prefix_hint(unexpected: List[str], target_keys) -> str:
    """Names the prefix all unmatched keys share (a wrapper such as torch.compile's
    ``_orig_mod.``), and whether stripping it would make them fit."""
    prefix = _common_prefix(unexpected) if len(unexpected) > 1 else ""
    if not prefix:
        return ""
    hint = f"hint: the unmatched checkpoint keys all start with the prefix {prefix!r}"
    fits = sum(k[len(prefix):] in target_keys for k in unexpected)
    if fits:
        hint += (f"; without it {fits} of them match the model's keys: strip it, e.g. "
                 f"{{k.removeprefix({prefix!r}): v for k, v in state_dict.items()}}")
    return hint


def _pose_hint(mapped, model_head: str) -> str:
    """A pose checkpoint into another head's model misses stage 4's multi-scale fuse layers: say
    which head it is for."""
    if model_head == "pose" or not any(head_of_key(k) == "pose" for k in mapped):
        return ""
    return ("hint: the checkpoint is a pose model (final_layer.weight; stage 4's last module fuses "
            "only the highest resolution): build the model with head='pose'")


def _convention_warning(fmt: str, model: nn.Module) -> Optional[str]:
    """A warning when ``fmt`` implies a fuse-step resize other than the model's, else None."""
    cfg = getattr(model, "config", None)
    mode = getattr(cfg, "upsample", None)
    if fmt not in _FORMAT_UPSAMPLE or mode is None:
        return None
    trained, source = _FORMAT_UPSAMPLE[fmt]
    if mode == trained:
        return None
    name = getattr(cfg, "name", None)
    preset = repr(name) if name and name != "custom" else "..."
    when = (" at input sizes not divisible by 32" if {trained, mode} == {"mmseg", "bilinear"}
            else "")
    return (f"the checkpoint looks like {source} (format {fmt!r}), trained with upsample={trained!r}, "
            f"but this model uses upsample={mode!r}: its outputs will differ from the original "
            f"model's{when} (by a few percent). Build the model with HRNetConfig.preset({preset}, "
            f"upsample={trained!r}) (or HRNet({preset}, upsample={trained!r})) to match; keep "
            f"{mode!r} only if the checkpoint was trained with it.")


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
    model_head = getattr(getattr(model, "config", None), "head", "seg")

    unused_fuse_output = _unused_fuse_outputs(target_keys)
    to_load: Dict[str, torch.Tensor] = {}
    unexpected: List[str] = []
    for k, v in mapped.items():
        if k in target_keys:
            to_load[k] = v
        elif head_of_key(k) not in (None, model_head) or unused_fuse_output(k):
            report.skipped.append(k)  # a head (or output) this model does not have
        else:
            unexpected.append(k)
    report.skipped.extend(dropped)

    meta = [k for k, v in to_load.items() if v.is_meta]
    if meta:
        more = f" (and {len(meta) - 1} more)" if len(meta) > 1 else ""
        raise CheckpointError(
            f"the checkpoint holds no data: {meta[0]}{more} is a meta tensor (a shape without "
            "values, as a state dict saved from a model on the meta device, before its weights "
            "were materialised or loaded)")

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
    model_head_missing = [k for k in missing if head_of_key(k) == model_head]
    ckpt_has_model_head = any(head_of_key(k) == model_head for k in to_load)
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
        for extra in (_prefix_hint(unexpected, target_keys), _pose_hint(mapped, model_head)):
            if extra:
                parts.append(extra)
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
    else:  # a backbone-only start (ImageNet weights into a seg model) is trained on: no warning
        convention = _convention_warning(fmt, model)
        if convention:
            warnings.warn(convention, stacklevel=2)
    if verbose:
        print(report)
    return report
