"""The one-launch BasicBlock kernel (hrnet_fast.kernels.basic_block) against F.conv2d in float64, and
the explicit ``backend="triton"`` engine's per-shape choice of it (``Triton.blocks``).

On the CPU the kernel runs under the Triton interpreter on small odd shapes; full HRNet shapes, bf16
and CUDA graphs are GPU tests. Every buffer the op allocates (output and scratch) is NaN-poisoned
before the kernel runs, so an unwritten output element or a scratch element read before it was
written shows up as a non-finite value. fp32: rel. error <= 1e-5 against float64; fp16/bf16: at
most 2x the error of the same two convs run by PyTorch in that dtype.
"""
from __future__ import annotations

import pytest
import torch

from helpers import (DEVICE, assert_graph_replay_equal, poisoned_allocations, randomize_bn,
                     spy_triton_launches)
from oracles import MODEL_FP32_TOL, assert_close_to_oracle, assert_model_close
from hrnet_fast.kernels import triton_status

_ok, _why = triton_status(DEVICE)
pytestmark = pytest.mark.skipif(not _ok, reason=_why)

if _ok:
    from hrnet_fast.kernels import basic_block as kblock
    from hrnet_fast.kernels import conv as kconv
    _DEFAULT_TILES, _DEFAULT_SHAPES = kblock.BLOCK_TILES, list(kblock._BLOCK_SHAPES)


def _one_config(monkeypatch, tile, shape):
    """The block kernel with one config (no autotuning): tile (TH, TW), shape (BLOCK_M, BLOCK_K,
    warps, stages)."""
    monkeypatch.setattr(kblock, "_TUNED", {})
    monkeypatch.setattr(kblock, "BLOCK_TILES", (tile,))
    monkeypatch.setattr(kblock, "_BLOCK_SHAPES", [shape])


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(kblock, "_debug_poison_outputs", True)
    monkeypatch.setattr(kblock, "_tile_override", None)
    if torch.device(DEVICE).type == "cuda":
        # one config per case on a GPU (test_block_gpu_every_config runs each): autotuning every
        # case would compile about 90 more kernels inside gpu_check's tests_tiled step
        _one_config(monkeypatch, (8, 16), (64, 32, 4, 2))


def _make_block(c, seed, dtype=torch.float32, biases=(True, True)):
    g = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5).to(dtype) for _ in range(2)]
    bs = [(torch.randn(c, generator=g) * 0.3) if has else None for has in biases]
    return ws, bs


def _ref(x, ws, bs, dtype):
    return kblock.block_reference(x.to(dtype), ws[0].to(dtype), None if bs[0] is None else bs[0].to(dtype),
                                  ws[1].to(dtype), None if bs[1] is None else bs[1].to(dtype))


def _check(out, x, ws, bs, dtype):
    ref64 = _ref(x, ws, bs, torch.float64)
    ref_lowp = None if dtype == torch.float32 else _ref(x, ws, bs, dtype)
    assert_close_to_oracle(out.cpu(), ref64.cpu(),
                           None if ref_lowp is None else ref_lowp.cpu(), dtype=dtype,
                           what="basic block", fp32_tol=MODEL_FP32_TOL,
                           reason="the design's fp32 bound: two convs of 9*C products each")


BLOCK_CASES = [
    # N, C, H, W, tile override (TH, TW), biases
    (2, 18, 13, 17, None, (True, True)),       # the interpreter's 8 x 8: 2 x 3 tiles, ragged edges;
                                               # VEC 2: K per tap (as 36 and 21)
    (1, 24, 9, 11, (4, 8), (True, True)),      # rectangular tiles, VEC 8: flat K (as 16 and 40)
    (2, 36, 5, 7, (2, 4), (False, True)),      # many tiles per image, no conv1 bias
    (1, 16, 6, 5, (8, 16), (True, False)),     # one tile larger than the image (masking)
    (1, 40, 7, 9, (4, 4), (False, False)),     # 40 channels: a 64-wide N tile, K in two blocks
    (1, 21, 6, 7, (4, 4), (True, True)),       # odd C: VEC 1, scalar loads
]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: "n%d_c%d_%dx%d_t%s_b%d%d" % (*c[:5], *c[5]))
def test_block_fp32(case, monkeypatch):
    n, c, h, w, tile, biases = case
    monkeypatch.setattr(kblock, "_tile_override", tile)
    ws, bs = _make_block(c, seed=c + h, biases=biases)
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(7))
    xd = x.to(DEVICE).contiguous(memory_format=torch.channels_last)
    before = xd.clone()
    wp = [kconv.pack_weight(w).to(DEVICE) for w in ws]
    bd = [None if b is None else b.to(DEVICE) for b in bs]
    out = kblock.basic_block(xd, wp[0], bd[0], wp[1], bd[1])
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    _check(out, x, ws, bs, torch.float32)
    assert torch.equal(xd, before), "x must be left unchanged"


