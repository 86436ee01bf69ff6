"""The CPU 1x1 conv kernel (csrc/cpu_conv1x1.cpp, hrnet_fast/cpu_ext.py: conv1x1 and conv1x1_into)
and its use by the torch backend on AVX2 CPUs (TorchCPU.conv, conv_into_residual and
conv_with_downsample in hrnet_fast/backends/torch_cpu.py; engine.run_block).

The kernel needs AVX2 + FMA (any CPU whose torch capability is AVX2 or AVX-512) and the JIT build
(shared with the CPU fuse kernel). Where either is missing, every kernel test is skipped with the
reason: the kernel is then NOT tested. The engine takes it on AVX2 CPUs only; the engine tests
force that rule so that they run on AVX-512 CPUs too.
"""
from __future__ import annotations


import pytest
import torch

from helpers import (bn_model, planted_failure_messages, poisoned_malloc, require_cpu_kernels,
                     seeded_cl, spy_calls, torch_threads)
from oracles import assert_close_to_oracle, assert_model_close

from hrnet_fast import cpu_ext, optimize
from hrnet_fast.backends import torch_cpu
from hrnet_fast.plan import ConvSpec
from hrnet_fast.reference import HighResolutionNet

CL = torch.channels_last


@pytest.fixture(scope="module")
def built():
    require_cpu_kernels("the 1x1 conv kernel")


def _weights(co, k, seed, bias=True):
    g = torch.Generator().manual_seed(1000 + seed)
    w = torch.randn(co, k, 1, 1, generator=g) / k ** 0.5
    return w, (torch.randn(co, generator=g) if bias else None)


def _oracle(x, w, b, residual=None, relu=True, x2=None):
    """act(conv(cat(x, x2), w) + b + residual) in float64."""
    inp = x.double() if x2 is None else torch.cat([x.double(), x2.double()], 1)
    y = torch.nn.functional.conv2d(inp, w.double(), None if b is None else b.double())
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


def _run(x, w, b, residual=None, *, relu, x2=None, into=False):
    packed = cpu_ext.conv1x1_pack(w)
    return cpu_ext.conv1x1_cpu(x, packed, w.shape[0], b, residual, relu=relu, x2=x2,
                               into_residual=into)


