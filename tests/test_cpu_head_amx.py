"""The bfloat16 AMX seg head (csrc/cpu_head_amx.cpp, hrnet_fast/cpu_ext.py: seg_head_amx_cpu) and
its use by the torch backend's bfloat16 engine (TorchCPU.projected_head, engine.run_seg_head).

The kernel needs AMX-BF16 (Intel Xeon from Sapphire Rapids on) and the JIT build. Where either is
missing, every kernel test is skipped with the reason: the kernel is then NOT tested. The routing
tests at the end run everywhere.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import poisoned_malloc, randomize_bn, require_cpu_kernels
from oracles import assert_close_to_oracle, assert_model_close

from hrnet_fast import HRNet, HRNetConfig, cpu_ext, optimize
from hrnet_fast.backends import torch_cpu
from hrnet_fast.plan import ConvSpec
from hrnet_fast.reference import HighResolutionNet

CL = torch.channels_last
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def built():
    require_cpu_kernels("the AMX head", avx=False)
    if not cpu_ext.amx_conv_supported():
        pytest.skip("this CPU or OS offers no AMX-BF16 tiles: the AMX head is NOT tested")


def _tensor(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(BF16).contiguous(memory_format=CL)


class Head:
    """A random head: projection ci -> cm, classifier cm -> co (bf16 weights, float32 biases),
    contributions at ``sizes`` (batch n)."""

    def __init__(self, n, ci, h, w, cm, co, sizes, seed, bias=True):
        g = torch.Generator().manual_seed(seed)
        self.x = _tensor((n, ci, h, w), seed)
        self.wp = (torch.randn(cm, ci, 1, 1, generator=g) / ci ** 0.5).to(BF16)
        self.wc = (torch.randn(co, cm, 1, 1, generator=g) / cm ** 0.5).to(BF16)
        self.bp = torch.randn(cm, generator=g).to(BF16).float() if bias else None
        self.bc = torch.randn(co, generator=g).to(BF16).float() if bias else None
        self.cs = [_tensor((n, cm, hk, wk), seed + 1 + k) for k, (hk, wk) in enumerate(sizes)]

    def run(self, mode, align=False, contributions=None):
        cs = self.cs if contributions is None else contributions
        return cpu_ext.seg_head_amx_cpu(self.x, cpu_ext.conv_amx_pack(self.wp), self.bp, cs,
                                        cpu_ext.conv_amx_pack(self.wc), self.bc,
                                        proj_size=self.wp.shape[:2], cls_size=self.wc.shape[:2],
                                        mode=mode, align_corners=align)

    def composed(self, dtype, mode, align=False):
        """The head as torch ops in ``dtype``: projection, resize + add + ReLU, classifier."""
        def c(t):
            return None if t is None else t.to(dtype)
        h = F.conv2d(self.x.to(dtype), self.wp.to(dtype), c(self.bp))
        for t in self.cs:
            kw = {} if mode == "nearest" else {"align_corners": align}
            h = h + F.interpolate(t.to(dtype), size=self.x.shape[-2:], mode=mode, **kw)
        return F.conv2d(h.relu(), self.wc.to(dtype), c(self.bc))


CASES = [
    # n, ci, h, w, cm, co, contribution sizes: w18's head (126 -> 270 -> 19, branch 3 at 1/8),
    # a K tail of 2 (ci 34), no K tail (64), Cm not a multiple of 16, more than four classifier
    # N tiles (70), partial 16- and 32-pixel blocks, batch 2, a contribution at full size
    (1, 126, 16, 32, 270, 19, [(2, 4)]),
    (2, 34, 7, 37, 36, 5, [(4, 19), (2, 10)]),
    (1, 64, 9, 17, 50, 70, [(5, 9), (9, 17)]),
    (2, 30, 5, 48, 18, 16, []),
    (1, 34, 3, 7, 36, 19, [(2, 4)]),  # narrower than one block
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode,align", [("bilinear", False), ("bilinear", True),
                                        ("nearest", False)])
def test_matches_oracle(built, case, mode, align):
    """Against the float64 composition, within 2x the composition's own bfloat16 error; every
    output value written (fresh heap memory is poisoned)."""
    n, ci, h, w, cm, co, sizes = case
    head = Head(n, ci, h, w, cm, co, sizes, seed=ci + cm)
    with poisoned_malloc():
        out = head.run(mode, align)
    assert out.dtype == BF16 and out.is_contiguous(memory_format=CL)
    assert_close_to_oracle(out, head.composed(torch.float64, mode, align),
                           head.composed(BF16, mode, align), dtype=BF16,
                           what=f"seg head {case} {mode} align={align}")


def test_without_biases(built):
    head = Head(1, 30, 6, 21, 36, 19, [(3, 11)], seed=3, bias=False)
    assert_close_to_oracle(head.run("bilinear"), head.composed(torch.float64, "bilinear"),
                           head.composed(BF16, "bilinear"), dtype=BF16, what="no biases")


def test_a_channel_slice_contribution(built):
    """A contribution with channel stride 1 but wider pixel strides (a channel slice of a
    channels_last tensor, as the fuse kernel takes): its strides are read, not assumed."""
    head = Head(2, 34, 7, 37, 36, 5, [], seed=9)
    wide = _tensor((2, 44, 4, 19), seed=10)
    head.cs = [wide[:, 4:40]]
    assert not head.cs[0].is_contiguous(memory_format=CL)
    for mode in ("bilinear", "nearest"):
        assert_close_to_oracle(head.run(mode), head.composed(torch.float64, mode),
                               head.composed(BF16, mode), dtype=BF16, what=f"slice {mode}")


def test_nan_in_x_stays_at_its_pixel(built):
    """A NaN input channel reaches exactly its own pixel's outputs (a 1x1 projection)."""
    head = Head(1, 34, 5, 37, 36, 5, [(3, 19)], seed=4)
    head.x[0, 7, 3, 33] = float("nan")  # pixel 33: the partial block of the row's second pair
    out = head.run("bilinear")
    expected = torch.zeros_like(out, dtype=torch.bool)
    expected[0, :, 3, 33] = True
    assert torch.equal(torch.isnan(out), expected)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_nan_in_a_contribution_reaches_exactly_its_resize_taps(built, mode):
    """A NaN contribution value reaches the pixels whose resize reads it, as F.interpolate's."""
    head = Head(1, 34, 9, 37, 36, 5, [(4, 19)], seed=5)
    head.cs[0][0, 3, 2, 11] = float("nan")
    kw = {} if mode == "nearest" else {"align_corners": False}
    taps = F.interpolate(head.cs[0].float(), size=(9, 37), mode=mode, **kw)
    expected = torch.isnan(taps).any(1, keepdim=True).expand(1, 5, 9, 37)
    assert expected.any()
    assert torch.equal(torch.isnan(head.run(mode)), expected)