def test_block_fp16():
    ws, bs = _make_block(24, seed=3, dtype=torch.float16)
    x = torch.randn(2, 24, 11, 13, generator=torch.Generator().manual_seed(8)).half()
    out = kblock.basic_block(x.to(DEVICE), ws[0].to(DEVICE), bs[0].to(DEVICE), ws[1].to(DEVICE),
                             bs[1].to(DEVICE))
    assert out.dtype == torch.float16
    _check(out, x, ws, bs, torch.float16)


@pytest.mark.parametrize("layout,in_place", [("nchw", False), ("slice_at_3", False),
                                             ("slice_at_4", False), ("slice_at_16", True)])
def test_block_input_layouts(layout, in_place, monkeypatch):
    """An NCHW x, a 24-channel slice at channel 3 of a channels_last 29-channel tensor and one at
    channel 4 of a 48-channel tensor (its base not 16-byte aligned) are made dense channels_last (a
    copy, so they run with VEC 8 and the flat K walk); a 24-channel slice at channel 16 of a
    48-channel tensor (a padded batched conv's output) is read in place, VEC 8."""
    args = []
    seen = spy_triton_launches(monkeypatch, args)
    ws, bs = _make_block(24, seed=5)
    g = torch.Generator().manual_seed(9)
    if layout == "nchw":
        x = torch.randn(1, 24, 7, 10, generator=g)
        xd = x.to(DEVICE)
    else:
        start, total = {"slice_at_3": (3, 29), "slice_at_4": (4, 48), "slice_at_16": (16, 48)}[layout]
        big = torch.randn(2, total, 7, 10, generator=g).contiguous(memory_format=torch.channels_last)
        x = big[:, start:start + 24]
        xd = big.to(DEVICE)[:, start:start + 24]
    out = kblock.basic_block(xd, ws[0].to(DEVICE), bs[0].to(DEVICE), ws[1].to(DEVICE), bs[1].to(DEVICE))
    _check(out, x, ws, bs, torch.float32)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert [(k["VEC"], k["FLAT_K"]) for k in seen] == [(8, True)]
    assert (args[0][0].data_ptr() == xd.data_ptr()) is in_place


def test_block_errors_and_fake():
    x = torch.randn(1, 18, 5, 5)
    ws, bs = _make_block(18, seed=1)
    with pytest.raises(ValueError, match=r"w2 must be \[18, 18, 3, 3\] or packed \[162, 18\] for a "
                                         r"18-channel x, got \(36, 18, 3, 3\)"):
        kblock.basic_block(x, ws[0], bs[0], torch.randn(36, 18, 3, 3), bs[1])
    with pytest.raises(ValueError, match=r"b1 must be \[18\], got \(36,\)"):
        kblock.basic_block(x, ws[0], torch.randn(36), ws[1], bs[1])
    with pytest.raises(TypeError, match="basic_block needs a 4-D float32/float16/bfloat16 x"):
        kblock.basic_block(x.int(), ws[0], bs[0], ws[1], bs[1])
    op = torch.ops.hrnet_fast.basic_block_triton
    assert "hrnet_fast::basic_block_triton" in str(op.default._schema)
    from hrnet_fast.kernels import interpreter_enabled
    if interpreter_enabled():
        return  # the interpreter launches on fake tensors' data pointers; the GPU run checks this
    from torch._subclasses.fake_tensor import FakeTensorMode
    packed = kconv.pack_weight(ws[0]).to(DEVICE)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(2, 18, 9, 7, device=DEVICE))
        fw = mode.from_tensor(packed)
        fo = op(fx, fw, None, fw, None)
        assert tuple(fo.shape) == (2, 18, 9, 7) and fo.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------ the engine's choice

