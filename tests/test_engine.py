"""optimize(): backends, dtypes, input errors, weight updates; the drop-in HRNet's behaviour."""
import pytest
import torch

from hrnet_fast import BackendUnavailable, HRNet, HRNetConfig, load_checkpoint, optimize
from hrnet_fast.check import clone_as
from hrnet_fast.reference import HighResolutionNet
from gpu_backends import require_backend
from helpers import randomize_bn, rel_err, require_native_precision
from oracles import assert_model_close

TOL = 1e-5


def _model(preset="w18_small_v1", seed=0, fast=True, **kw):
    torch.manual_seed(seed)
    return randomize_bn(HRNet(HRNetConfig.preset(preset, **kw), fast=fast), seed).eval()


def _reference_forward(model, x):
    with torch.no_grad():
        return HighResolutionNet.forward(model, x)


X = torch.randn(2, 3, 61, 83, generator=torch.Generator().manual_seed(5))


def test_optimize_errors():
    model = _model()
    with pytest.raises(ValueError, match="eval-mode"):
        optimize(_model().train())
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        optimize(model, backend="fastest")
    with pytest.raises(BackendUnavailable, match="'cuda' is not available on cpu"):
        optimize(model, backend="cuda")
    with pytest.raises(BackendUnavailable, match="cuda_graphs=True needs a CUDA device"):
        optimize(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="dtype"):
        optimize(model, dtype=torch.int8)
    with pytest.raises(TypeError, match="hrnet_fast HRNet"):
        optimize(torch.nn.Conv2d(3, 3, 1))


