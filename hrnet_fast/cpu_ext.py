"""The optional CPU kernels (``csrc/cpu_fuse.cpp``, ``csrc/cpu_conv_thin.cpp``,
``csrc/cpu_conv_amx.cpp``, ``csrc/cpu_head_amx.cpp``, ``csrc/cpu_head_f32.cpp``): build, status,
fake kernels, wrappers.

The kernel computes the fuse step ``act(base + sum_k resize(c_k, base size))`` in one pass over
memory, reading each contribution at its own resolution (the torch composition allocates a
full-size tensor per contribution). It is JIT-built with ``torch.utils.cpp_extension.load`` (a C++
compiler and ninja; about a minute on 2 cores, announced by one logged warning) the first time it
is needed, and cached like the CUDA extension's JIT build: under ``$HRNET_FAST_CACHE_DIR``, else
``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/hrnet_fast`` (``$XDG_CACHE_HOME/hrnet_fast`` when set),
in a subfolder per Python, torch and machine architecture. Later processes load the cached library in milliseconds.

Nothing here raises on import. A missing compiler or ninja, or a failed build, warns once
(``RuntimeWarning``, with the reason) and ``load_extension()`` returns False from then on: callers
keep the torch composition. A build lock left by a killed build never hangs a process: it is
waited for at most ``LOCK_WAIT_S`` and removed once older than ``STALE_LOCK_S``.
``HRNET_FAST_CPU_EXT=0`` turns the kernel off without building; ``HRNET_FAST_VERBOSE_BUILD=1``
shows the compiler output.

The ops are ``torch.ops.hrnet_fast_cpu.upsample_add_relu`` and ``resize_concat`` (schemas in
``csrc/cpu_fuse.cpp``), and ``conv3x3_thin_pack`` / ``conv3x3_thin`` / ``conv3x3_thin_into``
(``csrc/cpu_conv_thin.cpp``: 3x3 convolutions of thin layers, vectorised over pixels instead of
channels, direct or Winograd F(2x2, 3x3); AVX-512 or AVX2), and ``conv_amx_pack`` / ``conv_amx`` /
``conv_amx_into`` (``csrc/cpu_conv_amx.cpp``: 3x3 and 1x1 convolutions in bfloat16 on Intel AMX
tiles), and ``seg_head_amx`` / ``seg_head_f32`` (``csrc/cpu_head_amx.cpp``,
``csrc/cpu_head_f32.cpp``: the seg head in one pass, bfloat16 on AMX tiles, float32 on AVX-512 or AVX2).
Their fake
kernels are registered here once the library is loaded, so torch.compile and opcheck can trace
them.
"""
from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from .cuda_ext import _cache_root, _short, csrc_dir, ops_registered
from .ops._validate import check_fuse_meta

__all__ = ["load_extension", "cpu_ext_status", "upsample_add_relu_cpu", "upsample_add_relu_into_cpu",
           "resize_concat_cpu",
           "conv3x3_thin_cpu", "conv3x3_thin_pack", "conv1x1_pack", "conv1x1_cpu",
           "conv3x3_thin_rows_from", "conv3x3_thin_rows_cpu", "rows_to_tensor", "rows_pitch",
           "thin_rows_supported",
           "thin_conv_supported", "jit_build_directory",
           "amx_conv_supported", "conv_amx_pack", "conv_amx_cpu", "seg_head_amx_cpu",
           "seg_head_f32_cpu",
           "SOURCES", "DTYPES"]

LIBRARY = "hrnet_fast_cpu"
JIT_NAME = "hrnet_fast_cpu_fuse"
# Longest compile first: ninja starts them in this order, so the short ones fill the gaps at the
# end (g++ -O3 on a 2-core AMD EPYC: 30, 29, 22, 17, 16, 13, 12 and 7 s).
SOURCES = ("cpu_fuse.cpp", "cpu_conv_thin.cpp", "cpu_conv_amx.cpp", "cpu_head_amx.cpp",
           "cpu_head_f32.cpp", "cpu_conv1x1.cpp", "cpu_conv_thin_avx2.cpp", "cpu_head_f32_avx2.cpp")
# -O3 and no -march=native: the cache may be shared by machines with other CPUs; the source
# compiles its row kernel per instruction set and picks one at run time (see cpu_fuse.cpp).
EXTRA_CFLAGS = ["-O3"]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# torch's build lock (a file in the build folder) is left behind by a build that was killed, and
# torch then waits for it forever. A lock older than STALE_LOCK_S is removed; a younger one is
# waited for up to LOCK_WAIT_S (a build takes about a minute on 2 cores), then this process goes
# without the kernel.
STALE_LOCK_S = 600.0
LOCK_WAIT_S = 120.0

logger = logging.getLogger(__name__)
_lock = threading.RLock()
_state: dict = {"done": False, "ok": False, "reason": "not loaded yet", "fakes": False}


