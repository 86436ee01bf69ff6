"""The fused ops' torch implementations (the oracles), their validation and backend resolution."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from hrnet_fast.backends import selection
from hrnet_fast.ops import BackendUnavailable, conv2d_bias_act, seg_head, upsample_add_relu
from helpers import poisoned_allocations, rel_err
from oracles import assert_close_to_oracle, fuse_fp64, head_fp64


# The torch compositions are held to docs/architecture.md's fp32 bound, 1e-5, not the kernels' 1e-6.
TORCH_FP32 = {"fp32_tol": 1e-5, "reason": "the design's fp32 bound for the torch compositions"}


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
            assert_close_to_oracle(out, fuse_fp64(base, cs[:n], mode, align, relu), dtype=torch.float32,
                                   what=f"{n} contributions, relu={relu}", **TORCH_FP32)


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
    assert_close_to_oracle(out, head_fp64(base, cs, w, b, "bilinear", False), dtype=torch.float32,
                           **TORCH_FP32)
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


def test_backend_resolution_errors(monkeypatch):
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(BackendUnavailable, match="'cuda' is not available .* CUDA tensors only"):
        upsample_add_relu(x, [], backend="cuda")
    with pytest.raises(BackendUnavailable, match="unknown backend 'tpu'"):
        upsample_add_relu(x, [], backend="tpu")
    monkeypatch.setenv("HRNET_FAST_BACKEND", "cuda")
    assert selection.default_backend() == "cuda"
    with pytest.raises(BackendUnavailable, match="cuda"):
        upsample_add_relu(x, [])
    monkeypatch.setenv("HRNET_FAST_BACKEND", "auto")
    name, _ = selection.resolve_op("upsample_add_relu", None, "cpu")
    assert name == "torch"  # auto never picks the (interpreted) Triton kernels on the CPU


@pytest.mark.parametrize("stride,k", [(1, 3), (2, 3), (1, 1)])
def test_cpu_fused_conv_matches_conv2d(stride, k):
    """The oneDNN path of the CPU torch backend: same convolution as F.conv2d, fused epilogue."""
    from hrnet_fast.backends import torch_cpu as cpu_conv
    from hrnet_fast.ops.conv import conv2d_bias_act_torch
    if not cpu_conv.onednn_available():
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


# --- side paths never degrade the fast path; real downgrades warn once (issue 10, item 7) -------

def _conv_args(k=3):
    x = torch.randn(1, 4, 9, 11).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 4, k, k).contiguous(memory_format=torch.channels_last)
    return x, w, torch.randn(6)


@pytest.fixture
def onednn(monkeypatch):
    """cpu_conv with a fresh process state and a reorder call that can be made to fail."""
    from hrnet_fast.backends import torch_cpu as cpu_conv
    if not cpu_conv.onednn_available():
        pytest.skip("this torch build has no oneDNN fused convolution")
    monkeypatch.setitem(cpu_conv._STATE, "ok", True)
    monkeypatch.setattr(cpu_conv, "_WARNED", set())
    real = torch._C._nn.mkldnn_reorder_conv2d_weight
    calls = {"n": 0, "fail": 0}

    def reorder(*args):
        calls["n"] += 1
        if calls["fail"]:
            calls["fail"] -= 1
            raise RuntimeError("simulated oneDNN failure")
        return real(*args)

    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", reorder)
    return cpu_conv, calls


def _runtime_warnings(caught):
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_onednn_failure_outside_side_paths_warns_once(onednn):
    cpu_conv, calls = onednn
    x, w, b = _conv_args()
    with pytest.warns(RuntimeWarning, match="oneDNN") as caught:
        calls["fail"] = 1
        assert cpu_conv.conv_fused(x, w, b, 1, 1, None, True, {}) is None
    assert len(_runtime_warnings(caught)) == 1
    assert "F.conv2d" in str(caught[0].message) and "simulated oneDNN failure" in str(caught[0].message)
    assert not cpu_conv.onednn_available()  # a real downgrade: off for the process
    cpu_conv._STATE["ok"] = True  # even if it were probed and failed again: no second warning
    calls["fail"] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_conv.conv_fused(x, w, b, 1, 1, None, True, {}) is None


def side_path_flag(side):
    """(module, name) of the predicate that says a trace / ONNX export / compile is running."""
    import torch.onnx
    return {"onnx": (torch.onnx, "is_in_onnx_export"), "jit": (torch.jit, "is_tracing"),
            "compile": (torch.compiler, "is_compiling")}[side]


@pytest.mark.parametrize("side", ["onnx", "jit", "compile"])
def test_onednn_failure_during_a_side_path_disables_nothing(onednn, monkeypatch, side):
    cpu_conv, calls = onednn
    flag = side_path_flag(side)
    x, w, b = _conv_args()
    want = conv2d_bias_act(x, w, b, backend="torch")
    with monkeypatch.context() as m, warnings.catch_warnings():
        warnings.simplefilter("error")
        m.setattr(*flag, lambda: True)
        calls["fail"] = 1
        # the plain path for this call (the caller runs F.conv2d)
        assert cpu_conv.conv_fused(x, w, b, 1, 1, None, True, {}) is None
    assert cpu_conv.onednn_available()  # nothing was switched off
    calls["fail"] = 0
    got = cpu_conv.conv_fused(x, w, b, 1, 1, None, True, {})  # after the export: fused again
    assert got is not None and rel_err(got, want) < 1e-6


def test_onednn_path_under_a_real_jit_trace(onednn):
    cpu_conv, calls = onednn
    x, w, b = _conv_args()
    seen = []

    def fn(t):
        y = cpu_conv.conv_fused(t, w, b, 1, 1, None, True, {})
        seen.append(y)
        return y if y is not None else conv2d_bias_act(t, w, b, backend="torch")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings
        traced = torch.jit.trace(fn, x, check_trace=False)
    assert seen == [None] and calls["n"] == 0  # no oneDNN ops in a trace
    assert "mkldnn" not in str(traced.graph)
    assert cpu_conv.onednn_available()
    assert cpu_conv.conv_fused(x, w, b, 1, 1, None, True, {}) is not None


@pytest.fixture
def fake_cudnn(monkeypatch):
    """torch_cuda._cudnn_fused on CPU tensors with cuDNN's fused calls replaced (no GPU needed)."""
    from hrnet_fast.backends import torch_cuda as conv
    monkeypatch.setattr(conv, "_CUDNN_FUSED_BROKEN", set())
    monkeypatch.setattr(conv, "_CUDNN_FUSED_SEEN", set())
    monkeypatch.setattr(conv, "_WARNED", set())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    state = {"fail": True}

    def fused(x, weight, *rest):
        if state["fail"]:
            raise RuntimeError("simulated: no fused engine for this layout")
        return torch.zeros(1)

    monkeypatch.setattr(torch, "cudnn_convolution_relu", fused)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", fused)
    return conv, state


