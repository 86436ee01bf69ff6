"""The TMA-fed 3x3 conv (hrnet_fast.kernels.conv_tma, ``TMA_MODE = "on"``) against a float64 oracle.

On the CPU it runs under the Triton interpreter (tests/conftest.py), whose tensor descriptors
zero-fill out-of-bounds boxes as TMA does. Outputs are NaN-poisoned before the kernel runs. fp16:
error against float64 at most 2x that of torch's fp16 conv from the same inputs (tests/oracles.py).
The sm_90 build check compiles every config without a GPU; the GPU tests run them at full size."""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE, assert_graph_replay_equal
from oracles import assert_close_to_oracle, conv_oracle

triton_status = pytest.importorskip("hrnet_fast.kernels").triton_status
_ok, _why = triton_status(DEVICE)
if not _ok:
    pytest.skip(f"Triton kernels cannot run here: {_why}", allow_module_level=True)

from hrnet_fast.kernels import conv as kconv  # noqa: E402
from hrnet_fast.kernels import conv_tma  # noqa: E402


@pytest.fixture(autouse=True)
def _tma_on_and_poisoned(monkeypatch):
    monkeypatch.setattr(conv_tma, "TMA_MODE", "on")
    monkeypatch.setattr(kconv, "_debug_poison_outputs", True)


def _spy_kernels(monkeypatch):
    """The names of the Triton kernels launched through wrap_triton."""
    seen = []
    real = torch.library.wrap_triton

    def spy(kernel):
        seen.append(getattr(kernel, "fn", kernel).__name__)
        return real(kernel)

    monkeypatch.setattr(torch.library, "wrap_triton", spy)
    return seen


def _problem(x, cout, dtype, residual=True, ranges=((1, 9),), seed=0, device=DEVICE):
    """A random conv problem on ``device``: the op's call (a function of no arguments) and the
    float64 oracle and same-dtype torch composition, both computed on ``device`` too."""
    g = torch.Generator().manual_seed(seed)
    cin = x.shape[1]
    w = (torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5).to(device, dtype)
    b = (torch.randn(cout, generator=g) * 0.5).to(device)
    res = (torch.randn(x.shape[0], cout, x.shape[2], x.shape[3], generator=g).to(device, dtype)
           if residual else None)
    ranges = [tuple(r) for r in ranges] if ranges else None
    x = x.to(device)
    wp = kconv.pack_weight(w)

    def call():
        return kconv.conv2d_bias_act(x, wp, b, residual=res, relu=ranges is None, relu_ranges=ranges)
    ref64 = conv_oracle(x.double(), w.double(), b.double(), 1, 1,
                        res.double() if res is not None else None, True, ranges)
    ref_lowp = conv_oracle(x, w, b.to(dtype), 1, 1, res, True, ranges)
    return call, ref64, ref_lowp


def _run(x, cout, dtype, residual=True, ranges=((1, 9),), seed=0):
    call, ref64, ref_lowp = _problem(x, cout, dtype, residual, ranges, seed)
    return call(), ref64, ref_lowp


