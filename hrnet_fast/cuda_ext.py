"""The CUDA C++ extension (``csrc/``): loading, fake kernels for torch.compile, Python wrappers.

Where the kernels come from, first match wins:

1. ``hrnet_fast._C``, built by ``setup.py`` (``pip install --no-build-isolation -e .`` on a machine
   with a CUDA build of torch and nvcc);
2. a JIT build of the ``csrc/`` sources with ``torch.utils.cpp_extension.load`` (ninja + nvcc), cached
   under ``$HRNET_FAST_CACHE_DIR``, else ``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/hrnet_fast``
   (``$XDG_CACHE_HOME/hrnet_fast`` when set), in a subfolder per Python/torch/CUDA/GPU-arch.

Nothing is tried without a CUDA build of torch and a CUDA GPU: ``cuda_ext_status()`` then answers
``(False, reason)`` at once. A failed load or build warns once, with the reason, and
``load_extension()`` returns None from then on. ``HRNET_FAST_CUDA_EXT=0`` turns the extension off,
``HRNET_FAST_CUDA_EXT=prebuilt`` allows ``hrnet_fast._C`` only (no JIT build);
``HRNET_FAST_VERBOSE_BUILD=1`` shows the JIT compiler output.

The ops are ``torch.ops.hrnet_fast_cuda.*`` (schemas in ``csrc/bindings.cpp``); their fake (meta)
kernels are registered here once the library is loaded, so torch.compile can trace them.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence, Tuple

import torch

from .ops._validate import check_fuse_args, check_fuse_bias, check_fuse_meta

__all__ = [
    "load_extension",
    "cuda_ext_status",
    "upsample_add_relu_cuda",
    "output_memory_format",
    "jit_build_directory",
    "csrc_dir",
    "SOURCES",
]

LIBRARY = "hrnet_fast_cuda"
JIT_NAME = "hrnet_fast_C"
# csrc/ files compiled into the extension (bindings first).
SOURCES = ("bindings.cpp", "upsample_add_relu.cu")
EXTRA_CFLAGS = ["-O3"]
EXTRA_CUDA_CFLAGS = ["-O3", "-lineinfo"]

_lock = threading.RLock()
_state: dict = {"done": False, "module": None, "reason": "not loaded yet", "warned": False,
                "fakes": False}


# --------------------------------------------------------------------------------------- paths
PACKAGED_SOURCES = "_csrc"  # where a wheel carries csrc/ (setup.py's build_py copies it there)


def csrc_dir() -> Path:
    """The kernel sources: the csrc/ folder of a source checkout (or editable install) next to the
    package, else the copy an installed wheel carries inside the package (hrnet_fast/_csrc)."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "csrc"
    return checkout if checkout.is_dir() else package / PACKAGED_SOURCES


def _selection():
    from .backends import selection  # the reader of the HRNET_FAST_* variables
    return selection


def _cache_root() -> Path:
    from .backends.selection import cache_dir
    for v in (cache_dir(), os.environ.get("TORCH_EXTENSIONS_DIR")):
        if v:
            return Path(v).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hrnet_fast"


def jit_build_directory() -> Path:
    """Where the JIT build goes: one subfolder per Python, torch, CUDA and GPU architecture."""
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}_cu{torch.version.cuda}"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        tag += f"_sm{major}{minor}"
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)
    return _cache_root() / "torch_extensions" / tag / JIT_NAME


# ------------------------------------------------------------------------------------- loading
def _precheck() -> Optional[str]:
    """Why the extension cannot be used here, without importing or compiling anything; None if it may."""
    from .backends.selection import cuda_ext_mode
    flag = cuda_ext_mode()
    if flag in ("0", "off", "false", "no"):
        return "disabled by HRNET_FAST_CUDA_EXT=0"
    if torch.version.cuda is None:
        return f"torch has no CUDA (torch {torch.__version__} is a CPU-only build)"
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    return None


def ops_registered(library: str) -> bool:
    """Whether ``torch.ops.<library>.upsample_add_relu`` exists (the extension is loaded)."""
    try:
        getattr(torch.ops, library).upsample_add_relu
    except (AttributeError, RuntimeError):
        return False
    return True


def _ops_registered() -> bool:
    return ops_registered(LIBRARY)


def _short(exc: BaseException, limit: int = 1500) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    if len(text) > limit:
        text = text[:300] + "\n...\n" + text[-(limit - 300):]
    return text


def _jit_build() -> Tuple[Optional[ModuleType], str]:
    from torch.utils import cpp_extension

    src = csrc_dir()
    missing = [s for s in SOURCES if not (src / s).is_file()]
    if missing:
        return None, (f"no prebuilt hrnet_fast._C and the csrc/ sources are not next to the package "
                      f"({src} lacks {', '.join(missing)}); install from a source checkout with "
                      f"`pip install --no-build-isolation -e .`")
    if cpp_extension.CUDA_HOME is None:
        return None, "no prebuilt hrnet_fast._C, and no CUDA toolkit (nvcc) found for a JIT build; set CUDA_HOME"
    if not cpp_extension.is_ninja_available():
        return None, "no prebuilt hrnet_fast._C, and ninja (needed for the JIT build) is not installed"
    build_dir = jit_build_directory()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(
            name=JIT_NAME,
            sources=[str(src / s) for s in SOURCES],
            extra_cflags=EXTRA_CFLAGS,
            extra_cuda_cflags=EXTRA_CUDA_CFLAGS,
            build_directory=str(build_dir),
            verbose=_selection().verbose_build(),
        )
    except Exception as exc:  # noqa: BLE001 - any build failure becomes one reason string
        return None, f"JIT build of the CUDA extension failed in {build_dir}: {_short(exc)}"
    return module, f"JIT-built in {build_dir}"


