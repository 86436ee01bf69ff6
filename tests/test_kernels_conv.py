"""Triton convolution kernels (hrnet_fast.kernels.conv / conv_chain) against F.conv2d in float64.

On the CPU they run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on small
odd shapes; GPU-only cases (bf16, full HRNet shapes, torch.compile, CUDA graphs) are marked ``gpu``.
Every buffer the ops allocate is NaN-poisoned before the kernel runs (module test hooks), so an
unwritten output element shows up as a non-finite value.

fp32: rel. error <= 1e-5 against float64. fp16: error against float64 at most 2x that of the same
composition run by PyTorch in fp16 from the same (fp16-rounded) inputs (torch's CPU fp16 conv exists).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE, rel_err
from hrnet_fast.kernels import triton_status

_ok, _why = triton_status(DEVICE)
pytestmark = pytest.mark.skipif(not _ok, reason=_why)

if _ok:
    from hrnet_fast.kernels import conv as kconv
    from hrnet_fast.kernels import conv_chain as kchain


@pytest.fixture(autouse=True)
def _poison_outputs():
    kconv._debug_poison_outputs = True
    kchain._debug_poison_outputs = True
    yield
    kconv._debug_poison_outputs = False
    kchain._debug_poison_outputs = False
    kchain._tile_override = None


def _interpreted():
    from hrnet_fast.kernels import interpreter_enabled
    return interpreter_enabled()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _make_conv(cin, cout, k, seed=0):
    g = _gen(seed)
    w = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=g) * 0.5
    return w, b


def _ref_conv(x, w, b, stride, pad, residual, relu, ranges):
    """The composition in x's dtype (float64 for the oracle, fp16 for the dtype baseline)."""
    y = F.conv2d(x, w.to(x.dtype), b.to(x.dtype) if b is not None else None, stride=stride, padding=pad)
    if residual is not None:
        y = y + residual.to(x.dtype)
    if ranges is not None:
        y = y.clone()
        for a, e in ranges:
            y[:, a:e] = torch.relu(y[:, a:e])
    elif relu:
        y = torch.relu(y)
    return y


def _check(out, ref64, dtype, ref_lowp=None):
    assert torch.isfinite(out).all(), "non-finite output (unwritten or poisoned element)"
    err = rel_err(out, ref64)
    if dtype == torch.float32:
        assert err <= 1e-5, err
    else:
        assert ref_lowp is not None
        base = rel_err(ref_lowp, ref64)
        assert err <= 2 * base + 1e-6, (err, base)


# --------------------------------------------------------------------------------------------------
# conv2d_bias_act
# --------------------------------------------------------------------------------------------------

CONV_SHAPES = [
    # cin, cout, k, stride, H, W
    (18, 36, 3, 1, 17, 23),
    (36, 18, 3, 2, 17, 23),
    (3, 18, 3, 2, 17, 23),     # stem-like: flat-K path
    (36, 36, 3, 1, 9, 11),
    (18, 18, 1, 1, 9, 11),
    (36, 18, 1, 2, 17, 23),
    (18, 36, 1, 1, 17, 23),
    (3, 36, 1, 1, 9, 11),      # flat-K 1x1
    (72, 36, 3, 1, 9, 11),     # several K blocks per tap
]
EPILOGUES = [
    # residual?, relu, ranges
    (False, False, None),
    (True, True, None),
    (True, False, [(0, 5), (11, 17)]),
]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "c%d-%d_k%d_s%d_%dx%d" % s)
@pytest.mark.parametrize("epi", EPILOGUES, ids=["plain", "res_relu", "res_ranges"])
def test_conv_fp32(shape, epi):
    cin, cout, k, stride, h, w_ = shape
    has_res, relu, ranges = epi
    w, b = _make_conv(cin, cout, k, seed=cin * 7 + cout)
    g = _gen(1)
    x = torch.randn(2, cin, h, w_, generator=g)
    pad = k // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (w_ + 2 * pad - k) // stride + 1
    res = torch.randn(2, cout, ho, wo, generator=g) if has_res else None
    ref = _ref_conv(x.double(), w.double(), b.double(), stride, pad,
                    res.double() if res is not None else None, relu, ranges)
    xd = x.to(DEVICE).contiguous(memory_format=torch.channels_last)
    out = kconv.conv2d_bias_act(xd, kconv.pack_weight(w.to(DEVICE)), b.to(DEVICE), stride=stride,
                                residual=res.to(DEVICE) if res is not None else None, relu=relu,
                                relu_ranges=ranges)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    _check(out.cpu(), ref, torch.float32)


