"""Folding and every plan rewrite, exact against the reference (torch backend, fp32, CPU)."""
import pytest
import torch
from torch import nn

from hrnet_fast import HRNet, HRNetConfig, PRESET_NAMES, optimize
from hrnet_fast.backends.torch_cpu import TorchCPU
from hrnet_fast.engine import run_module, run_plan
from hrnet_fast.fold import fold_conv_bn
from hrnet_fast.ops.conv import conv2d_bias_act_torch
from hrnet_fast.plan import build_plan
from gpu_backends import require_backend
from helpers import randomize_bn, rel_err

TOL = 1e-5


def _model(preset="w18_small_v1", seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_bn(HRNet(HRNetConfig.preset(preset, **kw), fast=False), seed).eval()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("stride,k", [(1, 3), (2, 3), (1, 1)])
def test_fold_conv_bn_exact(bias, stride, k):
    torch.manual_seed(1)
    conv = nn.Conv2d(7, 5, k, stride, k // 2, bias=bias).double()
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(5)), seed=3)[0].double().eval()
    bn.eps = 1e-3
    x = torch.randn(2, 7, 11, 13, dtype=torch.float64)
    w, b = fold_conv_bn(conv, bn)
    folded = nn.functional.conv2d(x, w, b, stride, k // 2)
    torch.testing.assert_close(folded, bn(conv(x)), rtol=1e-12, atol=1e-12)


def test_fold_rejects_bn_without_statistics():
    with pytest.raises(ValueError, match="running statistics"):
        fold_conv_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))


