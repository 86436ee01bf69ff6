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

from helpers import DEVICE, assert_graph_replay_equal, once_per_session, rel_err, spy_triton_launches
from oracles import MODEL_FP32_TOL, assert_close_to_oracle, conv_oracle
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


_ref_conv = conv_oracle


def _check(out, ref64, dtype, ref_lowp=None):
    assert_close_to_oracle(out, ref64, ref_lowp, dtype=dtype, what="conv", fp32_tol=MODEL_FP32_TOL,
                           reason="the design's fp32 bound: K = k*k*Cin products in another order")


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


# 2-D pixel tiles (config TILE_W > 0): BLOCK_M / TILE_W output rows x TILE_W columns of one image.
TILED_CASES = [
    # cin, cout, k, stride, N, H, W, BLOCK_M, TILE_W
    (24, 24, 3, 1, 2, 13, 19, 64, 8),     # VEC 8, flat K; tiles overhang the bottom and right edges
    (18, 36, 3, 2, 2, 17, 23, 64, 16),    # stride 2, VEC 2, per-tap walk
    (3, 16, 3, 2, 1, 11, 9, 32, 4),       # stem-like: flat K, VEC 1
    (40, 24, 1, 1, 2, 9, 11, 64, 16),     # 1x1 (only the config lists keep tiles to 3x3 convs)
    (72, 36, 3, 1, 3, 5, 7, 64, 8),       # several K blocks per tap; one tile larger than the image
]


def _force_config(monkeypatch, block_m, tile_w, block_n=32, block_k=32):
    cfg = kconv.triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                               "TILE_W": tile_w}, num_warps=4, num_stages=1)
    monkeypatch.setattr(kconv, "conv_configs", lambda dtype=None: [cfg])


def _fp32_case(cin, cout, k, stride, n, h, w_, seed):
    """A random fp32 conv problem with a residual and two ReLU ranges: the op's arguments (on
    DEVICE, x channels_last), its keyword arguments and the float64 oracle."""
    w, b = _make_conv(cin, cout, k, seed=seed)
    g = _gen(seed + 1)
    x = torch.randn(n, cin, h, w_, generator=g)
    pad = k // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (w_ + 2 * pad - k) // stride + 1
    res = torch.randn(n, cout, ho, wo, generator=g)
    ranges = [(1, 9), (11, 15)]
    ref = _ref_conv(x.double(), w.double(), b.double(), stride, pad, res.double(), True, ranges)
    args = (x.to(DEVICE).contiguous(memory_format=torch.channels_last), kconv.pack_weight(w).to(DEVICE),
            b.to(DEVICE))
    return args, dict(stride=stride, residual=res.to(DEVICE), relu_ranges=ranges), ref


@pytest.mark.parametrize("case", TILED_CASES, ids=lambda c: "c%d-%d_k%d_s%d_n%d_%dx%d_bm%d_tw%d" % c)
def test_conv_tiled_pixels(case, monkeypatch):
    cin, cout, k, stride, n, h, w_, block_m, tile_w = case
    _force_config(monkeypatch, block_m, tile_w)
    args, kw, ref = _fp32_case(cin, cout, k, stride, n, h, w_, seed=cin + 5 * cout)
    _check(kconv.conv2d_bias_act(*args, **kw).cpu(), ref, torch.float32)


def test_conv_tiled_pixels_fp16(monkeypatch):
    _force_config(monkeypatch, 64, 16)
    cin, cout = 24, 40
    w, b = _make_conv(cin, cout, 3, seed=43)
    g = _gen(44)
    x = torch.randn(2, cin, 11, 21, generator=g).half().contiguous(memory_format=torch.channels_last)
    w16 = w.half()
    res = torch.randn(2, cout, 11, 21, generator=g).half()
    ref64 = _ref_conv(x.double(), w16.double(), b.double(), 1, 1, res.double(), True, None)
    ref16 = _ref_conv(x, w16, b.half(), 1, 1, res, True, None)
    out = kconv.conv2d_bias_act(x.to(DEVICE), kconv.pack_weight(w16).to(DEVICE), b.to(DEVICE),
                                residual=res.to(DEVICE))
    _check(out.cpu(), ref64, torch.float16, ref16)


def test_tiled_configs_only_for_thin_3x3(monkeypatch):
    """The tiled configs join the fp16/bf16 autotune list of 3x3 convs with <= TILED_MAX_CIN input
    channels only; TILED_CONFIGS "only" leaves nothing else there, "off" none of them; the autotuner
    cache keys on TILE_W, so the lists get separate autotuners."""
    def tiles(cfgs):
        return {c.kwargs["TILE_W"] for c in cfgs} - {0}

    fp16 = kconv.gpu_configs(torch.float16)
    assert tiles(fp16) and not tiles(kconv.gpu_configs(torch.float32))
    thin = kconv._prune_configs(fp16, 24, 24, 3, 8)
    assert tiles(thin) and any(c.kwargs["TILE_W"] == 0 for c in thin)
    assert all(c.kwargs["BLOCK_N"] <= 32 for c in thin)
    assert not tiles(kconv._prune_configs(fp16, 24, 24, 1, 8))               # 1x1: no tap reuse
    assert not tiles(kconv._prune_configs(fp16, 128, 128, 3, 8))             # wide: pipelined only
    monkeypatch.setattr(kconv, "TILED_CONFIGS", "only")
    only = kconv._prune_configs(fp16, 24, 24, 3, 8)
    assert only and all(c.kwargs["TILE_W"] for c in only)
    assert not tiles(kconv._prune_configs(fp16, 24, 24, 1, 8))
    monkeypatch.setattr(kconv, "conv_configs", lambda dtype=None: kconv.gpu_configs(dtype))
    tuned_only = kconv._tuned_kernel(24, 24, 3, torch.float16, 8)
    monkeypatch.setattr(kconv, "TILED_CONFIGS", "off")
    assert not tiles(kconv._prune_configs(fp16, 24, 24, 3, 8))
    tuned_off = kconv._tuned_kernel(24, 24, 3, torch.float16, 8)
    assert tuned_off is not tuned_only
    assert not tiles(tuned_off.configs) and all(c.kwargs["TILE_W"] for c in tuned_only.configs)