FP16_SHAPES = [(18, 36, 3, 1, 17, 23), (36, 18, 3, 2, 9, 11), (3, 18, 3, 2, 17, 23), (36, 18, 1, 1, 9, 11)]


@pytest.mark.parametrize("shape", FP16_SHAPES, ids=lambda s: "c%d-%d_k%d_s%d_%dx%d" % s)
def test_conv_fp16(shape):
    cin, cout, k, stride, h, w_ = shape
    w, b = _make_conv(cin, cout, k, seed=3)
    g = _gen(2)
    x = torch.randn(2, cin, h, w_, generator=g).half()
    w16 = w.half()
    pad = k // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (w_ + 2 * pad - k) // stride + 1
    res = torch.randn(2, cout, ho, wo, generator=g).half()
    ranges = [(2, 9)]
    ref64 = _ref_conv(x.double(), w16.double(), b.double(), stride, pad, res.double(), True, ranges)
    ref16 = _ref_conv(x, w16, b.half(), stride, pad, res, True, ranges)
    out = kconv.conv2d_bias_act(x.to(DEVICE), kconv.pack_weight(w16).to(DEVICE), b.to(DEVICE),
                                stride=stride, residual=res.to(DEVICE), relu_ranges=ranges)
    assert out.dtype == torch.float16
    _check(out.cpu(), ref64, torch.float16, ref16)


@pytest.mark.parametrize("shape", [(18, 36, 3, 2, 17, 23), (36, 18, 1, 1, 9, 11), (36, 54, 3, 1, 9, 11)],
                         ids=lambda s: "c%d-%d_k%d_s%d_%dx%d" % s)
def test_conv_flat_k_path(shape, monkeypatch):
    """The flat-K walk (taps x channels as one K axis), forced on for Cin >= 16 (the benchmark's A/B)."""
    monkeypatch.setattr(kconv, "FLAT_K_MAX_CIN", 64)
    cin, cout, k, stride, h, w_ = shape
    w, b = _make_conv(cin, cout, k, seed=13)
    g = _gen(14)
    x = torch.randn(2, cin, h, w_, generator=g)
    ranges = [(1, 7)]
    ref = _ref_conv(x.double(), w.double(), b.double(), stride, k // 2, None, True, ranges)
    out = kconv.conv2d_bias_act(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), stride=stride, relu_ranges=ranges)
    _check(out.cpu(), ref, torch.float32)


def test_conv_layouts_and_weight_forms():
    """NCHW input, raw (unpacked) weight, a non-contiguous residual, no bias, flat / tensor relu ranges."""
    cin, cout = 18, 36
    w, _ = _make_conv(cin, cout, 3, seed=5)
    g = _gen(6)
    x = torch.randn(2, cin, 9, 11, generator=g)                      # NCHW contiguous
    res_big = torch.randn(2, cout, 11, 9, generator=g)
    res = res_big.transpose(2, 3)                                    # [2, 36, 9, 11], odd strides
    ranges = [(3, 10), (20, 36)]
    ref = _ref_conv(x.double(), w.double(), None, 1, 1, res.double(), True, ranges)
    outs = [
        kconv.conv2d_bias_act(x.to(DEVICE), w.to(DEVICE), None, residual=res.to(DEVICE), relu_ranges=ranges),
        kconv.conv2d_bias_act(x.to(DEVICE), kconv.pack_weight(w).to(DEVICE), None, residual=res.to(DEVICE),
                              relu_ranges=[3, 10, 20, 36]),
        kconv.conv2d_bias_act(x.to(DEVICE), w.to(DEVICE), None, residual=res.to(DEVICE),
                              relu_ranges=kconv.relu_mask(ranges, cout, DEVICE)),
    ]
    mask_bool = torch.zeros(cout, dtype=torch.bool)
    mask_bool[3:10] = True
    mask_bool[20:36] = True
    outs.append(kconv.conv2d_bias_act(x.to(DEVICE), w.to(DEVICE), None, residual=res.to(DEVICE),
                                      relu_ranges=mask_bool.to(DEVICE)))
    for out in outs:
        _check(out.cpu(), ref, torch.float32)
    # empty range list = no ReLU at all
    out = kconv.conv2d_bias_act(x.to(DEVICE), w.to(DEVICE), None, relu_ranges=[])
    _check(out.cpu(), _ref_conv(x.double(), w.double(), None, 1, 1, None, False, None), torch.float32)