def test_engine_input_errors():
    engine = optimize(_model())
    with torch.no_grad():
        with pytest.raises(ValueError, match="input has 1 channels, the model expects 3"):
            engine(torch.randn(1, 1, 32, 32))
        with pytest.raises(ValueError, match="4-D NCHW"):
            engine(torch.randn(3, 32, 32))
        with pytest.raises(ValueError, match="input dtype torch.float16 does not match"):
            engine(torch.randn(1, 3, 32, 32, dtype=torch.float16))
        with pytest.raises(ValueError, match="input is on meta"):
            engine(torch.randn(1, 3, 32, 32, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_the_reference_error(dtype):
    require_native_precision(dtype, "cpu")
    model = _model("w18_small_v2")
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        ref64 = clone_as(model, torch.float64)(x.double())
        own = clone_as(model, dtype)(x.to(dtype))
        out = optimize(model, dtype=dtype, backend="torch")(x.to(dtype))
    assert_model_close(out, ref64, own, dtype=dtype)


def test_weight_change_after_optimize_is_picked_up():
    model = _model(fast=False)
    engine = optimize(model, backend="torch")
    with torch.no_grad():
        before = engine(X)
        model.stage3[0].branches[1][0].bn1.running_var.mul_(3.0)  # in place: version counter moves
        model.last_layer[3].weight.add_(0.1)
        after = engine(X)
    assert rel_err(after, _reference_forward(model, X)) < TOL
    assert rel_err(after, before) > 1e-3


def test_a_saved_or_copied_engine_folds_again(tmp_path):
    """torch.save and copy.deepcopy of an optimize() engine keep its source model and settings,
    not what the backend derived (oneDNN's opaque weights cannot be pickled at all; the CPU
    kernels' packs are in this machine's instruction-set order): the loaded engine folds again,
    equals the original, and follows its own copy of the source."""
    import copy
    model = _model(fast=False)
    engine = optimize(model, backend="torch")
    with torch.inference_mode():
        out = engine(X)
    torch.save(engine, tmp_path / "engine.pt")
    loaded = torch.load(tmp_path / "engine.pt", weights_only=False)
    copied = copy.deepcopy(engine)
    assert loaded.source is not model and copied.source is not model
    with torch.inference_mode():
        assert torch.equal(loaded(X), out) and torch.equal(copied(X), out)
    with torch.no_grad():
        copied.source.last_layer[3].weight.add_(0.1)
        changed = copied(X)
        assert rel_err(changed, _reference_forward(copied.source, X)) < TOL
        assert torch.equal(engine(X), out)  # the original watches the original source only


# ------------------------------------------------------------------ the drop-in HRNet

def test_dropin_uses_engine_only_in_eval_without_grad():
    model = _model()
    want = _reference_forward(model, X)
    with torch.inference_mode():
        got = model(X)
    assert model.engine is not None and model.engine.backend == "torch"
    assert rel_err(got, want) < TOL
    out = model(X)  # grad enabled: reference path, differentiable
    assert out.requires_grad
    model.train()
    with torch.no_grad():
        train_out = model(X)  # training mode: batch statistics, not the folded running ones
    assert rel_err(train_out, want) > 1e-3
    assert set(model.state_dict()) == set(HighResolutionNet(model.config).state_dict())


def test_dropin_rebuilds_after_weight_change_and_load_state_dict():
    model = _model()
    with torch.no_grad():
        model(X)
        first_engine = model.engine
        model.conv1.weight.mul_(1.5)
        got = model(X)
    assert rel_err(got, _reference_forward(model, X)) < TOL
    other = _model(seed=7)
    load_checkpoint(model, other.state_dict())
    with torch.no_grad():
        got = model(X)
    assert rel_err(got, _reference_forward(other, X)) < TOL
    assert model.engine is first_engine  # same engine, plan rebuilt in place


def test_dropin_follows_dtype_change_and_rejects_mismatched_input():
    require_native_precision(torch.bfloat16, X.device)
    model = _model()
    with torch.no_grad():
        model(X)
        model.to(torch.bfloat16)
        out = model(X.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16 and model.engine.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="input dtype torch.float32 does not match the model's"):
            model(X)
        with pytest.raises(ValueError, match="channels"):
            model(torch.randn(1, 4, 32, 32, dtype=torch.bfloat16))


def test_dropin_fast_off_and_features_head():
    model = _model(head="features", upsample="nearest").configure_fast(enabled=False)
    with torch.no_grad():
        ref = model(X)
        assert model.engine is None
        model.configure_fast(enabled=True, backend="torch")
        got = model(X)
    assert model.engine is not None and rel_err(got, ref) < TOL


def test_dropin_explicit_unavailable_backend_raises():
    model = _model().configure_fast(backend="cuda")
    with torch.no_grad(), pytest.raises(BackendUnavailable, match="cuda"):
        model(X)


def test_dropin_env_backend(monkeypatch):
    monkeypatch.setenv("HRNET_FAST_BACKEND", "torch")
    model = _model()
    with torch.no_grad():
        model(X)
    assert model.engine.backend == "torch"


def test_dropin_auto_falls_back_to_torch_with_a_warning(monkeypatch):
    """If the automatically chosen kernel backend fails at run time, the drop-in warns once and
    runs the torch engine; an explicitly requested backend raises instead."""
    import hrnet_fast.model as model_mod

    class FailingEngine(model_mod.HRNetEngine):
        def __init__(self, source, *, backend=None, cuda_graphs=False, branch_streams=None):
            super().__init__(source, backend="torch", cuda_graphs=cuda_graphs,
                             branch_streams=branch_streams)
            if backend != "torch":
                self.backend = "triton"  # pretend a kernel backend was chosen
                self.auto = backend in (None, "auto")

        def forward(self, x):
            if self.backend == "triton":
                raise RuntimeError("kernel launch failed")
            return super().forward(x)

    monkeypatch.setattr(model_mod, "HRNetEngine", FailingEngine)
    model = _model()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="triton backend failed"):
        got = model(X)
    assert model.engine.backend == "torch"
    assert rel_err(got, _reference_forward(model, X)) < TOL
    explicit = _model().configure_fast(backend="triton")
    with torch.no_grad(), pytest.raises(RuntimeError, match="kernel launch failed"):
        explicit(X)


@pytest.mark.parametrize("mode,head", [("bilinear", "seg"), ("nearest", "features")])
def test_triton_backend_matches_reference(mode, head):
    """The engine with the Triton fuse and head kernels (the CPU interpreter here, a GPU there)."""
    from helpers import DEVICE
    model = _model(upsample=mode, head=head).to(DEVICE)
    x = torch.randn(2, 3, 65, 97, device=DEVICE)
    engine = optimize(model, backend="triton")
    with torch.no_grad():
        got, want = engine(x), _reference_forward(model, x)
    assert engine.backend == "triton"
    assert rel_err(got, want) < TOL


def test_triton_backend_fp16():
    from helpers import DEVICE
    require_native_precision(torch.float16, DEVICE)  # the Triton backend's convs on the CPU are oneDNN's
    model = _model("w18_small_v1").to(DEVICE)
    x = torch.randn(1, 3, 49, 67, device=DEVICE)
    with torch.no_grad():
        ref64 = clone_as(model, torch.float64)(x.double())
        own = clone_as(model, torch.float16)(x.half())
        out = optimize(model, backend="triton", dtype=torch.float16)(x.half())
    assert_model_close(out, ref64, own, dtype=torch.float16)


def test_all_triton_engine_convs_and_chain_kernel(monkeypatch):
    """Every conv on the Triton implicit-GEMM kernel and every 2-3 step strided chain on the
    one-launch chain kernel (forced: on a GPU they are chosen by measurement)."""
    from helpers import DEVICE
    monkeypatch.setenv("HRNET_FAST_FORCE_CONV2D_BIAS_ACT", "triton")
    monkeypatch.setenv("HRNET_FAST_FORCE_FUSE_DOWN", "chain")
    model = _model("w18_small_v1", upsample="bilinear").to(DEVICE)
    x = torch.randn(2, 3, 29, 37, device=DEVICE)
    engine = optimize(model, backend="triton")
    be = engine._be
    assert be.packs_weights
    assert all(id(s) in be._packed for s in engine.plan.conv_specs())
    with torch.no_grad():
        got, want = engine(x), _reference_forward(model, x)
    assert rel_err(got, want) < TOL


def test_dropin_load_state_dict_assign_replaces_parameters():
    model = _model()
    with torch.no_grad():
        model(X)
    other = _model(seed=3)
    model.load_state_dict(other.state_dict(), assign=True)
    with torch.no_grad():
        got = model(X)
    assert rel_err(got, _reference_forward(other, X)) < TOL


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
def test_cpu_seg_head_projects_narrow_branches_as_one_conv(upsample):
    """The CPU seg head resizes the branches narrower than half the head width (w18: 36 and 72 of
    270) and projects them with branch 0 as one conv: exact against fp64 at an odd size, batch 2."""
    model = _model("w18", upsample=upsample)
    x = torch.randn(2, 3, 57, 75)
    engine = optimize(model, backend="torch")
    with torch.no_grad():
        out = engine(x)
        ref64 = HighResolutionNet.forward(clone_as(model, torch.float64), x.double())
    assert_model_close(out, ref64, dtype=torch.float32, what=f"w18 {upsample}")
    merged = [k for k in engine._be.derived if k[0] == "merged_head_projection"]
    assert [k[2] for k in merged] == [(1, 2)]
    spec = engine._be.derived[merged[0]]
    assert spec.weight.shape[:2] == (270, 18 + 36 + 72)


def test_engine_output_is_fresh_and_nchw():
    engine = optimize(_model(), backend="torch")
    x = X.clone()
    with torch.no_grad():
        a = engine(x)
        b = engine(x)
    assert a.is_contiguous() and a.data_ptr() != b.data_ptr()
    assert torch.equal(x, X)  # blocks accumulate into their own inputs, never into the caller's


@pytest.mark.parametrize("head", ["features", "classification", "pose"])
def test_in_place_residuals_leave_every_head_exact(head):
    """The CPU blocks write their last conv into their input's memory (conv_into_residual): every
    head's outputs still match the reference, including the features head's branch tensors."""
    kw = {"num_classes": 17} if head == "pose" else {}
    model = _model("w18_small_v2", head=head, **kw)
    with torch.no_grad():
        got = optimize(model, backend="torch")(X)
        want = _reference_forward(model, X)
    got, want = (got, want) if isinstance(got, list) else ([got], [want])
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_replay_matches_eager_engine(backend):
    from hrnet_fast.engine import MAX_CUDA_GRAPHS
    model = _model("w18_small_v2").cuda()
    eager = optimize(model, backend=backend, cuda_graphs=False)
    graphed = optimize(model, backend=backend)  # graphs are the default on CUDA
    assert graphed.cuda_graphs and not eager.cuda_graphs
    with torch.no_grad():
        for seed in range(4):  # call 1 eager, 2 captures, 3-4 replay the graph with new data
            x = torch.randn(2, 3, 97, 131, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            a, b = graphed(x), eager(x)
            assert rel_err(a, b) < TOL and rel_err(a, _reference_forward(model, x)) < TOL
        assert len(graphed._graphs) == 1
        first = graphed(x)
        second = graphed(x * 2)
        assert first.data_ptr() != second.data_ptr() and rel_err(first, b) < TOL
        for k in range(MAX_CUDA_GRAPHS + 1):
            xk = torch.randn(1, 3, 64 + 8 * k, 64, device="cuda")
            graphed(xk)
            assert rel_err(graphed(xk), _reference_forward(model, xk)) < TOL  # the captured call
    assert len(graphed._graphs) == MAX_CUDA_GRAPHS


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_low_precision_keeps_fused_epilogues(backend, dtype):
    """fp16/bf16 graph replay equals the eager engine, within the design bound of the fp64
    reference, and the capture records cuDNN's fused conv epilogues (never the unfused form)."""
    from hrnet_fast.backends import torch_cuda as conv_ops
    model = _model("w18_small_v2").cuda()
    eager = optimize(model, backend=backend, dtype=dtype, cuda_graphs=False)
    graphed = optimize(model, backend=backend, dtype=dtype)
    x = torch.randn(2, 3, 193, 257, device="cuda")
    before = dict(conv_ops.CAPTURED_EPILOGUES)
    with torch.no_grad():
        graphed(x.to(dtype))  # eager warm-up call
        graphed(x.to(dtype))  # captures
        y = torch.randn_like(x)
        got, want = graphed(y.to(dtype)), eager(y.to(dtype))
        ref64 = clone_as(model, torch.float64)(y.double())
        own = clone_as(model, dtype)(y.to(dtype))
    assert rel_err(got, want) <= 1e-6  # same kernels, same order: equal up to rounding noise
    assert_model_close(got, ref64, own, dtype=dtype)
    fused = conv_ops.CAPTURED_EPILOGUES["fused"] - before["fused"]
    unfused = conv_ops.CAPTURED_EPILOGUES["unfused"] - before["unfused"]
    assert fused > 50 and unfused == 0, (fused, unfused)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["w18", "w48"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_full_size_model_equality_on_gpu(preset, backend):
    """fp32 (TF32 off) within 1e-5 and fp16 within 2x the reference's own fp16 error, 1024x2048.
    torch and triton must run on a CUDA machine; cuda skips only where the extension cannot be
    built (tests/gpu_backends.py)."""
    require_backend(backend)
    model = _model(preset).cuda()
    x = torch.randn(1, 3, 1024, 2048, device="cuda")
    fast32 = optimize(model, backend=backend)
    with torch.no_grad():
        ref32 = _reference_forward(model, x)
        assert rel_err(fast32(x), ref32) < TOL
        ref64 = clone_as(model, torch.float64)(x.double())
        own16 = clone_as(model, torch.float16)(x.half())
        out16 = optimize(model, backend=backend, dtype=torch.float16)(x.half())
    assert_model_close(out16, ref64, own16, dtype=torch.float16)


@pytest.fixture(scope="module")
def w18_half_size_fp16():
    """w18 at 1x3x512x1024 (fp16 input), its fp64 reference and the reference run in fp16."""
    model = _model("w18").cuda()
    x = torch.randn(1, 3, 512, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(11))
    with torch.no_grad():
        ref64 = clone_as(model, torch.float64)(x.double())
        own16 = clone_as(model, torch.float16)(x.half())
    return model, x.half(), ref64, own16


def _conv_variant(spec, residual) -> str:
    if spec.relu_ranges is not None:
        return "relu ranges"
    act = "relu" if spec.relu else "no relu"
    return act if residual is None else f"residual + {act}"


def _record_candidates(op, calls, describe):
    """Wrap every candidate of a measured choice (selection.SelectingOp) so that each call appends
    ``(candidate name, describe(*args))`` to ``calls``."""
    from hrnet_fast.backends.selection import SelectingOp
    assert isinstance(op, SelectingOp), f"expected a measured choice, got {op!r}"

    def recorded(name, fn):
        def run(*args, **kwargs):
            calls.append((name, describe(*args, **kwargs)))
            return fn(*args, **kwargs)
        return run

    for name, fn in list(op.candidates.items()):
        op.candidates[name] = recorded(name, fn)


@pytest.mark.gpu
@pytest.mark.parametrize("down", ["batched", "chain"])
@pytest.mark.parametrize("conv", ["torch", "triton"])
def test_triton_backend_each_forced_implementation(conv, down, monkeypatch, w18_half_size_fp16):
    """backend="triton" times the candidates per shape, so a test that leaves the choice to timing
    checks only the winner. Here every conv and every strided fuse chain is forced onto one
    implementation (HRNET_FAST_FORCE_*), on w18 at 1x3x512x1024 in fp16, checked against fp64 with
    tests/oracles.py's rule. The calls are recorded: only the forced implementations run, and the
    forced conv runs every variant (ReLU without residual, neither ReLU nor residual, residual +
    ReLU, and with the batched down path the per-channel ReLU ranges)."""
    require_backend("triton")
    monkeypatch.setenv("HRNET_FAST_FORCE_CONV2D_BIAS_ACT", conv)
    monkeypatch.setenv("HRNET_FAST_FORCE_FUSE_DOWN", down)
    model, x, ref64, own16 = w18_half_size_fp16
    engine = optimize(model, backend="triton", dtype=torch.float16, cuda_graphs=False)
    assert engine.backend == "triton"
    conv_calls, down_calls = [], []
    _record_candidates(engine._be.conv, conv_calls,
                       lambda x, spec, residual=None: _conv_variant(spec, residual))
    _record_candidates(engine._be.down, down_calls, lambda *args, **kwargs: None)
    with torch.no_grad():
        out = engine(x)
    assert {name for name, _ in conv_calls} == {conv}
    assert {name for name, _ in down_calls} == {down}
    variants = {v for _, v in conv_calls}
    need = {"relu", "no relu", "residual + relu"} | ({"relu ranges"} if down == "batched" else set())
    assert need <= variants, f"forced conv {conv} ran only {sorted(variants)}"
    assert_model_close(out, ref64, own16, dtype=torch.float16, what=f"conv={conv}, down={down}")
