"""The CPU thin-layer conv kernel (csrc/cpu_conv_thin.cpp, hrnet_fast/cpu_ext.py: conv3x3_thin and
conv3x3_thin_into) and its use by the torch backend on the CPU (TorchCPU.conv, conv_into_residual
and the planar block chain TorchCPU.blocks in hrnet_fast/backends/torch_cpu.py).

The kernel needs AVX-512 or AVX2 (its two variants; the tests run the one torch's CPU capability
picks) and the JIT build (shared with the CPU fuse kernel). Where either is missing, every kernel
test is skipped with the reason: the kernel is then NOT tested.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from helpers import (bn_model, failing_from_call, planted_failure_messages, poisoned_malloc,
                     randomize_bn, require_cpu_kernels, spy_calls, torch_threads)
from oracles import assert_close_to_oracle, assert_model_close, conv_oracle

from hrnet_fast import HRNet, HRNetConfig, cpu_ext, optimize
from hrnet_fast.backends import torch_cpu
from hrnet_fast.reference import HighResolutionNet

CL = torch.channels_last
# Dense channels_last and NCHW, channel slices of either, and every other column of NCHW (neither
# channel nor pixel stride 1: the gather paths).
LAYOUTS = ["cl", "nchw", "cl_slice", "nchw_slice", "nchw_cols"]


ALGORITHMS = ["direct", "winograd"]


@pytest.fixture(scope="module")
def built():
    require_cpu_kernels("the thin conv kernel")


@pytest.fixture(params=ALGORITHMS)
def kernel(built, request):
    """The kernel with one algorithm: ``kernel(x, weight, bias, residual, **kw)``, packing the
    weight for it first."""
    winograd = request.param == "winograd"

    def run(x, weight, bias, residual=None, **kwargs):
        packed = cpu_ext.conv3x3_thin_pack(weight, winograd=winograd)
        return cpu_ext.conv3x3_thin_cpu(x, packed, bias, residual, **kwargs)
    return run


def _tensor(shape, layout, seed):
    """A random [N, C, H, W] float32 tensor: dense channels_last or NCHW, a channel slice of a
    wider tensor in either layout, or every other column of a wider NCHW tensor."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if layout == "nchw_cols":
        return torch.randn(n, c, h, 2 * w, generator=g)[..., ::2]
    if layout.endswith("slice"):
        wide = torch.randn(n, c + 7, h, w, generator=g)
        wide = wide.contiguous(memory_format=CL) if layout.startswith("cl") else wide
        return wide[:, 3:3 + c]
    t = torch.randn(n, c, h, w, generator=g)
    return t.contiguous(memory_format=CL) if layout == "cl" else t


def _weights(ci, co, seed, bias=True):
    g = torch.Generator().manual_seed(1000 + seed)
    w = torch.randn(co, ci, 3, 3, generator=g) / (3 * ci ** 0.5)
    return w, (torch.randn(co, generator=g) if bias else None)


def _oracle(x, w, b, residual, relu):
    return conv_oracle(x.double(), w.double(), None if b is None else b.double(), 1, 1,
                       None if residual is None else residual.double(), relu)