def cpu_ext_switch() -> str:
    """``HRNET_FAST_CPU_EXT``: "0" (off) or "" (default), read by backends/selection.py."""
    from .backends.selection import cpu_ext_mode
    return cpu_ext_mode()


def openmp_flags() -> list:
    """``-fopenmp`` where torch's intra-op threads are OpenMP's (Linux wheels): at::parallel_for
    is inline there and runs on one thread unless the extension is compiled with OpenMP. The
    extension then shares torch's libgomp (same soname, already loaded), so
    ``torch.set_num_threads`` applies. Other parallel backends need no flag."""
    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    return ["-fopenmp"] if sys.platform.startswith("linux") and openmp else []


def jit_build_directory() -> Path:
    """Where the JIT build goes: one subfolder per Python, torch and machine architecture."""
    tag = (f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}"
           f"_{platform.machine() or 'cpu'}")
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)
    return _cache_root() / "torch_extensions" / tag / JIT_NAME


# ------------------------------------------------------------------------------------- loading
def _ops_registered() -> bool:
    return ops_registered(LIBRARY)


def _precheck() -> Optional[str]:
    """Why the kernel cannot be built here, without compiling anything; None if it may."""
    if cpu_ext_switch() in ("0", "off", "false", "no"):
        return "disabled by HRNET_FAST_CPU_EXT=0"
    from torch.utils import cpp_extension
    src = csrc_dir()
    missing = [s for s in SOURCES if not (src / s).is_file()]
    if missing:
        return (f"the csrc/ sources are not next to the package ({src} lacks "
                f"{', '.join(missing)}); install from a source checkout with `pip install -e .`")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found; set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja (needed for the JIT build) is not installed (`pip install ninja`)"
    return None


def _wait_for_lock(build_dir: Path) -> Optional[str]:
    """None once no other build holds ``build_dir``'s lock (a stale lock is removed), else why."""
    lock = build_dir / "lock"
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return None
        if age > STALE_LOCK_S:
            try:
                lock.unlink()
            except FileNotFoundError:
                pass
            return None
        if time.monotonic() > deadline:
            return (f"another build has held {lock} for {age:.0f} s; if no build is running, "
                    "delete that file")
        time.sleep(0.2)


def needs_compile(build_dir: Path) -> bool:
    """Whether loading from ``build_dir`` compiles: no built library there yet, or a kernel source
    or header newer than it (torch's JIT loader then rebuilds)."""
    try:
        built = (build_dir / f"{JIT_NAME}.so").stat().st_mtime
    except FileNotFoundError:
        return True
    sources = [csrc_dir() / s for s in SOURCES] + list(csrc_dir().glob("cpu_*.h"))
    return any(p.stat().st_mtime > built for p in sources if p.exists())


def _build() -> Tuple[bool, str]:
    from .backends.selection import verbose_build
    from torch.utils import cpp_extension
    build_dir = jit_build_directory()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        busy = _wait_for_lock(build_dir)
        if busy is not None:
            return False, busy
        omp = openmp_flags()
        if needs_compile(build_dir):
            # a warning so that it shows by default (Python's last-resort handler prints warnings):
            # without it a first `hrnet-fast demo` sits silent for about a minute on 2 cores
            logger.warning("hrnet_fast: compiling the CPU kernels for this machine, once (about a "
                           "minute on 2 cores); later runs load them from %s", build_dir)
        else:
            logger.info("hrnet_fast: loading the CPU kernels from %s", build_dir)
        cpp_extension.load(name=JIT_NAME, sources=[str(csrc_dir() / s) for s in SOURCES],
                           extra_cflags=EXTRA_CFLAGS + omp, extra_ldflags=omp,
                           build_directory=str(build_dir),
                           verbose=verbose_build(), is_python_module=False)
    except Exception as exc:  # noqa: BLE001 - any build failure becomes one reason string
        return False, f"JIT build failed in {build_dir}: {_short(exc)}"
    if not _ops_registered():
        return False, f"built in {build_dir}, but torch.ops.{LIBRARY}.upsample_add_relu is missing"
    return True, f"JIT-built in {build_dir}"


def _load_locked() -> None:
    if _ops_registered():  # loaded by other means (a test, another copy of this module)
        ok, reason = True, f"torch.ops.{LIBRARY} already registered"
    else:
        reason = _precheck()
        if reason is not None:
            ok = False
            if not reason.startswith("disabled"):
                _warn(reason)
        else:
            ok, reason = _build()
            if not ok:
                _warn(reason)
    if ok:
        _register_fake()
    _state.update(done=True, ok=ok, reason=reason)