CASES = [
    # N, Cin, Cout, H, W
    (2, 24, 24, 13, 19),      # w18 branch 0 (padded); tiles overhang the bottom and right edges
    (1, 40, 24, 9, 17),       # two K blocks per tap; the weight box crosses into the next tap
    (2, 48, 48, 7, 5),        # one tile larger than the image
    (1, 72, 40, 6, 11),       # three K blocks per tap, Cout not a power of two
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n%d_c%d-%d_%dx%d" % c)
def test_tma_conv_fp16(case, monkeypatch):
    n, cin, cout, h, w = case
    seen = _spy_kernels(monkeypatch)
    x = torch.randn(n, cin, h, w, generator=torch.Generator().manual_seed(cin)).half()
    x = x.contiguous(memory_format=torch.channels_last)
    out, ref64, ref16 = _run(x, cout, torch.float16, seed=cin + cout)
    assert seen == ["_conv3x3_tma_kernel"], seen
    assert out.dtype == torch.float16 and out.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_oracle(out.cpu(), ref64, ref16, dtype=torch.float16, what="tma conv")


def test_tma_conv_reads_an_aligned_channel_slice_and_plain_epilogues(monkeypatch):
    """x = channels 8..31 of a 40-channel channels_last tensor (16-byte aligned base, pixel stride
    40): read in place; no residual, ReLU on every channel; and no bias, no ReLU."""
    seen = _spy_kernels(monkeypatch)
    wide = torch.randn(2, 40, 9, 11, generator=torch.Generator().manual_seed(5)).half()
    wide = wide.contiguous(memory_format=torch.channels_last)
    x = wide[:, 8:32]
    out, ref64, ref16 = _run(x, 24, torch.float16, residual=False, ranges=None, seed=6)
    assert_close_to_oracle(out.cpu(), ref64, ref16, dtype=torch.float16, what="tma conv slice")
    w = torch.randn(16, 24, 3, 3, generator=torch.Generator().manual_seed(7)).half()
    got = kconv.conv2d_bias_act(x, kconv.pack_weight(w), None, relu=False)
    want64 = conv_oracle(x.double(), w.double(), None, 1, 1, None, False, None)
    want16 = conv_oracle(x, w, None, 1, 1, None, False, None)
    assert_close_to_oracle(got, want64, want16, dtype=torch.float16, what="tma conv no bias")
    assert seen == ["_conv3x3_tma_kernel"] * 2, seen


def test_tma_eligibility(monkeypatch):
    """Only fp16/bf16 3x3 stride-1 convs whose channels and pixel strides are multiples of 8 with a
    16-byte aligned base, and only with TMA_MODE "on"; everything else keeps the pipelined kernel."""
    def x_of(c, dtype=torch.float16, total=None, start=0, n=1):
        t = torch.zeros(n, total or c, 5, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return t[:, start:start + c]

    def ok(x, cout=24, k=3, stride=1, padding=1):
        w = torch.zeros(k * k * x.shape[1], cout, dtype=x.dtype)
        return conv_tma.eligible(x, w, k, stride, padding)

    assert ok(x_of(24)) and ok(x_of(24, torch.bfloat16)) and ok(x_of(24, total=48, start=8, n=2))
    assert not ok(x_of(24, torch.float32))                  # fp32: the IEEE kernel
    assert not ok(x_of(24), stride=2, padding=1)
    assert not ok(x_of(24), k=1, padding=0)
    assert not ok(x_of(18)) and not ok(x_of(24), cout=18)   # not multiples of 8
    assert not ok(x_of(24, total=36, n=2))                  # pixel stride 36
    assert not ok(x_of(24, total=48, start=4))              # base 8 bytes off 16
    monkeypatch.setattr(conv_tma, "TMA_MODE", "off")
    assert not ok(x_of(24))


def test_tma_mode_off_keeps_the_pipelined_kernel(monkeypatch):
    monkeypatch.setattr(conv_tma, "TMA_MODE", "off")
    seen = _spy_kernels(monkeypatch)
    x = torch.randn(1, 24, 5, 7).half().contiguous(memory_format=torch.channels_last)
    _run(x, 24, torch.float16)
    assert seen == ["_conv2d_bias_act_kernel"], seen


# --------------------------------------------------------------------------------------------------
# sm_90 build, on the CPU (Triton's bundled ptxas)

_SM90_SCRIPT = r"""
import json, os, re, subprocess, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.backends.nvidia as nv
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hrnet_fast.kernels import conv_tma

CUOBJDUMP = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
fn = conv_tma._conv3x3_tma_kernel
rows = []
for cin, cout in ((48, 48),):  # keeps every config (24 channels prune the BLOCK_K 64 one)
    for cfg in conv_tma.tma_configs(cin, cout):
        kw = cfg.kwargs
        sig = {"x_desc": "tensordesc<fp16[1,%d,%d,%d]>" % (kw["TILE_H"], kw["TILE_W"], kw["BLOCK_K"]),
               "w_desc": "tensordesc<fp16[%d,%d]>" % (kw["BLOCK_K"], kw["BLOCK_N"]),
               "b_ptr": "*fp16", "r_ptr": "*fp16", "mask_ptr": "*i8", "out_ptr": "*fp16",
               "H": "i32", "W": "i32", "Cin": "i32", "Cout": "i32", "srn": "i32", "src_": "constexpr",
               "srh": "i32", "srw": "i32", "M_BUCKET": "i32"}
        cx = dict(src_=1, HAS_BIAS=True, HAS_RES=True, RELU_MODE=2, VEC_N=8, **kw)
        names = fn.arg_names
        consts = {}
        for name, v in cx.items():
            sig[name] = "constexpr"
            consts[(names.index(name),)] = v
        attrs = {(names.index(a),): [["tt.divisibility", 16]]
                 for a in ("b_ptr", "r_ptr", "mask_ptr", "out_ptr", "H", "W", "Cin", "srh", "M_BUCKET")}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        fd, path = tempfile.mkstemp(suffix=".cubin")
        with os.fdopen(fd, "wb") as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", path], capture_output=True, text=True).stdout
        os.unlink(path)
        m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", usage, re.S)
        rows.append({"cin": cin, "config": [kw["TILE_H"], kw["TILE_W"], kw["BLOCK_N"], kw["BLOCK_K"],
                                            cfg.num_warps, cfg.num_stages],
                     "regs": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(3)),
                     "shared": k.metadata.shared, "tma4d": len(re.findall(r"UTMALDG\.4D", sass)),
                     "tma2d": len(re.findall(r"UTMALDG\.2D", sass)),
                     "gmma": len(re.findall(r"HGMMA", sass))})
print("RESULT" + json.dumps(rows))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run compiles the kernel for real")
def test_sm90_tma_build(tmp_path):
    """Every config (at 48 channels): no spills or local memory, shared memory within an SM's 227 KB,
    both operands fetched by TMA (UTMALDG.4D for x, .2D for the weight) into tensor-core MMAs."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    nvbin = os.path.join(os.path.dirname(importlib.util.find_spec("triton").origin), "backends",
                         "nvidia", "bin")
    if not all(os.path.exists(os.path.join(nvbin, b)) for b in ("ptxas", "cuobjdump")):
        pytest.skip("Triton's NVIDIA backend (bundled ptxas / cuobjdump) is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], capture_output=True, text=True, env=env,
                       cwd=root, timeout=900)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    assert r.returncode == 0 and line, r.stderr[-3000:]
    rows = json.loads(line[0][len("RESULT"):])
    assert {tuple(r["config"]) for r in rows} == set(map(tuple, conv_tma._CONFIGS))
    for row in rows:
        print(row)
        assert row["stack"] == 0 and row["local"] == 0 and row["regs"] <= 255, row
        assert row["shared"] <= 227 * 1024, row
        assert row["tma4d"] > 0 and row["tma2d"] > 0 and row["gmma"] > 0, row


# --------------------------------------------------------------------------------------------------
# GPU only

GPU_CASES = [(1, 24, 24, 256, 512), (2, 24, 24, 255, 517), (2, 48, 48, 256, 512), (1, 40, 40, 127, 255),
             (2, 72, 72, 63, 131)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "n%d_c%d-%d_%dx%d" % c)
def test_tma_conv_gpu_every_config(case, dtype, monkeypatch):
    """Every config the problem keeps, each forced alone, at full HRNet sizes; then a CUDA-graph
    replay with a fresh input equals an eager call bit for bit."""
    n, cin, cout, h, w = case
    dev = torch.device("cuda")
    seen = _spy_kernels(monkeypatch)
    x = torch.randn(n, cin, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    call, ref64, reflp = _problem(x, cout, dtype, seed=3, device=dev)
    for cfg in conv_tma.tma_configs(cin, cout):
        monkeypatch.setattr(conv_tma, "tma_configs", lambda cin, cout, cfg=cfg: [cfg])
        assert_close_to_oracle(call(), ref64, reflp, dtype=dtype, what=f"tma conv {cfg}")
    assert set(seen) == {"_conv3x3_tma_kernel"}, seen
    wp = kconv.pack_weight(torch.randn(cout, cin, 3, 3, device=dev).to(dtype) / (9 * cin) ** 0.5)
    b = torch.randn(cout, device=dev)
    assert_graph_replay_equal(lambda t: kconv.conv2d_bias_act(t, wp, b), x.to(dev))


def test_env_switch_turns_tma_on_for_the_triton_backend(monkeypatch):
    """HRNET_FAST_CONV_TMA=1: building a Triton engine whose convs may run on the Triton conv turns
    the TMA path on (the whole-model A/B's switch)."""
    from hrnet_fast import HRNetConfig, optimize
    from hrnet_fast.reference import HighResolutionNet
    monkeypatch.setattr(conv_tma, "TMA_MODE", "off")
    monkeypatch.setenv("HRNET_FAST_FORCE_CONV2D_BIAS_ACT", "triton")
    model = HighResolutionNet(HRNetConfig.preset("w18_small_v1")).eval()
    optimize(model, backend="triton")
    assert conv_tma.TMA_MODE == "off"
    monkeypatch.setenv("HRNET_FAST_CONV_TMA", "1")
    optimize(model, backend="triton")
    assert conv_tma.TMA_MODE == "on"
