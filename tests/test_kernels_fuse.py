"""Triton fuse-step and segmentation-head kernels against a float64 torch oracle.

On the CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
the same file runs on a GPU, where the cases marked ``gpu`` (bf16, full sizes, torch.compile, CUDA
graphs) run too.

Oracle and tolerance rule: tests/oracles.py (resizing in float32 index arithmetic, the adds, ReLU and
the 1x1 conv in float64; fp32 within 1e-6, fp16/bf16 within 2x the torch composition in that dtype).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE
from oracles import (
    FP32_TOL, GPU_AC_FP32_TOL, assert_close_to_oracle, fuse_fp64, fuse_same_dtype, head_fp64,
    head_same_dtype,
)

triton_status = pytest.importorskip("hrnet_fast.kernels").triton_status
_ok, _why = triton_status(DEVICE)
if not _ok:
    pytest.skip(f"Triton kernels cannot run here: {_why}", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from hrnet_fast.kernels.seg_head import _launch_head, seg_head  # noqa: E402
from hrnet_fast.kernels.upsample_add_relu import (  # noqa: E402
    _launch, _nearest_axis, output_like, resize_scales, upsample_add_relu,
)
from nearest_sweep import (  # noqa: E402
    assert_sweep_bit_exact, float64_product_disagrees, integer_tensor, one_cpu_thread, sweep_pairs,
)

# The interpreter (numpy < 2.3) warns on loops over a runtime bound; harmless.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def fp32_tol(mode, align_corners, head=False):
    """The fp32 override (keywords of assert_close_to_oracle) for the GPU checks at full sizes:
    GPU_AC_FP32_TOL (see tests/oracles.py) for GPU bilinear align_corners=True, and twice the bound
    for the 720-channel head (its classifier sums 720 products, each with the fuse step's error)."""
    on_gpu = torch.cuda.is_available()
    gpu_ac = on_gpu and mode == "bilinear" and align_corners
    tol, why = (GPU_AC_FP32_TOL, "GPU bilinear align_corners=True") if gpu_ac else (FP32_TOL, "")
    if head:
        tol, why = 2 * tol, " + ".join(filter(None, [why, "720-channel classifier: 2x"]))
    return {"fp32_tol": tol, "reason": why} if why else {}


MODES = [("nearest", False), ("bilinear", False), ("bilinear", True)]
MODE_IDS = ["nearest", "bilinear", "bilinear-ac"]

# (base H, W), [contribution (h, w)], a few are the base size (added as is)
SHAPES = {
    "odd3": ((15, 17), [(8, 9), (4, 5), (2, 3)]),
    "pow2+same": ((12, 12), [(6, 6), (3, 3), (12, 12)]),
    "one": ((9, 7), [(5, 4)]),
    "four": ((9, 11), [(5, 6), (3, 3), (9, 11), (2, 2)]),
    "zero": ((6, 10), []),
    "six": ((10, 9), [(5, 5), (3, 3), (10, 9), (2, 2), (7, 8), (1, 1)]),
}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype, channels_last=False, seed=0):
    t = torch.randn(shape, generator=_gen(seed)).to(device=DEVICE, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def _make(n, c, base_hw, contrib_hw, dtype, channels_last, seed=0):
    base = _rand((n, c) + tuple(base_hw), dtype, channels_last, seed)
    contribs = [_rand((n, c) + tuple(hw), dtype, channels_last, seed + 1 + k)
                for k, hw in enumerate(contrib_hw)]
    return base, contribs


def _check_layout(out, base, channels):
    n, _, h, w = base.shape
    assert out.shape == (n, channels, h, w)
    assert out.dtype == base.dtype and out.device == base.device
    if base.is_contiguous(memory_format=torch.channels_last):
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()
    assert torch.isfinite(out).all(), "non-finite values in the output"


# ------------------------------------------------------------------------------------------------
# upsample_add_relu
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fuse_matches_oracle(dtype, shape, mode, align_corners, channels_last):
    base_hw, contrib_hw = SHAPES[shape]
    c = 36 if shape in ("pow2+same", "six") else 18
    base, contribs = _make(2, c, base_hw, contrib_hw, dtype, channels_last, seed=len(contrib_hw))
    out = upsample_add_relu(base, contribs, mode=mode, align_corners=align_corners)
    _check_layout(out, base, c)
    assert_close_to_oracle(out, fuse_fp64(base, contribs, mode, align_corners),
                           fuse_same_dtype(base, contribs, mode, align_corners), dtype=dtype, what=shape)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("c", [5, 200], ids=["C5", "C200"])
def test_fuse_relu_flag_and_channel_blocks(relu, channels_last, c):
    # C=200: more than one channel block (128 for NHWC, 32 for NCHW) and a partial last block.
    base, contribs = _make(2, c, (7, 9), [(4, 5), (7, 9), (3, 2)], torch.float32, channels_last, 3)
    out = upsample_add_relu(base, contribs, mode="bilinear", relu=relu)
    _check_layout(out, base, c)
    assert_close_to_oracle(out, fuse_fp64(base, contribs, "bilinear", False, relu=relu),
                           dtype=torch.float32)
    if not relu:
        assert (out < 0).any()


def test_fuse_mixed_layouts_and_strided_views():
    # base NCHW; one contribution channels_last, one a channel slice of a channels_last tensor
    # (how a horizontally batched 1x1 conv output is consumed), one an NCHW channel slice.
    g = 18
    base = _rand((2, g, 11, 13), torch.float32, False, 10)
    stacked_cl = _rand((2, 3 * g, 6, 7), torch.float32, True, 11)
    stacked = _rand((2, 2 * g, 3, 4), torch.float32, False, 12)
    same_cl = _rand((2, g, 11, 13), torch.float32, True, 13)
    contribs = [stacked_cl[:, g:2 * g], stacked[:, g:], same_cl]
    assert not contribs[0].is_contiguous() and not contribs[1].is_contiguous()
    for mode, ac in MODES:
        out = upsample_add_relu(base, contribs, mode=mode, align_corners=ac)
        _check_layout(out, base, g)
        assert_close_to_oracle(out, fuse_fp64(base, contribs, mode, ac), dtype=torch.float32,
                               what=f"{mode} ac={ac}")
    # channels_last base given as a channel slice: output is channels_last
    base_cl = _rand((2, 2 * g, 11, 13), torch.float32, True, 14)[:, :g]
    out = upsample_add_relu(base_cl, contribs, mode="bilinear")
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(out).all()
    assert_close_to_oracle(out, fuse_fp64(base_cl, contribs, "bilinear", False), dtype=torch.float32)


@pytest.mark.parametrize("base_hw,contrib_hw", [((13, 5), (1, 1)), ((7, 7), (1, 7)), ((1, 1), (1, 1)),
                                                 ((1, 9), (1, 4)), ((8, 1), (3, 1))],
                         ids=["13x5<1x1", "7x7<1x7", "1x1<1x1", "1x9<1x4", "8x1<3x1"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fuse_degenerate_sizes(base_hw, contrib_hw, channels_last):
    base, contribs = _make(1, 4, base_hw, [contrib_hw], torch.float32, channels_last, 20)
    for mode, ac in MODES:
        out = upsample_add_relu(base, contribs, mode=mode, align_corners=ac)
        assert_close_to_oracle(out, fuse_fp64(base, contribs, mode, ac), dtype=torch.float32,
                               what=f"{mode} ac={ac}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fuse_poisoned_preallocated_output(channels_last):
    base, contribs = _make(2, 18, (15, 17), [(8, 9), (4, 5), (2, 3)], torch.float16, channels_last, 5)
    out = output_like(base)
    out.fill_(float("nan"))
    _launch(out, base, contribs, "bilinear", False, True)
    assert torch.isfinite(out).all()
    assert_close_to_oracle(out, fuse_fp64(base, contribs, "bilinear", False),
                           fuse_same_dtype(base, contribs, "bilinear", False), dtype=torch.float16,
                           what="poisoned")


# The nearest-index sweep (tests/nearest_sweep.py): the Triton kernel's index helper on every pair,
# real launches on the pairs where a float64 product would go wrong, and on a GPU the whole sweep
# through the real kernel.
@triton.jit
def _nearest_axis_probe(dst_ptr, in_ptr, scale_ptr, src_ptr, n, BLOCK: tl.constexpr):
    """src[k] = _nearest_axis(dst[k], in[k], scale[k]): the kernel's own index helper, many
    (pair, dst) items per launch."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = k < n
    dst = tl.load(dst_ptr + k, mask=m, other=0)
    in_size = tl.load(in_ptr + k, mask=m, other=1)
    scale = tl.load(scale_ptr + k, mask=m, other=1.0)
    tl.store(src_ptr + k, _nearest_axis(dst, in_size, scale), mask=m)


def test_nearest_index_helper_matches_interpolate_on_every_pair():
    """The kernel's index helper, with the scales the host passes (resize_scales), against
    F.interpolate's sources on every pair of the sweep: ~500k (pair, dst) items in one launch under
    the interpreter (a ~1M-wide block is plain numpy there), 1024-wide blocks on a GPU."""
    dst, ins, outs, scales, want = [], [], [], [], []
    with one_cpu_thread():
        for i, o in sweep_pairs():
            dst.append(torch.arange(o, dtype=torch.int32))
            ins.append(torch.full((o,), i, dtype=torch.int32))
            outs.append(torch.full((o,), o, dtype=torch.int32))
            scales.append(torch.full((o,), resize_scales(i, i, o, o, "nearest", False)[0]))
            idx = torch.arange(i, dtype=torch.float32).view(1, 1, 1, i)
            want.append(F.interpolate(idx, size=(1, o), mode="nearest").view(-1).to(torch.int32))
    dst, ins, outs, scales, want = (torch.cat(t) for t in (dst, ins, outs, scales, want))
    assert scales.dtype == torch.float32
    n = dst.numel()
    got = torch.full_like(dst, -1, device=DEVICE)
    block = 1024 if DEVICE.type == "cuda" else triton.next_power_of_2(n)
    _nearest_axis_probe[(triton.cdiv(n, block),)](dst.to(DEVICE), ins.to(DEVICE),
                                                  scales.to(DEVICE), got, n, BLOCK=block)
    wrong = got.cpu() != want
    pairs = torch.unique(torch.stack([ins[wrong], outs[wrong]], 1), dim=0).tolist()
    assert not pairs, (f"{int(wrong.sum())} of {n} nearest source indices differ from "
                       f"F.interpolate; {len(pairs)} in->out pairs, e.g. {pairs[:20]}")


def _float64_sensitive_launches(n_outs: int = 8, per_out: int = 8):
    """[(base (H, W), [(h, w), ...])]: each call resizes ``per_out`` contributions into an H x W
    base, where h -> H and w -> W are pairs whose nearest sources change if the index product is
    taken in float64. The pairs are found here, by comparing both products (nearest_sweep.py);
    the known ones from HRNet (6 -> 46, 12 -> 46) and 2 -> 50, 2 -> 58 come first."""
    known = {46: [6, 12], 50: [2], 58: [2]}
    sensitive = {}
    for i, o in sweep_pairs():
        if float64_product_disagrees(i, o):
            sensitive.setdefault(o, []).append(i)
    for o, ins in known.items():
        assert set(ins) <= set(sensitive.get(o, ())), f"{ins} -> {o} no longer float64-sensitive"
    others = sorted((o for o in sensitive if o not in known), key=lambda o: -len(sensitive[o]))
    outs = list(known) + others[:n_outs - len(known)]
    picks = {o: (known.get(o, []) + [i for i in sensitive[o][::-1] if i not in known.get(o, [])])
             [:per_out] for o in outs}
    launches = []
    for out_h, out_w in zip(outs[0::2], outs[1::2]):
        hs, ws = picks[out_h], picks[out_w]
        count = max(len(hs), len(ws))
        sizes = [(hs[k % len(hs)], ws[k % len(ws)]) for k in range(count)]
        launches.append(((out_h, out_w), sizes))
    return launches


def test_fuse_nearest_real_launches_on_float64_sensitive_pairs():
    """The real kernel (more than four contributions: a presum launch, then the final one) on pairs
    where only PyTorch's float32 product gives the right rows: bit for bit. Integer values keep
    every sum exact, so any wrong source row or column shows. One channel, NCHW: the layouts
    share the index arithmetic, and the interpreter's time grows with the programs launched."""
    launches = _float64_sensitive_launches()
    covered = {(h, H) for (H, _), sizes in launches for h, _ in sizes}
    covered |= {(w, W) for (_, W), sizes in launches for _, w in sizes}
    assert {(6, 46), (12, 46), (2, 50), (2, 58)} <= covered and len(covered) >= 40
    for (H, W), sizes in launches:
        base = integer_tensor((1, 1, H, W), DEVICE, seed=H * W)
        contribs = [integer_tensor((1, 1, h, w), DEVICE, seed=H * W + k + 1)
                    for k, (h, w) in enumerate(sizes)]
        out = upsample_add_relu(base, contribs, mode="nearest", relu=False)
        want = base + torch.stack([F.interpolate(t, size=(H, W), mode="nearest")
                                   for t in contribs]).sum(0)
        if not torch.equal(out, want):
            zero = torch.zeros_like(base)
            bad = [f"{h}x{w}" for (h, w), t in zip(sizes, contribs) if not torch.equal(
                upsample_add_relu(zero, [t], mode="nearest", relu=False),
                F.interpolate(t, size=(H, W), mode="nearest"))]
            raise AssertionError(f"nearest into {H}x{W}: {int((out != want).sum())} values differ "
                                 f"from F.interpolate; contributions {bad}")


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_fuse_nearest_full_sweep(channels_last):
    """Every pair of the sweep through the real kernel on the GPU, bit for bit."""
    def run(base, contribs):
        return upsample_add_relu(base, contribs, mode="nearest", relu=False)

    checked = assert_sweep_bit_exact(run, DEVICE, channels=4 if channels_last else 1,
                                     channels_last=channels_last, what="Triton upsample_add_relu")
    assert checked == len(sweep_pairs())


@pytest.mark.parametrize("align_corners", [False, True])
def test_fuse_bilinear_close_to_interpolate_fp32(align_corners):
    # Against F.interpolate itself in float32: same index arithmetic, so the difference is only
    # float32 rounding of the interpolation (no neighbour or weight differs).
    for (h, H), (w, W) in [((60, 119), (30, 119)), ((33, 130), (17, 130)), ((8, 15), (9, 17))]:
        c = _rand((1, 3, h, w), torch.float32, False, h + w)
        base = torch.zeros((1, 3, H, W), device=DEVICE)
        out = upsample_add_relu(base, [c], mode="bilinear", align_corners=align_corners, relu=False)
        ref = F.interpolate(c, size=(H, W), mode="bilinear", align_corners=align_corners)
        assert (out - ref).abs().max().item() <= 4e-6 * ref.abs().max().item()


def test_fuse_validation_errors():
    base, contribs = _make(2, 8, (6, 6), [(3, 3)], torch.float32, False)
    with pytest.raises(ValueError, match="channels"):
        upsample_add_relu(base, [contribs[0][:, :4]])
    with pytest.raises(ValueError, match="batch"):
        upsample_add_relu(base, [contribs[0][:1]])
    with pytest.raises(ValueError, match="larger than base"):
        upsample_add_relu(base, [_rand((2, 8, 7, 6), torch.float32)])
    with pytest.raises(ValueError, match="dtype"):
        upsample_add_relu(base, [contribs[0].half()])
    with pytest.raises(ValueError, match="mode"):
        upsample_add_relu(base, contribs, mode="bicubic")
    with pytest.raises(ValueError, match="align_corners"):
        upsample_add_relu(base, contribs, mode="nearest", align_corners=True)
    with pytest.raises(ValueError, match="4-D"):
        upsample_add_relu(base[0], contribs)


def test_ops_registered():
    schema = str(torch.ops.hrnet_fast.upsample_add_relu_triton.default._schema)
    assert "Tensor[] contributions" in schema and "str mode" in schema and "bool relu" in schema
    schema = str(torch.ops.hrnet_fast.seg_head_triton.default._schema)
    assert "Tensor[] contributions" in schema and "Tensor? bias" in schema


# ------------------------------------------------------------------------------------------------
# seg_head
# ------------------------------------------------------------------------------------------------
def _head_weights(k, c, dtype, seed=100, with_bias=True):
    w = (torch.randn((k, c, 1, 1), generator=_gen(seed)) / c ** 0.5).to(DEVICE, dtype)
    b = torch.randn((k,), generator=_gen(seed + 1)).to(DEVICE, dtype) if with_bias else None
    return w, b


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_head_matches_oracle(dtype, mode, align_corners, channels_last):
    c, k = 18 + 36, 19
    base, contribs = _make(2, c, (15, 17), [(8, 9), (4, 5), (2, 3)], dtype, channels_last, 30)
    w, b = _head_weights(k, c, dtype)
    out = seg_head(base, contribs, w, b, mode=mode, align_corners=align_corners)
    _check_layout(out, base, k)
    assert_close_to_oracle(out, head_fp64(base, contribs, w, b, mode, align_corners),
                           head_same_dtype(base, contribs, w, b, mode, align_corners), dtype=dtype,
                           what="head")


@pytest.mark.parametrize("case", ["no-bias", "C150-K70", "zero", "six", "same-size"])
def test_head_variants(case):
    c, k, shapes, bias = 54, 19, [(6, 6), (3, 3)], True
    if case == "no-bias":
        bias = False
    elif case == "C150-K70":
        c, k = 150, 70  # three channel chunks (last partial) and two class blocks
    elif case == "zero":
        shapes = []
    elif case == "six":
        shapes = [(6, 6), (3, 3), (12, 12), (2, 2), (5, 7), (1, 1)]
    elif case == "same-size":
        shapes = [(12, 12)]
    base, contribs = _make(2, c, (12, 12), shapes, torch.float32, True, 40)
    w, b = _head_weights(k, c, torch.float32, with_bias=bias)
    out = seg_head(base, contribs, w, b)
    _check_layout(out, base, k)
    assert_close_to_oracle(out, head_fp64(base, contribs, w, b, "bilinear", False), dtype=torch.float32,
                           what=case)


def test_head_poisoned_preallocated_output():
    c, k = 54, 19
    base, contribs = _make(2, c, (15, 17), [(8, 9), (4, 5), (2, 3)], torch.float32, True, 50)
    w, b = _head_weights(k, c, torch.float32)
    out = output_like(base, channels=k)
    out.fill_(float("nan"))
    _launch_head(out, base, contribs, w.reshape(k, c).contiguous(), b, "bilinear", False, True)
    assert_close_to_oracle(out, head_fp64(base, contribs, w, b, "bilinear", False), dtype=torch.float32)


def test_head_validation_errors():
    base, contribs = _make(1, 8, (6, 6), [(3, 3)], torch.float32, False)
    w, b = _head_weights(5, 8, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        seg_head(base, contribs, w[:, :4], b)
    with pytest.raises(ValueError, match="weight"):
        seg_head(base, contribs, torch.randn(5, 8, 3, 3, device=DEVICE), b)
    with pytest.raises(ValueError, match="bias"):
        seg_head(base, contribs, w, b[:3])
    with pytest.raises(ValueError, match="channels"):
        seg_head(base, [contribs[0][:, :4]], w, b)


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_gpu_bf16(mode, align_corners):
    base, contribs = _make(2, 36, (15, 17), [(8, 9), (4, 5), (15, 17)], torch.bfloat16, True, 60)
    out = upsample_add_relu(base, contribs, mode=mode, align_corners=align_corners)
    _check_layout(out, base, 36)
    assert_close_to_oracle(out, fuse_fp64(base, contribs, mode, align_corners),
                           fuse_same_dtype(base, contribs, mode, align_corners), dtype=torch.bfloat16,
                           what="bf16 fuse")
    w, b = _head_weights(19, 36, torch.bfloat16)
    out = seg_head(base, contribs, w, b, mode=mode, align_corners=align_corners)
    assert_close_to_oracle(out, head_fp64(base, contribs, w, b, mode, align_corners),
                           head_same_dtype(base, contribs, w, b, mode, align_corners),
                           dtype=torch.bfloat16, what="bf16 head")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_gpu_full_size(dtype, channels_last, mode, align_corners):
    # w48 fuse step into branch 0 at 1024x2048 input, and the head on the same sizes (720 channels).
    base, contribs = _make(1, 48, (256, 512), [(128, 256), (64, 128), (32, 64)], dtype,
                           channels_last, 70)
    out = upsample_add_relu(base, contribs, mode=mode, align_corners=align_corners)
    _check_layout(out, base, 48)
    assert_close_to_oracle(out, fuse_fp64(base, contribs, mode, align_corners),
                           fuse_same_dtype(base, contribs, mode, align_corners), dtype=dtype,
                           what="full fuse", **fp32_tol(mode, align_corners))
    base, contribs = _make(1, 720, (256, 512), [(128, 256), (64, 128), (32, 64)], dtype,
                           channels_last, 71)
    w, b = _head_weights(19, 720, dtype)
    out = seg_head(base, contribs, w, b, mode=mode, align_corners=align_corners)
    _check_layout(out, base, 19)
    assert_close_to_oracle(out, head_fp64(base, contribs, w, b, mode, align_corners),
                           head_same_dtype(base, contribs, w, b, mode, align_corners), dtype=dtype,
                           what="full head", **fp32_tol(mode, align_corners, head=True))


@pytest.mark.gpu
@pytest.mark.parametrize("size", [473, 520])
@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_gpu_odd_input_sizes(size, mode, align_corners):
    # 473 -> 119/60/30/15 and 520 -> 130/65/33/17 at the four branches.
    s = [(size + 3) // 4]
    for _ in range(3):
        s.append((s[-1] + 1) // 2)
    for target in range(3):
        hw = [(x, x) for x in s]
        base, contribs = _make(1, 48, hw[target], hw[target + 1:], torch.float32, True, 80 + target)
        # contributions from higher-resolution branches arrive at the base size already
        contribs += [_rand((1, 48) + hw[target], torch.float32, True, 90 + j) for j in range(target)]
        out = upsample_add_relu(base, contribs, mode=mode, align_corners=align_corners)
        assert_close_to_oracle(out, fuse_fp64(base, contribs, mode, align_corners), dtype=torch.float32,
                               what=f"target {target}", **fp32_tol(mode, align_corners))
    base, contribs = _make(1, 720, (s[0], s[0]), [(x, x) for x in s[1:]], torch.float16, True, 95)
    w, b = _head_weights(19, 720, torch.float16)
    out = seg_head(base, contribs, w, b, mode=mode, align_corners=align_corners)
    assert_close_to_oracle(out, head_fp64(base, contribs, w, b, mode, align_corners),
                           head_same_dtype(base, contribs, w, b, mode, align_corners),
                           dtype=torch.float16, what="odd head")


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_int64_offsets(channels_last):
    # 2 x 64 x 4096 x 4100 = 2.15e9 elements (> 2^31): offsets must be 64-bit. Nearest upsampling
    # copies values, so the result equals torch's fp16 composition bit for bit (one rounding each).
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    base = torch.randn((2, 64, 4096, 4100), device=DEVICE, dtype=torch.float16).contiguous(
        memory_format=fmt)
    contrib = torch.randn((2, 64, 2048, 2050), device=DEVICE, dtype=torch.float16).contiguous(
        memory_format=fmt)
    out = upsample_add_relu(base, [contrib], mode="nearest")
    ref = torch.relu(base[1:, :, -64:] + F.interpolate(contrib[1:], size=(4096, 4100),
                                                        mode="nearest")[:, :, -64:])
    assert torch.equal(out[1:, :, -64:], ref)
    assert torch.equal(out[:1, :, :64], torch.relu(base[:1, :, :64] + F.interpolate(
        contrib[:1], size=(4096, 4100), mode="nearest")[:, :, :64]))
    del base, contrib, out, ref
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_torch_compile_and_cuda_graph():
    base, contribs = _make(2, 48, (64, 128), [(32, 64), (16, 32), (8, 16)], torch.float16, True, 99)
    w, b = _head_weights(19, 48, torch.float16)

    def fn(x, cs):
        y = upsample_add_relu(x, cs, mode="bilinear")
        return seg_head(y, cs, w, b, mode="bilinear")

    eager = fn(base, contribs)
    compiled = torch.compile(fn, fullgraph=True)(base, contribs)
    assert torch.equal(compiled, eager)

    static_in = [base.clone()] + [c.clone() for c in contribs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(static_in[0], static_in[1:])  # warm-up: compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in[0], static_in[1:])
    new = _make(2, 48, (64, 128), [(32, 64), (16, 32), (8, 16)], torch.float16, True, 7)
    for dst, src in zip(static_in, [new[0]] + new[1]):
        dst.copy_(src)
    static_out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, fn(new[0], new[1]))


# ------------------------------------------------------------------------------------------------
# CPU-side check of the GPU build: compile for sm_90 without a GPU (ptxas ships with triton)
# ------------------------------------------------------------------------------------------------
_SM90_SCRIPT = r'''
import json, os, re, subprocess, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton.backends.nvidia as nv
from hrnet_fast.kernels import upsample_add_relu as fz, seg_head as hd, bias_act as ba

cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
target = GPUTarget("cuda", 90, 32)
TY = {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16", torch.int8: "i8"}
launches = []


class Capture:
    # stands in for wrap_triton(kernel)[grid](...): records the launch instead of running it
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            launches.append((self.fn, args, kwargs))
        return run


torch.library.wrap_triton = Capture


def compile_launch(fn, args, kwargs):
    # specialise as Triton does at launch: ints equal to 1 become constants, ints and pointers
    # divisible by 16 (elements / bytes) get the divisibility hint
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    sig, cx, attrs = {}, {}, {}
    for i, (name, v) in enumerate(zip(fn.arg_names, list(args) + [None] * 99)):
        if name in kwargs:
            sig[name] = "constexpr"; cx[(i,)] = kwargs[name]
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + TY[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:
            sig[name] = "constexpr"; cx[(i,)] = 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs), target=target,
                       options=opts)
    path = os.path.join(sys.argv[1], f"k{len(os.listdir(sys.argv[1]))}.cubin")
    open(path, "wb").write(k.asm["cubin"])
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                           text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", usage, re.S)
    ptx = k.asm["ptx"]
    return {"shared": k.metadata.shared, "regs": int(m.group(1)), "stack": int(m.group(2)),
            "local": int(m.group(3)), "vector_loads": len(re.findall(r"ld\.global[.\w]*\.v\d", ptx))}


def branches(n, c, hw, dtype, cl):
    fmt = torch.channels_last if cl else torch.contiguous_format
    return [torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=fmt) for h, w in hw]


hw = [(64, 128), (32, 64), (16, 32), (8, 16)]
out = {}
for c, cl in ((18, True), (48, True), (48, False)):
    b = branches(2, c, hw, torch.float16, cl)
    fz.upsample_add_relu(b[0], b[1:], mode="bilinear")
    out[f"fuse fp16 C{c} {'nhwc' if cl else 'nchw'}"] = compile_launch(*launches.pop())
for c, dtype in ((270, torch.float16), (720, torch.float16), (720, torch.float32)):
    b = branches(2, c, hw, dtype, True)
    hd.seg_head(b[0], b[1:], torch.randn(19, c, 1, 1, dtype=dtype), torch.randn(19, dtype=dtype))
    out[f"head {TY[dtype]} C{c}"] = compile_launch(*launches.pop())
for cin, c, dtype in ((24, 272, torch.float16), (48, 720, torch.float16), (48, 720, torch.float32)):
    b = branches(2, c, hw[1:], dtype, True)
    x0 = branches(2, cin, hw[:1], dtype, True)[0]
    hd.seg_head_projected_triton(x0, torch.randn(c, cin, 1, 1, dtype=dtype), None, b,
                                 torch.randn(19, c, 1, 1, dtype=dtype), torch.randn(19, dtype=dtype),
                                 "bilinear", False)
    out[f"projected head {TY[dtype]} C{cin}->{c}"] = compile_launch(*launches.pop())
for c, cl in ((88, True), (88, False)):
    y = branches(1, c, [(128, 256)], torch.float16, cl)[0]
    ba.bias_relu_mask(y, torch.randn(c), torch.ones(c, dtype=torch.int8))
    out[f"bias_act fp16 C{c} {'nhwc' if cl else 'nchw'}"] = compile_launch(*launches.pop())
print(json.dumps(out))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_sm90_build_fits_without_spills(tmp_path):
    """Compile the default configurations for sm_90 (Hopper) on the CPU: shared memory within an
    H100/H200 SM's 227 KB and no register spills. Catches configurations that would only fail at
    launch on the GPU (OutOfResources) or run slowly."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    spec = importlib.util.find_spec("triton")
    nvbin = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(nvbin, b)) for b in ("ptxas", "cuobjdump")):
        pytest.skip("triton's bundled ptxas/cuobjdump not found")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SM90_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(usage, indent=1))
    assert usage["fuse fp16 C48 nhwc"]["vector_loads"] > 0
    assert usage["bias_act fp16 C88 nhwc"]["vector_loads"] > 0  # 16-byte loads of y
    for name, u in usage.items():
        assert u["shared"] <= 227 * 1024, (name, u)
        assert u["stack"] == 0 and u["local"] == 0, (name, u)
        assert u["regs"] <= 255, (name, u)