def _narrow_model_and_plan(mode: str = "bilinear"):
    """w18_small_v1's layout with branches 8/16/24/32 channels wide (the interpreter's time grows
    with the channels), randomized BatchNorm, a 1x3x27x31 input, and its CUDA-style plan (padded to
    8 channels, biases hoisted) in float32 channels_last."""
    from dataclasses import replace

    from hrnet_fast import HRNetConfig
    from hrnet_fast.plan import build_plan
    from hrnet_fast.reference import HighResolutionNet
    cfg = HRNetConfig.preset("w18_small_v1", upsample=mode)
    cfg = replace(cfg, stage2=replace(cfg.stage2, num_channels=(8, 16)),
                  stage3=replace(cfg.stage3, num_channels=(8, 16, 24)),
                  stage4=replace(cfg.stage4, num_channels=(8, 16, 24, 32)))
    model = randomize_bn(HighResolutionNet(cfg)).eval().to(DEVICE)
    x = torch.randn(1, 3, 27, 31, device=DEVICE).contiguous(memory_format=torch.channels_last)
    plan = build_plan(model, channel_multiple=8, hoist_biases=True).map_tensors(
        lambda t: t.float().contiguous(memory_format=torch.channels_last) if t.dim() == 4
        else t.float().contiguous())
    return model, x, plan


def _run_engine(model, x, plan, auto, monkeypatch):
    """The Triton backend's engine on ``plan`` (NaN-poisoned allocations) against the reference
    model; (the backend, the channel count of every block-kernel call)."""
    from hrnet_fast.backends import triton as triton_backend
    from hrnet_fast.engine import run_plan
    calls = []
    real = torch.ops.hrnet_fast.basic_block_triton

    def spy(*args):
        calls.append(args[0].shape[1])
        return real(*args)

    be = triton_backend.Triton.prepare(plan, DEVICE, torch.float32, auto=auto)
    monkeypatch.setattr(torch.ops.hrnet_fast, "basic_block_triton", spy)
    with torch.no_grad(), poisoned_allocations(monkeypatch):
        got = run_plan(plan, be, x)
        want = model(x)
    assert_model_close(got, want.double(), dtype=torch.float32)
    return be, calls


def _fusable_count(plan):
    from hrnet_fast.backends.triton import fusable_basic_block
    count = 0
    for stage in plan.stages:
        for module in stage:
            for blocks in module.branches:
                count += sum(fusable_basic_block(b) for b in blocks)
    return count


@pytest.mark.parametrize("forced,mode", [("fused", "bilinear"), ("fused", "nearest"),
                                         ("convs", "bilinear")])
def test_engine_runs_every_plain_basic_block_fused(forced, mode, monkeypatch):
    """The explicit triton backend with the choice forced to the block kernel: every plain
    BasicBlock of the branches (and nothing else) runs it, and the model matches the reference;
    forced to two convs, none does."""
    monkeypatch.setenv("HRNET_FAST_FORCE_BASIC_BLOCK", forced)
    # every other choice on cuDNN: on a GPU the Triton convs would autotune each shape
    monkeypatch.setenv("HRNET_FAST_FORCE_CONV2D_BIAS_ACT", "torch")
    monkeypatch.setenv("HRNET_FAST_FORCE_FUSE_DOWN", "batched")
    model, x, plan = _narrow_model_and_plan(mode)
    expected = _fusable_count(plan)
    assert expected >= 4
    _, calls = _run_engine(model, x, plan, False, monkeypatch)
    assert len(calls) == (expected if forced == "fused" else 0)


def test_fusable_basic_block_rules():
    from hrnet_fast.backends.triton import fusable_basic_block
    from hrnet_fast.plan import BlockPlan, ConvSpec

    def spec(cout=8, cin=8, k=3, **kw):
        return ConvSpec(torch.zeros(cout, cin, k, k), None, **{"stride": 1, "padding": 1, **kw})

    assert fusable_basic_block(BlockPlan([spec(), spec()]))
    assert not fusable_basic_block(BlockPlan([spec(), spec()], downsample=spec(k=1, padding=0)))
    assert not fusable_basic_block(BlockPlan([spec(), spec(), spec()]))
    assert not fusable_basic_block(BlockPlan([spec(), spec(stride=2)]))
    assert not fusable_basic_block(BlockPlan([spec(cout=16), spec(cin=16)]))
    assert not fusable_basic_block(BlockPlan([spec(relu=False), spec()]))
    assert not fusable_basic_block(BlockPlan([spec(), spec(relu_ranges=((0, 4),))]))
    assert not fusable_basic_block(BlockPlan([spec(k=1, padding=0), spec(k=1, padding=0)]))