# Split-K (SPLIT_K_MODE forced): partial sums in an fp32 workspace, then the reduce kernel's epilogue.
SPLIT_CASES = [
    # cin, cout, k, stride, N, H, W, split, tile_w (0: rows of pixels)
    (72, 36, 3, 1, 1, 7, 9, 3, 0),        # VEC 8, flat K
    (64, 24, 3, 1, 1, 7, 9, 3, 0),        # VEC 8, per-tap walk (Cin a multiple of 32)
    (36, 54, 3, 1, 2, 9, 11, 2, 0),       # VEC 4, per-tap walk
    (24, 40, 3, 2, 2, 17, 23, 5, 0),      # VEC 8 flat K, stride 2, uneven runs of steps
    (40, 24, 3, 1, 1, 13, 19, 4, 8),      # 2-D tiles + split
    (18, 18, 1, 1, 2, 9, 11, 3, 0),       # 1x1: one K step, so two of the three splits are empty
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "c%d-%d_k%d_s%d_n%d_%dx%d_split%d_tw%d" % c)
def test_conv_split_k(case, monkeypatch):
    cin, cout, k, stride, n, h, w_, split, tile_w = case
    _force_config(monkeypatch, 64, tile_w)
    monkeypatch.setattr(kconv, "SPLIT_K_MODE", split)
    seen = spy_triton_launches(monkeypatch)
    args, kw, ref = _fp32_case(cin, cout, k, stride, n, h, w_, seed=cin + 7 * cout)
    out = kconv.conv2d_bias_act(*args, **kw)
    _check(out.cpu(), ref, torch.float32)
    assert [s["SPLIT_K"] for s in seen] == [split, split]    # the conv, then the reduce kernel
    assert torch.equal(kconv.conv2d_bias_act(*args, **kw), out)   # partials added in a fixed order


def test_conv_split_k_fp16_no_bias_no_residual(monkeypatch):
    monkeypatch.setattr(kconv, "SPLIT_K_MODE", 3)
    cin, cout = 40, 48
    w, _ = _make_conv(cin, cout, 3, seed=53)
    g = _gen(54)
    x = torch.randn(2, cin, 7, 9, generator=g).half().contiguous(memory_format=torch.channels_last)
    w16 = w.half()
    ref64 = _ref_conv(x.double(), w16.double(), None, 1, 1, None, False, None)
    ref16 = _ref_conv(x, w16, None, 1, 1, None, False, None)
    out = kconv.conv2d_bias_act(x.to(DEVICE), kconv.pack_weight(w16).to(DEVICE), None, relu=False)
    assert out.dtype == torch.float16
    _check(out.cpu(), ref64, torch.float16, ref16)


def test_split_k_estimate():
    """The auto split: the low-resolution branch convs that leave an H200 (132 SMs) mostly idle
    split; convs with enough tiles, or too few K steps, do not; the CPU never splits."""
    f = kconv.split_k_for
    assert f(32 * 64, 144, 9 * 144, 132) > 1 and f(32 * 64, 384, 9 * 384, 132) > 1
    assert f(256 * 512, 24, 9 * 24, 132) == 1 and f(128 * 256, 96, 9 * 96, 132) == 1
    assert f(32 * 64, 144, 144, 132) == 1           # a 1x1 conv: 5 K steps
    assert all(1 <= f(m, 64, 9 * 64, 132) <= kconv.SPLIT_K_MAX for m in (1, 100, 10 ** 4, 10 ** 6))
    assert kconv._split_k(2048, 144, 1296, torch.device("cpu")) == 1


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
    with pytest.raises(ValueError, match=r"relu range \(0, 40\) outside \[0, 36\]"):
        kconv.conv2d_bias_act(x, w, relu_ranges=[(0, 40)])
    with pytest.raises(ValueError, match=r"relu_ranges must hold \(start, end\) pairs"):
        kconv.conv2d_bias_act(x, w, relu_ranges=[0, 5, 7])
    with pytest.raises(ValueError, match=r"residual has shape \(1, 36, 5, 6\), "
                                         r"expected \(1, 36, 9, 11\)"):
        kconv.conv2d_bias_act(x, w, residual=torch.randn(1, 36, 5, 6).to(DEVICE))
    with pytest.raises(ValueError, match="weight has Cin=17, x has 18 channels"):
        kconv.conv2d_bias_act(x, torch.randn(36, 17, 3, 3).to(DEVICE))
    with pytest.raises(ValueError, match=r"packed weight \(90, 36\) does not fit Cin=18"):
        kconv.conv2d_bias_act(x, torch.randn(5 * 18, 36).to(DEVICE))  # 90 rows: not k*k*18
    with pytest.raises(ValueError, match="bias has 35 entries, expected Cout=36"):
        kconv.conv2d_bias_act(x, w, torch.randn(35).to(DEVICE))


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
# VEC: channel / pixel strides passed divided by a power of two and multiplied back in the kernel
def test_autotune_switch_keeps_one_config(monkeypatch):
    """HRNET_FAST_CONV_AUTOTUNE=0 leaves the Autotuner one config (Triton then times nothing); the
    default keeps the pruned list. The GPU list is used here: the interpreter's has one config."""
    monkeypatch.setattr(kconv, "conv_configs", lambda dtype=None: kconv.gpu_configs(dtype))
    monkeypatch.delenv("HRNET_FAST_CONV_AUTOTUNE", raising=False)
    tuned = kconv._tuned_kernel(64, 64, 3, torch.float16)
    assert len(tuned.configs) > 1
    monkeypatch.setenv("HRNET_FAST_CONV_AUTOTUNE", "0")
    single = kconv._tuned_kernel(64, 64, 3, torch.float16)
    assert len(single.configs) == 1 and single is not tuned
    assert single.configs[0].kwargs == tuned.configs[0].kwargs


