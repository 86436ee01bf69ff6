"""The CPU fuse kernel (csrc/cpu_fuse.cpp, hrnet_fast/cpu_ext.py: upsample_add_relu and
resize_concat) and its use by the torch backend on the CPU (TorchCPU.fuse / head / resize_concat in
hrnet_fast/backends/torch_cpu.py).

The kernel is JIT-built once (cached on disk; 10-15 s on 2 cores the first time). Where it cannot be
built here, every kernel test is skipped with the reason: the kernel is then NOT tested.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from helpers import poisoned_allocations, poisoned_malloc, randomize_bn, torch_threads
from nearest_sweep import assert_sweep_bit_exact, sweep_pairs
from oracles import (assert_close_to_oracle, assert_model_close, fuse_fp64, fuse_same_dtype,
                     resize_concat_fp64, resize_concat_same_dtype)

from hrnet_fast import HRNet, HRNetConfig, cpu_ext, optimize
from hrnet_fast.backends import torch_cpu
from hrnet_fast.check import clone_as

CL = torch.channels_last
MODES = [("nearest", False), ("bilinear", False), ("bilinear", True)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (base H, W), contribution sizes. 6->46 and 12->46 are pairs where a float64 index product picks
# other nearest sources than PyTorch's float32 one; 2->3 a non-integer ratio; one axis unchanged;
# exactly 2x (nearest's special case in PyTorch); a contribution at base size; none at all.
CASES = [
    ((46, 46), [(6, 12)]),
    ((31, 45), [(8, 12)]),
    ((3, 3), [(2, 2)]),
    ((16, 24), [(16, 24)]),
    ((31, 45), [(31, 45), (16, 23), (8, 12)]),
    ((16, 46), [(16, 12), (8, 46)]),
    ((24, 32), [(12, 16), (6, 8)]),
    ((7, 9), []),
]
CHANNELS = 19  # one 16-lane vector and a remainder


@pytest.fixture(scope="module")
def kernel():
    ok, why = cpu_ext.cpu_ext_status()
    if not ok:
        pytest.skip(f"the CPU fuse kernel could not be built here ({why}): it is NOT tested")
    return torch.ops.hrnet_fast_cpu.upsample_add_relu


# ---------------------------------------------------------------------------------------- inputs
def _tensor(shape, dtype, layout, seed):
    """A random [N, C, H, W] tensor: dense channels_last ("cl"), a channel slice of a wider
    channels_last tensor ("slice"), or every second column of one ("wstride": W stride 2C)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if layout == "slice":
        big = torch.randn(n, c + 5, h, w, generator=g).to(dtype).contiguous(memory_format=CL)
        t = big[:, 2:2 + c]
    elif layout == "wstride":
        big = torch.randn(n, c, h, 2 * w, generator=g).to(dtype).contiguous(memory_format=CL)
        t = big[..., ::2]
    else:
        t = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=CL)
    assert t.stride(1) == 1
    return t


def _inputs(hw, sizes, dtype, views, n=2, c=CHANNELS, seed=0):
    base = _tensor((n, c, *hw), dtype, "slice" if views else "cl", seed)
    layouts = ("slice", "wstride") if views else ("cl",)
    contribs = [_tensor((n, c, *s), dtype, layouts[k % len(layouts)], seed + 1 + k)
                for k, s in enumerate(sizes)]
    return base, contribs


def _check(out, base, contribs, mode, ac, relu, what):
    oracle = fuse_fp64(base, contribs, mode, ac, relu)
    same = None if base.dtype == torch.float32 else fuse_same_dtype(base, contribs, mode, ac, relu)
    assert_close_to_oracle(out, oracle, same, dtype=base.dtype, what=what)