def test_opcheck(built):
    """Schema, fake kernel and dispatch agree with the real kernel."""
    head = Head(2, 34, 5, 21, 36, 19, [(3, 11)], seed=6)
    torch.library.opcheck(torch.ops.hrnet_fast_cpu.seg_head_amx.default,
                          (head.x, cpu_ext.conv_amx_pack(head.wp), [36, 34], head.bp, head.cs,
                           "bilinear", False, cpu_ext.conv_amx_pack(head.wc), [19, 36], head.bc))


@pytest.mark.parametrize("bad,match", [
    ("dtype", "x must be a dense channels_last bfloat16"),
    ("nchw", "x must be a dense channels_last bfloat16"),
    ("proj", "the packed proj weight takes 32 input channels, its input has 34"),
    ("cls", "the packed cls weight takes 32 input channels, its input has 36"),
    ("bias", "proj_bias must be a CPU tensor \\[36\\]"),
    ("channels", "contributions\\[0\\] must be \\[1, 36, h <= 5, w <= 21\\]"),
    ("larger", "contributions\\[0\\] must be \\[1, 36, h <= 5, w <= 21\\]"),
    ("mode", "mode must be 'nearest' or 'bilinear'"),
])
def test_bad_input_gets_one_clear_error(built, bad, match):
    head = Head(1, 34, 5, 21, 36, 19, [(3, 11)], seed=7)
    mode = "bilinear"
    if bad == "dtype":
        head.x = head.x.float().contiguous(memory_format=CL)
    elif bad == "nchw":
        head.x = head.x.contiguous()
    elif bad == "proj":
        head.wp = head.wp[:, :32]
    elif bad == "cls":
        head.wc = head.wc[:, :32]
    elif bad == "bias":
        head.bp = head.bp[:5]
    elif bad == "channels":
        head.cs = [_tensor((1, 18, 3, 11), seed=8)]
    elif bad == "larger":
        head.cs = [_tensor((1, 36, 6, 11), seed=8)]
    else:
        mode = "bicubic"
    with pytest.raises(RuntimeError, match=match):
        head.run(mode)


# ------------------------------------------------------------------------- the torch backend
@pytest.fixture
def head_calls(built, monkeypatch):
    """Every call of the AMX seg head: (x's channels, the classifier's outputs)."""
    calls = []
    real = cpu_ext.seg_head_amx_cpu
    monkeypatch.setitem(torch_cpu._AMX_HEAD, "on", True)

    def spy(x, proj, proj_bias, contributions, cls, cls_bias, **kwargs):
        calls.append((x.shape[1], kwargs["cls_size"][0]))
        return real(x, proj, proj_bias, contributions, cls, cls_bias, **kwargs)

    monkeypatch.setattr(cpu_ext, "seg_head_amx_cpu", spy)
    return calls