def test_auto_does_not_offer_the_block_kernel(monkeypatch):
    """``auto`` keeps the engine's two convs (the block kernel autotunes on first use), even with
    the choice forced."""
    from hrnet_fast.backends import triton as triton_backend
    monkeypatch.setenv("HRNET_FAST_FORCE_BASIC_BLOCK", "fused")
    _, x, plan = _narrow_model_and_plan()
    be = triton_backend.Triton.prepare(plan, DEVICE, torch.float32, auto=True)
    assert be.blocks(x, plan.stages[0][0].branches[0]) is None


# ------------------------------------------------------------------------------------- pinned widths

def _pin(cfg, c=16, dtype=torch.float32):
    kblock.PINNED_BLOCK_CONFIGS[(kconv.device_arch(DEVICE), dtype, c)] = cfg


@pytest.fixture
def _gpu_config_list(monkeypatch):
    """The GPU config list (not the interpreter's single config) and no pins but the test's own."""
    monkeypatch.setattr(kblock, "_INTERPRET", False)
    monkeypatch.setattr(kblock, "_TUNED", {})
    monkeypatch.setattr(kblock, "PINNED_BLOCK_CONFIGS", {})
    monkeypatch.setattr(kblock, "BLOCK_TILES", _DEFAULT_TILES)
    monkeypatch.setattr(kblock, "_BLOCK_SHAPES", _DEFAULT_SHAPES)


@pytest.mark.parametrize("pin,expected", [
    ((8, 16, 64, 16, 4, 2), [(8, 16, 64, 16, 4, 2)]),                      # the pin alone
    ((8, 16, 64, 32, 4, 2), [(8, 8, 64, 16, 4, 2), (8, 16, 64, 16, 4, 2),  # BLOCK_K 32 > 16
                             (16, 16, 64, 16, 4, 2)]),                     # channels: pruned, ignored
])
def test_a_pinned_width_compiles_its_config_alone(pin, expected, _gpu_config_list, monkeypatch):
    _pin(pin)
    got = kblock._tuned_block_kernel(16, kblock.pinned_block_config(DEVICE, torch.float32, 16))
    assert [kblock.block_config_tuple(c) for c in got.configs] == expected
    assert kblock.pinned_block_config(DEVICE, torch.float16, 16) is None      # per dtype
    assert kblock.pinned_block_config(DEVICE, torch.float32, 24) is None      # per width
    monkeypatch.setenv("HRNET_FAST_CONV_PINS", "0")
    assert kblock.pinned_block_config(DEVICE, torch.float32, 16) is None
    monkeypatch.delenv("HRNET_FAST_CONV_PINS")
    monkeypatch.setattr(kconv, "PINNED_MODE", "off")
    assert kblock.pinned_block_config(DEVICE, torch.float32, 16) is None


def test_a_pinned_width_runs_its_tile(_gpu_config_list, monkeypatch):
    """The op with a pin runs that config (tile 8 x 16 here) and still matches the oracle."""
    seen = []
    real = torch.library.wrap_triton

    def spy(kernel):
        seen.append([kblock.block_config_tuple(c) for c in kernel.configs])
        return real(kernel)

    monkeypatch.setattr(torch.library, "wrap_triton", spy)
    _pin((8, 16, 64, 16, 4, 2))
    ws, bs = _make_block(16, seed=12)
    x = torch.randn(1, 16, 11, 19, generator=torch.Generator().manual_seed(13))
    out = kblock.basic_block(x.to(DEVICE), ws[0].to(DEVICE), bs[0].to(DEVICE), ws[1].to(DEVICE),
                             bs[1].to(DEVICE))
    _check(out, x, ws, bs, torch.float32)
    assert seen == [[(8, 16, 64, 16, 4, 2)]]


