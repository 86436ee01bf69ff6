"""The drop-in HRNet never serves a stale or divergent answer (issue 10).

Every eval-mode, no-grad call of ``hrnet_fast.HRNet`` must equal the reference forward
(``HighResolutionNet.forward``, which fires hooks and honours each submodule's mode) within the fp32
bound: either the engine serves it from weights that are current, or the reference runs.
"""
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules import module as nn_module
from torch.nn.utils import prune

from hrnet_fast import HRNet, HRNetConfig, HRNetEngine, load_checkpoint, optimize
from hrnet_fast.check import clone_as
from hrnet_fast.reference import HighResolutionNet
from helpers import randomize_bn, rel_err, require_native_precision
from oracles import assert_close_to_oracle

TOL = 1e-5
X = torch.randn(2, 3, 61, 83, generator=torch.Generator().manual_seed(5))


def _model(seed=0, config=None, **kw):
    torch.manual_seed(seed)
    return randomize_bn(HRNet(config or HRNetConfig.preset("w18_small_v1", **kw)), seed).eval()


def _reference(model, x=X):
    with torch.no_grad():
        return HighResolutionNet.forward(model, x)


def _fast(model, x=X):
    with torch.no_grad():
        return model(x)


@pytest.fixture
def engine_calls(monkeypatch):
    """Every HRNetEngine.forward call (the engine that served it), to tell which path ran."""
    calls = []
    forward = HRNetEngine.forward

    def spy(self, x):
        calls.append(self)
        return forward(self, x)

    monkeypatch.setattr(HRNetEngine, "forward", spy)
    return calls


def _fallback_warnings(record):
    return [w for w in record if "hrnet_fast" in str(w.message) and "reference" in str(w.message)]


# ------------------------------------------------------- 1. changes the engine must notice

def _new_parameter(m):
    m.last_layer[3].weight = nn.Parameter(torch.randn_like(m.last_layer[3].weight))


def _new_buffer(m):
    m.bn1.running_var = m.bn1.running_var * 4


def _new_submodule(m):
    old = m.last_layer[3]
    m.last_layer[3] = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size,
                                padding=old.padding).eval()


def _new_downsample(m):
    """A module where there was none (``downsample = None`` is a plain attribute): _modules grows."""
    block = m.stage2[0].branches[0][0]
    assert block.downsample is None
    c = block.conv1.in_channels
    block.downsample = randomize_bn(nn.Sequential(nn.Conv2d(c, c, 1, bias=False),
                                                  nn.BatchNorm2d(c)), 3).eval()


def _bn_eps(m):
    m.bn1.eps = 0.5


def _in_place(m):
    m.bn1.running_var.mul_(4)  # the version counter moves


def _data_assignment(m):
    w = m.last_layer[3].weight
    w.data = w.data * 2  # the same Parameter and version counter, new storage


@pytest.mark.parametrize("edit", [_new_parameter, _new_buffer, _new_submodule, _new_downsample,
                                  _bn_eps, _in_place, _data_assignment])
def test_change_after_first_call_is_served_fresh_by_the_engine(edit, engine_calls):
    m = _model()
    before = _fast(m)
    with torch.no_grad():
        edit(m)
    want = _reference(m)
    assert rel_err(want, before) > 1e-3  # the edit matters
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # served by the engine: no fallback warning
        got = _fast(m)
    assert len(engine_calls) == 2
    assert rel_err(got, want) < TOL


def test_pruning_runs_the_reference(engine_calls):
    m = _model()
    _fast(m)
    prune.l1_unstructured(m.conv1, "weight", 0.3)  # a forward pre-hook recomputes the weight
    with pytest.warns(RuntimeWarning, match="hook"):
        got = _fast(m)
    assert len(engine_calls) == 1
    assert rel_err(got, _reference(m)) < TOL
    prune.remove(m.conv1, "weight")  # hook gone, weight_orig -> weight: the engine again, refolded
    got = _fast(m)
    assert len(engine_calls) == 2
    assert rel_err(got, _reference(m)) < TOL


# ------------------------------------------- 2. the package's loaders always invalidate the engine

@pytest.mark.parametrize("loader", ["load_state_dict", "load_checkpoint"])
def test_model_built_in_inference_mode_reloads(loader):
    other = _model(seed=7)
    sd = other.state_dict()
    want = _reference(other)
    with torch.inference_mode():
        m = _model()
        assert m.conv1.weight.is_inference()  # no version counter to watch
        m(X)
        if loader == "load_state_dict":
            m.load_state_dict(sd)
        else:
            load_checkpoint(m, sd)
        got = m(X)
    assert rel_err(got, want) < TOL