def _import_prebuilt() -> ModuleType:
    return importlib.import_module("hrnet_fast._C")


def _load_locked() -> None:
    reason = _precheck()
    if reason is not None:
        _state.update(done=True, module=None, reason=reason)
        return
    notes = []
    module: Optional[ModuleType] = None
    try:
        module = _import_prebuilt()
        how = "prebuilt hrnet_fast._C"
    except ModuleNotFoundError as exc:
        if exc.name not in ("hrnet_fast._C", "hrnet_fast"):
            notes.append(f"hrnet_fast._C failed to import: {_short(exc, 400)}")
        how = ""
    except ImportError as exc:  # e.g. built against another torch: undefined symbols
        notes.append(f"hrnet_fast._C failed to import: {_short(exc, 400)}")
        how = ""
    if module is None:
        if _selection().cuda_ext_mode() == "prebuilt":
            reason = "; ".join(notes + ["HRNET_FAST_CUDA_EXT=prebuilt forbids a JIT build"])
            if not notes:
                reason = "no prebuilt hrnet_fast._C and " + reason
            _state.update(done=True, module=None, reason=reason)
            return
        module, how = _jit_build()
        if module is None:
            _state.update(done=True, module=None, reason="; ".join(notes + [how]))
            _warn_once()
            return
    if not _ops_registered():
        _state.update(done=True, module=None,
                      reason=f"{how} loaded but torch.ops.{LIBRARY}.upsample_add_relu is missing")
        _warn_once()
        return
    _register_fakes()
    _state.update(done=True, module=module, reason=how)


def _warn_once() -> None:
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"hrnet_fast: CUDA extension unavailable: {_state['reason']}", RuntimeWarning,
                      stacklevel=4)


def load_extension() -> Optional[ModuleType]:
    """The extension module (its ops registered in torch.ops.hrnet_fast_cuda), or None.

    Loads (or JIT-builds) once per process; later calls return the cached answer.
    """
    if _state["done"]:
        return _state["module"]
    with _lock:
        if not _state["done"]:
            _load_locked()
    return _state["module"]


def usable_without_build() -> bool:
    """True when the extension is loaded or a prebuilt ``hrnet_fast._C`` can be imported: what the
    ``auto`` backend asks, so that it never starts a one-minute JIT build behind the user's back."""
    if _state["done"]:
        return _state["module"] is not None
    if _precheck() is not None or importlib.util.find_spec("hrnet_fast._C") is None:
        return False
    return cuda_ext_status()[0]


def cuda_ext_status() -> Tuple[bool, str]:
    """(available, reason). Where no CUDA torch or GPU exists, answers at once without compiling."""
    if not _state["done"]:
        reason = _precheck()
        if reason is not None:
            return False, reason
        load_extension()
    return _state["module"] is not None, _state["reason"]


# ---------------------------------------------------------------------------------- fake kernels
def output_memory_format(base: torch.Tensor) -> torch.memory_format:
    """Layout of the op's output; the CUDA binding applies the same rule (stride(1) < stride(3))."""
    if base.dim() == 4 and base.stride(1) < base.stride(3):
        return torch.channels_last
    return torch.contiguous_format


def _upsample_add_relu_fake(base, contributions, mode, align_corners, relu, bias=None):
    check_fuse_meta(base, contributions, mode)
    c = base.shape[1]
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == c, lambda: f"bias must have shape [{c}]")
    return torch.empty(base.shape, dtype=base.dtype, device=base.device,
                       memory_format=output_memory_format(base))


def _register_fakes() -> None:
    if _state["fakes"]:
        return
    try:
        torch.library.register_fake(f"{LIBRARY}::upsample_add_relu")(_upsample_add_relu_fake)
    except RuntimeError as exc:  # already registered (e.g. module reloaded): keep the existing one
        if "already" not in str(exc).lower():
            raise
    _state["fakes"] = True


# -------------------------------------------------------------------------------------- wrappers
def _require() -> None:
    if load_extension() is None:
        raise RuntimeError(f"hrnet_fast CUDA extension is unavailable: {_state['reason']}")


def upsample_add_relu_cuda(base: torch.Tensor, contributions: Sequence[torch.Tensor], *, mode: str,
                           align_corners: bool, relu: bool,
                           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(base + bias[c] + sum_k F.interpolate(contributions[k], size=base.shape[-2:]))``.

    base [N, C, H, W]; contributions [N, C, h, w] with h <= H, w <= W (any ratio; same size = plain
    add); mode "nearest" or "bilinear"; act = ReLU if ``relu``; bias optional [C] (float32 or base's
    dtype). fp32/fp16/bf16 CUDA tensors, any strides; fp32 accumulation; the result is a new tensor
    in base's layout (channels_last or contiguous). Runs the CUDA kernel of csrc/upsample_add_relu.cu.

    Arguments are checked here, in Python, before the op sees them (ValueError naming the problem):
    on an H200 (torch 2.11, 2026-11-26) the op's own C++ check of a contribution larger than the
    base killed the process instead of raising. The engine calls ``fuse_op`` with arguments it built.
    """
    check_fuse_args(base, contributions, mode, align_corners)
    check_fuse_bias(base, bias)
    _require()
    return torch.ops.hrnet_fast_cuda.upsample_add_relu(
        base, list(contributions), str(mode), bool(align_corners), bool(relu), bias)


def fuse_op(base: torch.Tensor, contributions: Sequence[torch.Tensor], mode: str,
            align_corners: bool, relu: bool, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The op itself, unchecked: for callers whose arguments are valid by construction (the engine's
    backend; the extension is loaded before that backend exists)."""
    return torch.ops.hrnet_fast_cuda.upsample_add_relu(base, list(contributions), mode, align_corners,
                                                      relu, bias)