def test_candidate_configs_are_built_once_per_class(monkeypatch):
    """Every conv launch asks ``_tuned_kernel`` for its kernel: the config list is built and pruned
    once per problem class, and again when the config source or a pruning knob changes."""
    calls = []

    def counted(dtype=None):
        calls.append(dtype)
        return kconv.gpu_configs(dtype)

    monkeypatch.setattr(kconv, "conv_configs", counted)
    monkeypatch.delenv("HRNET_FAST_CONV_AUTOTUNE", raising=False)
    first = kconv._tuned_kernel(64, 64, 3, torch.float16)
    assert kconv._tuned_kernel(64, 64, 3, torch.float16) is first and len(calls) == 1
    kconv._tuned_kernel(64, 64, 1, torch.float16)                      # another class
    kconv._tuned_kernel(64, 64, 3, torch.float32)                      # another dtype
    assert calls == [torch.float16, torch.float16, torch.float32]
    monkeypatch.setattr(kconv, "TILED_CONFIGS", "off")                 # a pruning knob
    kconv._tuned_kernel(64, 64, 3, torch.float16)
    assert len(calls) == 4
    monkeypatch.setattr(kconv, "conv_configs", lambda dtype=None: kconv.gpu_configs(dtype)[-1:])
    assert len(kconv._tuned_kernel(64, 64, 3, torch.float16).configs) == 1   # a new source


# --------------------------------------------------------------------------------------------------

def test_vec_factor_rule():
    vf = kconv.vec_factor
    assert vf(24, (0, 24 * 11, 24)) == 8                  # padded w18 branch, N = 1 (stride 0)
    assert vf(40, (40 * 99, 40 * 11, 40)) == 8
    assert vf(48, (48 * 99, 48 * 11, 48)) == 8            # capped at VEC_MAX = 8 (16 bytes of fp16)
    assert vf(18, (18 * 99, 18 * 11, 18)) == 2
    assert vf(36, (36 * 99, 36 * 11, 36)) == 4
    assert vf(3, (3 * 99, 3 * 11, 3)) == 1
    assert vf(24, (45 * 99, 45 * 11, 45)) == 1            # 24-channel slice of a 45-channel tensor
    assert vf(24, (36 * 99, 36 * 11, 36)) == 4
    assert vf(64, ()) == 8
    assert vf(24, (2 ** 31 + 8, 24, 8)) == 1              # int64 stride: must travel undivided


VEC_SHAPES = [
    # cin, cout, k, stride, H, W: the zero-padded HRNet branch widths (VEC 8 on both sides)
    (24, 24, 3, 1, 9, 11),
    (40, 40, 3, 1, 7, 9),
    (24, 40, 3, 2, 9, 11),
    (40, 24, 1, 1, 9, 11),
]


@pytest.mark.parametrize("flat", [False, True], ids=["taps", "flatk"])
@pytest.mark.parametrize("shape", VEC_SHAPES, ids=lambda s: "c%d-%d_k%d_s%d_%dx%d" % s)
def test_conv_vec8_fp32(shape, flat, monkeypatch):
    """Cin / Cout multiples of 8, channels_last: VEC_K = VEC_N = 8, per-tap and flat-K walks, with a
    residual (its strides scaled too) and a ReLU mask. fp32, so exact to 1e-5."""
    monkeypatch.setattr(kconv, "FLAT_K_ALIGNED", flat)
    seen = spy_triton_launches(monkeypatch)
    cin, cout, k, stride, h, w_ = shape
    w, b = _make_conv(cin, cout, k, seed=cin + 3 * cout)
    g = _gen(31)
    x = torch.randn(2, cin, h, w_, generator=g)
    pad = k // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (w_ + 2 * pad - k) // stride + 1
    res = torch.randn(2, cout, ho, wo, generator=g)
    ranges = [(1, 9), (17, 23)]
    ref = _ref_conv(x.double(), w.double(), b.double(), stride, pad, res.double(), True, ranges)
    out = kconv.conv2d_bias_act(x.to(DEVICE).contiguous(memory_format=torch.channels_last),
                                kconv.pack_weight(w).to(DEVICE), b.to(DEVICE), stride=stride,
                                residual=res.to(DEVICE).contiguous(memory_format=torch.channels_last),
                                relu_ranges=ranges)
    _check(out.cpu(), ref, torch.float32)
    assert (seen[-1]["VEC_K"], seen[-1]["VEC_N"]) == (8, 8)
    assert seen[-1]["FLAT_K"] == flat


