import os
import subprocess
import sys

import pytest

from hrnet_fast.cli import main


def test_info_lists_every_preset(capsys):
    assert main(["info", "--size", "64x128"]) == 0
    out = capsys.readouterr().out
    for name in ("w18_small_v1", "w18_small_v2", "w18", "w48", "w64"):
        assert f"\n{name} " in out
    assert "9.64" in out and "65.86" in out  # w18 and w48 parameter counts


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "hrnet_fast", "info", "--size", "32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "w18_small_v2" in r.stdout


def test_bad_size_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", "--size", "12xq"])
    assert e.value.code == 2
    assert "HxW" in capsys.readouterr().err


def _read_png(path):
    """Minimal decoder for the PNGs hrnet_fast writes (8-bit, filter 0, grey or RGB)."""
    import struct
    import zlib

    import numpy as np
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        tag, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if tag == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", payload)
        elif tag == b"IDAT":
            idat += payload
        pos += 12 + n
    w, h, _, color, *_ = hdr
    ch = 3 if color == 2 else 1
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * ch)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, ch) if ch == 3 else rows[:, 1:].reshape(h, w)


def test_segment_writes_the_reference_argmax(tmp_path, capsys):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from hrnet_fast import HRNet, HRNetConfig
    from hrnet_fast.cli import IMAGENET_MEAN, IMAGENET_STD
    from helpers import randomize_bn

    torch.manual_seed(0)
    ref = randomize_bn(HRNet(HRNetConfig.preset("w18_small_v1", num_classes=5), fast=False)).eval()
    ckpt = tmp_path / "w.pth"
    torch.save({"state_dict": ref.state_dict()}, ckpt)
    img = (np.random.default_rng(0).random((45, 61, 3)) * 255).astype(np.uint8)
    ppm = tmp_path / "img.ppm"
    ppm.write_bytes(b"P6\n# test\n61 45\n255\n" + img.tobytes())
    np.save(tmp_path / "img.npy", img)
    for src in (ppm, tmp_path / "img.npy"):
        out, labels = tmp_path / "seg.png", tmp_path / "labels.png"
        assert main(["segment", str(src), "--checkpoint", str(ckpt), "--preset", "w18_small_v1",
                     "--num-classes", "5", "--out", str(out), "--labels", str(labels)]) == 0
        got = _read_png(labels)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            logits = F.interpolate(ref(x), size=(45, 61), mode="bilinear", align_corners=False)
        want = logits.argmax(1)[0].numpy()
        assert got.shape == (45, 61) and (got == want).mean() > 0.999
        colour = _read_png(out)
        assert colour.shape == (45, 61, 3)
    assert "checkpoint format: plain" in capsys.readouterr().out