# (N, Ci, Ci2, Co, H, W): layer1's widths on a small map, the fuse steps' outputs that end in a
# channel remainder (18: 16 + 2, 54: 48 + 6, 126: 112 + 14) or a last 8-channel panel (24, 56),
# under 6 pixels in all (one edge tile) and pixel counts that leave 1-5 in the last tile, K = 1,
# an odd K, and the downsample merge (Ci2 > 0) with its own odd widths.
SHAPES = [(1, 64, 0, 256, 9, 13), (2, 256, 0, 64, 5, 7), (1, 36, 0, 18, 11, 17),
          (3, 72, 0, 54, 4, 5), (1, 144, 0, 126, 3, 11), (2, 5, 0, 24, 1, 5), (1, 1, 0, 7, 2, 3),
          (1, 33, 0, 56, 7, 1), (2, 64, 64, 256, 6, 7), (1, 7, 5, 19, 3, 5), (1, 3, 0, 8, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle(built, shape):
    """With and without bias, residual and ReLU, on 1 and 2 threads, against float64; the output
    allocation poisoned (a value the kernel never writes fails)."""
    n, ci, ci2, co, h, w = shape
    for k in range(4):
        x = seeded_cl((n, ci, h, w), seed=k)
        x2 = seeded_cl((n, ci2, h, w), seed=50 + k) if ci2 else None
        res = seeded_cl((n, co, h, w), seed=100 + k) if k % 2 else None
        relu, with_bias = k < 2, k != 2
        wt, b = _weights(co, ci + ci2, k, with_bias)
        with torch_threads(1 + k % 2), poisoned_malloc():
            out = _run(x, wt, b, res, relu=relu, x2=x2)
        assert out.is_contiguous(memory_format=CL) and out.shape == (n, co, h, w)
        assert_close_to_oracle(out, _oracle(x, wt, b, res, relu, x2), dtype=torch.float32,
                               what=f"{shape} residual={res is not None} relu={relu}")


def test_large_map_matches_oracle(built):
    """Many blocks over two threads, with the prefetches ahead of each tile near the end of the
    tensor: layer1's 64 -> 256 with residual at 37x53 (1961 pixels, 5 in the last tile)."""
    x, res = seeded_cl((1, 64, 37, 53), seed=3), seeded_cl((1, 256, 37, 53), seed=4)
    wt, b = _weights(256, 64, 3)
    with torch_threads(2), poisoned_malloc():
        out = _run(x, wt, b, res, relu=True)
    assert_close_to_oracle(out, _oracle(x, wt, b, res), dtype=torch.float32, what="37x53")


@pytest.mark.parametrize("ci2", [0, 64])
def test_into_residual_writes_the_residual(built, ci2):
    """conv1x1_into: the result lands in the residual's own memory and is returned; x and x2 are
    left alone."""
    x = seeded_cl((2, 64, 5, 9), seed=1)
    x2 = seeded_cl((2, ci2, 5, 9), seed=2) if ci2 else None
    before = [t.clone() for t in (x, x2) if t is not None]
    res = seeded_cl((2, 256, 5, 9), seed=3)
    wt, b = _weights(256, 64 + ci2, 4)
    oracle = _oracle(x, wt, b, res, True, x2)
    out = _run(x, wt, b, res, relu=True, x2=x2, into=True)
    assert out.data_ptr() == res.data_ptr()
    assert all(torch.equal(t, s) for t, s in zip([t for t in (x, x2) if t is not None], before))
    assert_close_to_oracle(res, oracle, dtype=torch.float32, what=f"into, ci2={ci2}")


def test_nan_propagates(built):
    """A NaN input pixel makes that pixel NaN in every output channel, through the ReLU (max(0,
    NaN) is NaN), in a full tile and in the edge tile; a NaN in the residual or in x2 stays where
    it is."""
    x, x2 = seeded_cl((1, 36, 3, 7), seed=5), seeded_cl((1, 4, 3, 7), seed=6)
    x[0, 3, 0, 2] = float("nan")  # pixel 2: the first full tile
    x[0, 0, 2, 6] = float("nan")  # pixel 20: the last, 3-pixel edge tile
    x2[0, 1, 1, 0] = float("nan")  # pixel 7
    res = seeded_cl((1, 18, 3, 7), seed=7)
    res[0, 17, 1, 3] = float("nan")  # the last channel: the staged channel remainder
    wt, b = _weights(18, 40, 6)
    expected = torch.isnan(_oracle(x, wt, b, res, True, x2))
    assert int(expected.sum()) == 3 * 18 + 1
    assert torch.equal(torch.isnan(_run(x, wt, b, res, relu=True, x2=x2)), expected)


def test_opcheck(built):
    """Schema, fake kernels (shapes, strides, layout) and dispatch agree with the real kernels."""
    x, x2 = seeded_cl((2, 18, 5, 7), seed=7), seeded_cl((2, 6, 5, 7), seed=8)
    res = seeded_cl((2, 20, 5, 7), seed=9)
    wt, b = _weights(20, 24, 7)
    ops = torch.ops.hrnet_fast_cpu
    torch.library.opcheck(ops.conv1x1_pack.default, (wt,))
    packed = cpu_ext.conv1x1_pack(wt)
    torch.library.opcheck(ops.conv1x1.default, (x, packed, 20, b, res, True, x2))
    torch.library.opcheck(ops.conv1x1.default, (seeded_cl((1, 24, 3, 3), 1), packed, 20, None,
                                                None, False, None))
    torch.library.opcheck(ops.conv1x1_into.default, (res.clone(memory_format=CL), x, packed, 20,
                                                     None, False, x2))


@pytest.mark.parametrize("bad,match", [
    ("dtype", "x must be float32"),
    ("nchw", "x must be dense channels_last"),
    ("channels", "x has 18 channels, the packed weight takes 17"),
    ("out_channels", "out_channels 30 does not match the packed weight"),
    ("bias", "bias must be float32 \\[20\\]"),
    ("residual", "residual has shape .*expected \\[1, 20, 4, 5\\]"),
    ("x2", "x2 has shape .*N, H, W must match"),
    ("into_alias", "must not share memory with x"),
    ("kernel3", "weight must be \\[Co, K\\] or \\[Co, K, 1, 1\\]"),
])
def test_bad_input_gets_one_clear_error(built, bad, match):
    x = seeded_cl((1, 18, 4, 5), seed=9)
    wt, b = _weights(20, 18, 9)
    res, x2, co, into = None, None, 20, False
    if bad == "dtype":
        x = x.double()
    elif bad == "nchw":
        x = x.contiguous()
    elif bad == "channels":
        wt = wt[:, :17]
    elif bad == "out_channels":
        co = 30
    elif bad == "bias":
        b = b[:19]
    elif bad == "residual":
        res = seeded_cl((1, 20, 4, 6), seed=1)
    elif bad == "x2":
        wt = _weights(20, 20, 9)[0]
        x2 = seeded_cl((1, 2, 4, 6), seed=2)
    elif bad == "into_alias":  # x and the residual: dense channels_last, one storage
        store = torch.randn(20 * (18 + 20))
        x = store[:360].view(1, 4, 5, 18).permute(0, 3, 1, 2)
        res, into = store[360:].view(1, 4, 5, 20).permute(0, 3, 1, 2), True
    elif bad == "kernel3":
        wt = torch.randn(20, 18, 3, 3)
    with pytest.raises(RuntimeError, match=match):
        packed = cpu_ext.conv1x1_pack(wt)
        cpu_ext.conv1x1_cpu(x, packed, co, b, res, relu=True, x2=x2, into_residual=into)

@pytest.mark.parametrize("ci,co,isa,fits", [
    (64, 256, "AVX2", True), (36, 18, "AVX2", True), (64, 64, "AVX2", True),
    (384, 336, "AVX2", True), (512, 448, "AVX2", True),
    (256, 64, "AVX2", False),  # input-bound: the input read outweighs the output write
    (1024, 256, "AVX2", False),
    (64, 256, "AVX512", False),  # oneDNN's 16-lane kernels there
])
def test_the_spec_rule(ci, co, isa, fits):
    spec = ConvSpec(torch.randn(co, ci, 1, 1), torch.randn(co), 1, 0, True)
    assert torch_cpu.pointwise_spec_fits(spec, isa) is fits


def test_the_spec_rule_takes_only_plain_1x1(built):
    """3x3, stride 2, padding, a partial ReLU or float64 weights stay in oneDNN."""
    w = torch.randn(18, 36, 1, 1)
    for spec in (ConvSpec(torch.randn(18, 36, 3, 3), None, 1, 1, True),
                 ConvSpec(w, None, 2, 0, True), ConvSpec(w, None, 1, 1, True),
                 ConvSpec(w.double(), None, 1, 0, True)):
        assert not torch_cpu.pointwise_spec_fits(spec, "AVX2")
    ranged = ConvSpec(w, None, 1, 0, False, relu_ranges=((0, 9),))
    assert not torch_cpu.pointwise_spec_fits(ranged, "AVX2")


@pytest.fixture
def pointwise_calls(built, monkeypatch):
    """Every call of the kernel from the engine, as (x's shape, x2 given, into_residual), with the
    AVX2 rule in force whatever this CPU is."""
    rule = torch_cpu.pointwise_spec_fits
    monkeypatch.setitem(torch_cpu._POINTWISE, "on", True)
    monkeypatch.setattr(torch_cpu, "pointwise_spec_fits", lambda spec, isa=None: rule(spec, "AVX2"))
    return spy_calls(monkeypatch, "conv1x1_cpu", lambda x, *args, **kwargs: (
        tuple(x.shape), kwargs.get("x2") is not None, kwargs.get("into_residual", False)))


@pytest.mark.parametrize("preset,mode,head,size", [
    ("w18_small_v2", "bilinear", "seg", (2, 3, 75, 101)),
    ("w18_small_v2", "nearest", "seg", (1, 3, 64, 96)),
    ("w18_small_v1", "bilinear", "classification", (1, 3, 64, 64))])
def test_engine_matches_the_reference(pointwise_calls, preset, mode, head, size):
    """Whole engines with layer1's bottlenecks (the downsample merged into the first block's last
    conv, the others into their residual) and the fuse steps' 1x1s in the kernel, against the
    float64 reference: odd sizes, batch 2, both upsampling modes, the classification head's
    bottlenecks too."""
    model = bn_model(preset, mode, head)
    x = torch.randn(*size, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        out = optimize(model, backend="torch")(x)
        ref64 = HighResolutionNet.forward(model.double(), x.double())
    assert_model_close(out, ref64, dtype=torch.float32, what=f"{preset} {head} {mode} {size}")
    assert any(merged for _, merged, _ in pointwise_calls)  # the downsample merge
    if preset != "w18_small_v1":  # one block per layer1 and head bottleneck there
        assert any(into for *_, into in pointwise_calls)  # accumulated into the block's input
    assert any(shape[1] != 64 and shape[1] != 256 for shape, *_ in pointwise_calls)  # fuse 1x1s


def test_input_bound_convs_stay_in_onednn(pointwise_calls):
    """Layer1's 256 -> 64 convs (input-bound, see POINTWISE_INPUT_BOUND_CI) never reach the kernel,
    while its 64 -> 256 convs do."""
    model = bn_model("w18_small_v2")
    with torch.inference_mode():
        optimize(model, backend="torch")(torch.randn(1, 3, 64, 64))
    inputs = [shape[1] for shape, *_ in pointwise_calls]
    assert 64 in inputs and 256 not in inputs


def test_a_failing_kernel_warns_once_and_onednn_answers(pointwise_calls, monkeypatch):
    """The kernel raising: one RuntimeWarning, the kernel off for the process, and the model's
    values unchanged (the merged downsample falls back to the two convs)."""
    def failing(*args, **kwargs):
        raise RuntimeError("planted failure")

    messages = planted_failure_messages(monkeypatch, "conv1x1_cpu", failing, "after the failure")
    assert len(messages) == 1 and "planted failure" in messages[0] and "switched off" in messages[0]
    assert torch_cpu._POINTWISE["on"] is False


def test_a_weight_change_reaches_the_packed_weights(pointwise_calls):
    """The drop-in refolds after an in-place change of layer1's last conv and downsample weights:
    the merged pack holds the new ones."""
    model = bn_model("w18_small_v2")
    model.fast = True
    x = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(17))
    with torch.inference_mode():
        before = model(x)
        assert any(merged for _, merged, _ in pointwise_calls)
        model.layer1[0].downsample[0].weight.mul_(-1.5)
        model.layer1[0].conv3.weight.add_(0.05)
        after = model(x)
        ref64 = HighResolutionNet.forward(model.double(), x.double())
    assert_model_close(after, ref64, dtype=torch.float32, what="after the weight change")
    assert float((after - before).abs().max()) > 1e-3