def _warn(reason: str) -> None:
    # Called from _load_locked only, which runs once per process: one warning.
    warnings.warn(f"hrnet_fast: CPU fuse kernel unavailable: {reason}; the fuse step runs as "
                  "the torch composition (same results, slower)", RuntimeWarning, stacklevel=5)


def load_extension() -> bool:
    """Whether ``torch.ops.hrnet_fast_cpu.upsample_add_relu`` is ready. Builds (or loads the cached
    build) once per process; later calls return the remembered answer."""
    if not _state["done"]:
        with _lock:
            if not _state["done"]:
                _load_locked()
    return _state["ok"]


def cpu_ext_status() -> Tuple[bool, str]:
    """(available, reason); builds on the first call unless switched off or impossible here."""
    load_extension()
    return _state["ok"], _state["reason"]


# ---------------------------------------------------------------------------------- fake kernel
def _upsample_add_relu_fake(base, contributions, mode, align_corners, relu):
    check_fuse_meta(base, contributions, mode)
    torch._check(base.dtype in DTYPES, lambda: f"dtype must be one of {DTYPES}, got {base.dtype}")
    return torch.empty(base.shape, dtype=base.dtype, device=base.device,
                       memory_format=torch.channels_last)


def _upsample_add_relu_into_fake(base, contributions, interpolation, align_corners, relu):
    check_fuse_meta(base, contributions, interpolation)
    torch._check(base.dtype in DTYPES, lambda: f"dtype must be one of {DTYPES}, got {base.dtype}")


def _resize_concat_fake(parts, size, mode, align_corners):
    torch._check(len(parts) > 0, lambda: "parts is empty")
    torch._check(mode in ("nearest", "bilinear"), lambda: f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    first = parts[0]
    torch._check(first.dtype in DTYPES, lambda: f"dtype must be one of {DTYPES}, got {first.dtype}")
    for k, t in enumerate(parts):
        torch._check(t.dim() == 4 and t.dtype == first.dtype and t.shape[0] == first.shape[0],
                     lambda: f"parts[{k}] must be 4-d with parts[0]'s dtype and batch")
        torch._check(t.shape[2] <= size[0] and t.shape[3] <= size[1],
                     lambda: f"parts[{k}] {tuple(t.shape)} is larger than size {tuple(size)}")
    channels = sum(t.shape[1] for t in parts)
    return torch.empty((first.shape[0], channels, size[0], size[1]), dtype=first.dtype,
                       device=first.device, memory_format=torch.channels_last)


def _packed_widths(packed):
    torch._check(packed.dtype == torch.float32 and (
        (packed.dim() == 4 and tuple(packed.shape[1:3]) == (3, 3))
        or (packed.dim() == 3 and packed.shape[0] == 16)),
        lambda: f"packed must come from conv3x3_thin_pack, got {packed.dtype} {tuple(packed.shape)}")
    return (packed.shape[1], packed.shape[2]) if packed.dim() == 3 else (packed.shape[0], packed.shape[3])


def _check_thin_meta(x, packed, bias):
    ci, co = _packed_widths(packed)
    torch._check(x.dim() == 4 and x.dtype == torch.float32 and x.shape[1] == ci,
                 lambda: f"x must be a 4-d float32 tensor with {ci} channels, got {x.dtype} "
                         f"{tuple(x.shape)}")
    torch._check(bias is None or tuple(bias.shape) == (co,), lambda: f"bias must be [{co}]")
    return co


def _conv3x3_thin_pack_fake(weight, winograd):
    torch._check(weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3),
                 lambda: f"weight must be [Co, Ci, 3, 3], got {tuple(weight.shape)}")
    co, ci = weight.shape[:2]
    shape = (16, ci, co) if winograd else (ci, 3, 3, co)
    return torch.empty(shape, dtype=weight.dtype, device=weight.device)


def _conv3x3_thin_fake(x, packed, bias, residual, relu, channels_last=True):
    co = _check_thin_meta(x, packed, bias)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((x.shape[0], co, x.shape[2], x.shape[3]), dtype=x.dtype,
                       device=x.device, memory_format=layout)


def _conv3x3_thin_into_fake(residual, x, packed, bias, relu):
    _check_thin_meta(x, packed, bias)


def _conv3x3_thin_rows_from_fake(x):
    torch._check(x.dim() == 4, lambda: f"x must be 4-d, got {tuple(x.shape)}")
    n, c, h, w = x.shape
    return x.new_empty((n, h, c, 2, rows_pitch(w)))