@pytest.mark.parametrize("shape", [(24, 24, 3, 1, 9, 11), (40, 24, 3, 2, 9, 11)],
                         ids=lambda s: "c%d-%d_k%d_s%d_%dx%d" % s)
def test_conv_vec8_fp16(shape):
    cin, cout, k, stride, h, w_ = shape
    w, b = _make_conv(cin, cout, k, seed=17)
    g = _gen(18)
    x = torch.randn(1, cin, h, w_, generator=g).half().contiguous(memory_format=torch.channels_last)
    w16 = w.half()
    pad = k // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (w_ + 2 * pad - k) // stride + 1
    res = torch.randn(1, cout, ho, wo, generator=g).half().contiguous(memory_format=torch.channels_last)
    ref64 = _ref_conv(x.double(), w16.double(), b.double(), stride, pad, res.double(), True, None)
    ref16 = _ref_conv(x, w16, b.half(), stride, pad, res, True, None)
    out = kconv.conv2d_bias_act(x.to(DEVICE), kconv.pack_weight(w16).to(DEVICE), b.to(DEVICE),
                                stride=stride, residual=res.to(DEVICE))
    _check(out.cpu(), ref64, torch.float16, ref16)


# x = a 24-channel slice (channels c0 .. c0+23) of a channels_last tensor with `total` channels; the
# residual likewise. The op reads the views in place (channel stride 1), so the VEC is set by their
# pixel strides: 45 -> 1 (the scalar fallback), 36 -> 4, 48 -> 8 (the slice offset, 8 elements, keeps
# the pointer 16-byte aligned).
SLICE_CASES = [
    # x total, x c0, residual total, residual c0, expected (VEC_K, VEC_N)
    (45, 3, 45, 5, (1, 1)),
    (36, 4, 50, 2, (4, 2)),
    (48, 8, 48, 16, (8, 8)),
]


@pytest.mark.parametrize("case", SLICE_CASES, ids=lambda c: "x%d+%d_r%d+%d" % c[:4])
def test_conv_channel_slices(case, monkeypatch):
    xt, x0, rt, r0, vecs = case
    seen = spy_triton_launches(monkeypatch)
    cin, cout = 24, 24
    w, b = _make_conv(cin, cout, 3, seed=41)
    g = _gen(42)
    big = torch.randn(2, xt, 9, 11, generator=g).contiguous(memory_format=torch.channels_last)
    rbig = torch.randn(2, rt, 9, 11, generator=g).contiguous(memory_format=torch.channels_last)
    x, res = big[:, x0:x0 + cin], rbig[:, r0:r0 + cout]
    ref = _ref_conv(x.double(), w.double(), b.double(), 1, 1, res.double(), True, None)
    xd, rd = big.to(DEVICE)[:, x0:x0 + cin], rbig.to(DEVICE)[:, r0:r0 + cout]
    assert xd.stride(1) == 1 and not xd.is_contiguous(memory_format=torch.channels_last)
    out = kconv.conv2d_bias_act(xd, kconv.pack_weight(w).to(DEVICE), b.to(DEVICE), residual=rd)
    _check(out.cpu(), ref, torch.float32)
    assert (seen[-1]["VEC_K"], seen[-1]["VEC_N"]) == vecs


def test_chain_vec8_and_slice(monkeypatch):
    """The chain with C_j = 24, C_i = 40 (VEC_J = VEC_I = 8) and with an accumulate_into that is a channel
    slice of a 45-channel tensor (VEC_I = 1)."""
    seen = spy_triton_launches(monkeypatch)
    ws, bs = _make_chain(2, 24, 40, seed=51)
    g = _gen(52)
    x = torch.randn(1, 24, 13, 15, generator=g)
    hf, wf = _final_size(13, 2), _final_size(15, 2)
    for total in (40, 45):
        abig = torch.randn(1, total, hf, wf, generator=g).contiguous(memory_format=torch.channels_last)
        a = abig[:, total - 40:]
        ref = kchain.chain_reference(x.double(), [t.double() for t in ws], [t.double() for t in bs],
                                     a.double())
        a_dev = abig.to(DEVICE)[:, total - 40:]
        out = kchain.strided_chain(x.to(DEVICE), [kconv.pack_weight(t).to(DEVICE) for t in ws],
                                   [t.to(DEVICE) for t in bs], accumulate_into=a_dev)
        _check(out.cpu(), ref, torch.float32)
        assert (seen[-1]["VEC_J"], seen[-1]["VEC_I"]) == (8, 8 if total == 40 else 1)


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
    x = torch.randn(1, 18, 9, 9)
    with pytest.raises(ValueError, match="strided_chain needs 2 or 3 weights"):
        kchain.strided_chain(x, ws[:1], bs[:1])
    # accumulate_into must be [N, C_i, Hf, Wf]: two steps take 9x9 to 3x3 with C_i = 18 here
    right = kchain.strided_chain(x.to(DEVICE), [w.to(DEVICE) for w in ws[:2]],
                                 [b.to(DEVICE) for b in bs[:2]],
                                 accumulate_into=torch.zeros(1, 18, 3, 3, device=DEVICE))
    assert tuple(right.shape) == (1, 18, 3, 3)
    with pytest.raises(ValueError, match=r"accumulate_into has shape \(1, 18, 2, 2\), "
                                         r"expected \(1, 18, 3, 3\)"):
        kchain.strided_chain(x, ws[:2], bs[:2], accumulate_into=torch.randn(1, 18, 2, 2))
    bad = [torch.randn(20, 18, 3, 3), ws[2]]
    with pytest.raises(ValueError, match="intermediate chain convs must keep C_j=18 channels, "
                                         "got Cout=20"):
        kchain.strided_chain(x, bad, [None, None])


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


