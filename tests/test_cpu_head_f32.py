"""The float32 seg head in one pass (csrc/cpu_head_f32.cpp, hrnet_fast/cpu_ext.py: seg_head_f32_cpu)
and its use by the torch backend's float32 engine (TorchCPU.projected_head, engine.run_seg_head).

The kernel needs AVX-512 or AVX2 (torch's CPU capability picks the variant) and the JIT build.
Where either is missing, every kernel test is skipped with the reason: the kernel is then NOT
tested. The routing tests at the end run everywhere.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from helpers import (poisoned_malloc, randomize_bn, require_cpu_kernels,
                     runtime_warnings_over_two_calls, seeded_cl)
from oracles import assert_close_to_oracle, assert_model_close

from hrnet_fast import HRNet, HRNetConfig, cpu_ext, optimize
from hrnet_fast.backends import torch_cpu
from hrnet_fast.plan import ConvSpec
from hrnet_fast.reference import HighResolutionNet

CL = torch.channels_last


@pytest.fixture(scope="module")
def built():
    require_cpu_kernels("the fp32 head")


class Head:
    """A random head: projection ci -> cm, classifier cm -> co, contributions at ``sizes``."""

    def __init__(self, n, ci, h, w, cm, co, sizes, seed, bias=True):
        g = torch.Generator().manual_seed(seed)
        self.x = seeded_cl((n, ci, h, w), seed)
        self.wp = torch.randn(cm, ci, 1, 1, generator=g) / ci ** 0.5
        self.wc = torch.randn(co, cm, 1, 1, generator=g) / cm ** 0.5
        self.bp = torch.randn(cm, generator=g) if bias else None
        self.bc = torch.randn(co, generator=g) if bias else None
        self.cs = [seeded_cl((n, cm, hk, wk), seed + 1 + k) for k, (hk, wk) in enumerate(sizes)]

    def run(self, mode, align=False):
        return cpu_ext.seg_head_f32_cpu(self.x, self.wp, self.bp, self.cs, self.wc, self.bc,
                                        mode=mode, align_corners=align)

    def oracle(self, mode, align=False):
        """The head as float64 torch ops: projection, resize + add + ReLU, classifier."""
        def d(t):
            return None if t is None else t.double()
        h = F.conv2d(self.x.double(), self.wp.double(), d(self.bp))
        for t in self.cs:
            kw = {} if mode == "nearest" else {"align_corners": align}
            h = h + F.interpolate(t.double(), size=self.x.shape[-2:], mode=mode, **kw)
        return F.conv2d(h.relu(), self.wc.double(), d(self.bc))


CASES = [
    # n, ci, h, w, cm, co, contribution sizes: w18's head (126 -> 270 -> 19), odd widths and
    # channel counts, Cm and Co not multiples of 16 or of the 3-vector tile (70 outputs: 5
    # vectors), partial 8-pixel blocks (AVX-512) and 48-pixel blocks (AVX2: 101 columns are two
    # full blocks and 5 pixels), batch 2, a contribution at full size, none at all
    (1, 126, 16, 32, 270, 19, [(2, 4)]),
    (1, 40, 4, 101, 24, 7, [(2, 26)]),
    (2, 33, 7, 37, 36, 5, [(4, 19), (2, 10)]),
    (1, 64, 9, 17, 50, 70, [(5, 9), (9, 17)]),
    (2, 30, 5, 48, 18, 16, []),
    (1, 8, 3, 5, 16, 1, [(2, 3)]),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode,align", [("bilinear", False), ("bilinear", True),
                                        ("nearest", False)])
def test_matches_oracle(built, case, mode, align):
    """Against the float64 composition within the float32 bound; every output value written
    (fresh heap memory is poisoned)."""
    n, ci, h, w, cm, co, sizes = case
    head = Head(n, ci, h, w, cm, co, sizes, seed=ci + cm)
    with poisoned_malloc():
        out = head.run(mode, align)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=CL)
    assert_close_to_oracle(out, head.oracle(mode, align), dtype=torch.float32,
                           what=f"fp32 seg head {case} {mode} align={align}")


def test_without_biases_and_with_a_channel_slice(built):
    head = Head(2, 30, 6, 21, 36, 19, [], seed=3, bias=False)
    wide = seeded_cl((2, 44, 3, 11), seed=4)
    head.cs = [wide[:, 4:40]]
    for mode in ("bilinear", "nearest"):
        assert_close_to_oracle(head.run(mode), head.oracle(mode), dtype=torch.float32,
                               what=f"no biases, slice {mode}")


def test_nan_in_x_stays_at_its_pixel(built):
    head = Head(1, 34, 5, 37, 36, 5, [(3, 19)], seed=5)
    head.x[0, 7, 3, 33] = float("nan")  # pixel 33: a partial 8-pixel block
    out = head.run("bilinear")
    expected = torch.zeros_like(out, dtype=torch.bool)
    expected[0, :, 3, 33] = True
    assert torch.equal(torch.isnan(out), expected)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_nan_in_a_contribution_reaches_exactly_its_resize_taps(built, mode):
    head = Head(1, 34, 9, 37, 36, 5, [(4, 19)], seed=6)
    head.cs[0][0, 3, 2, 11] = float("nan")
    kw = {} if mode == "nearest" else {"align_corners": False}
    taps = F.interpolate(head.cs[0], size=(9, 37), mode=mode, **kw)
    expected = torch.isnan(taps).any(1, keepdim=True).expand(1, 5, 9, 37)
    assert expected.any()
    assert torch.equal(torch.isnan(head.run(mode)), expected)


def test_opcheck(built):
    head = Head(2, 34, 5, 21, 36, 19, [(3, 11)], seed=7)
    torch.library.opcheck(torch.ops.hrnet_fast_cpu.seg_head_f32.default,
                          (head.x, head.wp, head.bp, head.cs, "bilinear", False, head.wc, head.bc))


@pytest.mark.parametrize("bad,match", [
    ("dtype", "x must be a dense channels_last float32"),
    ("nchw", "x must be a dense channels_last float32"),
    ("proj", "proj must be a float32 \\[Cm, 34, 1, 1\\] weight"),
    ("cls", "cls must be a float32 \\[Co, 36, 1, 1\\] weight"),
    ("bias", "proj_bias must be a CPU tensor \\[36\\]"),
    ("channels", "contributions\\[0\\] must be \\[1, 36, h <= 5, w <= 21\\]"),
    ("larger", "contributions\\[0\\] must be \\[1, 36, h <= 5, w <= 21\\]"),
    ("mode", "mode must be 'nearest' or 'bilinear'"),
])
def test_bad_input_gets_one_clear_error(built, bad, match):
    head = Head(1, 34, 5, 21, 36, 19, [(3, 11)], seed=8)
    mode = "bilinear"
    if bad == "dtype":
        head.x = head.x.double().contiguous(memory_format=CL)
    elif bad == "nchw":
        head.x = head.x.contiguous()
    elif bad == "proj":
        head.wp = head.wp[:, :32]
    elif bad == "cls":
        head.wc = head.wc[:, :32]
    elif bad == "bias":
        head.bp = head.bp[:5]
    elif bad == "channels":
        head.cs = [seeded_cl((1, 18, 3, 11), seed=9)]
    elif bad == "larger":
        head.cs = [seeded_cl((1, 36, 6, 11), seed=9)]
    else:
        mode = "bicubic"
    with pytest.raises(RuntimeError, match=match):
        head.run(mode)


# ------------------------------------------------------------------------- the torch backend
@pytest.fixture
def head_calls(built, monkeypatch):
    """Every call of the float32 seg head: (x's channels, the classifier's outputs)."""
    calls = []
    real = cpu_ext.seg_head_f32_cpu
    monkeypatch.setitem(torch_cpu._F32_HEAD, "on", True)

    def spy(x, proj, proj_bias, contributions, cls, cls_bias, **kwargs):
        calls.append((x.shape[1], cls.shape[0]))
        return real(x, proj, proj_bias, contributions, cls, cls_bias, **kwargs)

    monkeypatch.setattr(cpu_ext, "seg_head_f32_cpu", spy)
    return calls


def _model(preset, mode="bilinear", seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = HRNetConfig.preset(preset, upsample=mode, **overrides)
    return randomize_bn(HRNet(cfg, fast=False), seed).eval()


@pytest.mark.parametrize("preset,mode,size", [("w18_small_v2", "bilinear", (2, 3, 75, 101)),
                                              ("w18_small_v1", "nearest", (1, 3, 64, 96))])
def test_fp32_engine_takes_the_fused_head(head_calls, preset, mode, size):
    """The fp32 engine's seg head in one pass, against the float64 reference within the design's
    fp32 bound: odd sizes, batch 2, both upsampling modes."""
    model = _model(preset, mode)
    x = torch.randn(*size, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        out = optimize(model, backend="torch", dtype=torch.float32)(x)
        ref64 = HighResolutionNet.forward(model.double(), x.double())
    assert_model_close(out, ref64, dtype=torch.float32, what=f"{preset} {mode} {size} fp32")
    # x is branch 0 and the narrow branches concatenated (w18_small_v2: 18 + 36 + 72 of 270 head
    # channels; w18_small_v1: 16 + 32 + 64 of 240)
    narrow = {"w18_small_v2": 126, "w18_small_v1": 112}[preset]
    assert head_calls == [(narrow, 19)], head_calls


def test_a_three_by_three_classifier_keeps_the_unfused_head(head_calls):
    model = _model("w18_small_v1", final_conv_kernel=3)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    with torch.inference_mode():
        out = optimize(model, backend="torch", dtype=torch.float32)(x)
        ref64 = HighResolutionNet.forward(model.double(), x.double())
    assert_model_close(out, ref64, dtype=torch.float32, what="3x3 classifier fp32")
    assert head_calls == []


def test_a_failing_head_warns_once_and_the_unfused_head_answers(head_calls, monkeypatch):
    monkeypatch.setattr(torch_cpu, "_WARNED", set())
    model = _model("w18_small_v1")
    x = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(13))
    with torch.inference_mode():
        ref64 = HighResolutionNet.forward(model.double(), x.double())

    def failing(*args, **kwargs):
        head_calls.append("failed")
        raise RuntimeError("planted failure")

    monkeypatch.setattr(cpu_ext, "seg_head_f32_cpu", failing)
    engine = optimize(model, backend="torch", dtype=torch.float32)
    messages = runtime_warnings_over_two_calls(engine, x, ref64, "after the failure")
    assert len(messages) == 1 and "planted failure" in messages[0] and "switched off" in messages[0]
    assert torch_cpu._F32_HEAD["on"] is False and head_calls == ["failed"]


# ------------------------------------------------------------------------- routing (everywhere)
def _spec(ci, cm, relu=False, dtype=torch.float32):
    return ConvSpec(torch.zeros(cm, ci, 1, 1, dtype=dtype), None, 1, 0, relu)


@pytest.mark.parametrize("what", ["bf16 weights", "fp64", "nchw", "relu", "3x3", "cls3x3",
                                  "contribution dtype", "contribution larger", "grad"])
def test_the_fit_rule_refuses(what, monkeypatch):
    """What the fused fp32 head does not take (the engine then runs the unfused head)."""
    monkeypatch.setitem(torch_cpu._F32_HEAD, "on", True)
    x = torch.zeros(1, 34, 8, 16).contiguous(memory_format=CL)
    spec, cls = _spec(34, 36), torch.zeros(19, 36, 1, 1)
    cs = [torch.zeros(1, 36, 4, 8).contiguous(memory_format=CL)]
    if what == "bf16 weights":
        spec = _spec(34, 36, dtype=torch.bfloat16)
    elif what == "fp64":
        x = x.double()
    elif what == "nchw":
        x = x.contiguous()
    elif what == "relu":
        spec = _spec(34, 36, relu=True)
    elif what == "3x3":
        spec = ConvSpec(torch.zeros(36, 34, 3, 3), None, 1, 1, False)
    elif what == "cls3x3":
        cls = torch.zeros(19, 36, 3, 3)
    elif what == "contribution dtype":
        cs = [cs[0].double()]
    elif what == "contribution larger":
        cs = [torch.zeros(1, 36, 9, 8).contiguous(memory_format=CL)]
    else:
        x.requires_grad_(True)
    assert torch_cpu.f32_head_fits(x, spec, cs, cls) is False


def test_the_fit_rule_takes_the_engine_head(built):
    x = torch.zeros(1, 34, 8, 16).contiguous(memory_format=CL)
    cs = [torch.zeros(1, 36, 4, 8).contiguous(memory_format=CL)]
    with torch.inference_mode():
        assert torch_cpu.f32_head_fits(x, _spec(34, 36), cs, torch.zeros(19, 36, 1, 1))