def test_conv_registered_op_and_fake():
    """The op is registered, runs eagerly, and its fake (meta) path gives the right shape and layout."""
    op = torch.ops.hrnet_fast.conv2d_bias_act_triton
    w, b = _make_conv(18, 36, 3, seed=8)
    x = torch.randn(1, 18, 9, 11, generator=_gen(9)).to(DEVICE)
    wp = kconv.pack_weight(w).to(DEVICE)
    out = op(x, wp, b.to(DEVICE), None, None, 3, 2, 1, True)
    ref = _ref_conv(x.cpu().double(), w.double(), b.double(), 2, 1, None, True, None)
    _check(out.cpu(), ref, torch.float32)
    schema = str(op.default._schema)
    assert "hrnet_fast::conv2d_bias_act_triton" in schema and "Tensor? relu_mask" in schema
    if _interpreted():
        return  # the interpreter launches kernels even on fake tensors; fake path checked on the GPU
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fo = op(fx, mode.from_tensor(wp), mode.from_tensor(b.to(DEVICE)), None, None, 3, 2, 1, True)
        assert tuple(fo.shape) == (1, 36, 5, 6)
        assert fo.is_contiguous(memory_format=torch.channels_last)


def test_conv_argument_errors():
    x = torch.randn(1, 18, 9, 11).to(DEVICE)
    w = torch.randn(36, 18, 3, 3).to(DEVICE)
    with pytest.raises(ValueError):
        kconv.conv2d_bias_act(x, w, relu_ranges=[(0, 40)])           # range beyond Cout
    with pytest.raises(ValueError):
        kconv.conv2d_bias_act(x, w, relu_ranges=[0, 5, 7])           # odd flat list
    with pytest.raises(ValueError):
        kconv.conv2d_bias_act(x, w, residual=torch.randn(1, 36, 5, 6).to(DEVICE))
    with pytest.raises(ValueError):
        kconv.conv2d_bias_act(x, torch.randn(36, 17, 3, 3).to(DEVICE))
    with pytest.raises(ValueError):
        kconv.conv2d_bias_act(x, torch.randn(5 * 18, 36).to(DEVICE))  # packed K not k*k*Cin


def test_pack_weight_layout():
    w = torch.arange(4 * 3 * 3 * 3, dtype=torch.float32).reshape(4, 3, 3, 3)
    p = kconv.pack_weight(w)
    assert p.shape == (27, 4) and p.is_contiguous()
    for co in range(4):
        for c in range(3):
            for r in range(3):
                for s in range(3):
                    assert p[(r * 3 + s) * 3 + c, co] == w[co, c, r, s]


# --------------------------------------------------------------------------------------------------
# strided_chain
# --------------------------------------------------------------------------------------------------

def _make_chain(steps, cj, ci, seed, dtype=torch.float32):
    g = _gen(seed)
    ws, bs = [], []
    for k in range(steps):
        co = ci if k == steps - 1 else cj
        ws.append((torch.randn(co, cj, 3, 3, generator=g) / (9 * cj) ** 0.5).to(dtype))
        bs.append(torch.randn(co, generator=g) * 0.3)
    return ws, bs


def _final_size(s, steps):
    for _ in range(steps):
        s = (s + 1) // 2
    return s


CHAIN_CASES = [
    # steps, cj, ci, H, W, accumulate, tile override
    (2, 18, 36, 17, 23, False, None),
    (2, 18, 36, 17, 23, True, 2),        # many tiles per image
    (2, 36, 18, 9, 11, True, None),
    (3, 18, 72, 17, 23, False, None),
    (3, 18, 72, 17, 23, True, 2),
    (3, 36, 18, 9, 11, False, None),
    (3, 18, 36, 33, 45, True, 8),        # one 8x8 tile covering a 5x6 output (masking)
    (2, 3, 18, 12, 16, False, 2),        # even sizes, tiny C_j
]