_SM90_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile, time
import multiprocessing as mp
os.environ.pop("TRITON_INTERPRET", None)
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton.backends.nvidia as nv

CUOBJDUMP = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
TARGET = GPUTarget("cuda", 90, 32)
TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "i8"}
DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FULL = os.environ.get("HRNET_SM90_FULL") == "1"
launches = []


class Capture:  # stands in for wrap_triton(kernel)[grid](...): records the launch instead of running it
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            launches.append((self.fn, args, kwargs))
        return run


torch.library.wrap_triton = Capture
from hrnet_fast.kernels import basic_block, conv, conv_chain  # noqa: E402


def specialise(fn, args, kwargs):
    # as Triton does at launch: ints equal to 1 become constants; ints divisible by 16 and pointers
    # 16-byte aligned get the divisibility hint; ints >= 2**31 travel as i64. Config parameters (not
    # passed at the launch) are added per config.
    sig, cx, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in kwargs:
            sig[name], cx[(i,)] = "constexpr", kwargs[name]
        elif i < len(args):
            v = args[i]
            if isinstance(v, torch.Tensor):
                sig[name] = "*" + TY[v.dtype]
                if v.data_ptr() % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, float):
                sig[name] = "fp32"
            elif v == 1:
                sig[name], cx[(i,)] = "constexpr", 1
            else:
                sig[name] = "i64" if abs(v) >= 2 ** 31 else "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, cx, attrs


def nhwc(n, c, h, w, dt):
    return torch.empty(n, c, h, w, dtype=dt).contiguous(memory_format=torch.channels_last)


# conv classes: cin, cout, k, stride, H, W (HRNet at 1024x2048; 24/40/72/144: w18's zero-padded
# branches, 18/36: unpadded widths, VEC 2/4)
CONV = [(3, 64, 3, 2, 1024, 2048), (64, 64, 3, 2, 512, 1024), (64, 64, 3, 1, 256, 512),
        (24, 24, 3, 1, 256, 512), (40, 40, 3, 1, 128, 256), (72, 72, 3, 1, 64, 128),
        (144, 144, 3, 1, 32, 64), (48, 48, 3, 1, 256, 512), (24, 40, 3, 2, 256, 512),
        (256, 64, 1, 1, 256, 512), (64, 256, 1, 1, 256, 512), (40, 24, 1, 1, 128, 256),
        (18, 18, 3, 1, 256, 512), (36, 36, 3, 1, 128, 256)]
# fp32 (IEEE FMA dot; its own config list): the classes that reach every fp32 config
CONV_FP32 = [(3, 64, 3, 2, 1024, 2048), (64, 64, 3, 1, 256, 512), (64, 256, 1, 1, 256, 512),
             (24, 24, 3, 1, 256, 512), (36, 36, 3, 1, 128, 256), (144, 144, 3, 1, 32, 64)]
# the default run compiles the 2-D tiled configs on these classes only (every tiled config, the
# three K walks / VEC 1, 2, 8, strides 1 and 2); HRNET_SM90_FULL=1 on every class
TILED_SM90 = {(3, 64, 3, 2, 1024, 2048), (64, 64, 3, 2, 512, 1024), (24, 24, 3, 1, 256, 512),
              (40, 40, 3, 1, 128, 256), (18, 18, 3, 1, 256, 512)}
# split-K classes (SPLIT_K_MODE forced; the CPU's "auto" never splits): the low-resolution branch
# convs that split_k_for splits on an H200; the conv kernel at SPLIT_K > 1 and the reduce kernel
SPLIT = [((144, 144, 3, 1, 32, 64), 5), ((384, 384, 3, 1, 32, 64), 4)]
# chain classes: steps, C_j, C_i, H, W
CHAIN = [(2, 24, 72, 256, 512), (3, 24, 144, 256, 512), (2, 40, 144, 128, 256), (3, 48, 384, 256, 512),
         (2, 96, 384, 128, 256), (2, 36, 144, 128, 256)]
CHAIN_DEFAULT = [(3, 24, 144, 256, 512), (2, 96, 384, 128, 256)]
# BasicBlock classes: C, H, W (w18's padded branches and w48's); the default run compiles the
# narrowest (VEC 8, BLOCK_N 32) and the widest w18 one (BLOCK_N 128: the largest accumulator)
BLOCK = [(24, 256, 512), (40, 128, 256), (72, 64, 128), (144, 32, 64), (48, 256, 512), (96, 128, 256),
         (192, 64, 128), (384, 32, 64)]
BLOCK_DEFAULT = [(24, 256, 512), (144, 32, 64)]
# epilogues: (residual, RELU_MODE); the default run compiles the most register-hungry one
EPIS = [(False, 0), (False, 1), (False, 2), (True, 0), (True, 1), (True, 2)] if FULL else [(True, 2)]


