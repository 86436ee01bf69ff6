"""The fused ops' torch implementations (the oracles), their validation and the backend registry."""
import pytest
import torch
import torch.nn.functional as F

from hrnet_fast.ops import BackendUnavailable, conv2d_bias_act, registry, seg_head, upsample_add_relu
from helpers import poisoned_allocations, rel_err


def _oracle(base, contributions, mode, align_corners, relu):
    out = base.double()
    for c in contributions:
        if c.shape[-2:] != base.shape[-2:]:
            kw = {"align_corners": align_corners} if mode == "bilinear" else {}
            c = F.interpolate(c.double(), size=base.shape[-2:], mode=mode, **kw)
        out = out + c.double()
    return out.relu() if relu else out


SHAPES = [((15, 17), [(8, 9), (4, 5), (2, 3)]), ((12, 12), [(6, 6), (12, 12), (3, 3)]),
          ((119, 119), [(60, 60), (30, 30), (15, 15)])]


@pytest.mark.parametrize("base_hw,contrib_hw", SHAPES)
@pytest.mark.parametrize("mode,align", [("bilinear", False), ("bilinear", True), ("nearest", False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_add_relu_torch(monkeypatch, base_hw, contrib_hw, mode, align, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    base = torch.randn(2, 6, *base_hw).contiguous(memory_format=fmt)
    cs = [torch.randn(2, 6, *hw).contiguous(memory_format=fmt) for hw in contrib_hw]
    for n in range(len(cs) + 1):
        for relu in (True, False):
            with poisoned_allocations(monkeypatch):
                out = upsample_add_relu(base, cs[:n], mode=mode, align_corners=align, relu=relu,
                                        backend="torch")
            assert out.is_contiguous(memory_format=fmt)
            assert rel_err(out, _oracle(base, cs[:n], mode, align, relu)) < 1e-5


def test_upsample_add_relu_errors():
    base = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"contributions\[0\] has 5 channels but base has 4"):
        upsample_add_relu(base, [torch.randn(1, 5, 4, 4)])
    with pytest.raises(ValueError, match="batch 2"):
        upsample_add_relu(base, [torch.randn(2, 4, 4, 4)])
    with pytest.raises(ValueError, match="dtype torch.float64"):
        upsample_add_relu(base, [torch.randn(1, 4, 4, 4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="is on meta"):
        upsample_add_relu(base, [torch.randn(1, 4, 4, 4, device="meta")])
    with pytest.raises(ValueError, match="larger than base"):
        upsample_add_relu(base, [torch.randn(1, 4, 16, 8)])
    with pytest.raises(ValueError, match="mode"):
        upsample_add_relu(base, [], mode="bicubic")
    with pytest.raises(ValueError, match="align_corners"):
        upsample_add_relu(base, [], mode="nearest", align_corners=True)
    with pytest.raises(ValueError, match="4-D"):
        upsample_add_relu(base[0], [])
    with pytest.raises(TypeError, match="list of tensors"):
        upsample_add_relu(base, torch.randn(1, 4, 4, 4))


@pytest.mark.parametrize("k", [1, 3])
def test_seg_head_torch(monkeypatch, k):
    base = torch.randn(2, 10, 17, 19)
    cs = [torch.randn(2, 10, 9, 10), torch.randn(2, 10, 5, 5)]
    w, b = torch.randn(7, 10, k, k), torch.randn(7)
    with poisoned_allocations(monkeypatch):
        out = seg_head(base, cs, w, b, mode="bilinear", backend="torch")
    want = F.conv2d(_oracle(base, cs, "bilinear", False, True), w.double(), b.double(), 1, k // 2)
    assert rel_err(out, want) < 1e-5
    with pytest.raises(ValueError, match="input channels"):
        seg_head(base, cs, torch.randn(7, 9, 1, 1), b)


@pytest.mark.parametrize("stride,k", [(1, 3), (2, 3), (1, 1)])
def test_conv2d_bias_act_torch(monkeypatch, stride, k):
    x = torch.randn(2, 6, 17, 23).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(9, 6, k, k), torch.randn(9)
    plain = F.conv2d(x.double(), w.double(), b.double(), stride, k // 2)
    res = torch.randn(plain.shape)
    cases = [
        (dict(relu=True), plain.relu()),
        (dict(relu=False), plain),
        (dict(residual=res), (plain + res.double()).relu()),
        (dict(relu_ranges=[(0, 3), (6, 9)]),
         torch.cat([plain[:, :3].relu(), plain[:, 3:6], plain[:, 6:].relu()], 1)),
    ]
    for kwargs, want in cases:
        with poisoned_allocations(monkeypatch):
            out = conv2d_bias_act(x, w, b, stride=stride, backend="torch", **kwargs)
        assert rel_err(out, want) < 1e-5


def test_conv2d_bias_act_errors():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(5, 4, 3, 3)
    with pytest.raises(ValueError, match="x has 3 channels but weight expects 4"):
        conv2d_bias_act(torch.randn(1, 3, 8, 8), w, None)
    with pytest.raises(ValueError, match=r"residual must be \[1, 5, 8, 8\]"):
        conv2d_bias_act(x, w, None, residual=torch.randn(1, 5, 4, 4))
    with pytest.raises(ValueError, match="relu_ranges"):
        conv2d_bias_act(x, w, None, relu_ranges=[(3, 9)])
    with pytest.raises(ValueError, match=r"bias must be \[5\]"):
        conv2d_bias_act(x, w, torch.randn(4))


def test_registry_backend_errors(monkeypatch):
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(BackendUnavailable, match="'cuda' is not available .* CUDA tensors only"):
        upsample_add_relu(x, [], backend="cuda")
    with pytest.raises(BackendUnavailable, match="unknown backend 'tpu'"):
        upsample_add_relu(x, [], backend="tpu")
    monkeypatch.setenv("HRNET_FAST_BACKEND", "cuda")
    assert registry.default_backend() == "cuda"
    with pytest.raises(BackendUnavailable, match="cuda"):
        upsample_add_relu(x, [])
    monkeypatch.setenv("HRNET_FAST_BACKEND", "auto")
    name, _ = registry.resolve("upsample_add_relu", None, "cpu")
    assert name == "torch"  # auto never picks the (interpreted) Triton kernels on the CPU


@pytest.mark.parametrize("stride,k", [(1, 3), (2, 3), (1, 1)])
def test_cpu_fused_conv_matches_conv2d(stride, k):
    """The oneDNN path of the CPU torch backend: same convolution as F.conv2d, fused epilogue."""
    from hrnet_fast.ops import cpu_conv
    from hrnet_fast.ops.conv import conv2d_bias_act_torch
    if not cpu_conv.available():
        pytest.skip("this torch build has no oneDNN fused convolution")
    x = torch.randn(2, 18, 17, 23).contiguous(memory_format=torch.channels_last)
    w = torch.randn(36, 18, k, k).contiguous(memory_format=torch.channels_last)
    b = torch.randn(36)
    ref_plain = conv2d_bias_act_torch(x, w, b, stride, k // 2, None, False)
    res = torch.randn(ref_plain.shape).contiguous(memory_format=torch.channels_last)
    cache = {}
    for residual in (None, res):
        for relu in (True, False):
            got = cpu_conv.conv_fused(x, w, b, stride, k // 2, residual, relu, cache)
            want = conv2d_bias_act_torch(x, w, b, stride, k // 2, residual, relu)
            assert got is not None and rel_err(got, want) < 1e-6
    assert list(cache) == [tuple(x.shape)]  # the weight was reordered once
    for n in (3, 4, 5):  # other input sizes: the cache stays bounded
        cpu_conv.conv_fused(torch.randn(n, 18, 9, 9).contiguous(memory_format=torch.channels_last),
                            w, b, stride, k // 2, None, True, cache)
    assert len(cache) == cpu_conv.MAX_SHAPES
    assert cpu_conv.conv_fused(x.double(), w.double(), b.double(), stride, k // 2, None, True,
                               {}) is None  # fp32 only: the caller takes the plain path