# ------------------------------------------------------------------------------- the kernel itself
@pytest.mark.parametrize("views", [False, True], ids=["dense", "views"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode,ac", MODES, ids=["nearest", "bilinear", "bilinear_ac"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_oracle(kernel, case, mode, ac, dtype, views):
    """Every case, mode, dtype and layout within the oracles' rule (fp32 1e-6; bf16/fp16 2x the
    composition in that dtype), batch 2, 1-3 contributions or none, ReLU on and off; output
    allocations poisoned; on torch's threads (several row tasks where it has more than one)."""
    hw, sizes = CASES[case]
    relu = case % 2 == 0
    base, contribs = _inputs(hw, sizes, dtype, views, seed=case)
    with poisoned_malloc():
        out = kernel(base, contribs, mode, ac, relu)
    assert out.is_contiguous(memory_format=CL) and out.dtype == dtype
    _check(out, base, contribs, mode, ac, relu, f"{hw} <- {sizes} {mode} ac={ac} relu={relu}")


def test_nearest_sweep_bit_exact(kernel):
    """Nearest does no arithmetic on values: every (in <= 64, out <= 130) pair bit for bit against
    F.interpolate (tests/nearest_sweep.py), channels_last."""
    def run(base, contribs):
        return kernel(base, contribs, "nearest", False, False)
    checked = assert_sweep_bit_exact(run, "cpu", channels=4, channels_last=True,
                                     what="CPU fuse kernel")
    assert checked == len(sweep_pairs())


def test_bilinear_large_ratios_and_batch(kernel):
    """Bigger HRNet-like shapes (8x up, batch 3, 36 channels) in both bilinear modes."""
    base, contribs = _inputs((64, 96), [(32, 48), (16, 24), (8, 12)], torch.float32, True, n=3,
                             c=36, seed=7)
    for ac in (False, True):
        out = kernel(base, contribs, "bilinear", ac, True)
        _check(out, base, contribs, "bilinear", ac, True, f"64x96 ac={ac}")


_OTHER_ISA = """
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from oracles import (assert_close_to_oracle, fuse_fp64, fuse_same_dtype, resize_concat_fp64,
                     resize_concat_same_dtype)
from hrnet_fast import cpu_ext
assert torch.backends.cpu.get_cpu_capability() == {cap!r}, torch.backends.cpu.get_cpu_capability()
assert cpu_ext.load_extension(), cpu_ext.cpu_ext_status()
cl = torch.channels_last
for dtype in (torch.float32, torch.bfloat16):
    for mode, ac in (("nearest", False), ("bilinear", False), ("bilinear", True)):
        base = torch.randn(2, 19, 31, 45).to(dtype).contiguous(memory_format=cl)
        cs = [torch.randn(2, 19, h, w).to(dtype).contiguous(memory_format=cl)
              for h, w in ((31, 45), (16, 23), (8, 12))]
        out = torch.ops.hrnet_fast_cpu.upsample_add_relu(base, cs, mode, ac, True)
        same = None if dtype == torch.float32 else fuse_same_dtype(base, cs, mode, ac)
        assert_close_to_oracle(out, fuse_fp64(base, cs, mode, ac), same, dtype=dtype, what=mode)
        cat = torch.ops.hrnet_fast_cpu.resize_concat([base] + cs[1:], [31, 45], mode, ac)
        same = None if dtype == torch.float32 else resize_concat_same_dtype([base] + cs[1:], (31, 45), mode, ac)
        assert_close_to_oracle(cat, resize_concat_fp64([base] + cs[1:], (31, 45), mode, ac), same,
                               dtype=dtype, what="concat " + mode)
"""


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2"])
def test_other_instruction_sets(kernel, capability):
    """The row kernel's other compiled variants, chosen through torch's ATEN_CPU_CAPABILITY (a new
    process: torch reads it once)."""
    if sys.platform != "linux" or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("x86 variants: this CPU or torch build has no AVX2 capability")
    if capability == torch.backends.cpu.get_cpu_capability():
        pytest.skip(f"{capability} is this process' own variant, tested by the other tests")
    tests = Path(__file__).resolve().parent
    code = _OTHER_ISA.format(root=str(tests.parent), tests=str(tests), cap=capability)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_same_result_on_one_and_two_threads(kernel):
    base, contribs = _inputs((46, 46), [(6, 12), (23, 23)], torch.float32, True, seed=3)
    with torch_threads(1):
        one = kernel(base, contribs, "bilinear", False, True)
    with torch_threads(2):
        two = kernel(base, contribs, "bilinear", False, True)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype,bits", [(torch.bfloat16, 8), (torch.float16, 11)],
                         ids=["bfloat16", "float16"])
def test_one_rounding_to_nearest_even(kernel, dtype, bits):
    """base = k / 4 and a same-size contribution j / 2^(bits+2) (|k|, |j| < 2^(bits-1), exact in
    ``dtype``): their sum needs up to 2*bits significant bits, exact in float32, and must come out
    rounded once to nearest, ties to even: bit for bit torch's float32 -> dtype conversion. (The
    oracles' 2x rule does not see a truncating store.)"""
    g = torch.Generator().manual_seed(5)
    k = torch.randint(-2 ** (bits - 1) + 1, 2 ** (bits - 1), (2, CHANNELS, 6, 40), generator=g)
    j = torch.randint(-2 ** (bits - 1) + 1, 2 ** (bits - 1), k.shape, generator=g)
    base = (k.double() / 4).to(dtype).contiguous(memory_format=CL)
    contrib = (j.double() / 2 ** (bits + 2)).to(dtype).contiguous(memory_format=CL)
    exact = base.double() + contrib.double()
    assert torch.equal(exact.float().double(), exact)  # exact in float32, by construction
    out = kernel(base, [contrib], "bilinear", False, False)
    assert torch.equal(out, exact.float().to(dtype))
    rounded = int((exact.float().to(dtype).double() != exact).sum())
    nudge = exact.abs() * 2.0 ** -20  # far below half an ulp of dtype: flips ties only
    ties = int(((exact - nudge).float().to(dtype) != (exact + nudge).float().to(dtype)).sum())
    assert rounded > 1000 and ties > 20  # the check rounds, ties among them


def test_nan_propagates_through_relu(kernel):
    base, contribs = _inputs((5, 6), [(3, 3)], torch.float32, False)
    base[0, 0, 1, 2] = float("nan")
    out = kernel(base, contribs, "bilinear", False, True)
    assert torch.isnan(out[0, 0, 1, 2]) and int(torch.isnan(out).sum()) == 1


def test_opcheck(kernel):
    """Schema, fake kernel (shapes, strides, dtype) and dispatch agree with the real kernel."""
    for views in (False, True):
        base, contribs = _inputs((9, 11), [(4, 5), (9, 11)], torch.float32, views)
        torch.library.opcheck(kernel.default, (base, contribs, "bilinear", False, True))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode,ac", MODES, ids=["nearest", "bilinear", "bilinear_ac"])
def test_into_writes_the_same_values_over_base(kernel, mode, ac, dtype):
    """upsample_add_relu_into: the op's values bit for bit, written over base (float32 rows
    accumulate in base itself; bf16/fp16 through a scratch row), contributions as views too."""
    into = torch.ops.hrnet_fast_cpu.upsample_add_relu_into
    for case, (hw, sizes) in enumerate(CASES):
        base, contribs = _inputs(hw, sizes, dtype, False, seed=case)
        views = _inputs(hw, sizes, dtype, True, seed=case)[1]
        for cs in (contribs, views):
            want = kernel(base, cs, mode, ac, True)
            target = base.clone()
            ptr = target.data_ptr()
            assert into(target, cs, mode, ac, True) is None
            assert target.data_ptr() == ptr and torch.equal(target, want), f"case {case}"
        same = base.clone()  # relu off, and the wrapper returns base
        got = cpu_ext.upsample_add_relu_into_cpu(same, contribs, mode=mode, align_corners=ac,
                                                 relu=False)
        assert got is same and torch.equal(got, kernel(base, contribs, mode, ac, False))


def test_into_opcheck(kernel):
    base, contribs = _inputs((9, 11), [(4, 5), (9, 11)], torch.float32, False)
    torch.library.opcheck(torch.ops.hrnet_fast_cpu.upsample_add_relu_into.default,
                          (base, contribs, "bilinear", False, True))


def test_into_bad_input_gets_one_clear_error(kernel):
    into = torch.ops.hrnet_fast_cpu.upsample_add_relu_into
    base, contribs = _inputs((8, 8), [(4, 4)], torch.float32, True)  # base: a channel slice
    with pytest.raises(RuntimeError, match="base must be dense channels_last"):
        into(base, contribs, "bilinear", False, True)
    base = base.contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="contributions\\[0\\] shares memory with base"):
        into(base, [base[:, :, :4, :4]], "bilinear", False, True)