def conv_launch(cin, cout, k, s, h, w, dn, res, relu, split="auto"):
    # every launch of one call: the conv, and with split-K its reduce kernel
    dt = DT[dn]
    ho, wo = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
    before = len(launches)
    conv.SPLIT_K_MODE = split
    conv.conv2d_bias_act(nhwc(1, cin, h, w, dt), torch.empty(k * k * cin, cout, dtype=dt),
                         torch.empty(cout, dtype=dt), stride=s,
                         residual=nhwc(1, cout, ho, wo, dt) if res else None, relu=relu == 1,
                         relu_ranges=[(0, 4)] if relu == 2 else None)
    conv.SPLIT_K_MODE = "auto"
    new = launches[before:]
    del launches[before:]
    return new


def chain_launch(steps, cj, ci, h, w, dn, acc):
    dt = DT[dn]
    hf, wf = h, w
    for _ in range(steps):
        hf, wf = (hf + 1) // 2, (wf + 1) // 2
    ws = [torch.empty(9 * cj, cj if i < steps - 1 else ci, dtype=dt) for i in range(steps)]
    conv_chain.strided_chain(nhwc(1, cj, h, w, dt), ws, [torch.empty(t.shape[1], dtype=dt) for t in ws],
                             accumulate_into=nhwc(1, ci, hf, wf, dt) if acc else None)
    return launches.pop()


def block_launch(c, h, w, dn):
    dt = DT[dn]
    wp = torch.empty(9 * c, c, dtype=dt)
    basic_block.basic_block(nhwc(1, c, h, w, dt), wp, torch.empty(c, dtype=dt), wp,
                            torch.empty(c, dtype=dt))
    return launches.pop()


def tile_of(cfg):
    if "TH" in cfg.kwargs:
        return "%dx%d" % (cfg.kwargs["TH"], cfg.kwargs["TW"])
    return cfg.kwargs.get("T")


def jobs():
    out = {}

    def add(kind, label, launch):
        at, args, kwargs = launch
        if hasattr(at, "configs"):          # an autotuned kernel: every config
            fn, configs = at.fn, at.configs
        else:                               # a plain kernel (split-K's reduce): its launch options
            fn, configs = at, [triton.Config({}, num_warps=kwargs.pop("num_warps", 4), num_stages=1)]
            kind = "reduce"
        sig, cx, attrs = specialise(fn, args, kwargs)
        for cfg in configs:
            if cfg.kwargs.get("TILE_W") and not FULL and tuple(label[:6]) not in TILED_SM90:
                continue
            key = (kind, repr(sorted(sig.items())), repr(sorted(cx.items())), repr(sorted(attrs.items())),
                   repr(sorted(cfg.all_kwargs().items())))
            if key not in out:
                out[key] = (kind, [], sig, cx, attrs, cfg)
            out[key][1].append(label)
    for dn in ("fp16", "bf16", "fp32") if FULL else ("fp16",):
        for c in (CONV_FP32 if dn == "fp32" else CONV):
            for res, relu in EPIS:
                for launch in conv_launch(*c, dn, res, relu):
                    add("conv", [*c, dn, res, relu], launch)
        for c, split in (SPLIT if FULL else SPLIT[:1]):
            for res, relu in EPIS:
                for launch in conv_launch(*c, dn, res, relu, split):
                    add("conv", [*c, dn, res, relu, split], launch)
    for dn in ("fp16", "bf16") if FULL else ("fp16",):
        for c in CHAIN if FULL else CHAIN_DEFAULT:
            for acc in (False, True) if FULL else (True,):
                add("chain", [*c, dn, acc], chain_launch(*c, dn, acc))
        for c in BLOCK if FULL else BLOCK_DEFAULT:
            add("block", [*c, dn], block_launch(*c, dn))
    return list(out.values())


def compile_one(job):
    kind, labels, sig, cx, attrs, cfg = job
    fn = {"conv": conv._conv2d_bias_act_kernel, "chain": conv_chain._strided_chain_kernel,
          "block": basic_block._basic_block_kernel, "reduce": conv._split_k_reduce_kernel}[kind]
    sig, cx = dict(sig), dict(cx)
    for name, v in cfg.kwargs.items():
        sig[name] = "constexpr"
        cx[(fn.arg_names.index(name),)] = v
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.maxnreg is not None:
        opts["maxnreg"] = cfg.maxnreg
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs), target=TARGET,
                       options=opts)
    fd, path = tempfile.mkstemp(suffix=".cubin")
    with os.fdopen(fd, "wb") as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True,
                           text=True).stdout
    os.unlink(path)
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", usage, re.S)
    ptx = k.asm["ptx"]
    return {"kind": kind, "labels": labels,
            "config": [tile_of(cfg), cfg.kwargs.get("BLOCK_M"), cfg.kwargs.get("BLOCK_N"),
                       cfg.kwargs.get("BLOCK_K"), cfg.num_warps, cfg.num_stages,
                       cfg.kwargs.get("TILE_W", 0)],
            "regs": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(3)),
            "shared": k.metadata.shared,
            "cp16": len(re.findall(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], 0x10", ptx)),
            "ld16": len(re.findall(r"ld\.global[.\w]*\.v4\.b32", ptx)),
            "ld16_l2only": len(re.findall(r"ld\.global\.(?:cg|cs|cv|lu)[.\w]*\.v4\.b32", ptx)),
            "wgmma": len(re.findall(r"wgmma\.mma_async", ptx))}


