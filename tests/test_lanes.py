"""Branch lanes (hrnet_fast/lanes.py): the engine's dataflow across CUDA streams, checked on the CPU.

A CUDA race needs a GPU to show (tests/test_engine.py has the GPU tests: lanes on against off,
eager and graph replays, bitwise). What the CPU can check is the rule that makes those runs
race-free: every tensor an op reads was produced on the op's lane or delivered to it, with the
producer's event marked after the production. ``TrackingLanes`` plays the lanes and a backend proxy
tags each op's outputs with the lane it ran on and checks each op's inputs.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from helpers import bn_model
from hrnet_fast import optimize
from hrnet_fast.backends.base import Backend
from hrnet_fast.engine import run_plan
from hrnet_fast.lanes import SerialLanes

X = torch.randn(2, 3, 61, 83, generator=torch.Generator().manual_seed(3))


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class TrackingLanes(SerialLanes):
    """Lanes as bookkeeping: which lane produced each storage and when, what was delivered where."""

    def __init__(self) -> None:
        self.lane, self.clock = 0, 0
        self.home = {}            # storage -> (lane, clock of production)
        self.delivered = set()    # (storage, lane)
        self.errors = []
        self.ops = []             # (op name, lane)
        self.alive = []           # every tracked tensor (see produced)
        self.forked = self.joined = False

    def fork(self) -> None:
        self.forked = True

    def join(self) -> None:
        self.joined = True

    @contextlib.contextmanager
    def on(self, lane: int):
        before, self.lane = self.lane, lane
        try:
            yield
        finally:
            self.lane = before

    def mark(self, lane: int):
        self.clock += 1
        return (lane, self.clock)

    def produced(self, t: torch.Tensor) -> None:
        self.clock += 1
        self.home[_storage(t)] = (self.lane, self.clock)
        # Held until the run ends: a freed storage's address could be reused by a tensor no
        # tracked step made (the classification head's add), which would inherit a stale home.
        self.alive.append(t)

    def check(self, op: str, t: torch.Tensor, lane=None) -> None:
        lane = self.lane if lane is None else lane
        home = self.home.get(_storage(t))
        if home is not None and home[0] != lane and (_storage(t), lane) not in self.delivered:
            self.errors.append(f"{op} on lane {lane} reads a tensor of lane {home[0]} "
                               "that was never delivered to it")

    def deliver(self, lane, tensors, ready) -> None:
        for t in tensors:
            home = self.home.get(_storage(t))
            if home is None:
                self.errors.append(f"delivered to lane {lane}: a tensor no op produced")
                continue
            src, when = home
            if src != lane:
                event = ready.get(src)
                if event is None or event[0] != src or event[1] < when:
                    self.errors.append(f"delivered from lane {src} to {lane} without an event "
                                       "marked after its production")
            self.delivered.add((_storage(t), lane))


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class TrackedBackend:
    """``be`` with every plan step checked (inputs available on the current lane) and its outputs
    tagged with that lane."""

    STEPS = ("conv", "conv_into_residual", "conv_with_downsample", "blocks", "fuse", "head",
             "projected_head", "down", "resize_concat")

    def __init__(self, be: Backend, lanes: TrackingLanes) -> None:
        self._be, self._lanes = be, lanes

    def __getattr__(self, name):
        real = getattr(self._be, name)
        if name not in self.STEPS:
            return real
        lanes = self._lanes

        def step(*args, **kwargs):
            lanes.ops.append((name, lanes.lane))
            for t in _tensors(list(args) + list(kwargs.values())):
                lanes.check(name, t)
            out = real(*args, **kwargs)
            for t in _tensors(out):
                lanes.produced(t)
            return out
        return step


def _run_tracked(plan, be, x):
    """``run_plan`` with tracking lanes; the engine's own resize (mmseg's extra step) is tracked
    as a step too."""
    from unittest import mock

    from hrnet_fast import engine
    lanes = TrackingLanes()
    lanes.produced(x)
    resize = TrackedBackend(mock.Mock(resize=engine.fuse_resize), lanes)
    resize.STEPS = ("resize",)
    with mock.patch.object(engine, "fuse_resize", resize.resize):
        out = run_plan(plan, TrackedBackend(be, lanes), x, lanes)
    for t in _tensors(out):
        lanes.check("the caller", t, lane=0)
    assert lanes.forked and lanes.joined
    return out, lanes


CASES = [("w18_small_v1", "seg", "bilinear"), ("w18_small_v1", "seg", "nearest"),
         ("w18_small_v2", "seg", "mmseg"), ("w18_small_v1", "pose", None),
         ("w18_small_v1", "classification", None), ("w18_small_v1", "features", None)]


@pytest.mark.parametrize("plain", [False, True], ids=["torch-backend", "base-backend"])
@pytest.mark.parametrize("preset,head,mode", CASES)
def test_every_read_is_on_its_lane_or_delivered(preset, head, mode, plain):
    """Every head and resize convention; the CPU torch backend (narrow seg-head branches resized
    and projected with branch 0) and the plain base backend (every branch projected on its own
    lane). The tracked run equals the serial run exactly, and the branches really ran on lanes of
    their own."""
    model = bn_model(preset, mode=mode or "nearest", head=head)
    eng = optimize(model, backend="torch")
    be = Backend(eng.plan, eng.device, eng.dtype) if plain else eng._be
    x = X.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        serial = run_plan(eng.plan, be, x.clone())
        tracked, lanes = _run_tracked(eng.plan, be, x.clone())
    assert lanes.errors == []
    for a, b in zip(_tensors(serial), _tensors(tracked)):
        assert torch.equal(a, b)
    # w18_small_v1/v2 end with four branches: blocks and fuse steps ran on all four lanes
    used = {lane for op, lane in lanes.ops if op in ("conv", "blocks", "conv_into_residual")}
    assert used == {0, 1, 2, 3}
    assert {lane for op, lane in lanes.ops if op == "fuse"} == {0, 1, 2, 3} or head == "pose"


def test_a_missing_delivery_is_caught(monkeypatch):
    """The tracking fails when a transition's result is not delivered to its branch's lane (a
    planted bug: the new branch's first block would race its transition conv on a GPU)."""
    real_deliver = TrackingLanes.deliver

    def skip_transitions(self, lane, tensors, ready):
        import inspect
        if inspect.stack()[1].function == "run_transition":
            return
        real_deliver(self, lane, tensors, ready)

    monkeypatch.setattr(TrackingLanes, "deliver", skip_transitions)
    eng = optimize(bn_model("w18_small_v1"), backend="torch")
    with torch.no_grad():
        _, lanes = _run_tracked(eng.plan, eng._be, X.contiguous(memory_format=torch.channels_last))
    assert any("never delivered" in e for e in lanes.errors)


def test_a_stale_event_is_caught(monkeypatch):
    """The tracking fails when a delivery waits on an event marked before the production (a planted
    bug: the receiving lane could read the tensor before it is written)."""
    def early(self, lane):
        return (lane, 0)

    monkeypatch.setattr(TrackingLanes, "mark", early)
    eng = optimize(bn_model("w18_small_v1"), backend="torch")
    with torch.no_grad():
        _, lanes = _run_tracked(eng.plan, eng._be, X.contiguous(memory_format=torch.channels_last))
    assert any("without an event" in e for e in lanes.errors)


def test_dropin_passes_branch_streams_on():
    """The drop-in's ``fast_branch_streams`` / ``configure_fast(branch_streams=...)`` reach the
    engine: on the CPU, asking for them is the engine's one clear error."""
    from hrnet_fast import HRNet
    from hrnet_fast.backends.base import BackendUnavailable
    model = HRNet("w18_small_v1", fast_branch_streams=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), pytest.raises(BackendUnavailable, match="needs a CUDA device"):
        model(x)
    model.configure_fast(branch_streams=False)
    with torch.no_grad():
        model(x)
    assert model.engine is not None and model.engine.branch_streams is False


def test_branch_streams_need_cuda():
    from hrnet_fast.backends.base import BackendUnavailable
    with pytest.raises(BackendUnavailable, match="branch_streams=True needs a CUDA device"):
        optimize(bn_model("w18_small_v1"), backend="torch", branch_streams=True)
    assert optimize(bn_model("w18_small_v1"), backend="torch").branch_streams is False


@pytest.mark.gpu
@pytest.mark.parametrize("preset,head,dtype,size", [
    ("w18", "seg", torch.float16, (2, 3, 257, 385)),
    ("w18", "seg", torch.float32, (1, 3, 193, 257)),
    ("w48", "seg", torch.bfloat16, (1, 3, 512, 1024)),
    ("w18_small_v1", "pose", torch.float16, (3, 3, 256, 192)),
    ("w18_small_v2", "features", torch.float16, (2, 3, 97, 131)),
])
def test_lanes_on_the_gpu_equal_the_serial_engine(preset, head, dtype, size):
    """Branch lanes against the serial engine on a GPU, bit for bit: eager calls and CUDA-graph
    replays with fresh random inputs (a race between lanes shows up as a difference on some
    replay). Both engines use the same cuDNN algorithms (one process, measured once per shape)
    and the same kernels in the same order per branch."""
    from hrnet_fast.engine import optimize as opt
    model = bn_model(preset, head=head).cuda()
    serial = opt(model, dtype=dtype, branch_streams=False, cuda_graphs=False)
    eager = opt(model, dtype=dtype, cuda_graphs=False, branch_streams=True)
    graphed = opt(model, dtype=dtype)
    assert graphed.branch_streams and not serial.branch_streams
    assert not opt(model, dtype=dtype, cuda_graphs=False).branch_streams  # the default follows graphs
    gen = torch.Generator("cuda")
    with torch.no_grad():
        for seed in range(6):  # graphed: call 1 eager, 2 captures, 3-6 replay
            x = torch.randn(*size, device="cuda", generator=gen.manual_seed(seed)).to(dtype)
            want = serial(x)
            for got in (eager(x), graphed(x)):
                for a, b in zip(_tensors(got), _tensors(want)):
                    assert torch.equal(a, b), (seed, (a.float() - b.float()).abs().max().item())
    assert len(graphed._graphs) == 1


@pytest.mark.gpu
def test_compile_backend_runs_one_stream():
    """torch.compile traces the serial forward: lanes are off by default there, and asking for
    them is one clear error (not a silent downgrade)."""
    from hrnet_fast.backends.base import BackendUnavailable
    model = bn_model("w18_small_v1").cuda()
    assert optimize(model, backend="compile").branch_streams is False
    with pytest.raises(BackendUnavailable, match="does not combine with backend='compile'"):
        optimize(model, backend="compile", branch_streams=True)