@pytest.mark.parametrize("bad,match", [
    ("dtype", "contributions\\[0\\] has dtype"),
    ("nchw", "contributions\\[0\\] must have channel stride 1"),
    ("larger", "larger than base"),
    ("mode", "mode must be 'nearest' or 'bilinear'"),
    ("batch", "batch and channels must match"),
    ("int", "dtype must be float32, bfloat16 or float16"),
])
def test_bad_input_gets_one_clear_error(kernel, bad, match):
    base, (c,) = _inputs((8, 8), [(4, 4)], torch.float32, False)
    mode = "bilinear"
    if bad == "dtype":
        c = c.double()
    elif bad == "nchw":
        c = c.contiguous()
    elif bad == "larger":
        c = _tensor((2, CHANNELS, 9, 4), torch.float32, "cl", 1)
    elif bad == "mode":
        mode = "bicubic"
    elif bad == "batch":
        c = c[:1]
    elif bad == "int":
        base, c = base.to(torch.int32), c.to(torch.int32)
    with pytest.raises(RuntimeError, match=match):
        kernel(base, [c], mode, False, True)


# ------------------------------------------------------------------------------- resize_concat
CONCAT_CASES = [  # output size, part sizes (the first usually at the output size, as in the head)
    ((31, 45), [(31, 45), (16, 23), (8, 12)]),
    ((46, 46), [(46, 46), (6, 12), (23, 46)]),
    ((3, 3), [(2, 2)]),
    ((24, 32), [(12, 16), (24, 32), (6, 8)]),
]
CONCAT_CHANNELS = (5, 19, 36)  # a remainder only, one vector and a remainder, two vectors and more