if __name__ == "__main__":
    t0 = time.time()
    js = jobs()
    print("%d compiles" % len(js), file=sys.stderr, flush=True)
    if len(sys.argv) > 1 and sys.argv[1] == "--count":
        sys.exit(0)
    with mp.get_context("fork").Pool(int(os.environ.get("HRNET_SM90_PROCS", "2"))) as pool:
        rows = pool.map(compile_one, js, chunksize=1)
    print("compiled in %.1f s" % (time.time() - t0), file=sys.stderr)
    lists = {dn: [[None, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                   c.num_stages, c.kwargs["TILE_W"]] for c in conv.conv_configs(DT[dn])]
             for dn in ("fp16", "bf16", "fp32")}
    lists["chain"] = [[c.kwargs["T"], c.kwargs["BLOCK_M"], None, c.kwargs["BLOCK_K"], c.num_warps,
                       c.num_stages, 0] for c in conv_chain.chain_configs()]
    lists["block"] = [[tile_of(c), c.kwargs["BLOCK_M"], None, c.kwargs["BLOCK_K"], c.num_warps,
                       c.num_stages, 0] for c in basic_block.block_configs()]
    print("RESULT" + json.dumps({"rows": rows, "lists": lists}))
"""


@pytest.fixture(scope="module")
def sm90_build(tmp_path_factory):
    """Compile every autotune config of both kernels for sm_90 (Triton's bundled ptxas, no GPU) at the
    signatures Triton specialises at launch, captured from the real Python wrappers on representative
    HRNet problem classes (conv: stem, 64/256 widths, the zero-padded w18 branch widths 24/40/72/144,
    w48's 48, 1x1 and stride-2 convs, unpadded 18/36; chain: a 3-step 24 -> 144 and a 2-step 96 -> 384
    chain; the 2-D tiled configs on five classes, split-K and its reduce kernel on 144 -> 144 at
    32x64; the BasicBlock kernel on w18's 24- and 144-channel branches). Default: fp16 with the most
    register-hungry epilogue (bias + residual + ReLU mask /
    accumulate_into), 110 compiles in a 2-process pool, about 60 s on 2 idle cores.
    HRNET_SM90_FULL=1: also bf16 and fp32, every epilogue (residual on/off x RELU_MODE 0/1/2, chain
    accumulate on/off), four more chain classes, the tiled configs on every class and a second
    split class: 1878 compiles, about 25 minutes on 2 cores."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    spec = importlib.util.find_spec("triton")
    nvbin = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(nvbin, b)) for b in ("ptxas", "cuobjdump")):
        pytest.skip("Triton's NVIDIA backend (bundled ptxas / cuobjdump) is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))

    def compile_all():
        r = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], capture_output=True, text=True,
                           env=env, cwd=root, timeout=3600)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
        assert r.returncode == 0 and line, r.stderr[-3000:]
        return json.loads(line[0][len("RESULT"):])
    return once_per_session(tmp_path_factory, "sm90_build", compile_all)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run compiles the kernels for real")
def test_sm90_every_config_fits_without_spills(sm90_build):
    """Every (config, signature): no spills, no local memory, shared memory within an H100/H200 SM's
    227 KB, at most 255 registers; and every config of conv_configs() / chain_configs() was compiled."""
    rows = sm90_build["rows"]
    groups = {}
    for r in rows:
        group = r["labels"][0][6] if r["kind"] == "conv" else r["kind"]    # conv: by dtype
        groups.setdefault(group, set()).add(tuple(r["config"]))
    assert {"fp16", "chain", "block", "reduce"} <= set(groups), set(groups)
    for group, seen in groups.items():
        if group != "reduce":    # split-K's reduce kernel has no config list
            assert seen == {tuple(c) for c in sm90_build["lists"][group]}, (group, seen)
    assert any(len(lb) == 10 for r in rows if r["kind"] == "conv" for lb in r["labels"])  # split
    for r in sorted(rows, key=lambda r: (r["kind"], r["config"][1:], str(r["labels"]))):
        print(r["kind"], r["config"], "regs %(regs)d stack %(stack)d local %(local)d shared %(shared)d" % r,
              r["labels"][0], "(+%d)" % (len(r["labels"]) - 1))
    for r in rows:
        assert r["stack"] == 0 and r["local"] == 0, r
        assert r["shared"] <= 227 * 1024 and r["regs"] <= 255, r


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run compiles the kernels for real")
def test_sm90_thin_layers_use_16_byte_loads(sm90_build):
    """fp16 conv specialisations for Cin 24 / 40 / 48 (channels_last, pixel strides multiples of 8 but
    not of 16): every A-tile and weight-tile load is a 16-byte cp.async (LDGSTS.E.BYPASS.128), i.e. at
    least num_stages x (BLOCK_M*BLOCK_K + BLOCK_K*BLOCK_N) / (8 x threads) of them (the weight tile
    only where it gives each thread 8 elements or more); the committed kernel had none (2-byte
    scalar ld.global.b16 without cp.async). The 2-D tiled configs (num_stages 1) read the A tile with
    at least BLOCK_M*BLOCK_K / (8 x threads) 16-byte ld.global, none of them L2-only (.cg/.cs/.cv/.lu),
    so its taps can hit L1, into Hopper's wgmma. The chain and the block kernel read their 24-channel input with 16-byte
    copies."""
    thin = [r for r in sm90_build["rows"] if r["kind"] == "conv"
            and any(lb[0] in (24, 40, 48) and lb[6] == "fp16" for lb in r["labels"])]
    cins = {lb[0] for r in thin for lb in r["labels"]}
    assert {24, 40, 48} <= cins, cins
    assert any(r["config"][6] for r in thin) and any(not r["config"][6] for r in thin)
    for r in thin:
        _, bm, bn, bk, warps, stages, tile_w = r["config"]
        threads = 32 * warps
        per_stage = bm * bk + (bk * bn if bk * bn >= 8 * threads else 0)
        if tile_w:
            # the 2-D tiled configs: plain 16-byte loads that allocate in L1 (no .cg), no cp.async
            assert stages == 1 and r["cp16"] == 0 and r["ld16_l2only"] == 0, r
            assert r["ld16"] >= bm * bk // (8 * threads) and r["wgmma"] > 0, r    # Hopper MMAs
            continue
        assert r["cp16"] >= stages * per_stage // (8 * threads), r
        if r["labels"][0][7]:
            assert r["ld16"] > 0, r    # the residual tile: 16-byte ld.global.v4
    chain = [r for r in sm90_build["rows"] if r["kind"] == "chain" and r["labels"][0][1] == 24]
    assert chain and all(r["cp16"] > 0 for r in chain)
    block = [r for r in sm90_build["rows"] if r["kind"] == "block" and r["labels"][0][0] == 24]
    assert block and all(r["cp16"] > 0 for r in block)


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
    # zero-padded w18 branch widths (VEC 8 paths)
    (24, 24, 3, 1, 256, 512), (40, 40, 3, 1, 128, 256), (72, 72, 3, 1, 64, 128), (144, 144, 3, 1, 32, 64),
    (24, 40, 3, 2, 256, 512), (40, 24, 1, 1, 128, 256),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", GPU_CONV_SHAPES, ids=lambda s: "c%d-%d_k%d_s%d_%dx%d" % s)