# (N, Ci, Co, H, W): w18's widths (a 6-channel register tile: 18 = 3 tiles, 40 = 6 tiles + 4),
# widths below a tile, widths of 1; odd sizes (odd rows: Winograd's last row pair is half used),
# widths below one 16-pixel vector, one over a 64-pixel tile (Winograd: 64 + 32 + 16-tile blocks
# at 223 columns), a single pixel; batch 2; 45 columns (23 tiles: blocks of 16 and 8, partly used)
# with a channel remainder.
SHAPES = [(2, 18, 18, 33, 71), (1, 36, 36, 7, 79), (2, 5, 7, 3, 2), (1, 18, 40, 1, 1),
          (1, 72, 72, 10, 64), (2, 1, 1, 9, 17), (1, 3, 18, 16, 15), (1, 8, 12, 5, 223),
          (2, 20, 26, 11, 45)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle_in_every_layout(kernel, shape):
    """Every input, residual and output layout (channels_last, NCHW, channel slices of either),
    ReLU on and off, with and without bias and residual, against float64; the output allocation
    poisoned; on torch's threads."""
    n, ci, co, h, w = shape
    for k, (xl, rl, out_cl) in enumerate(itertools.product(LAYOUTS, ["none"] + LAYOUTS,
                                                           [True, False])):
        x = _tensor((n, ci, h, w), xl, seed=k)
        res = None if rl == "none" else _tensor((n, co, h, w), rl, seed=100 + k)
        relu, with_bias = k % 2 == 0, k % 3 != 0
        wt, b = _weights(ci, co, k, with_bias)
        with poisoned_malloc():
            out = kernel(x, wt, b, res, relu=relu, channels_last=out_cl)
        assert out.is_contiguous(memory_format=CL if out_cl else torch.contiguous_format)
        assert_close_to_oracle(out, _oracle(x, wt, b, res, relu), dtype=torch.float32,
                               what=f"{shape} x {xl} residual {rl} out_cl={out_cl} relu={relu}")


# Narrow rows (pose crops), where the AVX2 Winograd packs several row pairs' tiles into one row:
# 6 columns with two groups of row pairs (the second partial at one thread) and an odd height; 11
# columns (odd: the last tile's second column is past W); 3 columns; 24 columns.
NARROW = [(4, 32, 32, 9, 6), (2, 24, 20, 7, 11), (3, 8, 40, 4, 3), (1, 36, 36, 16, 24)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", NARROW, ids=lambda s: "x".join(map(str, s)))
def test_narrow_rows_match_the_oracle(built, shape, threads):
    """Winograd on narrow rows, in every input, residual and output layout, against float64, on
    1 and 2 threads (the packing depends on the thread count); the output allocation poisoned."""
    n, ci, co, h, w = shape
    with torch_threads(threads):
        for k, (xl, rl, out_cl) in enumerate(itertools.product(LAYOUTS, ["none", "cl", "nchw"],
                                                               [True, False])):
            x = _tensor((n, ci, h, w), xl, seed=k)
            res = None if rl == "none" else _tensor((n, co, h, w), rl, seed=200 + k)
            wt, b = _weights(ci, co, k)
            packed = cpu_ext.conv3x3_thin_pack(wt, winograd=True)
            with poisoned_malloc():
                out = cpu_ext.conv3x3_thin_cpu(x, packed, b, res, relu=k % 2 == 0,
                                               channels_last=out_cl)
            assert_close_to_oracle(out, _oracle(x, wt, b, res, k % 2 == 0), dtype=torch.float32,
                                   what=f"{shape} x {xl} residual {rl} out_cl={out_cl}")


@pytest.mark.parametrize("layout", ["cl", "nchw"])
def test_into_residual_writes_the_residual(kernel, layout):
    """conv3x3_thin_into: the result lands in the residual's own memory (either dense layout) and
    is returned; x is left alone."""
    x = _tensor((2, 18, 13, 37), "cl_slice", seed=1)
    x_before = x.clone()
    res = _tensor((2, 18, 13, 37), layout, seed=2)
    oracle = _oracle(x, *_weights(18, 18, 3), res, True)
    wt, b = _weights(18, 18, 3)
    out = kernel(x, wt, b, res, relu=True, into_residual=True)
    assert out.data_ptr() == res.data_ptr() and torch.equal(x, x_before)
    assert_close_to_oracle(res, oracle, dtype=torch.float32, what=f"into {layout}")


def test_winograd_error_stays_at_float32_rounding(built):
    """Winograd F(2x2, 3x3) adds transform roundings: over 72 channels of random data its error
    against float64 stays within 2x that of F.conv2d in float32 (measured 1.3x)."""
    x = _tensor((1, 72, 32, 64), "nchw", seed=16)
    wt, b = _weights(72, 72, 16)
    oracle = _oracle(x, wt, b, None, False)
    out = cpu_ext.conv3x3_thin_cpu(x, cpu_ext.conv3x3_thin_pack(wt, winograd=True), b, None,
                                   relu=False, channels_last=False)
    conv = torch.nn.functional.conv2d(x, wt, b, 1, 1)
    assert_close_to_oracle(out, oracle, dtype=torch.float32, what="winograd 72")
    err, err_conv = [float((t.double() - oracle).norm() / oracle.norm()) for t in (out, conv)]
    assert err <= 2 * err_conv, (err, err_conv)


def test_nan_propagates(kernel):
    """A NaN input pixel makes its 3x3 neighbourhood NaN in every output channel, through the ReLU
    (max(0, NaN) is NaN), in both output layouts; a NaN in the residual stays where it is. The
    same for Winograd: its transforms multiply by no explicit zero, so an output reads exactly its
    own 3x3 window."""
    x = _tensor((1, 18, 9, 40), "cl", seed=4)
    x[0, 5, 4, 20] = float("nan")  # even row and column: two Winograd row pairs and tiles
    x[0, 1, 1, 7] = float("nan")  # odd row and column
    res = _tensor((1, 18, 9, 40), "nchw", seed=5)
    res[0, 2, 0, 0] = float("nan")
    wt, b = _weights(18, 18, 6)
    expected = torch.isnan(_oracle(x, wt, b, res, True))
    assert int(expected.sum()) == 2 * 18 * 9 + 1
    for out_cl in (True, False):
        out = kernel(x, wt, b, res, relu=True, channels_last=out_cl)
        assert torch.equal(torch.isnan(out), expected)


@pytest.mark.parametrize("winograd", [False, True])
def test_opcheck(built, winograd):
    """Schema, fake kernels (shapes, strides, layout) and dispatch agree with the real kernels."""
    x = _tensor((2, 18, 5, 21), "cl_slice", seed=7)
    wt, b = _weights(18, 18, 7)
    res = _tensor((2, 18, 5, 21), "cl", seed=8)
    ops = torch.ops.hrnet_fast_cpu
    torch.library.opcheck(ops.conv3x3_thin_pack.default, (wt, winograd))
    packed = cpu_ext.conv3x3_thin_pack(wt, winograd=winograd)
    for out_cl in (True, False):
        torch.library.opcheck(ops.conv3x3_thin.default, (x, packed, b, res, True, out_cl))
    torch.library.opcheck(ops.conv3x3_thin_into.default,
                          (res.clone(memory_format=CL), x, packed, None, False))


@pytest.mark.parametrize("bad,match", [
    ("dtype", "x must be a 4-d float32 CPU tensor"),
    ("weight", "the packed weight takes 17 input channels, x has 18"),
    ("kernel5", "weight must be float32 \\[Co, Ci, 3, 3\\]"),
    ("bias", "bias must be float32 \\[18\\]"),
    ("residual", "residual must be float32 \\[1, 18, 6, 7\\]"),
    ("into_strided", "must be dense channels_last or NCHW"),
    ("into_alias", "must not share memory with x"),
])
def test_bad_input_gets_one_clear_error(kernel, bad, match):
    x = _tensor((1, 18, 6, 7), "cl", seed=9)
    wt, b = _weights(18, 18, 9)
    res, into = None, False
    if bad == "dtype":
        x = x.double()
    elif bad == "weight":
        wt = wt[:, :17]
    elif bad == "kernel5":
        wt = torch.randn(18, 18, 5, 5)
    elif bad == "bias":
        b = b[:5]
    elif bad == "residual":
        res = torch.randn(1, 18, 6, 8)
    elif bad == "into_strided":
        res, into = _tensor((1, 18, 6, 7), "cl_slice", seed=10), True
    else:
        res, into = x, True
    with pytest.raises(RuntimeError, match=match):
        kernel(x, wt, b, res, relu=True, into_residual=into)


# ------------------------------------------------------------------------- the torch backend
@pytest.mark.parametrize("ci,co,pays", [(18, 18, True), (36, 36, True), (72, 72, True),
                                        (144, 144, True), (256, 18, True), (64, 64, True),
                                        (32, 32, False), (128, 128, False), (256, 36, False),
                                        (40, 40, True), (30, 30, False)])
def test_the_width_rule_avx512(ci, co, pays):
    """AVX-512: the kernel takes the widths where oneDNN pads output channels by 10% or more, up
    to 72 (w18's 18, 36, 72), and the measured wins: w18's 144 and 256 -> 18, layer1's 64; not the
    unmeasured multiples of 16 of w32/w48. Direct up to 24 output channels, Winograd above."""
    assert torch_cpu.thin_conv_pays(ci, co, "AVX512") is pays
    assert torch_cpu.thin_winograd(co, "AVX512") is (co > 24)


@pytest.mark.parametrize("ci,co,pays", [(18, 18, True), (36, 36, True), (72, 72, True),
                                        (144, 144, True), (256, 18, True), (64, 64, True),
                                        (48, 48, True), (384, 384, True), (32, 32, True),
                                        (256, 32, True), (20, 20, True), (30, 30, True),
                                        (8, 8, True), (512, 512, False), (256, 400, False),
                                        (400, 64, False)])
def test_the_width_rule_avx2(ci, co, pays):
    """AVX2: Winograd on every width up to 384 channels in and out (all measured wins)."""
    assert torch_cpu.thin_conv_pays(ci, co, "AVX2") is pays
    assert torch_cpu.thin_winograd(co, "AVX2") is True


@pytest.mark.parametrize("shape,ci,co,pays", [
    ((8, 0, 8, 6), 256, 256, True),     # 8 row pairs of 3 tiles packed per row: 48 of 64 lanes
    ((1, 0, 8, 6), 256, 256, True),     # 2 pairs per thread: 6 tiles per pass of 4 MB of weights
    ((1, 0, 4, 3), 256, 256, False),    # 2 tiles per pass of weights
    ((1, 0, 2, 11), 256, 256, False),   # 6 tiles, but one row for two threads
    ((2, 0, 4, 3), 384, 384, False),    # 4 tiles per pass
    ((4, 0, 12, 9), 384, 384, True), ((1, 0, 16, 12), 128, 128, True),
    ((1, 0, 4, 6), 192, 192, False), ((1, 0, 4, 6), 96, 96, True),  # weights up to 128 x 128
    ((1, 0, 16, 32), 384, 384, True), ((1, 0, 17, 17), 144, 144, True),
    ((2, 0, 9, 9), 256, 256, True), ((1, 0, 8, 6), 18, 18, True),
    ((1, 0, 8, 6), 36, 36, True),       # oneDNN pads 18 and 36
    ((1, 0, 1, 5), 8, 8, True), ((1, 0, 512, 1024), 384, 384, True), ((2, 0, 3, 3), 20, 20, True)])
def test_the_row_rule_avx2(shape, ci, co, pays):
    """AVX2, on 2 threads: a conv takes the kernel when oneDNN pads its width, when its weights are
    at most 128 x 128, or when each of its rows (after packing) holds 6 real tiles or more and
    every thread gets a row; else oneDNN. AVX-512 has no row rule."""
    with torch_threads(2):
        assert torch_cpu.thin_row_pays(shape, ci, co, "AVX2") is pays
        assert torch_cpu.thin_row_pays(shape, ci, co, "AVX512") is True


@pytest.mark.parametrize("width,height,batch,rows", [
    (12, 16, 8, (48, 56, 8)),   # 6 tiles: 8 pairs per row (8 rows of 56 lanes), not 9 (8 of 64)
    (18, 24, 4, (36, 40, 12)),  # 9 tiles: 4 pairs per row, 12 rows (6 per thread) of 40 lanes
    (6, 8, 8, (48, 64, 2)),     # 3 tiles: 16 pairs per row, one row per thread
    (24, 32, 8, (36, 40, 43)),  # 12 tiles: 3 pairs (22 rows per thread of 40 lanes), not 4 (16 of 56)
    (48, 64, 8, (24, 24, 256)),  # 24 tiles fill their lanes: not packed
    (6, 8, 1, (6, 8, 2)),       # 2 pairs per thread: one of 7 tiles each
    (5, 2, 1, (3, 8, 1))])      # one row pair, nothing to pack with
def test_packing_computes_the_fewest_lanes(width, height, batch, rows):
    """AVX2 packing on 2 threads (winograd_rows, the mirror of the kernel's packed_pairs; checked
    equal to it over 4500 shapes on 1-8 threads when the rule was written): among the pair counts
    that fit a row, the one whose busiest thread computes the fewest lanes."""
    with torch_threads(2):
        assert torch_cpu.winograd_rows(width, height, batch) == rows


def test_narrow_rows_stay_in_onednn(thin_calls, monkeypatch):
    """The row rule decides per call. With the AVX2 rule in force on 2 threads, a w32 pose engine
    at 2x3x128x96 sends its 32-, 64- and 128-channel convs (24, 12 and 6 columns; the last two
    packed) to the kernel and its 256-channel ones (3 columns, 4 row pairs: two packed rows of 4
    real tiles, each streaming 4 MB of weights) to oneDNN, and matches the float64 reference."""
    rule = torch_cpu.thin_row_pays
    monkeypatch.setattr(torch_cpu, "thin_row_pays",
                        lambda shape, ci, co, isa=None: rule(shape, ci, co, "AVX2"))
    torch.manual_seed(3)
    model = randomize_bn(HRNet(HRNetConfig.preset("w32", head="pose", num_classes=17), fast=False),
                         3).eval()
    x = torch.randn(2, 3, 128, 96, generator=torch.Generator().manual_seed(14))
    with torch_threads(2), torch.inference_mode():
        out = optimize(model, backend="torch")(x)
        ref64 = HighResolutionNet.forward(model.double(), x.double())
    assert_model_close(out, ref64, dtype=torch.float32, what="w32 pose 128x96")
    seen = {(shape[1], shape[-1]) for *_, shape in thin_calls}
    assert {(32, 24), (64, 12), (128, 6)} <= seen, seen
    assert all(w != 3 for _, w in seen), seen  # no 256-channel conv at 3 columns


@pytest.fixture
def thin_calls(built, monkeypatch):
    """Every call of the thin conv kernel: (x's channels_last-ness, channels_last out, into,
    x's shape)."""
    monkeypatch.setitem(torch_cpu._THIN, "on", True)
    # the planar chain: the row-pair chain (AVX2, tests/test_cpu_thin_rows.py) off
    monkeypatch.setitem(torch_cpu._ROWS, "on", False)
    return spy_calls(monkeypatch, "conv3x3_thin_cpu", lambda x, *args, **kwargs: (
        x.is_contiguous(memory_format=CL), kwargs.get("channels_last", True),
        kwargs.get("into_residual", False), tuple(x.shape)))


@pytest.mark.parametrize("preset,mode,size", [("w18_small_v2", "bilinear", (2, 3, 75, 101)),
                                              ("w18_small_v2", "nearest", (1, 3, 64, 96)),
                                              ("w18", "bilinear", (1, 3, 47, 61))])
def test_engine_chains_match_the_reference(thin_calls, preset, mode, size):
    """Whole engines whose thin branches run as planar chains, against the float64 reference:
    odd sizes, batch 2, both upsampling modes. Each chain reads channels_last once and writes it
    once; everything between is planar (NCHW)."""
    model = bn_model(preset, mode)
    x = torch.randn(*size, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        out = optimize(model, backend="torch")(x)
        ref64 = HighResolutionNet.forward(model.double(), x.double())
    assert_model_close(out, ref64, dtype=torch.float32, what=f"{preset} {mode} {size}")
    assert out.is_contiguous(memory_format=CL) or out.is_contiguous()
    planar_out = sum(1 for _, out_cl, *_ in thin_calls if not out_cl)
    cl_out = sum(1 for _, out_cl, *_ in thin_calls if out_cl)
    assert planar_out > 0 and cl_out > 0 and planar_out > cl_out  # chains, not single convs


def test_kernel_off_gives_the_samebn_model(thin_calls, monkeypatch):
    """With the kernel switched off the engine runs oneDNN only, and both agree to float32
    rounding."""
    model = bn_model("w18_small_v2")
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(12))
    engine = optimize(model, backend="torch")
    with torch.inference_mode():
        on = engine(x)
        assert thin_calls
        monkeypatch.setitem(torch_cpu._THIN, "on", False)
        count = len(thin_calls)
        off = engine(x)
    assert len(thin_calls) == count
    assert_model_close(on, off.double(), dtype=torch.float32, what="thin kernel against oneDNN")


@pytest.mark.parametrize("fail_at", [1, 4])
def test_a_failing_kernel_warns_once_and_onednn_answers(thin_calls, monkeypatch, fail_at):
    """The kernel raising in the middle of a chain (call 4: after planar intermediates exist) or at
    its start: one RuntimeWarning, the kernel off for the process, and the model's values
    unchanged."""
    failing = failing_from_call(thin_calls, cpu_ext.conv3x3_thin_cpu, fail_at)
    messages = planted_failure_messages(monkeypatch, "conv3x3_thin_cpu", failing,
                                        f"failure at call {fail_at}")
    assert len(messages) == 1 and "planted failure" in messages[0] and "switched off" in messages[0]
    assert torch_cpu._THIN["on"] is False and len(thin_calls) == fail_at - 1


def test_without_avx_onednn_answers(thin_calls, monkeypatch):
    """A CPU without AVX-512 or AVX2 (torch's capability) never calls the kernel."""
    monkeypatch.setattr(cpu_ext, "thin_conv_supported", lambda: False)
    model = bn_model("w18_small_v2")
    x = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(14))
    with torch.inference_mode():
        out = optimize(model, backend="torch")(x)
        ref64 = HighResolutionNet.forward(model.double(), x.double())
    assert thin_calls == []
    assert_model_close(out, ref64, dtype=torch.float32, what="oneDNN only")


def test_autograd_keeps_the_composition(thin_calls):
    """With gradients wanted (a weight that requires grad) the backend does not take the kernel."""
    x = _tensor((1, 18, 8, 9), "cl", seed=15)
    wt, b = _weights(18, 18, 15)
    from hrnet_fast.plan import ConvSpec
    spec = ConvSpec(wt.requires_grad_(True), b, 1, 1, True)
    be = torch_cpu.TorchCPU(None, torch.device("cpu"), torch.float32)
    out = be.conv(x, spec)
    assert thin_calls == [] and out.grad_fn is not None


def test_a_weight_change_reaches_the_packed_weights(thin_calls):
    """The drop-in refolds after an in-place change of a thin branch conv's weight (and of layer1's
    64-channel 3x3): the kernel's packed weights are the new ones, not the first call's."""
    model = bn_model("w18_small_v2")
    model.fast = True
    x = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(17))
    with torch.inference_mode():
        before = model(x)
        assert thin_calls
        model.stage3[0].branches[0][0].conv1.weight.mul_(-1.5)
        model.layer1[0].conv2.weight.add_(0.05)
        after = model(x)
        ref64 = HighResolutionNet.forward(model.double(), x.double())
    assert_model_close(after, ref64, dtype=torch.float32, what="after the weight change")
    assert float((after - before).abs().max()) > 1e-3
