"""ONNX Runtime and OpenVINO as peers of ``hrnet-fast bench`` (hrnet_fast/peers.py, bench.py).

Tests that run a peer need its packages (``pip install -e '.[peers]'``) and are skipped, saying
so, without them; the tests of their absence run everywhere. The tiny model is exported once for
the module: by the benchmark run of the ``bench`` fixture, whose export the other tests reuse.
"""
import importlib.util
import math
import statistics
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

import hrnet_fast.bench as bench
from hrnet_fast import peers
from hrnet_fast.backends import BackendUnavailable
from hrnet_fast.check import rel_err
from hrnet_fast.cli import main

CPU = torch.device("cpu")
PRESET, SIZE = "w18_small_v1", (64, 96)
FP32_TOLERANCE = 1e-4


def _installed(*packages):
    try:
        return all(importlib.util.find_spec(p) is not None for p in packages)
    except ValueError:  # hidden through sys.modules[p] = None
        return False


HAVE_ORT = _installed("onnx", "onnxruntime")
HAVE_OV = _installed("onnx", "openvino")
needs_ort = pytest.mark.skipif(not HAVE_ORT, reason="onnx/onnxruntime not installed "
                               "(pip install -e '.[peers]'): the ONNX Runtime peer is NOT tested")
needs_ov = pytest.mark.skipif(not HAVE_OV, reason="onnx/openvino not installed "
                              "(pip install -e '.[peers]'): the OpenVINO peers are NOT tested")


class _KeptExport(peers.OnnxExport):
    """The benchmark's export, kept past its case so that the direct tests reuse the file."""
    made = []

    def __init__(self, *args):
        super().__init__(*args)
        _KeptExport.made.append(self)

    def close(self):
        pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The peers follow torch's thread count; one thread keeps these tests quick on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench_result():
    """One benchmark case with every peer, the engine and the reference, timed round robin."""
    _KeptExport.made.clear()
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(bench, "OnnxExport", _KeptExport)
            result = bench.run_bench([PRESET], [SIZE], [1], [torch.float32], ["torch"],
                                     ["eager", *peers.ONNX_PEERS], CPU, warmup=1, repeats=2)
        yield result
    finally:  # also when the run failed half-way
        for export in _KeptExport.made:
            peers.OnnxExport.close(export)


@pytest.fixture(scope="module")
def export(bench_result):
    (made,) = _KeptExport.made
    return made


def _rows(result):
    return {r["name"]: r for r in result["rows"]}


def _hide_peer_packages(monkeypatch):
    for package in ("onnx", "onnxruntime", "openvino"):
        monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError


# --- the peers' outputs against the reference ---------------------------------------------------

@pytest.mark.parametrize("name", [pytest.param("onnxruntime", marks=needs_ort),
                                  pytest.param("openvino-fp32", marks=needs_ov)])
def test_fp32_peer_runs_the_same_model(export, name):
    run, info = peers.build_peer(name, export, CPU, torch.float32)
    with torch.inference_mode():
        expected = export.model(export.example)
    out = run(export.example)
    assert out.shape == expected.shape
    assert rel_err(out, expected) < FP32_TOLERANCE
    assert info["precision"] == "f32" and info["threads"] == torch.get_num_threads()


@needs_ov
def test_openvino_default_says_what_precision_it_ran(export):
    import openvino as ov

    run, info = peers.build_peer("openvino", export, CPU, torch.float32)
    with torch.inference_mode():
        err = rel_err(run(export.example), export.model(export.example))
    assert err < 0.05  # the same model, at worst in bf16 (another model would be off by ~1)
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        # It really runs bf16 here: the row must say so, and its error must show it.
        assert info["precision"] == "bf16" and err > FP32_TOLERANCE
    else:
        assert info["precision"] == "f32"


# --- the benchmark's rows ----------------------------------------------------------------------

@needs_ort
@needs_ov
def test_bench_rows_carry_times_errors_and_speedups(bench_result):
    rows = _rows(bench_result)
    assert set(rows) == {"eager", "torch", *peers.ONNX_PEERS}
    assert all(r["median_ms"] > 0 and math.isfinite(r["rel_err"]) for r in rows.values())
    assert rows["eager"]["rel_err"] == 0.0  # the reference against itself
    for name in ("onnxruntime", "openvino-fp32"):
        # Not 0: a peer compared with its own output would hide every error.
        assert 0.0 < rows[name]["rel_err"] < FP32_TOLERANCE
    assert rows["openvino"]["precision"] in ("bf16", "f32", "f16")
    assert set(rows["torch"]["speedup"]) == {"eager", *peers.ONNX_PEERS}
    assert set(rows["torch"]["paired_speedup"]) == set(rows["torch"]["speedup"])  # round robin
    ort_ms = rows["onnxruntime"]["median_ms"]
    assert rows["torch"]["speedup"]["onnxruntime"] == pytest.approx(ort_ms / rows["torch"]["median_ms"])
    env = bench_result["environment"]
    assert env["onnxruntime"] and env["openvino"]
    assert bench_result["timing"]["round_robin"] and bench_result["timing"]["cpu_gap_s"] > 0
    labels = {row[4] for row in bench.format_table(bench_result)[1:]}
    assert {"ref:onnxruntime", "ref:openvino-fp32", "fast:torch"} <= labels
    precision = rows["openvino"]["precision"]
    assert ("ref:openvino" if precision == "f32" else f"ref:openvino ({precision})") in labels


