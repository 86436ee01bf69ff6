"""The CUDA C++ extension (csrc/, hrnet_fast/cuda_ext.py, setup.py).

CPU, every run:
  * nvcc -c of every torch-free csrc/*.cu for sm_80 and sm_90 (skipped without nvcc);
  * the kernels' per-item code run on the CPU: csrc/upsample_add_relu.cu built with
    -DHRNET_FAST_HOST_EMULATION as a shared library (same planning, vector-width choice, chaining and
    index arithmetic as the GPU path) and compared with an fp64 torch oracle through ctypes;
  * g++ -fsyntax-only of csrc/bindings.cpp against torch's headers (slow; skipped if headers lack CUDA);
  * cuda_ext_status() answers at once, without compiling, where no CUDA torch / GPU exists;
  * setup.py's build decision, `setup.py --version`, and a pure-Python wheel.
GPU (@pytest.mark.gpu): the extension loads (prebuilt or JIT) and matches the oracle.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time
import zipfile
from importlib import util as import_util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE, once_per_session
from gpu_backends import require_backend
from nearest_sweep import assert_sweep_bit_exact, sweep_pairs
from oracles import GPU_AC_FP32_TOL, assert_close_to_oracle, fuse_fp64, fuse_same_dtype, rel_err

from hrnet_fast import cuda_ext

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
TORCH_FREE_CU = sorted(p for p in CSRC.glob("*.cu"))
# torch builds extensions with these; the kernels must compile under them.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MODES = [("nearest", False), ("bilinear", False), ("bilinear", True)]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit)")


# ----------------------------------------------------------------------------- inputs
def make_inputs(n, c, hw, sizes, dtype, layout, device, seed=0, bias=True):
    """base [n,c,*hw] and contributions of `sizes`, random, in `layout`:
    "nchw", "cl" (channels_last), "mixed" (base channels_last, contributions alternate), or
    "strided" (every tensor a non-contiguous view: a channel slice of a larger channels_last tensor)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(shape, k):
        t = torch.randn(shape, generator=g).to(dtype)
        if layout == "nchw" or (layout == "mixed" and k % 2 == 1):
            return t.contiguous().to(device)
        if layout == "strided":
            big = torch.randn((shape[0], shape[1] + 3, shape[2], shape[3]), generator=g).to(dtype)
            big = big.to(device).contiguous(memory_format=torch.channels_last)
            view = big[:, 1:1 + shape[1]]
            view.copy_(t.to(device))
            return view
        return t.to(device).contiguous(memory_format=torch.channels_last)

    base = rnd((n, c, *hw), 0)
    contribs = [rnd((n, c, *s), k + 1) for k, s in enumerate(sizes)]
    b = (torch.randn(c, generator=g) * 0.5).to(device) if bias else None
    return base, contribs, b


def check_against_oracle(out, base, contribs, mode, align_corners, relu, bias):
    """tests/oracles.py's rule: fp32 within 1e-6 of the fp64 oracle (GPU bilinear align_corners=True:
    GPU_AC_FP32_TOL, as for the Triton kernel), fp16/bf16 within 2x the torch composition in that
    dtype."""
    gpu_ac = out.is_cuda and mode == "bilinear" and align_corners
    override = {"fp32_tol": GPU_AC_FP32_TOL, "reason": "GPU bilinear align_corners=True"}
    if not gpu_ac:
        override = {}
    assert_close_to_oracle(out, fuse_fp64(base, contribs, mode, align_corners, relu, bias),
                           fuse_same_dtype(base, contribs, mode, align_corners, relu, bias),
                           dtype=base.dtype, what=f"{mode} ac={align_corners} relu={relu}", **override)