@pytest.mark.parametrize("case", CHAIN_CASES, ids=lambda c: "s%d_c%d-%d_%dx%d_acc%d_t%s" % c)
def test_chain_fp32(case):
    steps, cj, ci, h, w_, acc, tile = case
    kchain._tile_override = tile
    ws, bs = _make_chain(steps, cj, ci, seed=steps * 10 + cj)
    g = _gen(11)
    x = torch.randn(2, cj, h, w_, generator=g)
    hf, wf = _final_size(h, steps), _final_size(w_, steps)
    a = torch.randn(2, ci, hf, wf, generator=g) if acc else None
    ref = kchain.chain_reference(x.double(), [w.double() for w in ws], [b.double() for b in bs],
                                 a.double() if acc else None)
    a_dev = a.to(DEVICE) if acc else None
    a_copy = a_dev.clone() if acc else None
    out = kchain.strided_chain(x.to(DEVICE), [kconv.pack_weight(w).to(DEVICE) for w in ws],
                               [b.to(DEVICE) for b in bs], accumulate_into=a_dev)
    assert out.shape == (2, ci, hf, wf) and out.is_contiguous(memory_format=torch.channels_last)
    _check(out.cpu(), ref, torch.float32)
    if acc:
        assert torch.equal(a_dev, a_copy), "accumulate_into must be left unchanged"


@pytest.mark.parametrize("steps", [2, 3])
def test_chain_fp16(steps):
    cj, ci = 18, 36
    ws, bs = _make_chain(steps, cj, ci, seed=21, dtype=torch.float16)
    g = _gen(12)
    x = torch.randn(2, cj, 17, 23, generator=g).half()
    hf, wf = _final_size(17, steps), _final_size(23, steps)
    a = torch.randn(2, ci, hf, wf, generator=g).half()
    ref64 = kchain.chain_reference(x.double(), [w.double() for w in ws], [b.double() for b in bs], a.double())
    ref16 = kchain.chain_reference(x, ws, [b.half() for b in bs], a)
    out = kchain.strided_chain(x.to(DEVICE), [w.to(DEVICE) for w in ws], [b.to(DEVICE) for b in bs],
                               accumulate_into=a.to(DEVICE))
    assert out.dtype == torch.float16
    _check(out.cpu(), ref64, torch.float16, ref16)


def test_chain_fake_and_errors():
    op = torch.ops.hrnet_fast.strided_chain_triton
    ws, bs = _make_chain(3, 18, 36, seed=4)
    wp = [kconv.pack_weight(w).to(DEVICE) for w in ws]
    assert "hrnet_fast::strided_chain_triton" in str(op.default._schema)
    if not _interpreted():
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode() as mode:
            fx = mode.from_tensor(torch.randn(1, 18, 17, 23, device=DEVICE))
            args = [mode.from_tensor(t.to(DEVICE)) for t in (wp[0], bs[0], wp[1], bs[1], wp[2], bs[2])]
            fo = op(fx, *args, None)
            assert tuple(fo.shape) == (1, 36, 3, 3)
            assert fo.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError):
        kchain.strided_chain(torch.randn(1, 18, 9, 9), ws[:1], bs[:1])
    with pytest.raises(ValueError):
        kchain.strided_chain(torch.randn(1, 18, 9, 9), ws[:2], bs[:2],
                             accumulate_into=torch.randn(1, 18, 3, 3))    # Ci is 18 here, Hf = 3: ok
        kchain.strided_chain(torch.randn(1, 18, 9, 9), ws[:2], bs[:2],
                             accumulate_into=torch.randn(1, 18, 2, 2))    # wrong size
    with pytest.raises(ValueError):
        bad = [torch.randn(20, 18, 3, 3), ws[2]]
        kchain.strided_chain(torch.randn(1, 18, 9, 9), bad, [None, None])


_TRACE_SCRIPT = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget


class _Sm90Driver:  # lets torch analyse the kernels' TTIR for an sm_90 target without a GPU
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, *a):
        return 0


triton.runtime.driver.set_active(_Sm90Driver())
import torch
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from hrnet_fast.kernels import conv as kconv, conv_chain as kchain


