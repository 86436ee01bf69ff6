"""The bfloat16 AMX conv kernel (csrc/cpu_conv_amx.cpp, hrnet_fast/cpu_ext.py: conv_amx) and its
use by the torch backend's bfloat16 engine (TorchCPU.conv in hrnet_fast/backends/torch_cpu.py).

The kernel needs AMX-BF16 (Intel Xeon from Sapphire Rapids on) and the JIT build. Where either is
missing, every kernel test is skipped with the reason: the kernel is then NOT tested. The
routing tests at the end run everywhere.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from helpers import poisoned_malloc, randomize_bn, require_cpu_kernels
from oracles import assert_close_to_oracle, assert_model_close, conv_oracle

from hrnet_fast import HRNet, HRNetConfig, cpu_ext, optimize
from hrnet_fast.backends import torch_cpu
from hrnet_fast.plan import ConvSpec
from hrnet_fast.reference import HighResolutionNet

CL = torch.channels_last
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def built():
    require_cpu_kernels("the AMX conv", avx=False)
    if not cpu_ext.amx_conv_supported():
        pytest.skip("this CPU or OS offers no AMX-BF16 tiles: the AMX conv is NOT tested")


def _tensor(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(BF16).contiguous(memory_format=CL)


def _weights(ci, co, seed, bias=True, k=3):
    g = torch.Generator().manual_seed(1000 + seed)
    w = (torch.randn(co, ci, k, k, generator=g) / (k * ci ** 0.5)).to(BF16)
    return w, (torch.randn(co, generator=g) if bias else None)


def _run(x, w, b, residual=None, relu=True, stride=1, ranges=None):
    return cpu_ext.conv_amx_cpu(x, cpu_ext.conv_amx_pack(w), b, residual, relu=relu,
                                   weight_size=w.shape[:2], stride=stride, relu_ranges=ranges)


def _oracles(x, w, b, residual, relu, stride=1, ranges=None):
    """(float64 oracle, the same conv in bfloat16 through torch): the design's bf16 yardstick."""
    pad = w.shape[-1] // 2
    oracle = conv_oracle(x.double(), w.double(), None if b is None else b.double(), stride, pad,
                         None if residual is None else residual.double(), relu, ranges)
    same = conv_oracle(x, w, None if b is None else b.to(BF16), stride, pad, residual, relu, ranges)
    return oracle, same