# --------------------------------------------------------------------------- CPU: nvcc compile
@needs_nvcc
@pytest.mark.parametrize("src", TORCH_FREE_CU, ids=lambda p: p.name)
def test_nvcc_compiles_torch_free_sources(src, tmp_path):
    includes = [line for line in src.read_text().splitlines() if line.lstrip().startswith("#include")]
    assert not any(h in line for line in includes for h in ("<torch", "<ATen", "<c10", "<pybind")), \
        f"{src.name} must stay torch-free: {includes}"
    cmd = [NVCC, "-c", "-std=c++17", "-O3", *TORCH_NVCC_DEFINES,
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "--threads", "2", "-Xptxas", "-v", str(src), "-o", str(tmp_path / (src.stem + ".o"))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=CSRC)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}"
    regs = [int(line.split("Used ")[1].split()[0]) for line in proc.stderr.splitlines() if "Used " in line]
    spills = [line.strip() for line in proc.stderr.splitlines()
              if "spill" in line and not line.strip().endswith("0 bytes spill stores, 0 bytes spill loads")]
    print(f"\n{src.name}: {len(regs)} kernels x archs, registers {min(regs)}..{max(regs)}, "
          f"{took:.1f} s; spill lines: {spills or 'none'}")
    assert (tmp_path / (src.stem + ".o")).stat().st_size > 0