@pytest.mark.parametrize("forced", ["fused", "convs", None])
def test_auto_offers_only_the_pinned_block_widths(forced, monkeypatch):
    """``auto`` with the 16-channel width pinned: forced to the block kernel, exactly the fusable
    16-channel blocks run it and the model matches the reference; forced to the two convs, or
    not forced on the CPU (nothing can be timed there), none does and nothing is packed."""
    from hrnet_fast.backends import triton as triton_backend
    monkeypatch.setattr(triton_backend, "PINNED_CONV_DEVICES", {"cpu", "cuda"})
    monkeypatch.setattr(kblock, "PINNED_BLOCK_CONFIGS", {})
    monkeypatch.setattr(kblock, "_TUNED", {})
    if forced is None:
        if torch.device(DEVICE).type != "cpu":
            pytest.skip("on a GPU the choice is measured")
        monkeypatch.delenv("HRNET_FAST_FORCE_BASIC_BLOCK_PINNED", raising=False)
    else:
        monkeypatch.setenv("HRNET_FAST_FORCE_BASIC_BLOCK_PINNED", forced)
    model, x, plan = _narrow_model_and_plan()
    _pin((8, 8, 64, 32, 4, 1) if kblock._INTERPRET else (8, 16, 64, 32, 4, 2))  # the one config
    from hrnet_fast.backends.triton import _branch_blocks, fusable_basic_block
    sixteen = [b for b in _branch_blocks(plan) if fusable_basic_block(b)
               and b.convs[0].weight.shape[0] == 16]
    assert sixteen and len(sixteen) < _fusable_count(plan)
    be, calls = _run_engine(model, x, plan, True, monkeypatch)
    if forced == "fused":
        assert calls == [16] * len(sixteen)                    # the widths of the blocks run
        assert set(be._packed) == {id(c) for b in sixteen for c in b.convs}
    else:
        assert calls == []
    if forced is None:
        assert not be._packed and be._block is None


# ------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [(24, 256, 512), (40, 128, 256), (72, 64, 128), (144, 32, 64),
                                  (48, 256, 512), (96, 128, 256), (192, 64, 128), (384, 32, 64),
                                  (24, 60, 65)],
                         ids=lambda c: "c%d_%dx%d" % c)
def test_block_gpu_full_shapes(case, dtype, monkeypatch):
    """Every w18/w48 branch-body block at 1024x2048 (and a ragged size), one config each."""
    c, h, w = case
    _one_config(monkeypatch, (8, 16), (64, 32, 4, 2))
    dev = torch.device("cuda")
    ws, bs = _make_block(c, seed=2)
    x = torch.randn(1, c, h, w).to(dtype)
    out = kblock.basic_block(x.to(dev).contiguous(memory_format=torch.channels_last),
                             ws[0].to(dev, dtype), bs[0].to(dev), ws[1].to(dev, dtype), bs[1].to(dev))
    _check(out, x, ws, bs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("c", [24, 144])
def test_block_gpu_every_config(c, monkeypatch):
    """Each autotune config alone (the tile and the block shape), fp16, a ragged size."""
    from itertools import product
    dev = torch.device("cuda")
    ws, bs = _make_block(c, seed=6)
    x = torch.randn(2, c, 37, 70).half()
    tiles, shapes = _DEFAULT_TILES, _DEFAULT_SHAPES
    for tile, shape in product(tiles, shapes):
        _one_config(monkeypatch, tile, shape)
        out = kblock.basic_block(x.to(dev), ws[0].to(dev).half(), bs[0].to(dev), ws[1].to(dev).half(),
                                 bs[1].to(dev))
        _check(out, x, ws, bs, torch.float16)


@pytest.mark.gpu
def test_block_gpu_graph_replay():
    dev = torch.device("cuda")
    ws, bs = _make_block(40, seed=4, dtype=torch.float16)
    wp = [kconv.pack_weight(w.to(dev)) for w in ws]
    bd = [b.to(dev) for b in bs]
    x = torch.randn(2, 40, 64, 96, device=dev).half().contiguous(memory_format=torch.channels_last)
    assert_graph_replay_equal(lambda t: kblock.basic_block(t, wp[0], bd[0], wp[1], bd[1]), x)