def _model(preset, mode="bilinear", seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = HRNetConfig.preset(preset, upsample=mode, **overrides)
    return randomize_bn(HRNet(cfg, fast=False), seed).eval()


@pytest.mark.parametrize("preset,mode,size", [("w18_small_v2", "bilinear", (2, 3, 75, 101)),
                                              ("w18_small_v1", "nearest", (1, 3, 64, 96))])
def test_bf16_engine_takes_the_fused_head(head_calls, preset, mode, size):
    """The bf16 engine's seg head in one pass, against the float64 reference within 2x the
    reference's own bf16 error: odd sizes, batch 2, both upsampling modes."""
    model = _model(preset, mode)
    x = torch.randn(*size, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        out = optimize(model, backend="torch", dtype=BF16)(x.to(BF16))
        ref64 = HighResolutionNet.forward(model.double(), x.double())
        same = HighResolutionNet.forward(model.to(BF16), x.to(BF16))
    assert_model_close(out, ref64, same, dtype=BF16, what=f"{preset} {mode} {size} bf16")
    # x is branch 0 and the narrow branches concatenated: 18 + 36 + 72 (w18_small_v2 of 270 head
    # channels), 16 + 32 + 64 (w18_small_v1 of 240)
    narrow = {"w18_small_v2": 126, "w18_small_v1": 112}[preset]
    assert head_calls == [(narrow, 19)], head_calls


def test_a_three_by_three_classifier_keeps_the_unfused_head(head_calls):
    """final_conv_kernel=3: the classifier reads neighbouring pixels, so the head stays unfused."""
    model = _model("w18_small_v1", final_conv_kernel=3)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    with torch.inference_mode():
        out = optimize(model, backend="torch", dtype=BF16)(x.to(BF16))
        ref64 = HighResolutionNet.forward(model.double(), x.double())
        same = HighResolutionNet.forward(model.to(BF16), x.to(BF16))
    assert_model_close(out, ref64, same, dtype=BF16, what="3x3 classifier bf16")
    assert head_calls == []


def test_a_failing_head_warns_once_and_the_unfused_head_answers(head_calls, monkeypatch):
    monkeypatch.setattr(torch_cpu, "_WARNED", set())
    model = _model("w18_small_v1")
    x = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(13))
    with torch.inference_mode():
        ref64 = HighResolutionNet.forward(model.double(), x.double())
        same = HighResolutionNet.forward(model.to(BF16), x.to(BF16))

    def failing(*args, **kwargs):
        head_calls.append("failed")
        raise RuntimeError("planted failure")

    monkeypatch.setattr(cpu_ext, "seg_head_amx_cpu", failing)
    engine = optimize(model, backend="torch", dtype=BF16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with torch.inference_mode():
                out = engine(x.to(BF16))
            assert_model_close(out, ref64, same, dtype=BF16, what="after the failure")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "planted failure" in messages[0] and "switched off" in messages[0]
    assert torch_cpu._AMX_HEAD["on"] is False and head_calls == ["failed"]


# ------------------------------------------------------------------------- routing (everywhere)
def _spec(ci, cm, relu=False):
    return ConvSpec(torch.zeros(cm, ci, 1, 1, dtype=BF16), None, 1, 0, relu)


@pytest.mark.parametrize("what", ["fp32", "odd", "relu", "3x3", "cls3x3", "contribution dtype",
                                  "contribution larger", "contribution width"])
def test_the_fit_rule_refuses(what, monkeypatch):
    """What the fused head does not take (the engine then runs the unfused head)."""
    monkeypatch.setitem(torch_cpu._AMX_HEAD, "on", True)
    x = torch.zeros(1, 34, 8, 16, dtype=BF16).contiguous(memory_format=CL)
    spec, cls = _spec(34, 36), torch.zeros(19, 36, 1, 1, dtype=BF16)
    cs = [torch.zeros(1, 36, 4, 8, dtype=BF16).contiguous(memory_format=CL)]
    if what == "fp32":
        x = x.float()
    elif what == "odd":
        x, spec = x[:, :33].contiguous(memory_format=CL), _spec(33, 36)
    elif what == "relu":
        spec = _spec(34, 36, relu=True)
    elif what == "3x3":
        spec = ConvSpec(torch.zeros(36, 34, 3, 3, dtype=BF16), None, 1, 1, False)
    elif what == "cls3x3":
        cls = torch.zeros(19, 36, 3, 3, dtype=BF16)
    elif what == "contribution dtype":
        cs = [cs[0].float()]
    elif what == "contribution larger":
        cs = [torch.zeros(1, 36, 9, 8, dtype=BF16).contiguous(memory_format=CL)]
    else:
        cs = [torch.zeros(1, 18, 4, 8, dtype=BF16).contiguous(memory_format=CL)]
    assert torch_cpu.amx_head_fits(x, spec, cs, cls) is False


def test_the_fit_rule_takes_the_engine_head(built):
    x = torch.zeros(1, 34, 8, 16, dtype=BF16).contiguous(memory_format=CL)
    cs = [torch.zeros(1, 36, 4, 8, dtype=BF16).contiguous(memory_format=CL)]
    assert torch_cpu.amx_head_fits(x, _spec(34, 36), cs, torch.zeros(19, 36, 1, 1, dtype=BF16))