def test_cudnn_fused_epilogue_unavailable_warns_once_per_cause(fake_cudnn):
    conv, state = fake_cudnn
    x, w, b = _conv_args()
    with pytest.warns(RuntimeWarning, match="cuDNN fused") as caught:
        assert conv._cudnn_fused(x, w, b, 1, 1, None) is None
    assert len(_runtime_warnings(caught)) == 1
    msg = str(caught[0].message)
    assert "cpu" in msg and "float32" in msg and "simulated" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert conv._cudnn_fused(x, w, b, 1, 1, None) is None  # remembered: not tried, no warning
        conv._CUDNN_FUSED_BROKEN.clear()
        assert conv._cudnn_fused(x, w, b, 1, 1, None) is None  # fails again: still one warning
    res = torch.randn(1, 6, 9, 11)
    with pytest.warns(RuntimeWarning, match="residual"):  # another cause: the residual form
        assert conv._cudnn_fused(x, w, b, 1, 1, res) is None


@pytest.mark.parametrize("side", ["onnx", "jit", "compile"])
def test_cudnn_failure_during_a_side_path_disables_nothing(fake_cudnn, monkeypatch, side):
    conv, state = fake_cudnn
    flag = side_path_flag(side)
    x, w, b = _conv_args()
    with monkeypatch.context() as m, warnings.catch_warnings():
        warnings.simplefilter("error")
        m.setattr(*flag, lambda: True)
        assert conv._cudnn_fused(x, w, b, 1, 1, None) is None
    assert not conv._CUDNN_FUSED_BROKEN
    state["fail"] = False
    assert conv._cudnn_fused(x, w, b, 1, 1, None) is not None