def f(x, res, wp, b, w1, w2, w3, acc2, acc3):
    y = kconv.conv2d_bias_act(x, wp, b, residual=res, relu_ranges=[(0, 4)])
    z2 = kchain.strided_chain(x, [w1, w2], [b[:18], None], accumulate_into=acc2)
    z3 = kchain.strided_chain(x, [w1, w1, w3], [None, b[:18], b], accumulate_into=acc3)
    return y, z2, z3


args = (torch.randn(1, 18, 9, 11), torch.randn(1, 36, 9, 11), kconv.pack_weight(torch.randn(36, 18, 3, 3)),
        torch.randn(36), kconv.pack_weight(torch.randn(18, 18, 3, 3)), kconv.pack_weight(torch.randn(72, 18, 3, 3)),
        kconv.pack_weight(torch.randn(36, 18, 3, 3)), torch.randn(1, 72, 3, 3), torch.randn(1, 36, 2, 2))
gm = make_fx(dispatch_functionalize(f), tracing_mode="fake")(*args)
found = []
for node in gm.graph.nodes:
    if node.op == "call_function" and "triton_kernel_wrapper_functional" in str(node.target):
        found.append(sorted(node.kwargs["tensors_to_clone"]))
print("RESULT" + json.dumps(found))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run compiles the ops for real")
def test_ops_trace_into_triton_hops():
    """torch.compile readiness without a GPU: in a subprocess without the interpreter (and a stand-in
    sm_90 driver so torch can analyse the TTIR), functionalised tracing turns each op into one Triton
    kernel HOP that writes only its own outputs (no defensive copies of the inputs)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], capture_output=True, text=True, env=env,
                       cwd=root, timeout=300)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    assert r.returncode == 0 and line, r.stderr[-3000:]
    found = json.loads(line[0][len("RESULT"):])
    assert found == [["out_ptr"], ["out_ptr", "s1_ptr"], ["out_ptr", "s1_ptr", "s2_ptr"]], found


_COMPILE_SCRIPT = r"""
import os, sys, time
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hrnet_fast.kernels import conv, conv_chain

target = GPUTarget("cuda", 90, 32)


def build(fn, ptr_types, consts, warps=4, stages=2):
    sig = {n: ("constexpr" if n in consts else ptr_types.get(n, "i32")) for n in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                       options={"num_warps": warps, "num_stages": stages})
    assert "ld.global" in k.asm["ptx"]


t0 = time.time()
for flat in (False, True):
    ptrs = {"x_ptr": "*fp16", "w_ptr": "*fp16", "r_ptr": "*fp16", "out_ptr": "*fp16", "b_ptr": "*fp32",
            "mask_ptr": "*i8"}
    build(conv._conv2d_bias_act_kernel, ptrs,
          dict(KSIZE=3, STRIDE=2, PAD=1, HAS_BIAS=True, HAS_RES=True, RELU_MODE=2, FLAT_K=flat, IEEE=False,
               BLOCK_M=64, BLOCK_N=32, BLOCK_K=32))
ptrs = {p: "*fp16" for p in ("x_ptr", "w1_ptr", "w2_ptr", "w3_ptr", "acc_ptr", "out_ptr", "s1_ptr", "s2_ptr")}
ptrs.update({p: "*fp32" for p in ("b1_ptr", "b2_ptr", "b3_ptr")})
for steps in (2, 3):
    build(conv_chain._strided_chain_kernel, ptrs,
          dict(STEPS=steps, T=2, HAS_B1=True, HAS_B2=True, HAS_B3=True, HAS_ACC=True, IEEE=False,
               BLOCK_NI=32, BLOCK_NF=32, BLOCK_M=32, BLOCK_K=32))