# (N, Ci, Co, H, W): w18's widths and the kernel's cases: K = 3 Ci with a tail tile (18: 54 = 32 +
# 22; 36: 108 = 3 x 32 + 12) and without (64: 192), one and several 16-channel N tiles and a
# partial one (18 = 16 + 2, 40, 64 = four tiles), 2 input channels (K = 6); widths of 1 to 17
# pixels (edge blocks only, staged), 33 and 47 (interior blocks and a partial last block),
# multiples of 16 as in the model (the last full block reads up to the row's last pixel, never
# past it), one row, batch 2, 256 -> 18 (w18's transition). Above 64 outputs (the 2 x 2 order):
# 72 (five N tiles: two pairs and a single one; K tail 24), 144 (nine; tail 16), 80 from 64 (no
# K tail, a partial N tile in the last pair), 96 from 2 (K = 6, all tail), widths giving a
# single last block (35 = 2 x 16 + 3, 20, 16: one interior-free block), odd and even block counts.
# The N-major order's dense epilogue (16 to 64 outputs, tiles stored at a row stride of Co): 16
# (its lower edge: no columns past Co), 33 (a last tile holding one channel, 15 columns landing on
# the next pixel), and 18, 36, 40 and 64 above. w48's widths: 192 and 384 (K = 1152, 36 K tiles).
SHAPES = [(2, 18, 18, 13, 47), (1, 36, 36, 9, 33), (1, 64, 64, 6, 40), (1, 72, 72, 5, 35),
          (2, 2, 5, 3, 1), (1, 18, 40, 1, 17), (1, 256, 18, 4, 38), (1, 144, 144, 3, 20),
          (2, 18, 18, 5, 32), (1, 36, 36, 4, 64), (2, 72, 72, 4, 64), (1, 64, 80, 3, 49),
          (1, 2, 96, 2, 16), (1, 144, 144, 4, 48), (1, 72, 70, 1, 1), (1, 16, 16, 3, 21),
          (2, 18, 33, 2, 18), (1, 192, 192, 3, 33), (1, 384, 384, 2, 20)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle(built, shape):
    """ReLU on and off, with and without bias and residual, against float64, within the design's
    bf16 bound (2x the same conv's error in bf16 through torch); the output allocation poisoned."""
    n, ci, co, h, w = shape
    for k, (with_res, relu, with_bias) in enumerate([(True, True, True), (False, True, False),
                                                     (True, False, True), (False, False, True)]):
        x = _tensor((n, ci, h, w), seed=k)
        res = _tensor((n, co, h, w), seed=100 + k) if with_res else None
        wt, b = _weights(ci, co, k, with_bias)
        with poisoned_malloc():
            out = _run(x, wt, b, res, relu)
        assert out.dtype == BF16 and out.is_contiguous(memory_format=CL)
        oracle, same = _oracles(x, wt, b, res, relu)
        assert_close_to_oracle(out, oracle, same, dtype=BF16,
                               what=f"{shape} residual={with_res} relu={relu} bias={with_bias}")


# Stride 2 (N, Ci, Co, H, W): w18's transition and fuse-step convs, batched as the plan batches
# them (18 -> 36 + 72 + 144 at one input, 36 -> 72 + 144 ...): 18 -> 36 and 54, 36 -> 108 (2 x 2
# order), 18 -> 144, 256 -> 36 (K = 768), layer1's stem 64 -> 64; odd and even sizes; widths with
# interior blocks (an output block is interior from input width 64 on: pixels 2 x0 - 1 to 2 x0 +
# 31), an output width of 1, and output widths ending on a partial block.
STRIDE2_SHAPES = [(2, 18, 36, 9, 67), (1, 18, 54, 7, 96), (1, 36, 108, 5, 130), (1, 18, 144, 4, 65),
                  (1, 256, 36, 3, 70), (1, 64, 64, 4, 101), (1, 36, 72, 2, 2), (1, 18, 18, 1, 33)]


@pytest.mark.parametrize("shape", STRIDE2_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_stride2_matches_oracle(built, shape):
    """Stride 2, ReLU on all, none, or some channel ranges (the batched convs' branches), with and
    without bias and residual, against float64 within the bf16 bound; the output poisoned."""
    n, ci, co, h, w = shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    third = max(1, co // 3)
    for k, (with_res, relu, ranges) in enumerate([(False, True, None), (False, False, None),
                                                  (True, True, None),
                                                  (False, True, ((0, third), (2 * third, co)))]):
        x = _tensor((n, ci, h, w), seed=20 + k)
        res = _tensor((n, co, ho, wo), seed=120 + k) if with_res else None
        wt, b = _weights(ci, co, 20 + k, bias=k != 1)
        with poisoned_malloc():
            out = _run(x, wt, b, res, relu, stride=2, ranges=ranges)
        assert out.shape == (n, co, ho, wo) and out.is_contiguous(memory_format=CL)
        oracle, same = _oracles(x, wt, b, res, relu, 2, ranges)
        assert_close_to_oracle(out, oracle, same, dtype=BF16,
                               what=f"{shape} stride 2 residual={with_res} relu={relu} "
                                    f"ranges={ranges}")


# 1x1 (N, Ci, Co, H, W, stride): w18's fuse-step convs (36 -> 18, 72 -> 54, 144 -> 126), layer1's
# 256 -> 64 and 64 -> 64, the 2 x 2 order (126 outputs), K tails (36: 32 + 4; 270: 8 x 32 + 14;
# 2: all tail), odd widths (partial last blocks, staged), stride 2.
ONE_BY_ONE_SHAPES = [(1, 36, 18, 9, 33, 1), (2, 64, 64, 5, 40, 1), (1, 256, 64, 3, 37, 1),
                     (1, 144, 126, 3, 16, 1), (1, 72, 54, 4, 21, 1), (1, 270, 19, 3, 20, 1),
                     (1, 2, 20, 2, 7, 1), (2, 18, 36, 5, 35, 2), (1, 36, 80, 4, 67, 2),
                     (1, 384, 336, 3, 17, 1)]


@pytest.mark.parametrize("shape", ONE_BY_ONE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_one_by_one_matches_oracle(built, shape):
    """1x1 convs: ReLU on all, none or some channels, with and without bias and residual, against
    float64 within the bf16 bound; the output poisoned."""
    n, ci, co, h, w, stride = shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    for k, (with_res, relu, ranges) in enumerate([(False, False, None), (True, True, None),
                                                  (False, True, ((1, co // 2),))]):
        x = _tensor((n, ci, h, w), seed=40 + k)
        res = _tensor((n, co, ho, wo), seed=140 + k) if with_res else None
        wt, b = _weights(ci, co, 40 + k, bias=k != 2, k=1)
        with poisoned_malloc():
            out = _run(x, wt, b, res, relu, stride=stride, ranges=ranges)
        assert out.shape == (n, co, ho, wo) and out.is_contiguous(memory_format=CL)
        oracle, same = _oracles(x, wt, b, res, relu, stride, ranges)
        assert_close_to_oracle(out, oracle, same, dtype=BF16,
                               what=f"{shape} 1x1 residual={with_res} relu={relu} ranges={ranges}")


@pytest.mark.parametrize("ci,co", [(36, 18), (144, 126)], ids=["n-major", "2x2"])
def test_one_by_one_nan_stays_at_its_pixel(built, ci, co):
    """A 1x1 tile row is one pixel's Ci values: a NaN input makes exactly its own output pixel NaN
    (every channel), at the row's first and last pixels, in a partial last block, and next to a
    pixel whose values sit right before it in memory."""
    x = _tensor((1, ci, 4, 37), seed=50)
    for y, col in ((0, 0), (1, 36), (2, 17), (3, 33), (2, 18)):
        x[0, [0, ci - 1], y, col] = float("nan")
    wt, b = _weights(ci, co, 50, k=1)
    expected = torch.isnan(_oracles(x, wt, b, None, True)[0])
    assert int(expected.sum()) == co * 5
    assert torch.equal(torch.isnan(_run(x, wt, b, None, True)), expected)


@pytest.mark.parametrize("ci,co,stride", [(18, 18, 1), (72, 72, 1), (18, 54, 2), (36, 108, 2)],
                         ids=["n-major", "2x2", "n-major-s2", "2x2-s2"])
def test_nan_reaches_exactly_its_window(built, ci, co, stride):
    """A tile row reads 3 Ci consecutive values of a channels_last row and never past its window:
    a NaN input pixel makes exactly its 3x3 neighbourhood NaN in every output channel (through the
    ReLU), at an interior block, at the image's edges (staged blocks) and across a block boundary;
    a NaN in the residual stays where it is. Both tile orders (18 outputs: N-major; 72: 2 x 2,
    whose K tails are staged per block)."""
    width = 48 * stride  # stride 2: interior output blocks too
    x = _tensor((1, ci, 7, width), seed=4)
    last = width - 1
    # (4, 0) follows (3, last) in memory; with stride 2 also odd columns (in two output windows)
    # and interior blocks' first and last input pixels (63, 64: output blocks from 32)
    extra = ((5, 70), (1, 33), (2, 63), (6, 64)) if stride == 2 else ()
    for y, col in ((3, 20), (0, 0), (6, last), (2, 16), (4, 0)) + extra:
        x[0, [0, 5, ci - 1], y, col] = float("nan")  # a pixel's first and last values too
    ho, wo = (7 - 1) // stride + 1, (width - 1) // stride + 1
    res = _tensor((1, co, ho, wo), seed=5)
    res[0, 2, 5 // stride, 33] = float("nan")
    wt, b = _weights(ci, co, 6)
    expected = torch.isnan(_oracles(x, wt, b, res, True, stride)[0])
    if stride == 1:
        assert int(expected.sum()) == co * (9 + 4 + 4 + 9 + 6) + 1
    assert int(expected.sum()) > co * 7
    assert torch.equal(torch.isnan(_run(x, wt, b, res, True, stride)), expected)


def test_opcheck(built):
    """Schema, fake kernels and dispatch agree with the real kernels."""
    x = _tensor((2, 18, 5, 21), seed=7)
    wt, b = _weights(18, 18, 7)
    res = _tensor((2, 18, 5, 21), seed=8)
    ops = torch.ops.hrnet_fast_cpu
    torch.library.opcheck(ops.conv_amx_pack.default, (wt,))
    packed = cpu_ext.conv_amx_pack(wt)
    torch.library.opcheck(ops.conv_amx.default, (x, packed, [18, 18], b, res, True))
    torch.library.opcheck(ops.conv_amx.default, (x, packed, [18, 18], None, None, False))
    torch.library.opcheck(ops.conv_amx_into.default, (res.clone(), x, packed, [18, 18], b, True))


@pytest.mark.parametrize("ci,co,k,stride", [(18, 18, 3, 1), (72, 72, 3, 1), (36, 18, 1, 1),
                                         (18, 36, 3, 2), (144, 126, 1, 1)])
def test_into_residual_equals_a_new_tensor(built, ci, co, k, stride):
    """conv_amx_into writes the result over the residual: the same values, bit for bit, as the
    new-tensor op (both orders, 1x1, stride 2, partial blocks), and the residual object back."""
    x = _tensor((2, ci, 5, 37), seed=60)
    ho, wo = (5 - 1) // stride + 1, (37 - 1) // stride + 1
    res = _tensor((2, co, ho, wo), seed=61)
    wt, b = _weights(ci, co, 60, k=k)
    want = _run(x, wt, b, res, True, stride)
    got = cpu_ext.conv_amx_cpu(x, cpu_ext.conv_amx_pack(wt), b, res, relu=True,
                               weight_size=wt.shape[:2], stride=stride, into_residual=True)
    assert got is res and torch.equal(got, want)


def test_into_residual_refuses_memory_shared_with_x(built):
    """x is read throughout while the residual is written: one tensor as both is refused."""
    x = _tensor((1, 18, 5, 20), seed=62)
    wt, b = _weights(18, 18, 62)
    before = x.clone()
    with pytest.raises(RuntimeError, match="must not share memory with x"):
        cpu_ext.conv_amx_cpu(x, cpu_ext.conv_amx_pack(wt), b, x, relu=True,
                             weight_size=wt.shape[:2], into_residual=True)
    assert torch.equal(x, before)


@pytest.mark.parametrize("bad,match", [
    ("dtype", "x must be a dense channels_last bfloat16"),
    ("nchw", "x must be a dense channels_last bfloat16"),
    ("weight", "the packed weight takes 16 input channels, x has 18"),
    ("odd", "Ci even"),
    ("bias", "bias must be a CPU tensor \\[18\\]"),
    ("residual", "residual must be a dense channels_last bfloat16 tensor \\[1, 18, 6, 7\\]"),
])
def test_bad_input_gets_one_clear_error(built, bad, match):
    x = _tensor((1, 18, 6, 7), seed=9)
    wt, b = _weights(18, 18, 9)
    res = None
    if bad == "dtype":
        x = x.float().contiguous(memory_format=CL)
    elif bad == "nchw":
        x = x.contiguous()
    elif bad == "weight":
        wt = wt[:, :16]
    elif bad == "odd":
        wt = wt[:, :17]
    elif bad == "bias":
        b = b[:5]
    else:
        res = _tensor((1, 18, 6, 8), seed=10)
    with pytest.raises(RuntimeError, match=match):
        _run(x, wt, b, res)


# ------------------------------------------------------------------------- the torch backend
@pytest.fixture
def amx_calls(built, monkeypatch):
    """Every call of the AMX kernel: (input channels, output N tiles, stride, ReLU ranges, kernel
    size)."""
    calls = []
    real = cpu_ext.conv_amx_cpu
    monkeypatch.setitem(torch_cpu._AMX, "on", True)

    def spy(x, packed, *args, **kwargs):
        calls.append((x.shape[1], packed.shape[1], kwargs.get("stride", 1),
                      kwargs.get("relu_ranges"), packed.shape[0], kwargs.get("into_residual")))
        return real(x, packed, *args, **kwargs)

    monkeypatch.setattr(cpu_ext, "conv_amx_cpu", spy)
    return calls


def _model(preset, mode="bilinear", seed=0):
    torch.manual_seed(seed)
    return randomize_bn(HRNet(HRNetConfig.preset(preset, upsample=mode), fast=False), seed).eval()


@pytest.mark.parametrize("preset,mode,size", [("w18_small_v2", "bilinear", (2, 3, 75, 101)),
                                              ("w18_small_v2", "nearest", (1, 3, 64, 96))])
def test_bf16_engine_matches_the_reference(amx_calls, preset, mode, size):
    """The bf16 engine with its thin 3x3 convs on AMX tiles, against the float64 reference, within
    2x the reference's own bf16 error: odd sizes, batch 2, both upsampling modes."""
    model = _model(preset, mode)
    x = torch.randn(*size, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        out = optimize(model, backend="torch", dtype=BF16)(x.to(BF16))
        ref64 = HighResolutionNet.forward(model.double(), x.double())
        same = HighResolutionNet.forward(model.to(BF16), x.to(BF16))
    assert out.dtype == BF16
    assert_model_close(out, ref64, same, dtype=BF16, what=f"{preset} {mode} {size} bf16")
    # every branch width (18/36: N-major order, 72/144: 2 x 2) and layer1's 64-channel 3x3s;
    # stride 2: the stem's 64 -> 64, the transitions and the fuse step's batched convs, some with
    # a ReLU on part of their channels
    calls = {c[:3] for c in amx_calls}
    assert {(18, 2, 1), (36, 3, 1), (64, 4, 1), (72, 5, 1), (144, 9, 1)} <= calls, calls
    # the residual blocks' second convs write over the block's input
    assert {c[0] for c in amx_calls if c[5]} >= {18, 36, 72, 144}, amx_calls
    assert {(64, 4, 2), (18, 4, 2)} <= calls, calls  # 18 -> 18 + 36 (the fuse's chains)
    assert any(c[2] == 2 and c[3] for c in amx_calls), amx_calls
    # 1x1: the fuse step's upsampling convs (36 -> 18: two N tiles), layer1's 256 -> 64 (four)
    ones = {(c[0], c[1]) for c in amx_calls if c[4] == 1}
    assert {(36, 2), (256, 4)} <= ones, ones


@pytest.mark.parametrize("preset,head,size", [("w18_small_v2", "classification", (2, 3, 64, 80)),
                                              ("w18_small_v2", "pose", (2, 3, 64, 48)),
                                              ("w18_small_v2", "features", (1, 3, 45, 61)),
                                              ("w48", "seg", (1, 3, 64, 96))])
def test_bf16_engine_heads_and_wide_layers(amx_calls, preset, head, size):
    """The other heads (classification's incre/downsample convs, 1x1 and stride 2, at many widths;
    pose; the features backbone) and w48's widths (192 and 384 channels on the kernel's 2 x 2
    order, the fuse step's wide 1x1s at low resolution) against the float64 reference, within 2x
    the reference's own bf16 error."""
    torch.manual_seed(1)
    model = randomize_bn(HRNet(HRNetConfig.preset(preset, head=head), fast=False), 1).eval()
    x = torch.randn(*size, generator=torch.Generator().manual_seed(12))
    with torch.inference_mode():
        out = optimize(model, backend="torch", dtype=BF16)(x.to(BF16))
        ref64 = HighResolutionNet.forward(model.double(), x.double())
        same = HighResolutionNet.forward(model.to(BF16), x.to(BF16))
    if head != "features":  # the backbone's outputs: one tensor per branch
        out, ref64, same = [out], [ref64], [same]
    assert len(out) == len(ref64)
    for i, (o, r, m) in enumerate(zip(out, ref64, same)):
        assert_model_close(o, r, m, dtype=BF16, what=f"{preset} {head} {size} bf16 output {i}")
    kinds = {(c[4], c[2]) for c in amx_calls}  # (kernel size, stride)
    assert {(3, 1), (3, 2), (1, 1)} <= kinds, kinds
    if preset == "w48":
        widths = {c[1] for c in amx_calls if c[4] == 3}
        assert {12, 24} <= widths, widths  # 192 and 384 outputs: 12 and 24 N tiles


def test_a_channel_slice_takes_the_kernel(amx_calls):
    """The second conv of the fuse step's stride-2 chains reads a channel slice of the batched
    first conv's output (not dense): the backend copies it dense for the kernel, and the result
    is the slice's convolution."""
    be = torch_cpu.TorchCPU(None, torch.device("cpu"), BF16)
    whole = _tensor((1, 54, 9, 70), seed=30)
    x = whole[:, 18:36]
    wt, b = _weights(18, 72, 30)
    spec = ConvSpec(wt, b.to(BF16), 2, 1, True)
    with torch.inference_mode():
        out = be.conv(x, spec)
    assert amx_calls and amx_calls[-1][:3] == (18, 5, 2), amx_calls
    oracle, same = _oracles(x.contiguous(memory_format=CL), wt, b.to(BF16), None, True, 2)
    assert_close_to_oracle(out, oracle, same, dtype=BF16, what="channel slice, stride 2")


def test_a_failing_kernel_warns_once_and_onednn_answers(amx_calls, monkeypatch):
    """The kernel raising: one RuntimeWarning, the kernel off for the process, the model's values
    still within the bound."""
    monkeypatch.setattr(torch_cpu, "_WARNED", set())
    model = _model("w18_small_v2")
    x = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(13))
    with torch.inference_mode():
        ref64 = HighResolutionNet.forward(model.double(), x.double())
        same = HighResolutionNet.forward(model.to(BF16), x.to(BF16))

    def failing(*args, **kwargs):
        amx_calls.append("failed")
        raise RuntimeError("planted failure")

    monkeypatch.setattr(cpu_ext, "conv_amx_cpu", failing)
    engine = optimize(model, backend="torch", dtype=BF16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with torch.inference_mode():
                out = engine(x.to(BF16))
            assert_model_close(out, ref64, same, dtype=BF16, what="after the failure")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "planted failure" in messages[0] and "switched off" in messages[0]
    assert torch_cpu._AMX["on"] is False and amx_calls == ["failed"]


@pytest.mark.parametrize("ci,co,fits", [(18, 18, True), (36, 36, True), (64, 64, True),
                                        (256, 18, True), (72, 72, True), (144, 144, True),
                                        (192, 192, True), (384, 384, True), (512, 512, False),
                                        (17, 18, False), (514, 18, False)])
def test_the_width_rule(ci, co, fits):
    """3x3 convs with padding 1, stride 1 or 2, an even input width of at most AMX_MAX_IN and at
    most 384 outputs: the measured wins (18 to 384 outputs, 256 -> 18 and 36), not 512 (level with
    oneDNN); 1x1 convs without padding of any width (their size rule is separate); a partial ReLU
    is the kernel's too; stride 3, other paddings and 5x5 are not."""
    for stride in (1, 2):
        spec = ConvSpec(torch.zeros(co, ci, 3, 3), None, stride, 1, True)
        assert torch_cpu.amx_spec_fits(spec) is fits
        one = ConvSpec(torch.zeros(co, ci, 1, 1), None, stride, 0, True)
        assert torch_cpu.amx_spec_fits(one) is (ci % 2 == 0 and ci <= 512)
    partial = ConvSpec(torch.zeros(co, ci, 3, 3), None, 2, 1, False, relu_ranges=((0, 1),))
    assert torch_cpu.amx_spec_fits(partial) is fits
    assert not torch_cpu.amx_spec_fits(ConvSpec(torch.zeros(co, ci, 3, 3), None, 3, 1, True))
    assert not torch_cpu.amx_spec_fits(ConvSpec(torch.zeros(co, ci, 3, 3), None, 1, 0, True))
    assert not torch_cpu.amx_spec_fits(ConvSpec(torch.zeros(co, ci, 1, 1), None, 1, 1, True))
    assert not torch_cpu.amx_spec_fits(ConvSpec(torch.zeros(co, ci, 5, 5), None, 1, 2, True))


@pytest.mark.parametrize("co,n,h,w,stride,fits", [
    (144, 1, 128, 256, 1, True),    # up to 144 outputs: any size
    (270, 1, 16, 32, 1, True),      # the fuse step's wide 1x1 at a low resolution (138k values)
    (336, 2, 16, 32, 1, True),      # 344k values
    (270, 1, 128, 256, 1, False),   # the head's 126 -> 270 at 128x256: 8.8M values, oneDNN wins
    (256, 1, 128, 256, 1, False),   # layer1's 64 -> 256
    (256, 1, 128, 256, 2, False),   # 64x128 outputs x 256: 2.1M values
    (256, 1, 64, 64, 1, True),      # exactly 2^20 values
    (256, 1, 64, 65, 1, False),     # one column more
    (256, 1, 127, 127, 2, True),    # stride 2: 64 x 64 outputs
])
def test_the_wide_1x1_size_rule(co, n, h, w, stride, fits):
    """1x1 convs above 144 outputs take the kernel only for outputs of at most 2^20 values."""
    spec = ConvSpec(torch.zeros(co, 64, 1, 1), None, stride, 0, True)
    x = torch.zeros(n, 64, h, w)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    assert co <= 144 or (n * ho * wo * co <= 1 << 20) is fits  # the case list itself
    assert torch_cpu.amx_size_fits(x, spec) is fits
    assert torch_cpu.amx_size_fits(x, ConvSpec(torch.zeros(co, 64, 3, 3), None, stride, 1, True))


def test_float32_and_autograd_never_take_the_kernel(monkeypatch):
    """float32 inputs and inputs that need gradients stay off the kernel (no build needed to know)."""
    monkeypatch.setattr(cpu_ext, "amx_conv_supported", lambda: True)
    w = torch.zeros(18, 18, 3, 3)
    assert not torch_cpu.amx_input_fits(torch.zeros(1, 18, 4, 4).contiguous(memory_format=CL), w)
    x = torch.zeros(1, 18, 4, 4, dtype=BF16).contiguous(memory_format=CL)
    assert torch_cpu.amx_input_fits(x, w.to(BF16))
    assert not torch_cpu.amx_input_fits(x, w.to(BF16).requires_grad_(True))
    assert not torch_cpu.amx_input_fits(x.contiguous(), w.to(BF16))