def _parts(case, dtype, views, n=2, seed=0):
    size, sizes = CONCAT_CASES[case]
    layouts = ("slice", "wstride", "cl") if views else ("cl",)
    return size, [_tensor((n, CONCAT_CHANNELS[k % 3], *s), dtype, layouts[k % len(layouts)], seed + k)
                  for k, s in enumerate(sizes)]


@pytest.fixture(scope="module")
def concat_kernel(kernel):
    return torch.ops.hrnet_fast_cpu.resize_concat


@pytest.mark.parametrize("views", [False, True], ids=["dense", "views"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode,ac", MODES, ids=["nearest", "bilinear", "bilinear_ac"])
@pytest.mark.parametrize("case", range(len(CONCAT_CASES)))
def test_resize_concat_matches_oracle(concat_kernel, case, mode, ac, dtype, views):
    """cat of resized parts within the oracles' rule, batch 2, parts of 5/19/36 channels, dense and
    strided views, output allocation poisoned; nearest, and parts already at the size, bit for bit."""
    size, parts = _parts(case, dtype, views, seed=case)
    with poisoned_malloc():
        out = concat_kernel(parts, list(size), mode, ac)
    assert out.is_contiguous(memory_format=CL) and out.dtype == dtype
    assert out.shape == (2, sum(p.shape[1] for p in parts), *size)
    same = resize_concat_same_dtype(parts, size, mode, ac)
    assert_close_to_oracle(out, resize_concat_fp64(parts, size, mode, ac),
                           None if dtype == torch.float32 else same, dtype=dtype,
                           what=f"resize_concat {size} <- {[tuple(p.shape[-2:]) for p in parts]} {mode}")
    start = 0
    for p in parts:
        piece = out[:, start:start + p.shape[1]]
        if tuple(p.shape[-2:]) == tuple(size):
            assert torch.equal(piece, p)
        elif mode == "nearest":
            assert torch.equal(piece, same[:, start:start + p.shape[1]])
        start += p.shape[1]


def test_resize_concat_nearest_sweep_bit_exact(concat_kernel):
    """Every nearest (in <= 64, out <= 130) pair of tests/nearest_sweep.py, bit for bit (the sweep's
    values are small integers, so the sum of the concatenated groups it compares is exact)."""
    def run(base, contribs):
        out = concat_kernel(contribs, list(base.shape[-2:]), "nearest", False)
        n, _, h, w = base.shape
        return base + out.reshape(n, len(contribs), base.shape[1], h, w).sum(1)
    checked = assert_sweep_bit_exact(run, "cpu", channels=4, channels_last=True,
                                     what="CPU resize_concat kernel")
    assert checked == len(sweep_pairs())


def test_resize_concat_opcheck(concat_kernel):
    size, parts = _parts(0, torch.float32, True)
    torch.library.opcheck(concat_kernel.default, (parts, list(size), "bilinear", False))


@pytest.mark.parametrize("bad,match", [
    ("dtype", "parts\\[1\\] has dtype"),
    ("nchw", "parts\\[1\\] must have channel stride 1"),
    ("larger", "only upsampling"),
    ("mode", "mode must be 'nearest' or 'bilinear'"),
    ("batch", "parts\\[1\\] has batch"),
    ("empty", "parts is empty"),
    ("size", "size must be two positive integers"),
])
def test_resize_concat_bad_input_gets_one_clear_error(concat_kernel, bad, match):
    size, parts = _parts(0, torch.float32, False)
    size, mode = list(size), "bilinear"
    if bad == "dtype":
        parts[1] = parts[1].double()
    elif bad == "nchw":
        parts[1] = parts[1].contiguous()
    elif bad == "larger":
        parts[1] = _tensor((2, 3, 32, 4), torch.float32, "cl", 1)
    elif bad == "mode":
        mode = "bicubic"
    elif bad == "batch":
        parts[1] = parts[1][:1]
    elif bad == "empty":
        parts = []
    else:
        size = [31, 0]
    with pytest.raises(RuntimeError, match=match):
        if parts:
            concat_kernel(parts, size, mode, False)
        else:  # the dispatcher needs a tensor: the wrapper says it first
            cpu_ext.resize_concat_cpu(parts, size, mode=mode, align_corners=False)


# ------------------------------------------------------------------------------- the torch backend
def _backend():
    from hrnet_fast.backends.torch_cpu import TorchCPU
    return TorchCPU.__new__(TorchCPU)  # fuse/head use no prepared state


@pytest.fixture
def kernel_calls(kernel, monkeypatch):
    """Shapes of the fuse kernel's calls (base) and, in ``kernel_calls.concat``, of resize_concat's
    (its first part)."""
    calls = KernelCalls()
    real, real_concat = cpu_ext.upsample_add_relu_cpu, cpu_ext.resize_concat_cpu

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    def spy_concat(*args, **kwargs):
        calls.concat.append(args[0][0].shape)
        return real_concat(*args, **kwargs)

    monkeypatch.setattr(cpu_ext, "upsample_add_relu_cpu", spy)
    monkeypatch.setattr(cpu_ext, "resize_concat_cpu", spy_concat)
    return calls


class KernelCalls(list):
    def __init__(self):
        super().__init__()
        self.concat = []


def test_backend_resize_concat_uses_the_kernel_or_the_composition(kernel_calls, monkeypatch):
    size, parts = _parts(0, torch.float32, True)
    with poisoned_allocations(monkeypatch), torch.inference_mode():
        out = _backend().resize_concat(parts, size, "bilinear", False)
    assert len(kernel_calls.concat) == 1
    oracle = resize_concat_fp64(parts, size, "bilinear", False)
    assert_close_to_oracle(out, oracle, dtype=torch.float32, what="TorchCPU.resize_concat")
    parts[1].requires_grad_(True)  # autograd: the composition, same values
    out = _backend().resize_concat(parts, size, "bilinear", False)
    assert len(kernel_calls.concat) == 1 and out.grad_fn is not None
    assert_close_to_oracle(out.detach(), oracle, dtype=torch.float32, what="composition")


def test_backend_fuse_uses_the_kernel(kernel_calls, monkeypatch):
    base, contribs = _inputs((31, 45), [(31, 45), (16, 23), (8, 12)], torch.float32, True)
    base = base.contiguous(memory_format=CL)
    with poisoned_allocations(monkeypatch), torch.inference_mode():
        out = _backend().fuse(base, contribs, "bilinear", False, True)
    assert len(kernel_calls) == 1
    _check(out, base, contribs, "bilinear", False, True, "TorchCPU.fuse")


@pytest.mark.parametrize("why", ["nchw_base", "requires_grad", "bias"])
def test_backend_fuse_falls_back_to_the_composition(kernel_calls, monkeypatch, why):
    """Arguments the kernel does not take run the composition, with the same results."""
    base, contribs = _inputs((12, 14), [(6, 7)], torch.float32, False)
    extra = ()
    if why == "nchw_base":
        base = base.contiguous()
    elif why == "requires_grad":
        contribs[0].requires_grad_(True)
    else:
        extra = (torch.randn(CHANNELS),)  # a hoisted conv bias: CPU plans keep them in the convs
    with poisoned_allocations(monkeypatch):
        out = _backend().fuse(base, contribs, "bilinear", False, True, *extra)
    assert kernel_calls == []
    assert (out.grad_fn is not None) == (why == "requires_grad")
    oracle = fuse_fp64(base, [c.detach() for c in contribs], "bilinear", False, True, *extra)
    assert_close_to_oracle(out.detach(), oracle, dtype=torch.float32, what=why)


@pytest.mark.parametrize("op", ["fuse", "resize_concat"])
def test_a_failing_kernel_warns_once_and_the_composition_answers(kernel, monkeypatch, op):
    """A kernel that raises in ordinary inference is switched off for the process with one
    RuntimeWarning; this call and later ones get the composition's values."""
    monkeypatch.setitem(torch_cpu._FUSE, "on", True)
    monkeypatch.setattr(torch_cpu, "_WARNED", set())

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(cpu_ext, "upsample_add_relu_cpu" if op == "fuse" else "resize_concat_cpu",
                        broken)
    size, parts = _parts(0, torch.float32, False)
    be = _backend()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with torch.inference_mode():
                if op == "fuse":
                    out = be.fuse(parts[0], [parts[0]], "bilinear", False, True)
                    oracle = fuse_fp64(parts[0], [parts[0]], "bilinear", False, True)
                else:
                    out = be.resize_concat(parts, size, "bilinear", False)
                    oracle = resize_concat_fp64(parts, size, "bilinear", False)
            assert_close_to_oracle(out, oracle, dtype=torch.float32, what=op)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "planted failure" in messages[0] and "switched off" in messages[0]
    assert torch_cpu._FUSE["on"] is False


def _model():
    return randomize_bn(HRNet(HRNetConfig.preset("w18_small_v1"))).eval()


def test_engine_with_the_kernel_matches_the_reference(kernel_calls):
    """A whole w18_small_v1 seg engine (fuse steps and seg head through the kernel) against the
    float64 reference, fp32 within 1e-5."""
    model = _model()
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        ref64 = clone_as(model, torch.float64)(x.double())
        out = optimize(model, backend="torch")(x)
    assert len(kernel_calls) > 5, "the engine did not run the CPU fuse kernel"
    assert len(kernel_calls.concat) == 1, "the seg head did not run resize_concat"
    assert_model_close(out, ref64, dtype=torch.float32, what="w18_small_v1, CPU fuse kernel")


def test_seg_head_fuses_over_its_projection(kernel, monkeypatch):
    """The unfused seg head (where the one-pass heads do not run: no AVX-512, AVX2 or AMX, a 3x3
    classifier) fuses over the head's projection (no second full-size tensor); the engine's output
    is bit-identical to the head fusing into a new tensor."""
    monkeypatch.setitem(torch_cpu._F32_HEAD, "on", False)
    monkeypatch.setitem(torch_cpu._AMX_HEAD, "on", False)
    calls = []
    real = cpu_ext.upsample_add_relu_into_cpu

    def spy(base, *args, **kwargs):
        calls.append(base.shape)
        return real(base, *args, **kwargs)

    monkeypatch.setattr(cpu_ext, "upsample_add_relu_into_cpu", spy)
    model = _model()
    x = torch.randn(2, 3, 64, 96)
    engine = optimize(model, backend="torch")
    with torch.inference_mode():
        into = engine(x)
        assert len(calls) == 1 and calls[0][1] == model.last_layer[0].out_channels
        monkeypatch.setattr(torch_cpu, "HEAD_FUSE_INTO", False)
        new = engine(x)
    assert len(calls) == 1 and torch.equal(into, new)


def test_bf16_engine_with_the_kernel(kernel_calls):
    ok, why = torch_cpu.native_precision(torch.bfloat16)
    if not ok:
        pytest.skip(f"{why}: the bf16 engine is NOT tested with the kernel here")
    model = _model()
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        ref64 = clone_as(model, torch.float64)(x.double())
        own = clone_as(model, torch.bfloat16)(x.bfloat16())
        out = optimize(model, backend="torch", dtype=torch.bfloat16)(x.bfloat16())
    assert len(kernel_calls) > 5
    assert_model_close(out, ref64, own, dtype=torch.bfloat16, what="bf16 engine with the kernel")


# ------------------------------------------------------------------------------- loading
@pytest.fixture
def fresh_loader(monkeypatch):
    """cpu_ext as in a new process where the library is not loaded yet."""
    monkeypatch.setattr(cpu_ext, "_state", {"done": False, "ok": False, "reason": "not loaded yet",
                                            "fakes": True})
    monkeypatch.setattr(cpu_ext, "_ops_registered", lambda: False)
    return monkeypatch


def _load_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = cpu_ext.load_extension()
        second = cpu_ext.load_extension()
    return first, second, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_the_kernels_build_wherever_they_can():
    """Where a C++ compiler and ninja are present and the kernels are not switched off, they must
    build. Every kernel test skips when the build fails (a machine without a compiler runs the
    torch composition), so without this a compile error in csrc/ would pass the suite as a few
    hundred skips."""
    why = cpu_ext._precheck()
    if why is not None:
        pytest.skip(f"the CPU kernels cannot be built here: {why}")
    ok, reason = cpu_ext.cpu_ext_status()
    assert ok, f"the CPU kernels failed to build: {reason}"


def test_missing_compiler_warns_once(fresh_loader):
    fresh_loader.setenv("CXX", "no-such-compiler-hrnet-fast")
    first, second, said = _load_warnings()
    assert (first, second) == (False, False)
    assert len(said) == 1 and "no C++ compiler" in str(said[0].message)
    assert "torch composition" in str(said[0].message)
    assert cpu_ext.cpu_ext_status() == (False, cpu_ext._state["reason"])


def test_failed_build_warns_once(fresh_loader, tmp_path):
    _planted_failure(fresh_loader, tmp_path)
    first, second, said = _load_warnings()
    assert (first, second) == (False, False)
    assert len(said) == 1 and "JIT build failed" in str(said[0].message)
    assert "planted build failure" in str(said[0].message)
    assert str(tmp_path / "cache") in cpu_ext.cpu_ext_status()[1]


def _planted_failure(loader, tmp_path):
    """A source that fails at once, built under its own name into a fresh cache."""
    src = tmp_path / "csrc"
    src.mkdir()
    for name in cpu_ext.SOURCES:
        (src / name).write_text("#error planted build failure\n")
    loader.setattr(cpu_ext, "csrc_dir", lambda: src)
    # another name: torch's JIT versioner would otherwise rebuild the real one under a new name
    loader.setattr(cpu_ext, "JIT_NAME", "hrnet_fast_cpu_fuse_planted_failure")
    loader.setenv("HRNET_FAST_CACHE_DIR", str(tmp_path / "cache"))
    build_dir = cpu_ext.jit_build_directory()
    build_dir.mkdir(parents=True)
    return build_dir


def test_a_first_build_is_announced_once(fresh_loader, tmp_path, caplog):
    """A first build takes about a minute on 2 cores: it logs one warning (shown without any
    logging set up), so a first `hrnet-fast demo` does not sit silent."""
    build_dir = _planted_failure(fresh_loader, tmp_path)
    with caplog.at_level("INFO", logger=cpu_ext.logger.name):
        _load_warnings()
    said = [r for r in caplog.records if "compiling the CPU kernels" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING"
    assert str(build_dir) in said[0].getMessage()


def test_needs_compile_follows_the_built_library(fresh_loader, tmp_path):
    build_dir = _planted_failure(fresh_loader, tmp_path)
    assert cpu_ext.needs_compile(build_dir)                 # nothing built yet
    lib = build_dir / f"{cpu_ext.JIT_NAME}.so"
    lib.touch()
    newest = max((cpu_ext.csrc_dir() / s).stat().st_mtime for s in cpu_ext.SOURCES)
    os.utime(lib, (newest + 10, newest + 10))
    assert not cpu_ext.needs_compile(build_dir)             # built after every source
    header = cpu_ext.csrc_dir() / "cpu_planted.h"
    header.write_text("// edited after the build\n")
    os.utime(header, (newest + 20, newest + 20))
    assert cpu_ext.needs_compile(build_dir)                 # a header edited since


def test_a_held_build_lock_is_waited_for_then_given_up(fresh_loader, tmp_path):
    lock = _planted_failure(fresh_loader, tmp_path) / "lock"
    lock.touch()
    fresh_loader.setattr(cpu_ext, "LOCK_WAIT_S", 0.3)
    first, _, said = _load_warnings()
    assert first is False and len(said) == 1
    assert f"another build has held {lock}" in str(said[0].message) and lock.exists()


def test_a_stale_build_lock_is_removed(fresh_loader, tmp_path):
    lock = _planted_failure(fresh_loader, tmp_path) / "lock"
    lock.touch()
    old = time.time() - cpu_ext.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    fresh_loader.setattr(cpu_ext, "LOCK_WAIT_S", 0.3)
    first, _, said = _load_warnings()
    assert first is False and "JIT build failed" in str(said[0].message)  # it went on to build
    assert not lock.exists()


def test_switched_off_without_a_warning(fresh_loader):
    fresh_loader.setenv("HRNET_FAST_CPU_EXT", "0")
    first, _, said = _load_warnings()
    assert first is False and said == []
    assert "HRNET_FAST_CPU_EXT=0" in cpu_ext.cpu_ext_status()[1]
    with pytest.raises(RuntimeError, match="CPU fuse kernel is unavailable: disabled"):
        cpu_ext.upsample_add_relu_cpu(torch.zeros(1, 1, 2, 2), [], mode="nearest",
                                      align_corners=False, relu=True)


def test_import_does_not_build():
    """Importing the package starts no build: the loader runs on first use only."""
    root = str(Path(__file__).resolve().parent.parent)
    code = (f"import sys; sys.path.insert(0, {root!r}); "
            "import hrnet_fast, hrnet_fast.backends.torch_cpu; "
            "from hrnet_fast import cpu_ext; "
            "assert not cpu_ext._state['done']; "
            "assert 'torch.utils.cpp_extension' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