print("COMPILED in %.1f s" % (time.time() - t0))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run compiles the kernels for real")
def test_kernels_compile_for_sm90():
    """Without a GPU: the kernels compile (TTIR -> PTX -> cubin with Triton's bundled ptxas) for sm_90,
    fp16, catching what the interpreter tolerates but the compiler rejects."""
    import os
    import subprocess
    import sys

    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("Triton's NVIDIA backend (bundled ptxas) is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                       cwd=root, timeout=600)
    assert r.returncode == 0 and "COMPILED" in r.stdout, r.stderr[-3000:]


# --------------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------------

GPU_CONV_SHAPES = [
    # cin, cout, k, stride, H, W (input size)
    (18, 18, 3, 1, 256, 512), (36, 36, 3, 1, 128, 256), (48, 48, 3, 1, 256, 512),
    (96, 96, 3, 1, 128, 256), (384, 384, 3, 1, 32, 64), (3, 64, 3, 2, 1024, 2048),
    (64, 64, 3, 2, 512, 1024), (64, 256, 1, 1, 256, 512), (256, 64, 1, 1, 256, 512),
    (36, 18, 1, 1, 128, 256), (18, 36, 3, 2, 256, 512), (270, 270, 1, 1, 256, 512),
    (720, 19, 1, 1, 256, 512),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", GPU_CONV_SHAPES, ids=lambda s: "c%d-%d_k%d_s%d_%dx%d" % s)
def test_conv_gpu_full_shapes(shape, dtype):
    cin, cout, k, stride, h, w_ = shape
    dev = torch.device("cuda")
    w, b = _make_conv(cin, cout, k, seed=1)
    x = torch.randn(1, cin, h, w_, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    wl = w.to(dev, dtype)
    pad = k // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (w_ + 2 * pad - k) // stride + 1
    res = torch.randn(1, cout, ho, wo, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    ranges = [(0, cout // 2)]
    ref64 = _ref_conv(x.double(), wl.double(), b.to(dev).double(), stride, pad, res.double(), True, ranges)
    out = kconv.conv2d_bias_act(x, kconv.pack_weight(wl), b.to(dev), stride=stride, residual=res,
                                relu_ranges=ranges)
    if dtype == torch.float32:
        _check(out, ref64, dtype)
    else:
        reflp = _ref_conv(x, wl, b.to(dev, dtype), stride, pad, res, True, ranges)
        _check(out, ref64, dtype, reflp)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [(2, 48, 192, 256, 512), (3, 48, 384, 256, 512), (2, 96, 384, 128, 256),
                                  (3, 18, 144, 256, 512), (2, 36, 144, 128, 256)],
                         ids=lambda c: "s%d_c%d-%d_%dx%d" % c)
def test_chain_gpu_full_shapes(case, dtype):
    steps, cj, ci, h, w_ = case
    dev = torch.device("cuda")
    ws, bs = _make_chain(steps, cj, ci, seed=2)
    ws = [w.to(dev, dtype) for w in ws]
    bs = [b.to(dev) for b in bs]
    x = torch.randn(1, cj, h, w_, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    a = torch.randn(1, ci, _final_size(h, steps), _final_size(w_, steps), device=dev).to(dtype)
    ref64 = kchain.chain_reference(x.double(), [w.double() for w in ws], [b.double() for b in bs], a.double())
    out = kchain.strided_chain(x, [kconv.pack_weight(w) for w in ws], bs, accumulate_into=a)
    if dtype == torch.float32:
        _check(out, ref64, dtype)
    else:
        reflp = kchain.chain_reference(x, ws, [b.to(dtype) for b in bs], a)
        _check(out, ref64, dtype, reflp)


@pytest.mark.gpu
def test_ops_under_compile_and_cuda_graph():
    dev = torch.device("cuda")
    w, b = _make_conv(48, 48, 3, seed=3)
    wp = kconv.pack_weight(w.to(dev, torch.float16))
    bd = b.to(dev)
    ws, bs = _make_chain(2, 48, 192, seed=4)
    wps = [kconv.pack_weight(t.to(dev, torch.float16)) for t in ws]
    bss = [t.to(dev) for t in bs]
    x = torch.randn(1, 48, 64, 128, device=dev).half().contiguous(memory_format=torch.channels_last)
    acc = torch.randn(1, 192, 16, 32, device=dev).half()

    def f(x, acc):
        y = kconv.conv2d_bias_act(x, wp, bd, residual=x, relu=True)
        return y, kchain.strided_chain(y, wps, bss, accumulate_into=acc)

    ref = f(x, acc)                      # eager; also runs the autotuners before capture
    cf = torch.compile(f, fullgraph=True)
    got = cf(x, acc)
    for r, o in zip(ref, got):
        assert rel_err(o, r) < 1e-3
    g = torch.cuda.CUDAGraph()
    static_x, static_acc = x.clone(), acc.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f(static_x, static_acc)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        outs = f(static_x, static_acc)
    static_x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    ref2 = f(static_x, static_acc)
    for r, o in zip(ref2, outs):
        assert torch.equal(o, r)