def _conv3x3_thin_rows_fake(x, packed, bias, residual, relu, width, out_rows):
    ci, co = _packed_widths(packed)
    torch._check(x.dim() in (4, 5),
                 lambda: f"x must be 4-d or a row-pair tensor, got {tuple(x.shape)}")
    h = x.shape[1] if x.dim() == 5 else x.shape[2]
    if out_rows:
        return x.new_empty((x.shape[0], h, co, 2, rows_pitch(width)))
    return torch.empty((x.shape[0], co, h, width), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _conv3x3_thin_rows_into_fake(residual, x, packed, bias, relu, width):
    _packed_widths(packed)


def _conv_amx_pack_fake(weight):
    torch._check(weight.dim() == 4 and tuple(weight.shape[2:]) in ((3, 3), (1, 1))
                 and weight.shape[1] % 2 == 0,
                 lambda: f"weight must be [Co, Ci, 3, 3] or [Co, Ci, 1, 1] with Ci even, got "
                         f"{tuple(weight.shape)}")
    co, ci, k = weight.shape[0], weight.shape[1], weight.shape[2]
    return torch.empty((k, -(-co // 16), -(-k * ci // 32), 16, 16, 2), dtype=torch.bfloat16,
                       device=weight.device)


def _conv_amx_fake(x, packed, weight_size, bias, residual, relu, stride=1, relu_ranges=()):
    co, ci = weight_size
    torch._check(x.dim() == 4 and x.dtype == torch.bfloat16 and packed.dim() == 6,
                 lambda: f"x must be a 4-d bfloat16 tensor, got {x.dtype} {tuple(x.shape)}")
    torch._check(x.shape[1] == ci, lambda: f"the packed weight takes {ci} input channels")
    torch._check(bias is None or tuple(bias.shape) == (co,), lambda: f"bias must be [{co}]")
    torch._check(stride in (1, 2), lambda: f"stride must be 1 or 2, got {stride}")
    return torch.empty((x.shape[0], co, (x.shape[2] - 1) // stride + 1,
                        (x.shape[3] - 1) // stride + 1), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _conv_amx_into_fake(residual, x, packed, weight_size, bias, relu, stride=1, relu_ranges=()):
    out = _conv_amx_fake(x, packed, weight_size, bias, residual, relu, stride, relu_ranges)
    torch._check(tuple(residual.shape) == tuple(out.shape),
                 lambda: f"residual must be {tuple(out.shape)}, got {tuple(residual.shape)}")


def _seg_head_amx_fake(x, proj, proj_size, proj_bias, contributions, mode, align_corners, cls,
                       cls_size, cls_bias):
    torch._check(x.dim() == 4 and x.dtype == torch.bfloat16 and x.shape[1] == proj_size[1],
                 lambda: f"x must be a 4-d bfloat16 tensor of {proj_size[1]} channels, got "
                         f"{x.dtype} {tuple(x.shape)}")
    torch._check(cls_size[1] == proj_size[0], lambda: "cls must take the projection's outputs")
    torch._check(mode in ("nearest", "bilinear"), lambda: "mode must be nearest or bilinear")
    for t in contributions:
        torch._check(t.dim() == 4 and t.shape[1] == proj_size[0],
                     lambda: f"contributions must be [N, {proj_size[0]}, h, w]")
    return torch.empty((x.shape[0], cls_size[0], x.shape[2], x.shape[3]), dtype=x.dtype,
                       device=x.device, memory_format=torch.channels_last)


def _seg_head_f32_fake(x, proj, proj_bias, contributions, mode, align_corners, cls, cls_bias):
    torch._check(x.dim() == 4 and x.dtype == torch.float32 and proj.dim() == 4
                 and x.shape[1] == proj.shape[1],
                 lambda: f"x must be a 4-d float32 tensor of proj's {proj.shape[1]} channels, got "
                         f"{x.dtype} {tuple(x.shape)}")
    torch._check(cls.dim() == 4 and cls.shape[1] == proj.shape[0],
                 lambda: "cls must take the projection's outputs")
    torch._check(mode in ("nearest", "bilinear"), lambda: "mode must be nearest or bilinear")
    for t in contributions:
        torch._check(t.dim() == 4 and t.shape[1] == proj.shape[0],
                     lambda: f"contributions must be [N, {proj.shape[0]}, h, w]")
    return torch.empty((x.shape[0], cls.shape[0], x.shape[2], x.shape[3]), dtype=x.dtype,
                       device=x.device, memory_format=torch.channels_last)


def _conv1x1_pack_fake(weight):
    torch._check(weight.dim() in (2, 4) and weight.dtype == torch.float32,
                 lambda: f"weight must be a float32 [Co, K] or [Co, K, 1, 1], got {tuple(weight.shape)}")
    co_pad = -(-weight.shape[0] // 8) * 8
    return weight.new_empty((co_pad, weight.shape[1]))


def _conv1x1_fake(x, packed, out_channels, bias, residual, relu, x2=None):
    ci2 = 0 if x2 is None else x2.shape[1]
    torch._check(x.dim() == 4 and x.dtype == torch.float32 and x.shape[1] + ci2 == packed.shape[1],
                 lambda: f"x must be a 4-d float32 tensor whose channels the packed weight takes, "
                         f"got {x.dtype} {tuple(x.shape)}")
    return torch.empty((x.shape[0], out_channels, x.shape[2], x.shape[3]), dtype=x.dtype,
                       device=x.device, memory_format=torch.channels_last)


def _conv1x1_into_fake(residual, x, packed, out_channels, bias, relu, x2=None):
    _conv1x1_fake(x, packed, out_channels, bias, residual, relu, x2)


def _register_fake() -> None:
    if _state["fakes"]:
        return
    for name, fake in (("upsample_add_relu", _upsample_add_relu_fake),
                       ("upsample_add_relu_into", _upsample_add_relu_into_fake),
                       ("resize_concat", _resize_concat_fake),
                       ("conv3x3_thin_pack", _conv3x3_thin_pack_fake),
                       ("conv3x3_thin", _conv3x3_thin_fake),
                       ("conv3x3_thin_into", _conv3x3_thin_into_fake),
                       ("conv3x3_thin_rows_from", _conv3x3_thin_rows_from_fake),
                       ("conv3x3_thin_rows", _conv3x3_thin_rows_fake),
                       ("conv3x3_thin_rows_into", _conv3x3_thin_rows_into_fake),
                       ("conv_amx_pack", _conv_amx_pack_fake),
                       ("conv_amx", _conv_amx_fake), ("conv_amx_into", _conv_amx_into_fake),
                       ("seg_head_amx", _seg_head_amx_fake),
                       ("seg_head_f32", _seg_head_f32_fake),
                       ("conv1x1_pack", _conv1x1_pack_fake), ("conv1x1", _conv1x1_fake),
                       ("conv1x1_into", _conv1x1_into_fake)):
        try:
            torch.library.register_fake(f"{LIBRARY}::{name}")(fake)
        except RuntimeError as exc:  # already registered (module reloaded): keep the existing one
            if "already" not in str(exc).lower():
                raise
    _state["fakes"] = True


# -------------------------------------------------------------------------------------- wrapper
def upsample_add_relu_cpu(base: torch.Tensor, contributions: Sequence[torch.Tensor], *, mode: str,
                          align_corners: bool, relu: bool) -> torch.Tensor:
    """``act(base + sum_k F.interpolate(contributions[k], size=base.shape[-2:]))`` in one pass.

    CPU tensors of one dtype (float32, bfloat16 or float16); base [N, C, H, W] and contributions
    [N, C, h, w] (h <= H, w <= W) with channel stride 1 (channels_last, or channel slices of
    channels_last tensors), other strides free; mode "nearest" (legacy) or "bilinear"; act = ReLU
    if ``relu``. float32 accumulation, one rounding at the store; the result is a new
    channels_last tensor. Raises RuntimeError when the kernel is unavailable (see
    ``cpu_ext_status()``) or an argument does not fit."""
    if not load_extension():
        raise RuntimeError(f"hrnet_fast CPU fuse kernel is unavailable: {_state['reason']}")
    return torch.ops.hrnet_fast_cpu.upsample_add_relu(base, list(contributions), str(mode),
                                                     bool(align_corners), bool(relu))


def upsample_add_relu_into_cpu(base: torch.Tensor, contributions: Sequence[torch.Tensor], *,
                               mode: str, align_corners: bool, relu: bool) -> torch.Tensor:
    """:func:`upsample_add_relu_cpu` written over ``base`` (dense channels_last, sharing no memory
    with a contribution), which is returned: no output to allocate and no second full-size tensor
    to write. Same values bit for bit."""
    if not load_extension():
        raise RuntimeError(f"hrnet_fast CPU fuse kernel is unavailable: {_state['reason']}")
    torch.ops.hrnet_fast_cpu.upsample_add_relu_into(base, list(contributions), str(mode),
                                                   bool(align_corners), bool(relu))
    return base


def resize_concat_cpu(parts: Sequence[torch.Tensor], size: Sequence[int], *, mode: str,
                      align_corners: bool) -> torch.Tensor:
    """``torch.cat([F.interpolate(p, size=size) for p in parts], dim=1)`` in one pass (a part already
    at ``size`` is copied as it is).

    CPU tensors of one dtype (float32, bfloat16 or float16) and batch, [N, C_k, h_k, w_k] with
    h_k <= size[0], w_k <= size[1] and channel stride 1; mode "nearest" (legacy) or "bilinear";
    float32 arithmetic, one rounding at the store; the result is a new channels_last tensor.
    Raises RuntimeError when the kernel is unavailable or an argument does not fit."""
    if not load_extension():
        raise RuntimeError(f"hrnet_fast CPU fuse kernel is unavailable: {_state['reason']}")
    if not parts:
        raise RuntimeError("hrnet_fast_cpu::resize_concat: parts is empty")
    return torch.ops.hrnet_fast_cpu.resize_concat(list(parts), [int(v) for v in size], str(mode),
                                                 bool(align_corners))


def thin_conv_supported() -> bool:
    """Whether ``conv3x3_thin`` and ``seg_head_f32`` can run here: torch's CPU capability (it
    honours ``ATEN_CPU_CAPABILITY``) is AVX-512 or AVX2 (each kernel's two variants, the same
    operations in the same order); there is no baseline variant."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2")


def conv3x3_thin_pack(weight: torch.Tensor, *, winograd: bool) -> torch.Tensor:
    """The thin conv's packed weight: [Ci, 3, 3, Co] for the direct algorithm, or the Winograd
    F(2x2, 3x3) transform G g G^T as [16, Ci, Co] (computed in float64, rounded once; on AVX2 each
    position's matrix ordered in panels of 12 output channels, the order its kernel reads), from a
    float32 [Co, Ci, 3, 3] weight. Callers keep it as long as the weight does not change."""
    if not load_extension():
        raise RuntimeError(f"hrnet_fast CPU kernels are unavailable: {_state['reason']}")
    return torch.ops.hrnet_fast_cpu.conv3x3_thin_pack(weight, bool(winograd))


def conv3x3_thin_cpu(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
                     residual: Optional[torch.Tensor] = None, *, relu: bool,
                     channels_last: bool = True, into_residual: bool = False) -> torch.Tensor:
    """``act(F.conv2d(x, weight, bias, stride=1, padding=1) + residual)``, vectorised over pixels,
    with ``packed = conv3x3_thin_pack(weight, winograd=...)`` (the packing picks the algorithm).

    float32 CPU tensors: x [N, Ci, H, W] and residual (None or [N, Co, H, W]) with any strides;
    bias [Co] or None; act = ReLU if ``relu``. The result is a new dense tensor, channels_last or
    (``channels_last=False``) contiguous NCHW, or ``residual`` itself with ``into_residual`` (dense
    in either layout, sharing no memory with x). Agrees with F.conv2d to float32 rounding (another
    summation order; Winograd's transforms add a few roundings). Raises RuntimeError when the
    kernel is unavailable (no build, or neither AVX-512 nor AVX2) or an argument does not fit."""
    if not load_extension():
        raise RuntimeError(f"hrnet_fast CPU kernels are unavailable: {_state['reason']}")
    if into_residual:
        if residual is None:
            raise RuntimeError("hrnet_fast_cpu::conv3x3_thin: into_residual needs a residual")
        torch.ops.hrnet_fast_cpu.conv3x3_thin_into(residual, x, packed, bias, bool(relu))
        return residual
    return torch.ops.hrnet_fast_cpu.conv3x3_thin(x, packed, bias, residual, bool(relu),
                                                 bool(channels_last))


def rows_pitch(width: int) -> int:
    """Floats per half of a channel row in the row-pair format (``conv3x3_thin_rows``): the
    row's Winograd tiles ((width + 1) // 2) rounded up to 8, plus 8."""
    return ((width + 1) // 2 + 7) // 8 * 8 + 8


def thin_rows_supported() -> bool:
    """Whether the row-pair format runs here: it is the thin conv's AVX2 variant's."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def conv3x3_thin_rows_from(x: torch.Tensor) -> torch.Tensor:
    """x (float32 [N, C, H, W], any strides) in the row-pair format: float32 [N, H, C, 2,
    rows_pitch(W)], each channel row as the thin conv's Winograd variant reads it, an "a" half
    (0, then the odd columns 1, 3, ...) and a "b" half (the even columns 0, 2, ...), zero-padded.
    A branch chain keeps its intermediates in it (``conv3x3_thin_rows``)."""
    if not load_extension():
        raise RuntimeError(f"hrnet_fast CPU kernels are unavailable: {_state['reason']}")
    return torch.ops.hrnet_fast_cpu.conv3x3_thin_rows_from(x)


def rows_to_tensor(rows: torch.Tensor, width: int) -> torch.Tensor:
    """A row-pair tensor (``conv3x3_thin_rows_from``) of width ``width`` back as a channels_last
    [N, C, H, W] tensor (torch operations: for the fallback path and the tests)."""
    n, h, c = rows.shape[:3]
    out = rows.new_empty((n, h, c, width))
    out[..., 0::2] = rows[:, :, :, 1, :(width + 1) // 2]
    out[..., 1::2] = rows[:, :, :, 0, 1:width // 2 + 1]
    return out.permute(0, 2, 1, 3).contiguous(memory_format=torch.channels_last)


def conv3x3_thin_rows_cpu(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
                          residual: Optional[torch.Tensor] = None, *, relu: bool, width: int,
                          out_rows: bool, into_residual: bool = False) -> torch.Tensor:
    """``conv3x3_thin_cpu`` with the row-pair format (AVX2, Winograd weights): x strided [N, Ci,
    H, W] or a row-pair tensor of width ``width``; residual None or a row-pair tensor; the result
    a new row-pair tensor (``out_rows``), a new channels_last tensor, or the residual itself
    (``into_residual``: written in place, row-pair). Each element is computed by the same float32
    operations as ``conv3x3_thin_cpu`` with a channels_last residual."""
    if not load_extension():
        raise RuntimeError(f"hrnet_fast CPU kernels are unavailable: {_state['reason']}")
    if into_residual:
        if residual is None:
            raise RuntimeError("hrnet_fast_cpu::conv3x3_thin_rows: into_residual needs a residual")
        torch.ops.hrnet_fast_cpu.conv3x3_thin_rows_into(residual, x, packed, bias, bool(relu),
                                                        int(width))
        return residual
    return torch.ops.hrnet_fast_cpu.conv3x3_thin_rows(x, packed, bias, residual, bool(relu),
                                                      int(width), bool(out_rows))


def conv1x1_pack(weight: torch.Tensor) -> torch.Tensor:
    """The 1x1 conv kernel's packed weight: a float32 [Co, K] or [Co, K, 1, 1] weight as panels of
    16 output channels ([K][16] each; a last panel of 8 where Co rounded up to 8 leaves 8), zero
    past Co, shape [Co rounded up to 8, K]. For a bottleneck's last conv merged with its
    downsample, K is both inputs' channels (``torch.cat([w, w_down], 1)``). Callers keep it as long
    as the weight does not change."""
    if not load_extension():
        raise RuntimeError(f"hrnet_fast CPU kernels are unavailable: {_state['reason']}")
    return torch.ops.hrnet_fast_cpu.conv1x1_pack(weight)


def conv1x1_cpu(x: torch.Tensor, packed: torch.Tensor, out_channels: int,
                bias: Optional[torch.Tensor], residual: Optional[torch.Tensor] = None, *,
                relu: bool, x2: Optional[torch.Tensor] = None,
                into_residual: bool = False) -> torch.Tensor:
    """``act(F.conv2d(x, w[:, :Ci]) + F.conv2d(x2, w[:, Ci:]) + bias + residual)`` for a 1x1
    stride-1 conv with ``packed = conv1x1_pack(w)`` (x2 optional: a second input whose weights
    follow x's), on AVX2 + FMA (csrc/cpu_conv1x1.cpp).

    float32 CPU tensors, x, x2 and residual dense channels_last with one N, H, W; bias [Co] or
    None; act = ReLU if ``relu``. The result is a new dense channels_last tensor, or ``residual``
    itself with ``into_residual`` (sharing no memory with x or x2). Agrees with F.conv2d to float32
    rounding (another summation order). Raises RuntimeError when the kernel is unavailable or an
    argument does not fit."""
    if not load_extension():
        raise RuntimeError(f"hrnet_fast CPU kernels are unavailable: {_state['reason']}")
    if into_residual:
        if residual is None:
            raise RuntimeError("hrnet_fast_cpu::conv1x1: into_residual needs a residual")
        torch.ops.hrnet_fast_cpu.conv1x1_into(residual, x, packed, int(out_channels), bias,
                                              bool(relu), x2)
        return residual
    return torch.ops.hrnet_fast_cpu.conv1x1(x, packed, int(out_channels), bias, residual,
                                            bool(relu), x2)


def amx_conv_supported() -> bool:
    """Whether ``conv_amx`` can run here: the kernels are built and this CPU and its OS offer
    AMX-BF16 tiles with AVX512-BF16 (Intel Xeon from Sapphire Rapids on; asked once per process:
    the engine checks it before every bfloat16 conv)."""
    if "amx" not in _state:
        _state["amx"] = load_extension() and bool(torch.ops.hrnet_fast_cpu.amx_available())
    return _state["amx"]


def conv_amx_pack(weight: torch.Tensor) -> torch.Tensor:
    """The AMX conv's packed weight (bfloat16 B tiles, [k, ceil(Co/16), ceil(k Ci/32), 16, 16, 2])
    from a [Co, Ci, k, k] weight, k 3 or 1, of any float dtype with Ci even (rounded to bfloat16
    once). Callers keep it as long as the weight does not change."""
    if not load_extension():
        raise RuntimeError(f"hrnet_fast CPU kernels are unavailable: {_state['reason']}")
    return torch.ops.hrnet_fast_cpu.conv_amx_pack(weight)


def conv_amx_cpu(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor] = None, *, relu: bool,
                 weight_size: Sequence[int], stride: int = 1,
                 relu_ranges: Optional[Sequence[Tuple[int, int]]] = None,
                 into_residual: bool = False) -> torch.Tensor:
    """``act(F.conv2d(x, weight, bias, stride, padding=k // 2) + residual)`` in bfloat16 on AMX
    tiles, k x k (3x3 or 1x1), stride 1 or 2, with ``packed = conv_amx_pack(weight)`` and ``weight_size =
    weight.shape[:2]`` (the packing pads both widths; x's channels are checked against it): x
    [N, Ci, H, W] and residual (None or [N, Co, Ho, Wo]) dense channels_last bfloat16, bias None
    or [Co] (float32 is best); float32 accumulation, bias and residual added in float32, one
    rounding to bfloat16. ``relu_ranges`` ([start, end) channel pairs, with ``relu``): the ReLU on
    those channels only. The result is a new channels_last tensor, or ``residual`` itself with
    ``into_residual`` (written in place; it may not share memory with x). Raises RuntimeError when
    the kernel is unavailable (no build, no AMX) or an argument does not fit."""
    if not load_extension():
        raise RuntimeError(f"hrnet_fast CPU kernels are unavailable: {_state['reason']}")
    flat = [int(v) for pair in (relu_ranges or ()) for v in pair]
    size = [int(v) for v in weight_size[:2]]
    if into_residual:
        if residual is None:
            raise RuntimeError("hrnet_fast_cpu::conv_amx: into_residual needs a residual")
        torch.ops.hrnet_fast_cpu.conv_amx_into(residual, x, packed, size, bias, bool(relu),
                                               int(stride), flat)
        return residual
    return torch.ops.hrnet_fast_cpu.conv_amx(x, packed, size, bias, residual, bool(relu),
                                             int(stride), flat)


def seg_head_amx_cpu(x: torch.Tensor, proj: torch.Tensor, proj_bias: Optional[torch.Tensor],
                     contributions: Sequence[torch.Tensor], cls: torch.Tensor,
                     cls_bias: Optional[torch.Tensor], *, proj_size: Sequence[int],
                     cls_size: Sequence[int], mode: str, align_corners: bool) -> torch.Tensor:
    """The CPU engine's bfloat16 seg head in one pass on AMX tiles (``csrc/cpu_head_amx.cpp``):
    ``conv1x1(relu(conv1x1(x, Wp) + bp + sum_k F.interpolate(c_k, size=x.shape[-2:])), Wc) + bc``
    with ``proj = conv_amx_pack(Wp)``, ``proj_size = Wp.shape[:2]``, ``cls = conv_amx_pack(Wc)``,
    ``cls_size = Wc.shape[:2]`` (both 1x1). x [N, Ci, H, W] dense channels_last bfloat16 with Ci
    even; contributions [N, Cm, h, w] bfloat16 (h <= H, w <= W, channel stride 1); mode "nearest"
    or "bilinear". The head map is summed in float32 and rounded to bfloat16 once, never written
    to memory; the result is a new channels_last bfloat16 tensor. Raises RuntimeError when the
    kernel is unavailable (no build, no AMX) or an argument does not fit."""
    if not load_extension():
        raise RuntimeError(f"hrnet_fast CPU kernels are unavailable: {_state['reason']}")
    return torch.ops.hrnet_fast_cpu.seg_head_amx(
        x, proj, [int(v) for v in proj_size[:2]], proj_bias, list(contributions), str(mode),
        bool(align_corners), cls, [int(v) for v in cls_size[:2]], cls_bias)


def seg_head_f32_cpu(x: torch.Tensor, proj: torch.Tensor, proj_bias: Optional[torch.Tensor],
                     contributions: Sequence[torch.Tensor], cls: torch.Tensor,
                     cls_bias: Optional[torch.Tensor], *, mode: str,
                     align_corners: bool) -> torch.Tensor:
    """The CPU engine's float32 seg head in one pass (``csrc/cpu_head_f32.cpp``, AVX-512 or AVX2):
    ``conv1x1(relu(conv1x1(x, proj) + proj_bias + sum_k F.interpolate(c_k, size=x.shape[-2:])),
    cls) + cls_bias`` with proj [Cm, Ci, 1, 1] and cls [Co, Cm, 1, 1] float32. x [N, Ci, H, W]
    dense channels_last float32; contributions [N, Cm, h, w] float32 (h <= H, w <= W, channel
    stride 1); mode "nearest" or "bilinear". float32 throughout, the head map never written to
    memory; agrees with the unfused head to float32 rounding. The result is a new channels_last
    tensor. Raises RuntimeError when the kernel is unavailable (no build, no AVX-512/AVX2) or an
    argument does not fit."""
    if not load_extension():
        raise RuntimeError(f"hrnet_fast CPU kernels are unavailable: {_state['reason']}")
    return torch.ops.hrnet_fast_cpu.seg_head_f32(x, proj, proj_bias, list(contributions),
                                                 str(mode), bool(align_corners), cls, cls_bias)