def test_demo_table(capsys):
    assert main(["demo", "--preset", "w18_small_v1", "--size", "64x96", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "reference (eager)" in out and "hrnet_fast (torch)" in out
    err = float(out.split("hrnet_fast (torch)")[1].split()[3])
    assert err < 1e-5  # the demo's own relative error column


def test_bench_json(tmp_path, capsys):
    import json
    path = tmp_path / "bench.json"
    assert main(["bench", "--preset", "w18_small_v1", "--size", "64x64", "--batch", "1", "2",
                 "--repeats", "2", "--warmup", "1", "--impls", "torch", "cuda", "--json", str(path),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "fast:torch" in out and "ref:eager" in out and "x ref:eager" in out
    data = json.load(open(path))
    rows = data["rows"]
    assert {r["batch"] for r in rows} == {1, 2}
    torch_rows = [r for r in rows if r["name"] == "torch"]
    assert all(r["median_ms"] > 0 and "eager" in r["speedup"] for r in torch_rows)
    assert all("skipped" in r for r in rows if r["name"] == "cuda")  # no GPU here: said, not faked
    assert data["environment"]["torch"]


def test_check_reports_and_exit_code(capsys, monkeypatch):
    assert main(["check", "--preset", "w18_small_v1", "--size", "33x47", "--backends", "torch", "cuda",
                 "--upsample", "nearest"]) == 0
    out = capsys.readouterr().out
    assert "torch    float32" in out and " ok" in out and "unavailable" in out
    # A backend that misses its bound makes the command fail.
    import hrnet_fast.check as check_mod
    monkeypatch.setattr(check_mod, "FP32_BOUND", 0.0)
    assert main(["check", "--preset", "w18_small_v1", "--size", "33x47", "--backends", "torch",
                 "--upsample", "bilinear"]) == 1
    assert "FAIL" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# Errors: one line "hrnet-fast: error: ..." on stderr, a non-zero exit, no traceback, no output left,
# and checks of arguments and paths before any model is built.

TINY = ["--preset", "w18_small_v1"]


def run_cli(argv):
    """main(argv)'s exit code, whether it returns it or raises SystemExit (argparse does)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def assert_one_line_error(capsys, argv, *words):
    """The command fails with exactly one 'hrnet-fast: error:' line naming ``words``; returns it."""
    code = run_cli(argv)
    cap = capsys.readouterr()
    assert code not in (0, None), cap
    assert "Traceback" not in cap.err + cap.out, cap.err
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("hrnet-fast: error:")]
    assert len(lines) == 1, cap.err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def assert_usage_error(capsys, argv, option):
    """argparse's own usage error (as argparse prints them): exit 2, 'error: argument OPTION'."""
    code = run_cli(argv)
    cap = capsys.readouterr()
    assert code == 2, cap
    assert "Traceback" not in cap.err + cap.out, cap.err
    last = cap.err.strip().splitlines()[-1]
    assert last.startswith("hrnet-fast") and f"error: argument {option}" in last, cap.err
    return last


@pytest.fixture
def no_model(monkeypatch):
    """Record (and refuse) any model construction or benchmark/check run; the list must stay empty."""
    import hrnet_fast.cli as cli
    built = []

    def refuse(name):
        def f(*a, **k):
            built.append(name)
            raise AssertionError(f"{name} was called before the arguments were checked")
        return f

    for name in ("HRNet", "HighResolutionNet", "run_bench", "run_check", "load_checkpoint"):
        if hasattr(cli, name):
            monkeypatch.setattr(cli, name, refuse(name))
    import hrnet_fast.checkpoints as ck
    monkeypatch.setattr(ck, "load_checkpoint", refuse("load_checkpoint"))
    return built


def _ppm(path, h=24, w=32):
    import numpy as np
    img = (np.random.default_rng(3).random((h, w, 3)) * 255).astype(np.uint8)
    path.write_bytes(f"P6\n{w} {h}\n255\n".encode() + img.tobytes())
    return path


def test_segment_missing_image_directory_and_bad_files(tmp_path, capsys, no_model):
    out = tmp_path / "seg.png"
    assert_one_line_error(capsys, ["segment", str(tmp_path / "nope.ppm"), "--out", str(out)] + TINY,
                          "nope.ppm", "not found")
    (tmp_path / "d.ppm").mkdir()
    assert_one_line_error(capsys, ["segment", str(tmp_path / "d.ppm"), "--out", str(out)] + TINY,
                          "d.ppm", "directory")
    (tmp_path / "trunc.ppm").write_bytes(b"P6\n32 24\n255\n" + bytes(100))
    assert_one_line_error(capsys, ["segment", str(tmp_path / "trunc.ppm"), "--out", str(out)] + TINY,
                          "trunc.ppm", "truncated")
    (tmp_path / "neg.ppm").write_bytes(b"P6\n-32 24\n255\n" + bytes(3000))
    assert_one_line_error(capsys, ["segment", str(tmp_path / "neg.ppm"), "--out", str(out)] + TINY,
                          "neg.ppm", "width")
    import numpy as np
    np.save(tmp_path / "x.npy", np.zeros((4, 4), np.float32))
    assert_one_line_error(capsys, ["segment", str(tmp_path / "x.npy"), "--out", str(out)] + TINY,
                          "x.npy", "HxWx3 uint8")
    assert_one_line_error(capsys, ["segment", str(_ppm(tmp_path / "ok.ppm")), "--out", str(out),
                                   "--checkpoint", str(tmp_path / "missing.pth")] + TINY, "missing.pth")
    assert not no_model and not out.exists()


def test_segment_empty_ppm_does_not_hang_end_to_end(tmp_path):
    """The real console path in a child process with a timeout: a hang fails instead of hanging."""
    (tmp_path / "empty.ppm").write_bytes(b"")
    try:
        r = subprocess.run([sys.executable, "-m", "hrnet_fast", "segment", str(tmp_path / "empty.ppm"),
                            "--out", str(tmp_path / "seg.png"), "--preset", "w18_small_v1"],
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("hrnet-fast segment hangs on an empty PPM")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
    assert r.stderr.startswith("hrnet-fast: error:") and "empty.ppm" in r.stderr
    assert not (tmp_path / "seg.png").exists()


@pytest.mark.parametrize("argv, option", [
    (["segment", "x.ppm", "--dtype", "xyz"], "--dtype"),
    (["bench", "--dtype", "xyz"], "--dtype"),
    (["check", "--dtype", "xyz"], "--dtype"),
    (["demo", "--device", "foo"], "--device"),
    (["segment", "x.ppm", "--device", "foo"], "--device"),
    (["bench", "--device", "cuda:x"], "--device"),
    (["check", "--device", "meta"], "--device"),
    (["demo", "--repeats", "0"], "--repeats"),
    (["demo", "--batch", "-1"], "--batch"),
    (["demo", "--batch", "0"], "--batch"),
    (["demo", "--batch", "two"], "--batch"),
    (["demo", "--num-classes", "0"], "--num-classes"),
    (["bench", "--batch", "1", "0"], "--batch"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--warmup", "-1"], "--warmup"),
    (["check", "--batch", "0"], "--batch"),
    (["segment", "x.ppm", "--num-classes", "0"], "--num-classes"),
    (["segment", "x.ppm", "--num-classes", "300"], "--num-classes"),  # labels are written as uint8
    (["info", "--num-classes", "-3"], "--num-classes"),
    (["info", "--size", "0x5"], "--size"),
])
def test_bad_arguments_are_usage_errors_before_any_work(capsys, no_model, argv, option):
    assert_usage_error(capsys, argv, option)
    assert not no_model


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("cmd", [["demo"], ["bench"], ["check"], ["segment", "x.ppm"]])
def test_cuda_without_a_gpu_is_a_clear_error(capsys, no_model, cmd):
    last = assert_usage_error(capsys, cmd + ["--device", "cuda"], "--device")
    assert "no CUDA GPU" in last
    assert not no_model


def test_fp16_segment_on_the_cpu_is_a_clear_error(tmp_path, capsys, no_model):
    assert_one_line_error(capsys, ["segment", str(_ppm(tmp_path / "a.ppm")), "--dtype", "fp16",
                                   "--device", "cpu", "--out", str(tmp_path / "s.png")] + TINY, "fp16")
    assert not no_model


def test_output_paths_are_checked_before_any_work(tmp_path, capsys, no_model):
    img = str(_ppm(tmp_path / "a.ppm"))
    (tmp_path / "outdir").mkdir()
    missing = tmp_path / "no" / "such" / "dir"
    cases = [
        (["--out", str(missing / "s.png")], "--out"),
        (["--out", str(tmp_path / "outdir")], "--out"),
        (["--out", str(tmp_path / "s.png"), "--labels", str(missing / "l.png")], "--labels"),
        (["--out", str(tmp_path / "s.png"), "--labels", str(tmp_path / "outdir")], "--labels"),
        (["--out", str(tmp_path / "s.png"), "--labels", str(tmp_path / "s.png")], "--labels"),
        (["--out", img], "--out"),  # would overwrite the input image
        (["--out", str(tmp_path / "a.ppm" / "s.png")], "--out"),  # parent is a file
    ]
    for extra, option in cases:
        assert_one_line_error(capsys, ["segment", img] + extra + TINY, option)
    for extra in (["--json", str(missing / "b.json")], ["--json", str(tmp_path / "outdir")]):
        assert_one_line_error(capsys, ["bench", "--quiet"] + extra + TINY, "--json")
    assert not no_model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ppm", "outdir"]
    assert not list((tmp_path / "outdir").iterdir())


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_directory(tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_one_line_error(capsys, ["segment", str(_ppm(tmp_path / "a.ppm")), "--out",
                                       str(ro / "s.png")] + TINY, "--out", "write")
    finally:
        ro.chmod(0o755)
    assert not no_model


def _segment_ok_argv(tmp_path):
    return ["segment", str(_ppm(tmp_path / "a.ppm")), "--out", str(tmp_path / "s.png"),
            "--labels", str(tmp_path / "l.png"), "--num-classes", "3"] + TINY


def test_segment_success_leaves_exactly_its_outputs(tmp_path, capsys):
    assert main(_segment_ok_argv(tmp_path)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ppm", "l.png", "s.png"]
    assert _read_png(tmp_path / "l.png").shape == (24, 32)


def test_a_failing_output_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    import hrnet_fast.imageio as imageio
    real = imageio.write_png
    calls = []

    def write_png(path, image):
        calls.append(path)
        if len(calls) == 2:  # the second output (the labels) fails half-way
            open(path, "wb").write(b"\x89PNG partial")
            raise OSError(28, "No space left on device")
        real(path, image)

    monkeypatch.setattr(imageio, "write_png", write_png)
    assert_one_line_error(capsys, _segment_ok_argv(tmp_path), "No space left")
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ppm"]


def test_a_failing_rename_removes_the_outputs_already_written(tmp_path, capsys, monkeypatch):
    import hrnet_fast.cli as cli
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith("l.png"):
            raise PermissionError(13, "Permission denied", str(dst))
        real(src, dst)

    monkeypatch.setattr(cli.os, "replace", replace)
    assert_one_line_error(capsys, _segment_ok_argv(tmp_path), "l.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ppm"]


def test_unexpected_errors_are_one_line_with_a_debug_hint(tmp_path, capsys, monkeypatch):
    import hrnet_fast.cli as cli

    def boom(*a, **k):
        raise RuntimeError("boom\nsecond line of the message")

    monkeypatch.setattr(cli, "HRNet", boom)
    argv = ["segment", str(_ppm(tmp_path / "a.ppm")), "--out", str(tmp_path / "s.png")] + TINY
    monkeypatch.delenv("HRNET_FAST_DEBUG", raising=False)
    line = assert_one_line_error(capsys, argv, "boom", "HRNET_FAST_DEBUG=1")
    assert "second line" in line
    monkeypatch.setenv("HRNET_FAST_DEBUG", "1")  # the traceback, for whoever debugs
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)
    assert not (tmp_path / "s.png").exists()


def test_help_documents_the_debug_variable(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "HRNET_FAST_DEBUG" in capsys.readouterr().out