def test_rebuild_fast_after_unseen_in_place_edits():
    m = _model()
    _fast(m)
    m.conv1.weight.data.mul_(1.5)  # .data: no version counter moves
    m.rebuild_fast()
    assert rel_err(_fast(m), _reference(m)) < TOL
    with torch.inference_mode():
        n = _model()
        n(X)
        n.bn1.running_var.mul_(3.0)  # an inference tensor: no version counter at all
        n.rebuild_fast()
        got = n(X)
    assert rel_err(got, _reference(n)) < TOL


# ------------------------------------------ 3. hooks and partial training mode: the reference

def _double_output(module, args, output):
    return output * 2


def _scale_input(module, args):
    return (args[0] * 0.5,)


@pytest.mark.parametrize("register", [
    lambda m: m.layer1.register_forward_hook(_double_output),
    lambda m: m.stage2[0].fuse_layers[0][1][0].register_forward_pre_hook(_scale_input),
    lambda m: m.transition1[0].register_forward_hook(
        lambda mod, args, kwargs, out: out * 2, with_kwargs=True),
    lambda m: nn_module.register_module_forward_hook(
        lambda mod, args, out: out * 2 if isinstance(mod, nn.BatchNorm2d) else None),
    lambda m: nn_module.register_module_forward_pre_hook(
        lambda mod, args: (args[0] * 0.5,) if isinstance(mod, nn.Conv2d) else None),
], ids=["forward", "pre", "with_kwargs", "global", "global_pre"])
def test_hooks_run_the_reference_and_warn_once(register, engine_calls):
    m = _model()
    before = _fast(m)
    handle = register(m)
    try:
        want = _reference(m)
        assert rel_err(want, before) > 1e-3
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            first, second = _fast(m), _fast(m)
        assert len(_fallback_warnings(record)) == 1  # once per model and reason, not per call
        assert issubclass(_fallback_warnings(record)[0].category, RuntimeWarning)
        assert "hook" in str(_fallback_warnings(record)[0].message)
        assert len(engine_calls) == 1
        assert rel_err(first, want) < TOL and rel_err(second, want) < TOL
    finally:
        handle.remove()
    assert rel_err(_fast(m), before) < TOL and len(engine_calls) == 2  # hook gone: the engine


def test_hook_on_a_newly_attached_submodule(engine_calls):
    m = _model()
    _fast(m)
    old = m.last_layer[3]
    new = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, padding=old.padding).eval()
    new.register_forward_hook(_double_output)
    m.last_layer[3] = new
    with pytest.warns(RuntimeWarning, match="hook"):
        got = _fast(m)
    assert len(engine_calls) == 1
    assert rel_err(got, _reference(m)) < TOL


def test_submodule_in_training_mode_runs_the_reference(engine_calls):
    m = _model()
    _fast(m)
    m.bn1.train()
    want = _reference(m)  # batch statistics in bn1
    with pytest.warns(RuntimeWarning, match="training mode") as record:
        got = _fast(m)
    assert "bn1" in str(record[0].message)
    assert len(engine_calls) == 1
    assert rel_err(got, want) < TOL
    m.eval()  # bn1's running statistics moved (their version counters did not): refolded
    assert rel_err(_fast(m), _reference(m)) < TOL and len(engine_calls) == 2
    m.bn1.train()
    m(X)  # autograd on: the reference, updating bn1's statistics again
    m.bn1.eval()  # not through m.train()/m.eval()
    assert rel_err(_fast(m), _reference(m)) < TOL and len(engine_calls) == 3


def test_batchnorm_recalibration_in_training_mode_is_seen():
    m = _model()
    _fast(m)
    m.train()
    with torch.no_grad():  # BatchNorm statistics move in place, not their version counters
        m.forward_backbone(X * 2 + 1)  # not through model(x)
    m.eval()
    assert rel_err(_fast(m), _reference(m)) < TOL
    m.train()
    with torch.no_grad():
        m(X - 1)
    m.eval()
    assert rel_err(_fast(m), _reference(m)) < TOL


def test_whole_model_training_or_grad_falls_back_silently():
    m = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m(X).requires_grad  # autograd on: the reference, differentiable
        m.train()
        with torch.no_grad():
            m(X)
    assert m.engine is None


# ------------------------------------------------------- 5. dtypes the engine does not support

def test_float64_model_runs_the_reference(engine_calls):
    m = _model().double()
    x = X.double()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got, again = _fast(m, x), _fast(m, x)
    assert got.dtype == torch.float64
    assert len(_fallback_warnings(record)) == 1
    assert "float64" in str(_fallback_warnings(record)[0].message)
    assert not engine_calls
    want = _reference(m, x)
    assert rel_err(got, want) < 1e-12 and rel_err(again, want) < 1e-12