@needs_nvcc
def test_torch_free_header_compiles_alone(tmp_path):
    src = tmp_path / "use_header.cpp"
    src.write_text('#include "upsample_add_relu.h"\nint main() { return hrnet_fast::kMaxContributionsPerLaunch - 4; }\n')
    proc = subprocess.run([NVCC, "-x", "c++", "-std=c++17", "-c", f"-I{CSRC}", str(src), "-o",
                           str(tmp_path / "h.o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- CPU: host emulation of the kernels
@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found (no CUDA toolkit)")

    def build() -> str:
        # nvcc takes ~8 s here: built once per session, the workers of pytest-xdist share the library
        out = tmp_path_factory.mktemp("emu") / "uar_emu.so"
        cmd = [NVCC, "-std=c++17", "-O2", *TORCH_NVCC_DEFINES, "-arch=sm_90", "-DHRNET_FAST_HOST_EMULATION",
               "-shared", "-Xcompiler", "-fPIC", str(CSRC / "upsample_add_relu.cu"), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return str(out)
    lib = ctypes.CDLL(once_per_session(tmp_path_factory, "uar_emulator", build))
    fn = lib.hrnet_fast_uar_emulate
    fn.restype = ctypes.c_int
    return fn


def _i64(values):
    return (ctypes.c_int64 * len(values))(*values)


def emulate(fn, base, contributions, mode, align_corners, relu, bias=None, out=None):
    """Run the kernels' code on CPU tensors; returns (out, vector widths per launch, 0 = NCHW kernel)."""
    if out is None:
        out = torch.empty(base.shape, dtype=base.dtype, memory_format=cuda_ext.output_memory_format(base))
    bias32 = bias.float().contiguous() if bias is not None else None
    k = len(contributions)
    cdata = (ctypes.c_void_p * max(k, 1))(*[c.data_ptr() for c in contributions])
    csizes = _i64([s for c in contributions for s in c.shape] or [0])
    cstrides = _i64([s for c in contributions for s in c.stride()] or [0])
    vecs = (ctypes.c_int32 * 8)(*([-1] * 8))
    msg = ctypes.c_char_p()
    code = fn(DTYPE_CODE[base.dtype], 0 if mode == "nearest" else 1, int(align_corners), int(relu),
              ctypes.c_void_p(base.data_ptr()), _i64(base.shape), _i64(base.stride()),
              ctypes.c_void_p(out.data_ptr()), _i64(out.stride()),
              ctypes.c_void_p(bias32.data_ptr() if bias32 is not None else None),
              k, cdata, csizes, cstrides, vecs, 8, ctypes.byref(msg))
    if code != 0:
        raise RuntimeError(msg.value.decode())
    return out, [v for v in vecs if v >= 0]


SMALL_SIZES = [(8, 9), (4, 5), (2, 3), (15, 17)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode,align_corners", MODES, ids=["nearest", "bilinear", "bilinear_ac"])
@pytest.mark.parametrize("layout", ["nchw", "cl", "mixed", "strided"])
@pytest.mark.parametrize("channels", [16, 6, 3])
def test_emulated_kernel_matches_oracle(emulator, dtype, mode, align_corners, layout, channels):
    base, contribs, bias = make_inputs(2, channels, (15, 17), SMALL_SIZES, dtype, layout, "cpu",
                                       seed=channels)
    out = torch.full(base.shape, float("nan"), dtype=dtype).contiguous(
        memory_format=cuda_ext.output_memory_format(base))
    out, vecs = emulate(emulator, base, contribs, mode, align_corners, True, bias, out=out)
    check_against_oracle(out, base, contribs, mode, align_corners, True, bias)
    # the kernel/vector width the planner chose
    elem = 4 if dtype == torch.float32 else 2
    if layout == "nchw":
        assert vecs == [0]
    elif layout == "cl":
        widest = 16 // elem
        expect = next(v for v in (8, 4, 2, 1) if v <= widest and channels % v == 0)
        assert vecs == [expect]
    elif layout == "strided":
        assert vecs == [1]  # channel slices at offset 1: misaligned, scalar path


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_emulated_chaining_more_than_four_contributions(emulator, relu, dtype):
    sizes = [(8, 9), (4, 5), (2, 3), (15, 17), (1, 1), (7, 17), (15, 2)]
    base, contribs, bias = make_inputs(2, 8, (15, 17), sizes, dtype, "cl", "cpu", seed=3)
    out, vecs = emulate(emulator, base, contribs, "bilinear", False, relu, bias)
    assert len(vecs) == 2
    # fp16: the chained partial sum is rounded once more, still within 2x torch's per-op rounding
    check_against_oracle(out, base, contribs, "bilinear", False, relu, bias)


def test_emulated_no_contributions_and_no_bias(emulator):
    base, _, _ = make_inputs(1, 4, (5, 7), [], torch.float32, "nchw", "cpu", bias=False)
    out, vecs = emulate(emulator, base, [], "nearest", False, False)
    assert torch.equal(out, base) and vecs == [0]
    out, _ = emulate(emulator, base, [], "nearest", False, True)
    assert torch.equal(out, base.relu())


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_emulated_nearest_is_bit_exact(emulator, layout):
    """nearest does no arithmetic on values: every pair of the sweep (tests/nearest_sweep.py,
    in <= 64 -> out <= 130, including those where a float64 index product picks other rows) must
    equal F.interpolate bit for bit."""
    def run(base, contribs):
        return emulate(emulator, base, contribs, "nearest", False, False)[0]

    checked = assert_sweep_bit_exact(run, "cpu", channels=4 if layout == "cl" else 1,
                                     channels_last=layout == "cl",
                                     what=f"emulated CUDA kernel ({layout})")
    assert checked == len(sweep_pairs())


def test_emulated_odd_hrnet_sizes(emulator):
    # 473 input: branches 119/60/30/15; 520 input: 130/65/33/17 (non-integer ratios)
    for full, branches in [(119, (60, 30, 15)), (130, (65, 33, 17))]:
        base, contribs, bias = make_inputs(1, 8, (full, full), [(b, b) for b in branches],
                                           torch.float32, "cl", "cpu", seed=full)
        for mode, ac in MODES:
            out, _ = emulate(emulator, base, contribs, mode, ac, True, bias)
            check_against_oracle(out, base, contribs, mode, ac, True, bias)


def test_emulated_rejects_bad_arguments(emulator):
    base, contribs, _ = make_inputs(1, 4, (5, 7), [(6, 7)], torch.float32, "nchw", "cpu", bias=False)
    with pytest.raises(RuntimeError, match="larger than the base"):
        emulate(emulator, base, contribs, "bilinear", False, True)
    base, contribs, _ = make_inputs(1, 4, (5, 7), [(2, 3)], torch.float32, "nchw", "cpu", bias=False)
    with pytest.raises(RuntimeError, match="channel"):
        emulate(emulator, base, [contribs[0][:, :2]], "bilinear", False, True)


# ------------------------------------------------------------------- CPU: binding syntax check
def _bindings_compile_cmd(tmp_path):
    from torch.utils import cpp_extension

    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no C++ compiler")
    incs = cpp_extension.include_paths()
    if not any((Path(i) / "c10" / "cuda" / "CUDAStream.h").exists() for i in incs):
        pytest.skip("this torch ships no c10/cuda headers")
    cuda_inc = None
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", str(Path(NVCC).parent.parent) if NVCC else None):
        if home and (Path(home) / "include" / "cuda_runtime_api.h").exists():
            cuda_inc = str(Path(home) / "include")
            break
    if cuda_inc is None:
        pytest.skip("cuda_runtime_api.h not found")
    import sysconfig

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [gxx, "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra", "-DTORCH_EXTENSION_NAME=_C",
           "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           # CPU wheels lack c10/cuda/impl/cuda_cmake_macros.h (a generated config header)
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    for inc in [*incs, cuda_inc, sysconfig.get_paths()["include"]]:
        cmd += ["-isystem", inc]
    return cmd + [str(CSRC / "bindings.cpp")]


@pytest.mark.slow
def test_bindings_syntax_against_torch_headers(tmp_path):
    cmd = _bindings_compile_cmd(tmp_path)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    own = [line for line in proc.stderr.splitlines() if "bindings.cpp" in line and "warning" in line]
    assert not own, "\n".join(own)


# ------------------------------------------------------------------------ CPU: loader behaviour
@pytest.fixture
def fresh_loader(monkeypatch):
    """cuda_ext with its cached state cleared (restored afterwards)."""
    saved = dict(cuda_ext._state)
    cuda_ext._state.update(done=False, module=None, reason="not loaded yet", warned=False)
    yield cuda_ext
    cuda_ext._state.clear()
    cuda_ext._state.update(saved)


@pytest.mark.skipif(torch.version.cuda is not None and torch.cuda.is_available(),
                    reason="checks the no-GPU answer")
def test_status_without_gpu_is_fast_and_compiles_nothing(fresh_loader, monkeypatch):
    from torch.utils import cpp_extension

    def boom(*a, **k):
        raise AssertionError("must not compile without a GPU")

    monkeypatch.setattr(cpp_extension, "load", boom)
    t0 = time.perf_counter()
    ok, reason = fresh_loader.cuda_ext_status()
    assert time.perf_counter() - t0 < 1.0
    assert ok is False
    assert "no CUDA" in reason or "torch has no CUDA" in reason, reason
    assert fresh_loader.load_extension() is None
    with pytest.raises(RuntimeError, match="unavailable"):
        fresh_loader.upsample_add_relu_cuda(torch.zeros(1, 1, 2, 2), [], mode="nearest",
                                            align_corners=False, relu=True)


def _no_prebuilt():
    raise ModuleNotFoundError("No module named 'hrnet_fast._C'", name="hrnet_fast._C")


def test_failed_jit_build_warns_once_and_is_cached(fresh_loader, monkeypatch, tmp_path):
    """Simulated GPU machine without hrnet_fast._C whose JIT build fails: one warning, no retry."""
    from torch.utils import cpp_extension

    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("Error building extension 'hrnet_fast_C': nvcc fatal : simulated")

    monkeypatch.setattr(fresh_loader, "_precheck", lambda: None)
    monkeypatch.setattr(fresh_loader, "_import_prebuilt", _no_prebuilt)
    monkeypatch.setattr(fresh_loader, "jit_build_directory", lambda: tmp_path / "build")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    monkeypatch.delenv("HRNET_FAST_CUDA_EXT", raising=False)
    with pytest.warns(RuntimeWarning, match="simulated"):
        assert fresh_loader.load_extension() is None
    ok, reason = fresh_loader.cuda_ext_status()
    assert not ok and "JIT build" in reason and "simulated" in reason
    assert len(calls) == 1
    kw = calls[0]
    assert kw["name"] == fresh_loader.JIT_NAME and kw["build_directory"] == str(tmp_path / "build")
    assert [Path(s).name for s in kw["sources"]] == list(fresh_loader.SOURCES)
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")
        assert fresh_loader.load_extension() is None  # cached: no second build, no second warning
    assert len(calls) == 1


def test_prebuilt_only_mode_skips_jit(fresh_loader, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(fresh_loader, "_precheck", lambda: None)
    monkeypatch.setattr(fresh_loader, "_import_prebuilt", _no_prebuilt)
    monkeypatch.setattr(cpp_extension, "load", lambda **k: pytest.fail("JIT build attempted"))
    monkeypatch.setenv("HRNET_FAST_CUDA_EXT", "prebuilt")
    ok, reason = fresh_loader.cuda_ext_status()
    assert not ok and "prebuilt" in reason


def test_status_disabled_by_env(fresh_loader, monkeypatch):
    monkeypatch.setenv("HRNET_FAST_CUDA_EXT", "0")
    ok, reason = fresh_loader.cuda_ext_status()
    assert not ok and "HRNET_FAST_CUDA_EXT=0" in reason


def test_jit_build_directory_is_a_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("HRNET_FAST_CACHE_DIR", str(tmp_path))
    d = cuda_ext.jit_build_directory()
    assert str(d).startswith(str(tmp_path)) and d.name == cuda_ext.JIT_NAME
    monkeypatch.delenv("HRNET_FAST_CACHE_DIR")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "t"))
    assert str(cuda_ext.jit_build_directory()).startswith(str(tmp_path / "t"))
    assert all((cuda_ext.csrc_dir() / s).is_file() for s in cuda_ext.SOURCES)


def test_fake_kernel_shapes_and_layout():
    base = torch.empty(2, 8, 15, 17, device="meta")
    cs = [torch.empty(2, 8, 8, 9, device="meta")]
    out = cuda_ext._upsample_add_relu_fake(base, cs, "bilinear", False, True, None)
    assert out.shape == base.shape and out.is_contiguous() and out.device.type == "meta"
    base_cl = base.contiguous(memory_format=torch.channels_last)
    out = cuda_ext._upsample_add_relu_fake(base_cl, cs, "nearest", False, True, torch.empty(8, device="meta"))
    assert out.is_contiguous(memory_format=torch.channels_last) and out.stride(1) == 1
    with pytest.raises(RuntimeError, match=r"contributions\[0\] .* is larger than base"):
        cuda_ext._upsample_add_relu_fake(base, [torch.empty(2, 8, 16, 9, device="meta")], "bilinear",
                                         False, True, None)
    with pytest.raises(RuntimeError, match="mode must be 'nearest' or 'bilinear', got 'bicubic'"):
        cuda_ext._upsample_add_relu_fake(base, cs, "bicubic", False, True, None)


def test_wrapper_checks_arguments_before_the_op():
    """upsample_add_relu_cuda rejects bad arguments in Python, before the op (whose C++ check of a
    larger contribution crashed the process on an H200) and before it needs the extension."""
    base = torch.zeros(1, 4, 6, 8)
    cases = [([torch.zeros(1, 4, 7, 8)], {}, "larger than base"),
             ([torch.zeros(1, 3, 3, 4)], {}, "channels"),
             ([torch.zeros(1, 4, 3, 4)], {"bias": torch.zeros(5)}, "bias"),
             ([torch.zeros(1, 4, 3, 4)], {"mode": "bicubic"}, "mode")]
    for contribs, kw, match in cases:
        args = {"mode": "bilinear", "align_corners": False, "relu": True, **kw}
        with pytest.raises(ValueError, match=match):
            cuda_ext.upsample_add_relu_cuda(base, contribs, **args)


# ---------------------------------------------------------------------------- CPU: setup.py
def _load_setup_module():
    spec = import_util.spec_from_file_location("hrnet_fast_setup_under_test", ROOT / "setup.py")
    mod = import_util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() runs only under __main__
    return mod


def test_setup_decision_env_and_cpu_torch():
    setup_mod = _load_setup_module()
    build, reason = setup_mod.cuda_build_decision({"HRNET_FAST_BUILD_CUDA": "0"})
    assert build is False and "HRNET_FAST_BUILD_CUDA=0" in reason
    with pytest.raises(RuntimeError, match="HRNET_FAST_BUILD_CUDA must be 0 or 1, got 'maybe'"):
        setup_mod.cuda_build_decision({"HRNET_FAST_BUILD_CUDA": "maybe"})
    if torch.version.cuda is None:
        build, reason = setup_mod.cuda_build_decision({})
        assert build is False and "CPU-only" in reason
        with pytest.raises(RuntimeError, match="cannot be built"):
            setup_mod.cuda_build_decision({"HRNET_FAST_BUILD_CUDA": "1"})


def test_setup_decision_with_cuda_torch_and_toolkit(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    setup_mod = _load_setup_module()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    build, reason = setup_mod.cuda_build_decision({})
    assert build is False and "nvcc" in reason
    with pytest.raises(RuntimeError, match="nvcc"):
        setup_mod.cuda_build_decision({"HRNET_FAST_BUILD_CUDA": "1"})
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    assert setup_mod.cuda_build_decision({})[0] is True
    assert setup_mod.cuda_build_decision({"HRNET_FAST_BUILD_CUDA": "1"})[0] is True
    assert setup_mod.cuda_build_decision({"HRNET_FAST_BUILD_CUDA": "0"})[0] is False


def test_setup_without_torch_in_build_env(monkeypatch):
    setup_mod = _load_setup_module()
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError, like build isolation
    build, reason = setup_mod.cuda_build_decision({})
    assert build is False and "--no-build-isolation" in reason


def test_setup_py_version_pure_python():
    env = dict(os.environ, HRNET_FAST_BUILD_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0.1.0"


@pytest.mark.slow
def test_pure_python_wheel_builds(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "hrnet_fast", src / "hrnet_fast",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
    env = dict(os.environ, HRNET_FAST_BUILD_CUDA="0", PIP_NO_INDEX="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist"), str(src)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list((tmp_path / "dist").glob("hrnet_fast-0.1.0-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "hrnet_fast/cuda_ext.py" in names
    assert not any(n.startswith("hrnet_fast/_C") for n in names)
    assert "py3-none-any" in wheels[0].name


# ================================================================================== GPU tests
@pytest.fixture(scope="module")
def ext():
    require_backend("cuda")  # fails where the extension can be built but does not load
    module = cuda_ext.load_extension()
    ok, reason = cuda_ext.cuda_ext_status()
    assert module is not None and ok, f"CUDA extension did not load: {reason}"
    print(f"\nCUDA extension: {reason}")
    return module


def _poison_allocator(nbytes):
    """Leave a freed block of exactly the output's size filled with 0xFF bytes (NaN in fp32, fp16 and
    bf16) in the caching allocator, so the op's output most likely reuses it: unwritten values show."""
    junk = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=DEVICE)
    del junk


def _run(base, contribs, mode, ac, relu, bias):
    _poison_allocator(base.numel() * base.element_size())
    return cuda_ext.upsample_add_relu_cuda(base, contribs, mode=mode, align_corners=ac, relu=relu, bias=bias)


@pytest.mark.gpu
def test_extension_loads(ext):
    assert hasattr(torch.ops.hrnet_fast_cuda, "upsample_add_relu")
    assert ext.max_contributions_per_launch == 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode,align_corners", MODES, ids=["nearest", "bilinear", "bilinear_ac"])
@pytest.mark.parametrize("layout", ["nchw", "cl", "mixed", "strided"])
@pytest.mark.parametrize("channels", [16, 6, 3])
@pytest.mark.parametrize("relu,with_bias", [(True, True), (False, False)])
def test_gpu_matches_oracle_small(ext, dtype, mode, align_corners, layout, channels, relu, with_bias):
    base, contribs, bias = make_inputs(2, channels, (15, 17), SMALL_SIZES, dtype, layout, DEVICE,
                                       seed=channels, bias=with_bias)
    out = _run(base, contribs, mode, align_corners, relu, bias)
    assert out.shape == base.shape and out.dtype == dtype
    assert out.stride() == torch.empty(base.shape, memory_format=cuda_ext.output_memory_format(base)).stride()
    check_against_oracle(out, base, contribs, mode, align_corners, relu, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("mode,align_corners", MODES, ids=["nearest", "bilinear", "bilinear_ac"])
def test_gpu_matches_oracle_full_size(ext, dtype, layout, mode, align_corners):
    base, contribs, bias = make_inputs(1, 48, (256, 512), [(128, 256), (64, 128), (32, 64)], dtype,
                                       layout, DEVICE, seed=1)
    out = _run(base, contribs, mode, align_corners, True, bias)
    check_against_oracle(out, base, contribs, mode, align_corners, True, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("full,branches", [(119, (60, 30, 15)), (130, (65, 33, 17))])
def test_gpu_odd_hrnet_sizes(ext, full, branches):
    base, contribs, bias = make_inputs(2, 32, (full, full), [(b, b) for b in branches], torch.float32,
                                       "cl", DEVICE, seed=full)
    for mode, ac in MODES:
        out = _run(base, contribs, mode, ac, True, bias)
        check_against_oracle(out, base, contribs, mode, ac, True, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_chains_more_than_four_contributions(ext, dtype):
    sizes = [(8, 9), (4, 5), (2, 3), (15, 17), (1, 1), (7, 17)]
    base, contribs, bias = make_inputs(2, 8, (15, 17), sizes, dtype, "cl", DEVICE, seed=4)
    out = _run(base, contribs, "bilinear", False, True, bias)
    check_against_oracle(out, base, contribs, "bilinear", False, True, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_gpu_nearest_is_bit_exact(ext, layout):
    """Every pair of the sweep (tests/nearest_sweep.py) and one full-size HRNet pair, bit for bit."""
    def run(base, contribs):
        return _run(base, contribs, "nearest", False, False, None)

    checked = assert_sweep_bit_exact(run, DEVICE, channels=4 if layout == "cl" else 1,
                                     channels_last=layout == "cl", what=f"CUDA kernel ({layout})")
    assert checked == len(sweep_pairs())
    base, contribs, _ = make_inputs(1, 16, (256, 512), [(32, 64)], torch.float32, layout, DEVICE,
                                    bias=False)
    base.zero_()
    out = run(base, contribs)
    assert torch.equal(out, F.interpolate(contribs[0], size=(256, 512), mode="nearest"))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_gpu_bilinear_matches_interpolate(ext, layout, align_corners):
    """Against CUDA's F.interpolate itself (zero base, no ReLU): the same indices and weights, so
    only the float32 rounding of the blend may differ; bit-exactness would need nvcc to contract
    the same FMAs as in PyTorch's kernel, which nothing guarantees. The stated bound is the fp32
    rule of tests/oracles.py: 1e-6, and GPU_AC_FP32_TOL for align_corners=True (its reason is
    there); a wrong neighbour or weight shows as 1e-2 or more. The count of values that are not
    bit-equal is printed."""
    override = {"fp32_tol": GPU_AC_FP32_TOL, "reason": "GPU bilinear align_corners=True"}
    for size, src in [((15, 17), (8, 9)), ((119, 119), (60, 60)), ((256, 512), (128, 256))]:
        base, contribs, _ = make_inputs(1, 16, size, [src], torch.float32, layout, DEVICE, bias=False)
        base.zero_()
        out = _run(base, contribs, "bilinear", align_corners, False, None)
        ref = F.interpolate(contribs[0], size=size, mode="bilinear", align_corners=align_corners)
        print(f"\n{src} -> {size}: {int((out != ref).sum())} of {out.numel()} values not bit-equal")
        assert_close_to_oracle(out, ref.double(), dtype=torch.float32, what=f"{src} -> {size}",
                               **(override if align_corners else {}))


@pytest.mark.gpu
def test_gpu_argument_errors(ext):
    base, contribs, bias = make_inputs(1, 4, (6, 8), [(3, 4)], torch.float32, "nchw", DEVICE)
    op = torch.ops.hrnet_fast_cuda.upsample_add_relu
    with pytest.raises(RuntimeError, match="mode"):
        op(base, contribs, "bicubic", False, True, None)
    with pytest.raises(RuntimeError, match="larger"):
        op(base, [torch.randn(1, 4, 7, 8, device=DEVICE)], "bilinear", False, True, None)
    with pytest.raises(RuntimeError, match="dtype"):
        op(base, [contribs[0].half()], "bilinear", False, True, None)
    with pytest.raises(RuntimeError, match="channels"):
        op(base, [torch.randn(1, 3, 3, 4, device=DEVICE)], "bilinear", False, True, None)
    with pytest.raises(RuntimeError, match="bias"):
        op(base, contribs, "bilinear", False, True, torch.randn(5, device=DEVICE))
    with pytest.raises(RuntimeError, match=r"contributions\[0\] is on cpu but base is on cuda"):
        op(base, [contribs[0].cpu()], "bilinear", False, True, None)
    # CPU tensors only: the op has no CPU kernel (the dispatcher's NotImplementedError, a
    # RuntimeError) or, should a CPU kernel ever be registered, the binding's own check
    with pytest.raises(RuntimeError, match="'CPU' backend|base must be a CUDA tensor"):
        op(base.cpu(), [contribs[0].cpu()], "bilinear", False, True, None)


@pytest.mark.gpu
def test_gpu_empty_and_no_contributions(ext):
    base = torch.randn(2, 8, 5, 7, device=DEVICE)
    out = cuda_ext.upsample_add_relu_cuda(base, [], mode="nearest", align_corners=False, relu=False)
    assert torch.equal(out, base)
    empty = torch.randn(0, 8, 5, 7, device=DEVICE)
    out = cuda_ext.upsample_add_relu_cuda(empty, [torch.randn(0, 8, 2, 3, device=DEVICE)],
                                          mode="bilinear", align_corners=False, relu=True)
    assert out.shape == empty.shape


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(ext):
    base, contribs, bias = make_inputs(1, 16, (64, 96), [(32, 48), (16, 24)], torch.float16, "cl", DEVICE)
    fn = lambda: cuda_ext.upsample_add_relu_cuda(base, contribs, mode="bilinear", align_corners=False,  # noqa: E731
                                                 relu=True, bias=bias)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    base.copy_(torch.randn_like(base))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fn())


@pytest.mark.gpu
def test_gpu_opcheck_and_compile(ext):
    base, contribs, bias = make_inputs(2, 8, (15, 17), [(8, 9), (4, 5)], torch.float32, "cl", DEVICE)
    op = torch.ops.hrnet_fast_cuda.upsample_add_relu.default
    torch.library.opcheck(op, (base, contribs, "bilinear", False, True, bias),
                          test_utils=("test_schema", "test_faketensor"))

    def f(b, c1, c2, bi):
        return cuda_ext.upsample_add_relu_cuda(b * 2, [c1, c2], mode="bilinear", align_corners=False,
                                               relu=True, bias=bi) + 1

    compiled = torch.compile(f, fullgraph=True)
    got = compiled(base, *contribs, bias)
    assert rel_err(got, f(base, *contribs, bias)) <= 1e-6