def test_round_robin_takes_turns():
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    stats = bench.time_round_robin(fns, CPU, repeats=2)
    assert calls == [0, 1, 2, 0, 1, 2]
    assert len(stats) == 3 and all(s["min_ms"] <= s["median_ms"] <= s["max_ms"] for s in stats)
    assert all(len(s["samples_ms"]) == 2 and min(s["samples_ms"]) == s["min_ms"] for s in stats)


def test_paired_speedup_compares_within_rounds():
    # The machine slows 3x in the last two rounds; the row is 2x faster than the peer in every one.
    peer = [10.0, 10.0, 10.0, 30.0, 30.0]
    ours = [5.0, 5.0, 5.0, 15.0, 15.0]
    assert bench.paired_speedup(peer, ours) == 2.0
    # Medians alone mislead when the drift hits the rows unevenly: they say 6x here.
    peer, ours = [10.0, 10.0, 30.0, 30.0, 30.0], [5.0, 5.0, 5.0, 15.0, 30.0]
    assert statistics.median(peer) / statistics.median(ours) == pytest.approx(30 / 5)
    assert bench.paired_speedup(peer, ours) == 2.0
    with pytest.raises(ValueError, match="equally long"):
        bench.paired_speedup([1.0], [1.0, 2.0])


# --- absence and refusals: skipped rows, with the reason ------------------------------------------

@pytest.mark.parametrize("round_robin", [True, False])
def test_missing_packages_are_skipped_rows_with_the_reason(monkeypatch, round_robin):
    _hide_peer_packages(monkeypatch)

    def no_export(*args, **kwargs):
        raise AssertionError("exported although no peer could run it")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    result = bench.run_bench([PRESET], [SIZE], [1], [torch.float32], [], ["eager", *peers.ONNX_PEERS],
                             CPU, warmup=0, repeats=1, round_robin=round_robin)
    assert [r["name"] for r in result["rows"]] == ["eager", *peers.ONNX_PEERS]  # in the asked order
    rows = _rows(result)
    assert rows["eager"]["median_ms"] > 0 and rows["eager"]["speedup"] == {"eager": 1.0}
    assert "onnxruntime not installed" in rows["onnxruntime"]["skipped"]
    for name in peers.ONNX_PEERS:
        assert "median_ms" not in rows[name]
        assert "pip install -e '.[peers]'" in rows[name]["skipped"]
    assert "openvino not installed" in rows["openvino-fp32"]["skipped"]


def test_cli_bench_takes_the_peer_names_and_reports_skips(monkeypatch, capsys):
    _hide_peer_packages(monkeypatch)
    assert set(peers.ONNX_PEERS) <= set(bench.PEERS)  # cli.py's --peers choices
    assert main(["bench", "--preset", PRESET, "--size", "64x96", "--peers", "eager", *peers.ONNX_PEERS,
                 "--impls", "torch", "--repeats", "1", "--warmup", "0", "--quiet"]) == 0
    out = capsys.readouterr().out
    for name in peers.ONNX_PEERS:
        line = next(l for l in out.splitlines() if f"ref:{name} " in l)
        assert "skipped" in line and "pip install -e '.[peers]'" in line
    assert "fast:torch" in out


def test_package_imports_without_the_peer_packages():
    hide = "; ".join(f"sys.modules[{p!r}] = None" for p in ("onnx", "onnxruntime", "openvino"))
    code = (f"import sys; {hide}; import hrnet_fast, hrnet_fast.bench, hrnet_fast.cli; "
            "from hrnet_fast import peers; import torch; "
            "print(peers.skip_reason('onnxruntime', torch.device('cpu'), torch.float32))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "not installed: pip install -e '.[peers]'" in done.stdout


def test_cuda_and_low_precision_cases_are_refused():
    assert "CPU" in peers.skip_reason("onnxruntime", torch.device("cuda"), torch.float32)
    assert "fp32" in peers.skip_reason("openvino", CPU, torch.bfloat16)
    unused = peers.OnnxExport(nn.Identity(), torch.zeros(1))
    with pytest.raises(BackendUnavailable, match="CPU-only"):  # what run_bench turns into a row
        peers.build_peer("openvino-fp32", unused, torch.device("cuda:0"), torch.float32)
    with pytest.raises(ValueError, match="unknown ONNX peer 'tensorrt'"):
        peers.skip_reason("tensorrt", CPU, torch.float32)


def test_a_failed_export_is_one_reason_for_every_peer(monkeypatch):
    installed = types.SimpleNamespace(__version__="0")
    monkeypatch.setattr(peers, "_import", lambda package: installed)  # as if all were installed
    attempts = []

    def failing_export(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("unsupported op\n<a long IR dump>")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    result = bench.run_bench([PRESET], [SIZE], [1], [torch.float32], [], list(peers.ONNX_PEERS),
                             CPU, warmup=0, repeats=1)
    reasons = {r["skipped"] for r in result["rows"]}
    assert reasons == {"torch.onnx.export of the reference failed: RuntimeError: unsupported op"}
    assert len(attempts) == 1


def test_export_refuses_a_training_mode_model(tmp_path):
    with pytest.raises(ValueError, match="eval mode"):
        peers.export_reference(nn.BatchNorm2d(3).train(), torch.zeros(1, 3, 2, 2),
                               str(tmp_path / "m.onnx"))
