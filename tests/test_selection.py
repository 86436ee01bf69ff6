"""Per-shape selection between implementations (the measuring itself runs on GPUs; here fake
timers, fake graphs and fake events drive the logic; the @gpu tests time for real)."""
import json
import math
import multiprocessing
import time
import warnings

import pytest
import torch

import hrnet_fast
import hrnet_fast.backends.selection as sel
from hrnet_fast.backends.selection import SelectingOp, cache_path, cuda_timer, time_calls

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def cache_dir(monkeypatch, tmp_path):
    """Every test gets its own empty disk cache and a fresh in-process copy of it."""
    monkeypatch.setenv("HRNET_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sel, "_DISK", None)
    monkeypatch.setattr(sel, "_WARNED", set())  # once-per-process warnings, per test
    return tmp_path


@pytest.fixture
def fake_gpu(monkeypatch):
    """Lets ``choose`` run for a CUDA device on a machine without one (not capturing)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 9000")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


class CountingTimer:
    """Runs the candidate once and reports its fake time."""

    def __init__(self, timings):
        self.timings, self.calls = timings, 0

    def __call__(self, fn, device):
        self.calls += 1
        return self.timings[fn()]


def _op(timings, persist=False, op="demo_op"):
    def make(name):
        return lambda x, scale: name

    timer = CountingTimer(timings)
    return SelectingOp(op, {name: make(name) for name in timings},
                       key_fn=lambda x, scale: (tuple(x.shape), scale), timer=timer,
                       persist=persist), timer


def _disk_key(device, op, key):
    return f"{sel._device_tag(device)}|{op}|{key}"


def test_picks_fastest_once_per_key():
    op, timer = _op({"a": 2.0, "b": 1.0, "c": 3.0})
    x = torch.ones(2, 3)
    assert op(x, 2.0) == "b"
    assert op.choices[((2, 3), 2.0)] == "b"
    assert op.timings[((2, 3), 2.0)] == {"a": 2.0, "b": 1.0, "c": 3.0}
    assert timer.calls == 3
    assert op(x, 2.0) == "b"
    assert timer.calls == 3  # remembered: no new measurement
    op.timer.timings = {"a": 0.5, "b": 1.0, "c": 3.0}
    assert op(torch.ones(4), 2.0) == "a"  # a new key measures again
    assert timer.calls == 6


def test_candidates_run_the_real_arguments():
    seen = []
    op = SelectingOp("demo_args", {"mul": lambda x, s: x * s, "add": lambda x, s: x + s},
                     key_fn=lambda x, s: tuple(x.shape),
                     timer=lambda fn, d: (seen.append(fn()), float(len(seen)))[1], persist=False)
    x = torch.full((2,), 3.0)
    assert torch.equal(op(x, 2.0), x * 2)  # "mul" was timed first, so it measured faster
    assert torch.equal(seen[0], x * 2) and torch.equal(seen[1], x + 2)


def test_choice_persists_and_is_read_back_without_timing():
    op, timer = _op({"a": 2.0, "b": 1.0}, persist=True)
    op(torch.ones(3), 1.0)
    saved = json.load(open(cache_path()))
    assert saved == {_disk_key(torch.device("cpu"), "demo_op", ((3,), 1.0)): "b"}
    sel._DISK = None  # a new process
    op2, timer2 = _op({"a": 2.0, "b": 1.0}, persist=True)
    assert op2(torch.ones(3), 1.0) == "b"
    assert timer2.calls == 0


def test_disk_key_has_package_version_and_device_name(monkeypatch, fake_gpu):
    monkeypatch.setattr(hrnet_fast, "__version__", "7.7.7-test")
    op, timer = _op({"a": 2.0, "b": 1.0}, persist=True)
    assert op.choose(CUDA, "k", (None, None), {}) == "b"
    (key,) = json.load(open(cache_path()))
    assert "Fake GPU 9000" in key and "hrnet_fast 7.7.7-test" in key
    assert f"torch {torch.__version__}" in key and "triton " in key

    def fresh_choice():
        sel._DISK = None
        op, timer = _op({"a": 2.0, "b": 1.0}, persist=True)
        op.choose(CUDA, "k", (None, None), {})
        return timer.calls

    assert fresh_choice() == 0  # same version and card: read back
    monkeypatch.setattr(hrnet_fast, "__version__", "7.7.8-test")
    assert fresh_choice() == 2  # a new version measures again
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Other GPU")
    assert fresh_choice() == 2  # so does another card
    assert len(json.load(open(cache_path()))) == 3


def test_package_version_fallbacks(monkeypatch):
    import importlib.metadata
    assert sel._package_version() == hrnet_fast.__version__
    monkeypatch.delattr(hrnet_fast, "__version__")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: f"dist-{name}")
    assert sel._package_version() == "dist-hrnet_fast"

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert sel._package_version() == "unknown"


@pytest.mark.parametrize("content", [
    b"\xff\xfe\x00garbage{{",  # not UTF-8, not JSON
    b'{"truncated": ',
    b"[" * 100000,  # nested past the recursion limit
    b'["a", "b"]',  # JSON, not an object
    b'"b"',
    json.dumps({"k1": 3, "k2": None, "k3": ["a"], "k4": {"b": 1}, "keep": "x"}).encode(),
    b"null",
    b"3",
    b"[1]",
    b'{"a": 1}',
    b"",
    bytes(range(256)),
], ids=["garbage", "truncated", "deep", "list", "string", "bad-values", "null", "number",
        "list-of-number", "number-value", "empty", "binary"])
def test_corrupt_cache_is_ignored_and_rewritten(content):
    with open(cache_path(), "wb") as f:
        f.write(content)
    op, timer = _op({"a": 2.0, "b": 1.0}, persist=True)
    assert op(torch.ones(3), 1.0) == "b"
    assert timer.calls == 2
    saved = json.load(open(cache_path()))
    assert isinstance(saved, dict) and all(isinstance(v, str) for v in saved.values())
    assert saved[_disk_key(torch.device("cpu"), "demo_op", ((3,), 1.0))] == "b"
    assert set(saved) <= {"keep", _disk_key(torch.device("cpu"), "demo_op", ((3,), 1.0))}
    if b"keep" in content:
        assert saved["keep"] == "x"  # good entries of a partly bad file survive


def test_cached_unknown_candidate_is_measured_again():
    key = _disk_key(torch.device("cpu"), "demo_op", ((3,), 1.0))
    with open(cache_path(), "w") as f:
        json.dump({key: "removed_impl"}, f)
    op, timer = _op({"a": 2.0, "b": 1.0}, persist=True)
    assert op(torch.ones(3), 1.0) == "b"
    assert timer.calls == 2
    assert json.load(open(cache_path())) == {key: "b"}


def test_unwritable_cache_dir_does_not_break_choosing(monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("HRNET_FAST_CACHE_DIR", str(blocker / "sub"))  # makedirs fails
    op, timer = _op({"a": 2.0, "b": 1.0}, persist=True)
    with pytest.warns(RuntimeWarning, match=r"selection cache.*not writable|could not save") as rec:
        assert op(torch.ones(3), 1.0) == "b"
    assert not list(tmp_path.glob("**/*.tmp"))
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert str(blocker / "sub") in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second failed save: no second warning
        assert op(torch.ones(5), 1.0) == "b"
        assert timer.calls == 4


def _add_keys(tag, n, barrier):
    """One process of the concurrency test: its own in-process copy, read before the others
    write, then ``n`` saves of one new key each."""
    sel._DISK = None
    sel._disk()
    barrier.wait()
    for i in range(n):
        with sel._LOCK:
            sel._disk()[f"{tag}-{i}"] = tag
            sel._save_disk()


def test_concurrent_processes_keep_each_others_entries():
    with open(cache_path(), "w") as f:
        json.dump({"old": "x"}, f)
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    barrier = ctx.Barrier(2)
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork in a multi-threaded process
        procs = [ctx.Process(target=_add_keys, args=(tag, 50, barrier)) for tag in ("p", "q")]
        for p in procs:
            p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    saved = json.load(open(cache_path()))
    assert saved == {"old": "x", **{f"{t}-{i}": t for t in ("p", "q") for i in range(50)}}
    assert time.monotonic() - t0 < 30
    assert not [p for p in sel.os.listdir(sel.os.path.dirname(cache_path())) if p.endswith(".tmp")]


def test_save_merges_entries_written_since_the_read():
    op, _ = _op({"a": 2.0, "b": 1.0}, persist=True)
    sel._disk()  # this process read the (empty) file
    with open(cache_path(), "w") as f:  # then another process saved its choice
        json.dump({"other": "x", "bad": 3}, f)
    op(torch.ones(3), 1.0)
    saved = json.load(open(cache_path()))
    assert saved == {"other": "x", _disk_key(torch.device("cpu"), "demo_op", ((3,), 1.0)): "b"}
    assert sel._disk()["other"] == "x"  # and this process sees it too


@pytest.mark.skipif(sel.fcntl is None, reason="no fcntl on this platform")
def test_save_waits_for_the_file_lock():
    import threading
    sel._disk()["mine"] = "y"
    fd = sel.os.open(cache_path() + ".lock", sel.os.O_RDWR | sel.os.O_CREAT)
    sel.fcntl.flock(fd, sel.fcntl.LOCK_EX)  # another process in the middle of its save
    try:
        saver = threading.Thread(target=sel._save_disk)
        saver.start()
        saver.join(0.3)
        assert saver.is_alive()  # waiting for the lock
        with open(cache_path(), "w") as f:  # what the other process writes meanwhile
            json.dump({"theirs": "x"}, f)
    finally:
        sel.os.close(fd)
    saver.join(10)
    assert not saver.is_alive()
    assert json.load(open(cache_path())) == {"mine": "y", "theirs": "x"}


def test_save_without_fcntl(monkeypatch):
    monkeypatch.setattr(sel, "fcntl", None)  # a platform without it: no lock, same merge
    with open(cache_path(), "w") as f:
        json.dump({"other": "x"}, f)
    op, _ = _op({"a": 2.0, "b": 1.0}, persist=True)
    sel._disk()
    op(torch.ones(3), 1.0)
    assert len(json.load(open(cache_path()))) == 2


def test_force_override_and_bad_force(monkeypatch):
    op, timer = _op({"a": 2.0, "b": 1.0})
    monkeypatch.setenv("HRNET_FAST_FORCE_DEMO_OP", "a")
    assert op(torch.ones(1), 1.0) == "a"
    assert timer.calls == 0
    monkeypatch.setenv("HRNET_FAST_FORCE_DEMO_OP", "zzz")
    with pytest.raises(ValueError, match=r"HRNET_FAST_FORCE_DEMO_OP='zzz'.*\['a', 'b'\]"):
        op(torch.ones(1), 1.0)


def test_no_measurement_and_no_choice_during_capture(monkeypatch, fake_gpu):
    op, timer = _op({"a": 2.0, "b": 1.0}, persist=True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert op.choose(CUDA, "k", (None, None), {}) == "a"  # the first candidate
    assert timer.calls == 0 and op.choices == {} and sel._disk() == {}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert op.choose(CUDA, "k", (None, None), {}) == "b"  # measured once outside the capture
    assert timer.calls == 2


def test_failing_candidate_is_skipped_and_choice_persisted():
    def broken(x, scale):
        raise RuntimeError("no kernel for this shape")

    op = SelectingOp("demo_op2", {"broken": broken, "ok": lambda x, scale: x + scale},
                     key_fn=lambda x, scale: tuple(x.shape), timer=lambda fn, d: (fn(), 1.0)[1])
    assert torch.equal(op(torch.zeros(3), 1.0), torch.ones(3))
    saved = json.load(open(cache_path()))
    assert list(saved.values()) == ["ok"]
    sel._DISK = None  # a new process reads the choice back without timing
    op2 = SelectingOp("demo_op2", {"broken": broken, "ok": lambda x, scale: x + scale},
                      key_fn=lambda x, scale: tuple(x.shape), timer=lambda fn, d: 1 / 0)
    assert torch.equal(op2(torch.zeros(3), 1.0), torch.ones(3))


def test_no_candidate_runs():
    op = SelectingOp("demo_op3", {"x": lambda t: 1 / 0, "y": lambda t: 1 / 0},
                     key_fn=lambda t: 0, timer=lambda fn, d: fn(), persist=False)
    with pytest.raises(RuntimeError, match="no implementation could run"):
        op(torch.zeros(1))


# --- time_calls: what the CUDA timer measures, with a fake GPU clock --------------------------

LAUNCH_MS = 10.0  # host overhead of one eager launch, which a graph replay does not pay


class FakeGPU:
    """A clock, events on it, an op whose eager call costs LAUNCH_MS + kernel time, and graphs
    whose replay costs only the kernels (``replay_kernel_ms`` per call, one entry per replay)."""

    def __init__(self, eager_kernel_ms=1.0, replay_kernel_ms=(), capture_fails=False):
        self.now, self.eager_kernel_ms = 0.0, eager_kernel_ms
        self.replay_kernel_ms = list(replay_kernel_ms)
        self.capture_fails, self.capturing = capture_fails, False
        self.eager_calls, self.captured_calls, self.replays, self.resets = 0, 0, 0, 0

    def fn(self):
        if self.capturing:
            self.captured_calls += 1
        else:
            self.eager_calls += 1
            self.now += LAUNCH_MS + self.eager_kernel_ms

    def capture(self, body):
        self.capturing = True
        try:
            body()
            if self.capture_fails:
                raise RuntimeError("operation not permitted when stream is capturing")
        finally:
            self.capturing = False
        gpu = self

        class Graph:
            def replay(self):
                gpu.replays += 1
                gpu.now += gpu.captured_calls * gpu.replay_kernel_ms.pop(0)

            def reset(self):
                gpu.resets += 1

        return Graph()

    def event(self):
        gpu = self

        class Event:
            t = None

            def record(self):
                self.t = gpu.now

            def synchronize(self):
                assert self.t is not None

            def elapsed_time(self, end):
                return end.t - self.t

        return Event()


def test_time_calls_times_graph_replays_per_call_median():
    # First replay (upload, 9.0) is untimed; then per-call kernel times with an outlier.
    gpu = FakeGPU(replay_kernel_ms=[9.0, 1.0, 1.3, 5.0, 0.9, 1.0])
    ms = time_calls(gpu.fn, n=20, repeats=5, capture=gpu.capture, event=gpu.event)
    assert math.isclose(ms, 1.0)  # median (mean 1.84, min 0.9, max 5.0; with the upload 1.3)
    assert gpu.captured_calls == 20 and gpu.eager_calls == 0
    assert gpu.replays == 6 and gpu.replay_kernel_ms == []
    assert gpu.resets == 1  # the graph is freed


def test_time_calls_frees_the_graph_when_replay_fails():
    gpu = FakeGPU(replay_kernel_ms=[1.0])  # the second replay finds no entry: IndexError
    with pytest.raises(IndexError):
        time_calls(gpu.fn, n=3, repeats=5, capture=gpu.capture, event=gpu.event)
    assert gpu.resets == 1


def test_time_calls_falls_back_to_eager_calls_when_capture_fails():
    gpu = FakeGPU(eager_kernel_ms=2.0, capture_fails=True)
    ms = time_calls(gpu.fn, n=4, repeats=3, capture=gpu.capture, event=gpu.event)
    assert math.isclose(ms, LAUNCH_MS + 2.0)  # per call, not per batch of 4
    assert gpu.eager_calls == 4 * 3 and gpu.replays == 0 and gpu.resets == 0


def test_time_calls_fallback_median():
    gpu = FakeGPU(capture_fails=True)
    costs = iter([1.0] * 4 + [100.0] * 4 + [2.0] * 4)  # three repeats of 4 calls, one slow

    def fn():
        if not gpu.capturing:
            gpu.now += next(costs)

    ms = time_calls(fn, n=4, repeats=3, capture=gpu.capture, event=gpu.event)
    assert math.isclose(ms, 2.0)  # median per call (mean 34.3, min 1.0, max 100.0)


# --- on a GPU: the real timer ------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_timer_graph_path_and_capture_fallback():
    dev = torch.device("cuda")
    x = torch.randn(1 << 16, device=dev)
    stream = torch.cuda.current_stream()
    ms = cuda_timer(lambda: torch.add(x, 1), dev)
    assert 0 < ms < 10 and torch.cuda.current_stream() == stream

    def syncing():  # .item() synchronises: capture refuses it, the eager fallback times it
        return (x + 1).sum().item()

    for _ in range(2):  # the failed capture leaves nothing behind that breaks a second one
        ms = cuda_timer(syncing, dev)
        assert 0 < ms < 100 and torch.cuda.current_stream() == stream
        assert not torch.cuda.is_current_stream_capturing()
    torch.testing.assert_close((x * 2).cpu(), x.cpu() * 2)  # the GPU is usable afterwards
    torch.randn(4, device=dev)  # and the RNG is out of capture mode
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x * 3
    graph.replay()
    torch.testing.assert_close(y, x * 3)


@pytest.mark.gpu
def test_selecting_op_with_the_real_timer():
    dev = torch.device("cuda")
    x = torch.randn(256, 256, device=dev)
    op = SelectingOp("demo_gpu", {"slow": lambda t: sum(t * 1 for _ in range(20)) / 20,
                                  "fast": lambda t: t.clone()},
                     key_fn=lambda t: tuple(t.shape))
    torch.testing.assert_close(op(x), x)
    assert op.choices[(256, 256)] == "fast"
    assert op.timings[(256, 256)]["fast"] < op.timings[(256, 256)]["slow"]