def test_conv_gpu_full_shapes(shape, dtype):
    _gpu_full_shape_check(shape, dtype)


# batch 2; odd sizes leave partial tiles at the bottom and right edges
GPU_TILED_SHAPES = [(24, 24, 3, 1, 256, 512), (18, 18, 3, 1, 255, 517), (48, 48, 3, 1, 256, 512),
                    (72, 72, 3, 1, 63, 131), (24, 40, 3, 2, 257, 515)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_TILED_SHAPES, ids=lambda s: "c%d-%d_k%d_s%d_%dx%d" % s)
def test_conv_gpu_tiled_configs(shape, dtype, monkeypatch):
    """Every 2-D tiled config that the thin layer's list keeps, each forced alone (so no autotuning),
    compiled for the card: LDG-fed tiles at full HRNet sizes, edge tiles included."""
    cin, cout, k = shape[:3]
    vec = kconv.vec_factor(cin, ())
    tiled = [c for c in kconv._prune_configs(kconv.gpu_configs(dtype), cin, cout, k, vec)
             if c.kwargs["TILE_W"]]
    assert tiled
    for cfg in tiled:
        monkeypatch.setattr(kconv, "conv_configs", lambda dtype=None, cfg=cfg: [cfg])
        _gpu_full_shape_check(shape, dtype, batch=2)


GPU_SPLIT_CASES = [((144, 144, 3, 1, 32, 64), "auto"), ((384, 384, 3, 1, 32, 64), "auto"),
                   ((72, 72, 3, 1, 63, 131), 3), ((192, 192, 3, 1, 64, 128), 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_SPLIT_CASES, ids=lambda c: "c%d-%d_k%d_s%d_%dx%d" % c[0] + f"_{c[1]}")
def test_conv_gpu_split_k(case, dtype, monkeypatch):
    """Split-K at full low-resolution sizes (the first config only: no autotuning): within the
    bounds, the same bits on a second call and in a CUDA-graph replay (the partials' workspace is
    allocated inside the capture), and "auto" splits these two on an H100/H200 (132 SMs)."""
    shape, split = case
    monkeypatch.setenv("HRNET_FAST_CONV_AUTOTUNE", "0")
    monkeypatch.setattr(kconv, "SPLIT_K_MODE", split)
    cin, cout, k, stride, h, w_ = shape
    if split == "auto":
        assert kconv._split_k(h * w_, cout, k * k * cin, torch.device("cuda")) > 1
    _gpu_full_shape_check(shape, dtype, batch=2)
    dev = torch.device("cuda")
    x = torch.randn(2, cin, h, w_, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    wp = kconv.pack_weight(torch.randn(cout, cin, k, k, device=dev).to(dtype) / (9 * cin) ** 0.5)
    b = torch.randn(cout, device=dev)
    eager = kconv.conv2d_bias_act(x, wp, b)
    assert torch.equal(kconv.conv2d_bias_act(x, wp, b), eager)
    assert_graph_replay_equal(lambda t: kconv.conv2d_bias_act(t, wp, b), x)


def _gpu_full_shape_check(shape, dtype, batch=1):
    cin, cout, k, stride, h, w_ = shape
    dev = torch.device("cuda")
    w, b = _make_conv(cin, cout, k, seed=1)
    x = torch.randn(batch, cin, h, w_, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    wl = w.to(dev, dtype)
    pad = k // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (w_ + 2 * pad - k) // stride + 1
    res = (torch.randn(batch, cout, ho, wo, device=dev).to(dtype)
           .contiguous(memory_format=torch.channels_last))
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
                                  (3, 18, 144, 256, 512), (2, 36, 144, 128, 256),
                                  (2, 24, 72, 256, 512), (3, 24, 144, 256, 512), (2, 40, 144, 128, 256)],
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