def test_plan_batches_fuse_convs_with_relu_ranges():
    plan = build_plan(_model("w18"))
    fuse = plan.stages[2][0].fuse  # stage 4: branches 18/36/72/144
    up3 = fuse.up[3]
    assert [(s.target, s.start, s.end) for s in up3.splits] == [(0, 0, 18), (1, 18, 54), (2, 54, 126)]
    assert up3.conv.weight.shape == (126, 144, 1, 1) and not up3.conv.relu
    down0 = fuse.down_first[0]
    # chain 0->1 is one conv (no ReLU); 0->2 and 0->3 continue, so their first convs take a ReLU.
    assert [(s.target, s.start, s.end) for s in down0.splits] == [(1, 0, 36), (2, 36, 54), (3, 54, 72)]
    assert down0.conv.relu_ranges == ((36, 72),) and down0.conv.stride == 2
    assert [c.weight.shape[:2] for c in fuse.down_rest[(0, 3)]] == [(18, 18), (144, 18)]
    head = plan.head
    assert [p.weight.shape[:2] for p in head.projections] == [(270, 18), (270, 36), (270, 72), (270, 144)]
    assert head.projections[0].bias is not None and all(p.bias is None for p in head.projections[1:])


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_each_fused_module_matches_reference_module(mode):
    model = _model("w18_small_v2", upsample=mode)
    plan = build_plan(model).map_tensors(torch.Tensor.float)
    ops = TorchCPU.prepare(plan, torch.device("cpu"), torch.float32)
    xs = [torch.randn(2, c, 31 // 2 ** i + 1, 45 // 2 ** i + 1) for i, c in enumerate((18, 36, 72, 144))]
    with torch.no_grad():
        for ref_module, module_plan in zip(model.stage4, plan.stages[2]):
            got = run_module(ops, [x.contiguous(memory_format=torch.channels_last) for x in xs],
                          module_plan, mode, False)
            want = ref_module([x.clone() for x in xs])
            assert rel_err(got, want) < TOL
            xs = want


@pytest.mark.parametrize("mode,align", [("bilinear", False), ("bilinear", True), ("nearest", False)])
def test_head_rewrite_exact(mode, align):
    model = _model("w18_small_v2", upsample=mode, align_corners=align, num_classes=7)
    plan = build_plan(model).map_tensors(torch.Tensor.float)
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        feats = model.forward_backbone(x)
        size = feats[0].shape[-2:]
        up = [feats[0]] + [nn.functional.interpolate(
            f, size=size, mode=mode, **({"align_corners": align} if mode == "bilinear" else {}))
            for f in feats[1:]]
        want = model.last_layer(torch.cat(up, 1))
        ops = TorchCPU.prepare(plan, torch.device("cpu"), torch.float32)
        p = [ops.conv(f, s) for f, s in zip(feats, plan.head.projections)]
        got = ops.head(p[0], p[1:], plan.head.classifier.weight, plan.head.classifier.bias, mode, align)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_every_preset_matches_reference(preset):
    model = _model(preset)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert rel_err(optimize(model, backend="torch")(x), model(x)) < TOL


@pytest.mark.parametrize("size", [(473, 473), (520, 520), (333, 517)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("head", ["seg", "features"])
def test_odd_sizes_batch2_heads_modes(size, mode, head):
    model = _model("w18_small_v1", upsample=mode, head=head)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        got, want = optimize(model, backend="torch")(x), model(x)
    if head == "features":
        assert len(got) == 4 and all(g.shape == w.shape for g, w in zip(got, want))
    else:
        assert got.shape == want.shape
    assert rel_err(got, want) < TOL


def test_classification_head_and_kernel3_classifier_and_align_corners():
    for kw in ({"head": "classification", "num_classes": 10},
               {"final_conv_kernel": 3, "align_corners": True}):
        model = _model("w18_small_v1", **kw)
        x = torch.randn(2, 3, 70, 90)
        with torch.no_grad():
            assert rel_err(optimize(model, backend="torch")(x), model(x)) < TOL


def test_channels_last_off_and_channels_last_input():
    model = _model("w18_small_v2")
    x = torch.randn(2, 3, 66, 98)
    with torch.no_grad():
        want = model(x)
        plain = optimize(model, backend="torch", channels_last=False)(x)
        cl_in = optimize(model, backend="torch")(x.contiguous(memory_format=torch.channels_last))
    assert rel_err(plain, want) < TOL and rel_err(cl_in, want) < TOL
    assert plain.is_contiguous()
    assert cl_in.is_contiguous(memory_format=torch.channels_last)


def test_plan_map_tensors_and_run_plan_in_float64():
    model = _model("w18_small_v1")
    plan = build_plan(model)
    assert all(t.dtype == torch.float64 for t in plan.tensors())
    x = torch.randn(1, 3, 40, 56, dtype=torch.float64)
    with torch.no_grad():
        got = run_plan(plan, TorchCPU.prepare(plan, torch.device("cpu"), torch.float32), x)
        want = model.double()(x)
    assert rel_err(got, want) < 1e-12


# ------------------------------------------------------------- channel padding (channel_multiple)

M = 8


def _up8(c):
    return -(-c // M) * M


def _padded_widths(model):
    """{padded width: real width} for every width the model's branches and seg head use (from the
    config, not the plan) that is not a multiple of 8."""
    cfg = model.config
    widths = {c * (4 if s.block == "BOTTLENECK" else 1) for s in cfg.stages for c in s.num_channels}
    widths.add(sum(model.pre_stage_channels))  # seg head width (270 for w18)
    return {_up8(c): c for c in widths if c % M}


@pytest.mark.parametrize("head", ["seg", "features", "classification"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("preset", ["w18_small_v2", "w18"])
def test_padded_plan_matches_reference(preset, mode, head):
    kw = {"num_classes": 10} if head == "classification" else {}
    model = _model(preset, upsample=mode, head=head, **kw)
    plan = build_plan(model, channel_multiple=M)
    ops = TorchCPU.prepare(plan, torch.device("cpu"), torch.float32)
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        got32, want32 = run_plan(plan.map_tensors(torch.Tensor.float), ops, x), model(x)
        got64, want64 = run_plan(plan, ops, x.double()), model.double()(x.double())
    if head == "features":
        assert [g.shape for g in got64] == [w.shape for w in want64]
    else:
        assert got64.shape == want64.shape
    assert rel_err(got32, want32) < TOL
    assert rel_err(got64, want64) < 1e-10


@pytest.mark.parametrize("head", ["seg", "pose", "classification"])
def test_min_channels_pads_only_the_narrow_widths(head, monkeypatch):
    """``min_channels`` (HRNET_FAST_CUDA_MIN_CHANNELS) pads every width below it up to it and keeps
    the multiple for the rest (w18 with 8 and 32: 18 -> 32, 36 -> 40, 72 -> 72, 144 -> 144); exact,
    every head; the batched fuse convs' splits stay aligned to the multiple."""
    from hrnet_fast.backends import selection
    kw = {"num_classes": 17} if head == "pose" else {"num_classes": 10} if head != "seg" else {}
    model = _model("w18", upsample="bilinear", head=head, **kw)
    plan = build_plan(model, channel_multiple=8, hoist_biases=True, min_channels=32)
    widths = [b[0].convs[0].out_channels for b in plan.stages[-1][0].branches]
    assert widths == [32, 40, 72, 144]
    for stage in plan.stages:
        for mod in stage:
            for table in (mod.fuse.up, mod.fuse.down_first) if mod.fuse else ():
                assert all(sp.start % 8 == 0 for b in table.values() for sp in b.splits)
    ops = TorchCPU.prepare(plan, torch.device("cpu"), torch.float64)
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        got64, want64 = run_plan(plan, ops, x.double()), model.double()(x.double())
    assert rel_err(got64, want64) < 1e-10
    monkeypatch.setenv(selection.CUDA_MIN_CHANNELS_ENV, "32")
    assert selection.cuda_min_channels() == 32
    for bad in ("-1", "x"):
        monkeypatch.setenv(selection.CUDA_MIN_CHANNELS_ENV, bad)
        with pytest.raises(ValueError, match="HRNET_FAST_CUDA_MIN_CHANNELS"):
            selection.cuda_min_channels()
    with pytest.raises(ValueError, match="min_channels"):
        build_plan(model, channel_multiple=8, min_channels=-2)


@pytest.mark.parametrize("m", [16, 32])
def test_wider_channel_multiples_match_reference(m, monkeypatch):
    """The CUDA plans' channel multiple can be raised for an A/B of cuDNN's kernel choice
    (HRNET_FAST_CUDA_CHANNEL_MULTIPLE): a plan padded to 16 or 32 is exact too (w18: 18 -> 32,
    36 -> 48 or 64, 72 -> 80 or 96, 270 -> 272 or 288), and the variable reaches the engine's
    plan on CUDA only (a bad value is one error naming it)."""
    from hrnet_fast.backends import selection
    model = _model("w18", upsample="bilinear")
    plan = build_plan(model, channel_multiple=m, hoist_biases=True)
    assert all(c % m == 0 for c in [s.weight.shape[0] for s in plan.conv_specs()][:-1])
    ops = TorchCPU.prepare(plan, torch.device("cpu"), torch.float64)
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        got64, want64 = run_plan(plan, ops, x.double()), model.double()(x.double())
    assert rel_err(got64, want64) < 1e-10
    monkeypatch.setenv(selection.CUDA_CHANNEL_MULTIPLE_ENV, str(m))
    assert selection.cuda_channel_multiple() == m
    cpu_plan = optimize(model.float(), backend="torch").plan  # CUDA plans only: not padded here
    assert [b[0].convs[0].out_channels for b in cpu_plan.stages[-1][0].branches] == [18, 36, 72, 144]
    for bad in ("12", "0", "-8", "eight"):
        monkeypatch.setenv(selection.CUDA_CHANNEL_MULTIPLE_ENV, bad)
        with pytest.raises(ValueError, match="HRNET_FAST_CUDA_CHANNEL_MULTIPLE"):
            selection.cuda_channel_multiple()


def _relu_rows(spec):
    """Which output channels take the ReLU (``relu_ranges`` override ``relu``)."""
    rows = torch.zeros(spec.out_channels, dtype=torch.bool)
    if spec.relu_ranges is not None:
        for a, b in spec.relu_ranges:
            rows[a:b] = True
    else:
        rows[:] = spec.relu
    return rows


def _batched_pairs(plain, padded):
    """{id(padded batched spec): (plain BatchedConv, padded BatchedConv)} over every fuse step."""
    pairs = {}
    for ps, qs in zip(plain.stages, padded.stages):
        for pm, qm in zip(ps, qs):
            if pm.fuse is not None:
                for table in ("up", "down_first"):
                    for j, pb in getattr(pm.fuse, table).items():
                        qb = getattr(qm.fuse, table)[j]
                        pairs[id(qb.conv)] = (pb, qb)
    return pairs


@pytest.mark.parametrize("head", ["seg", "classification"])
@pytest.mark.parametrize("preset", ["w18_small_v2", "w18"])
def test_padded_plan_is_plain_plan_plus_zeros_at_aligned_offsets(preset, head):
    """Spec by spec, the padded plan is the m=1 plan embedded in zeros: real rows (at each split's
    aligned start in batched convs) and real columns equal, every other weight and bias exactly 0,
    ReLU on the same real channels; widths and split starts are multiples of 8."""
    model = _model(preset, head=head, **({"num_classes": 10} if head == "classification" else {}))
    plain, padded = build_plan(model), build_plan(model, channel_multiple=M)
    batched = _batched_pairs(plain, padded)
    classifier = plain.head.classifier if head == "seg" else None
    specs = list(zip(plain.conv_specs(), padded.conv_specs()))
    assert len(specs) > 50 and len(batched) > 5
    for p, q in specs:
        assert (p.stride, p.padding, p.weight.shape[2:]) == (q.stride, q.padding, q.weight.shape[2:])
        cout, cin = p.weight.shape[:2]
        # Widths: padded to multiples of 8, except the image (stem input) and the classifier output.
        assert q.weight.shape[1] == (cin if p is plain.stem[0] else _up8(cin))
        assert q.out_channels == (cout if p is classifier else _up8(cout)) or id(q) in batched
        rows = [(0, cout, 0)]  # (plain start, plain end, padded start)
        if id(q) in batched:
            pb, qb = batched[id(q)]
            assert [s.target for s in pb.splits] == [s.target for s in qb.splits]
            for s, t in zip(pb.splits, qb.splits):
                assert t.start % M == 0 and t.end - t.start == _up8(s.end - s.start)
            assert qb.splits[-1].end == q.out_channels
            rows = [(s.start, s.end, t.start) for s, t in zip(pb.splits, qb.splits)]
        want_w = torch.zeros_like(q.weight)
        want_b = None if q.bias is None else torch.zeros_like(q.bias)
        want_relu = torch.zeros(q.out_channels, dtype=torch.bool)
        for a, b, start in rows:
            want_w[start:start + b - a, :cin] = p.weight[a:b]
            if want_b is not None:
                want_b[start:start + b - a] = p.bias[a:b]
            want_relu[start:start + b - a] = _relu_rows(p)[a:b]
        assert (p.bias is None) == (q.bias is None)
        assert torch.equal(q.weight, want_w)
        assert want_b is None or torch.equal(q.bias, want_b)
        real = want_w.flatten(1).any(1)  # padding rows may take a ReLU or not: they are zeros
        assert torch.equal(_relu_rows(q)[real], want_relu[real])
    if head == "classification":
        fc = plain.head.fc_weight
        assert torch.equal(padded.head.fc_weight[:, :fc.shape[1]], fc)
        assert not padded.head.fc_weight[:, fc.shape[1]:].any()
    assert padded.branch_channels == plain.branch_channels == tuple(model.pre_stage_channels)


@pytest.mark.parametrize("head", ["seg", "features"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_padding_channels_stay_exactly_zero(mode, head):
    """Every tensor the padded plan runs through (conv inputs and outputs, fuse and head operands)
    whose width is a padded branch or head width has exact zeros past the real width."""
    model = _model("w18", upsample=mode, head=head)
    plan = build_plan(model, channel_multiple=M)
    torch_ops = TorchCPU.prepare(plan, torch.device("cpu"), torch.float32)
    real = _padded_widths(model)
    assert set(real) == {24, 40, 272}
    seen = []

    def check(t):
        c = real.get(t.shape[1])
        if c is not None:
            assert not t[:, c:].any(), f"padding channels {c}:{t.shape[1]} are not zero"
            seen.append(c)
        return t

    def conv(x, spec, residual=None):
        check(x)
        return check(torch_ops.conv(x, spec, None if residual is None else check(residual)))

    def fuse(base, contributions, mode, align, relu, bias=None):
        for t in [base, *contributions]:
            check(t)
        return check(torch_ops.fuse(base, contributions, mode, align, relu, bias))

    def head_op(base, contributions, weight, bias, mode, align):
        for t in [base, *contributions]:
            check(t)
        return torch_ops.head(base, contributions, weight, bias, mode, align)

    class Checking(TorchCPU):  # the torch backend, every operand and result checked
        resize_narrow_head_branches = False  # every head operand at its own resolution

    ops = Checking.prepare(plan, torch.device("cpu"), torch.float64)
    ops.conv, ops.fuse, ops.head = conv, fuse, head_op
    x = torch.randn(2, 3, 65, 97, dtype=torch.float64)
    with torch.no_grad():
        out = run_plan(plan, ops, x)
    assert set(seen) == ({18, 36, 270} if head == "seg" else {18, 36}) and len(seen) > 200
    if head == "features":  # sliced back to the real widths
        assert [t.shape[1] for t in out] == [18, 36, 72, 144]


def test_stack_aligns_split_starts_with_zero_rows():
    """The batched conv of unaligned convs: splits start at multiples of 8, the gap rows are zero
    (weights and bias), ReLU ranges cover the real ReLU channels, and each split's slice equals
    its own conv."""
    from hrnet_fast.plan import ConvSpec, _stack_convs
    torch.manual_seed(0)
    convs = [ConvSpec(torch.randn(co, 16, 3, 3, dtype=torch.float64), torch.randn(co, dtype=torch.float64),
                      2, 1, relu=r) for co, r in ((18, False), (36, True), (18, True), (8, False))]
    plain = _stack_convs(convs, [1, 2, 3, 4])
    assert [(s.start, s.end) for s in plain.splits] == [(0, 18), (18, 54), (54, 72), (72, 80)]
    assert plain.conv.relu_ranges == ((18, 72),)
    b = _stack_convs(convs, [1, 2, 3, 4], M)
    assert [(s.target, s.start, s.end) for s in b.splits] == [(1, 0, 18), (2, 24, 60), (3, 64, 82),
                                                            (4, 88, 96)]
    assert b.conv.out_channels == 96
    gaps = torch.ones(96, dtype=torch.bool)
    for s in b.splits:
        gaps[s.start:s.end] = False
    assert not b.conv.weight[gaps].any() and not b.conv.bias[gaps].any()
    relu = _relu_rows(b.conv)
    assert relu[24:82].all() and not relu[:18].any() and not relu[88:].any()
    x = torch.randn(2, 16, 13, 11, dtype=torch.float64)
    y = conv2d_bias_act_torch(x, b.conv.weight, b.conv.bias, 2, 1, None, b.conv.relu, b.conv.relu_ranges)
    for c, s in zip(convs, b.splits):
        want = nn.functional.conv2d(x, c.weight, c.bias, 2, 1)
        want = want.relu() if c.relu else want
        # float64 to rounding, not bit for bit: the GEMM may block 96 output channels differently
        # from 18 (it does on AVX2 CPUs); a wrong row or bias is off by O(1)
        assert rel_err(y[:, s.start:s.end], want) < 1e-13
    assert not y[:, gaps].any()


def test_channel_multiple_one_keeps_the_model_widths():
    """m=1 (the default) is the plan as it always was: every conv has the reference conv's
    shape (no zero rows or columns) and split starts are cumulative widths."""
    model = _model("w18", head="features")
    plan = build_plan(model, channel_multiple=1)
    default = build_plan(model)
    assert [s.weight.shape for s in plan.conv_specs()] == [s.weight.shape for s in default.conv_specs()]
    for spec in plan.conv_specs():
        w = spec.weight.flatten(2)
        assert w.any(2).any(1).all() and w.any(2).any(0).all()  # no all-zero row or column
    assert plan.stem[0].weight.shape == model.conv1.weight.shape
    for ref_stage, stage in zip((model.stage2, model.stage3, model.stage4), plan.stages):
        for ref_module, module in zip(ref_stage, stage):
            for ref_branch, branch in zip(ref_module.branches, module.branches):
                for ref_block, block in zip(ref_branch, branch):
                    assert [c.weight.shape for c in block.convs] == [ref_block.conv1.weight.shape,
                                                                     ref_block.conv2.weight.shape]
    for fuse in (m.fuse for stage in plan.stages for m in stage if m.fuse):
        for b in [*fuse.up.values(), *fuse.down_first.values()]:
            ends = [0] + [s.end for s in b.splits]
            assert [s.start for s in b.splits] == ends[:-1] and ends[-1] == b.conv.out_channels
    x = torch.randn(1, 3, 40, 56, dtype=torch.float64)
    with torch.no_grad():
        out = run_plan(plan, TorchCPU.prepare(plan, torch.device("cpu"), torch.float32), x)
    assert [t.shape[1] for t in out] == [18, 36, 72, 144]
    assert all(t.is_contiguous() for t in out)  # not slices of wider tensors


@pytest.mark.parametrize("bad", [0, -8, 2.0, True, "8"])
def test_channel_multiple_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="channel_multiple"):
        build_plan(_model(), channel_multiple=bad)


def test_engine_pads_channels_only_on_cuda(monkeypatch):
    from hrnet_fast import engine as engine_module
    calls = []

    def spy(model, channel_multiple=1, hoist_biases=False, min_channels=0):
        calls.append((channel_multiple, hoist_biases, min_channels))
        return build_plan(model, channel_multiple, hoist_biases, min_channels)

    monkeypatch.setattr(engine_module, "build_plan", spy)
    monkeypatch.setenv("HRNET_FAST_CUDA_MIN_CHANNELS", "32")  # CUDA plans only
    monkeypatch.setenv("HRNET_FAST_CUDA_CHANNEL_MULTIPLE", "16")
    optimize(_model(), backend="torch")
    assert calls == [(1, False, 0)]


@pytest.mark.gpu
@pytest.mark.parametrize("head", ["seg", "features"])
@pytest.mark.parametrize("backend", ["torch", "auto", "triton", "cuda"])
def test_cuda_engine_runs_the_padded_plan(backend, head):
    """On CUDA the engine's plan is padded (18/36 -> 24/40 channels) and still exact (fp32).
    torch, auto and triton must run on a CUDA machine; cuda skips only where the extension cannot
    be built (tests/gpu_backends.py)."""
    require_backend(backend)
    model = _model("w18_small_v2", upsample="bilinear", head=head).cuda()
    engine = optimize(model, backend=backend, cuda_graphs=False)
    stem = engine.plan.stem[0]
    assert all(s.weight.shape[1] % M == 0 for s in engine.plan.conv_specs() if s is not stem)
    x = torch.randn(2, 3, 129, 193, device="cuda")
    with torch.no_grad():
        got, want = engine(x), model(x)
    if head == "features":
        assert [g.shape for g in got] == [w.shape for w in want]
    assert rel_err(got, want) < TOL