# ------------------------------------------- 6. tracing, export and compiling see the reference

def test_jit_trace_traces_the_reference(engine_calls):
    m = _model()
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        traced = torch.jit.trace(m, X, check_trace=False)
        got = traced(X)
    assert not _fallback_warnings(record)  # expected: silent
    assert not engine_calls and m.engine is None
    assert rel_err(got, _reference(m)) < TOL


def test_torch_export_exports_the_reference(engine_calls):
    m = _model()
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        exported = torch.export.export(m, (X,))
        got = exported.module()(X)
    assert not _fallback_warnings(record)
    assert not engine_calls and m.engine is None
    assert rel_err(got, _reference(m)) < TOL


def test_torch_compile_traces_the_reference(engine_calls):
    m = _model()
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        got = compiled(X)
    assert not _fallback_warnings(record)
    assert not engine_calls and m.engine is None
    assert rel_err(got, _reference(m)) < TOL


def test_onnx_export_exports_the_reference(engine_calls):
    pytest.importorskip("onnx")
    m = _model()
    with torch.no_grad():
        torch.onnx.export(m, (X,), io.BytesIO(), dynamo=False)  # the exporter that needs onnx only
    assert not engine_calls and m.engine is None


# ------------------------------- 7. engines against the reference forward, not against model(x)
# (the drop-in's no-grad call runs the engine: comparing with it compares the engine with itself)

# One block per branch: every part of the plan (stem, layer1, transitions, up and down fuse
# steps, head) with half of w18_small_v1's convs, since Inductor's CPU compile dominates the time.
ONE_BLOCK = HRNetConfig.from_yaml_extra({
    "STAGE1": {"NUM_MODULES": 1, "NUM_BRANCHES": 1, "BLOCK": "BOTTLENECK", "NUM_BLOCKS": [1],
               "NUM_CHANNELS": [16]},
    "STAGE2": {"NUM_MODULES": 1, "NUM_BRANCHES": 2, "BLOCK": "BASIC", "NUM_BLOCKS": [1, 1],
               "NUM_CHANNELS": [8, 16]},
    "STAGE3": {"NUM_MODULES": 1, "NUM_BRANCHES": 3, "BLOCK": "BASIC", "NUM_BLOCKS": [1, 1, 1],
               "NUM_CHANNELS": [8, 16, 32]},
    "STAGE4": {"NUM_MODULES": 1, "NUM_BRANCHES": 4, "BLOCK": "BASIC", "NUM_BLOCKS": [1, 1, 1, 1],
               "NUM_CHANNELS": [8, 16, 32, 64]},
}, num_classes=5)


def test_compile_backend_matches_reference():
    m = _model(config=ONE_BLOCK)
    x = X[:1, :, :40, :48].contiguous()
    engine = optimize(m, backend="compile")
    assert engine.backend == "compile"
    with torch.no_grad():
        got = engine(x)
    assert rel_err(got, _reference(m, x)) < TOL


@pytest.mark.parametrize("head,upsample", [("seg", "mmseg"), ("classification", "nearest"),
                                           ("pose", "nearest"), ("features", "bilinear")])
def test_compile_backend_traces_the_forward_as_one_graph(head, upsample):
    """A graph break inside the plan's forward makes Dynamo skip the whole frame (it sits in a loop),
    so the compile backend would run the model eagerly in small compiled pieces. Tracing only (no
    Inductor), every head and resize convention."""
    m = _model(head=head, upsample=upsample)
    engine = optimize(m, backend="compile")
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(engine._run)(X[:1, :, :40, :48].contiguous())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_bfloat16_dropin_within_twice_the_reference_error(engine_calls):
    """The design's low-precision rule against fp64: the engine's bf16 error at most twice the bf16
    reference model's (with the oracles' floor for an exact reference). On a CPU without native
    bfloat16 the drop-in runs the reference instead (tests/test_cpu_precision.py covers that)."""
    require_native_precision(torch.bfloat16, X.device)
    m = _model()
    ref64 = _reference(clone_as(m, torch.float64), X.double())
    m.to(torch.bfloat16)
    x = X.to(torch.bfloat16)
    ref_bf16 = _reference(m, x)
    got = _fast(m, x)
    assert len(engine_calls) == 1 and m.engine.dtype == torch.bfloat16  # the engine served it
    assert_close_to_oracle(got, ref64, ref_bf16, dtype=torch.bfloat16, what="bf16 drop-in")
