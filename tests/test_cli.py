import os
import subprocess
import sys

import numpy as np
import pytest

from hrnet_fast.cli import main


def test_info_lists_every_preset(capsys):
    assert main(["info", "--size", "64x128"]) == 0
    out = capsys.readouterr().out
    for name in ("w18_small_v1", "w18_small_v2", "w18", "w48", "w64"):
        assert f"\n{name} " in out
    assert "9.64" in out and "65.86" in out  # w18 and w48 parameter counts


def test_python_dash_m_entry_point():
    # --help: the entry point and the parser; `info` over all nine presets costs 10-15 s here and
    # is covered in-process above.
    r = subprocess.run([sys.executable, "-m", "hrnet_fast", "--help"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "usage: hrnet-fast" in r.stdout and "demo" in r.stdout


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


def varied_classes(model, x):
    """Random HRNets predict one class everywhere (the classifier sees mostly the mean feature), which
    hides mistakes such as a wrong normalisation. Remove the mean feature of ``x`` from the classifier
    (and its bias) so that the argmax varies over the image."""
    import torch
    last = model.last_layer[3]
    feats = []
    hook = last.register_forward_hook(lambda m, i, o: feats.append(i[0]))
    with torch.no_grad():
        model.eval()(x)
        hook.remove()
        mean = feats[0].mean((0, 2, 3))
        w = last.weight[:, :, 0, 0]
        w -= torch.outer(w @ mean, mean) / mean.dot(mean)
        last.bias.zero_()
    model.rebuild_fast()
    return model


def test_segment_writes_the_reference_argmax(tmp_path, capsys):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from hrnet_fast import HRNet, HRNetConfig
    from hrnet_fast.cli import IMAGENET_MEAN, IMAGENET_STD
    from hrnet_fast.imageio import palette
    from helpers import randomize_bn

    torch.manual_seed(0)
    ref = randomize_bn(HRNet(HRNetConfig.preset("w18_small_v1", num_classes=5), fast=False)).eval()
    img = (np.random.default_rng(0).random((45, 61, 3)) * 255).astype(np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    varied_classes(ref, x)
    ckpt = tmp_path / "w.pth"
    torch.save({"state_dict": ref.state_dict()}, ckpt)
    ppm = tmp_path / "img.ppm"
    ppm.write_bytes(b"P6\n# test\n61 45\n255\n" + img.tobytes())
    np.save(tmp_path / "img.npy", img)
    colours = palette(5)
    for src, overlay in ((ppm, []), (tmp_path / "img.npy", ["--overlay"])):
        out, labels = tmp_path / "seg.png", tmp_path / "labels.png"
        assert main(["segment", str(src), "--checkpoint", str(ckpt), "--preset", "w18_small_v1",
                     "--num-classes", "5", "--out", str(out), "--labels", str(labels)] + overlay) == 0
        got = _read_png(labels)
        assert len(np.unique(got)) >= 4  # a map that a wrong input or wrong resize would change
        with torch.no_grad():
            logits = F.interpolate(ref(x), size=(45, 61), mode="bilinear", align_corners=False)
        want = logits.argmax(1)[0].numpy()
        assert got.shape == (45, 61) and (got == want).mean() > 0.999
        if overlay:  # half the colour of each written class id, half the image
            assert np.array_equal(_read_png(out), (0.5 * colours[got] + 0.5 * img).astype(np.uint8))
        else:  # the colour of each written class id
            assert np.array_equal(_read_png(out), colours[got])
            assert (_read_png(out) == colours[want]).all(-1).mean() > 0.999
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
    # The figures agree with each other and with the printed table.
    timed = [r for r in rows if "skipped" not in r]
    assert len(timed) == 4  # eager and torch at batch 1 and 2
    printed = {}
    for line in out.splitlines():
        cells = line.split()
        if cells[:1] == ["w18_small_v1"] and "skipped" not in cells:
            printed[(int(cells[2]), cells[4])] = cells
    for r in timed:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["images_per_s"] == pytest.approx(1000 * r["batch"] / r["median_ms"], rel=1e-9)
        eager = next(e for e in timed if e["name"] == "eager" and e["batch"] == r["batch"])
        assert r["speedup"]["eager"] == pytest.approx(eager["median_ms"] / r["median_ms"], rel=1e-9)
        assert r["rel_err"] < 1e-5 and (r["rel_err"] == 0) == (r["name"] == "eager")
        cells = printed[(r["batch"], ("ref:" if r["kind"] == "peer" else "fast:") + r["name"])]
        assert cells[5:8] == [f"{r['median_ms']:.2f}", f"{r['images_per_s']:.1f}",
                              f"{r['speedup']['eager']:.2f}"]


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


# ---------------------------------------------------------------------------------------------------
# segment into a folder, eval: end to end through the CLI, and their errors

def _tiny_checkpoint(tmp_path, num_classes):
    import torch
    from hrnet_fast import HRNet, HRNetConfig
    from helpers import randomize_bn
    torch.manual_seed(1)
    model = randomize_bn(HRNet(HRNetConfig.preset("w18_small_v1", num_classes=num_classes), fast=False))
    varied_classes(model, torch.randn(1, 3, 20, 28))
    torch.save(model.state_dict(), tmp_path / "w.pth")
    return str(tmp_path / "w.pth")


def test_segment_a_folder_skips_a_corrupt_image_and_resumes(tmp_path, capsys):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("a", "sub/b"):
        _ppm(tmp_path / "in" / f"{name}.ppm", h=20, w=28)
    (tmp_path / "in" / "broken.ppm").write_bytes(b"P6\n8 8\n255\n" + bytes(10))
    ckpt = _tiny_checkpoint(tmp_path, 3)
    argv = ["segment", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--checkpoint", ckpt,
            "--num-classes", "3", "--colour", "--batch", "2", "--workers", "0", "--quiet"] + TINY
    assert main(argv) == 3
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    skipped = [ln for ln in cap.err.splitlines() if ln.startswith("hrnet-fast: skipped")]
    assert len(skipped) == 1 and "broken.ppm" in skipped[0] and "truncated" in skipped[0]
    assert "exit status 3" in cap.err and "2 of 3 images segmented" in cap.out
    assert "images/s" in cap.out and "decode" in cap.out and "write" in cap.out
    # The same class ids as segmenting the image on its own, the colours those of the ids.
    assert main(["segment", str(tmp_path / "in" / "a.ppm"), "--out", str(tmp_path / "a_col.png"),
                 "--labels", str(tmp_path / "a_ids.png"), "--checkpoint", ckpt, "--num-classes", "3"]
                + TINY) == 0
    assert len(np.unique(_read_png(tmp_path / "a_ids.png"))) == 3
    assert np.array_equal(_read_png(tmp_path / "out" / "a.png"), _read_png(tmp_path / "a_ids.png"))
    assert np.array_equal(_read_png(tmp_path / "out" / "a_colour.png"), _read_png(tmp_path / "a_col.png"))
    assert (tmp_path / "out" / "sub" / "b.png").exists()
    capsys.readouterr()
    before = os.path.getmtime(tmp_path / "out" / "a.png")
    assert main(argv + ["--resume"]) == 3  # the corrupt image is still there, still skipped
    assert "0 of 3 images segmented" in capsys.readouterr().out
    assert os.path.getmtime(tmp_path / "out" / "a.png") == before


def _eval_dataset(tmp_path, sizes=((20, 28), (20, 28), (20, 28))):
    """Cityscapes layout: leftImg8bit/val/<city>/*_leftImg8bit.ppm, gtFine/val/<city>/*_labelIds.npy."""
    rng = np.random.default_rng(7)
    for k, (h, w) in enumerate(sizes):
        city = "aachen" if k % 2 == 0 else "bonn"
        stem = f"{city}_{k:06d}_000019"
        img_dir = tmp_path / "leftImg8bit" / "val" / city
        gt_dir = tmp_path / "gtFine" / "val" / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        (img_dir / f"{stem}_leftImg8bit.ppm").write_bytes(f"P6\n{w} {h}\n255\n".encode() + img.tobytes())
        # ids 0..26: every Cityscapes class up to car, none of truck ... bicycle (27..33)
        np.save(gt_dir / f"{stem}_gtFine_labelIds.npy", rng.integers(0, 27, (h, w)).astype(np.uint8))
    return str(tmp_path / "leftImg8bit" / "val"), str(tmp_path / "gtFine" / "val")


def test_eval_writes_the_metrics_of_the_checkpoint(tmp_path, capsys):
    import json

    import torch
    from hrnet_fast import HRNet, HRNetConfig, load_checkpoint
    from hrnet_fast.evaluate import METRIC_KEYS, label_lookup_table, pair_images_and_labels
    from hrnet_fast.imageio import read_rgb
    from hrnet_fast.infer import normalize
    from test_evaluate import brute_force_metrics

    images, labels = _eval_dataset(tmp_path)
    ckpt = _tiny_checkpoint(tmp_path, 19)
    out = tmp_path / "m.json"
    assert main(["eval", "--images", images, "--labels", labels, "--checkpoint", ckpt, "--label-map",
                 "cityscapes", "--json", str(out), "--workers", "0", "--quiet"] + TINY) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    assert list(got) == list(METRIC_KEYS)
    # The same model predicting each image on its own; metrics counted pixel by pixel.
    model = HRNet(HRNetConfig.preset("w18_small_v1", num_classes=19))
    load_checkpoint(model, ckpt)
    model.eval()
    table = label_lookup_table("cityscapes", 255)
    preds, targets = [], []
    with torch.inference_mode():
        for item in pair_images_and_labels(images, labels):
            img = read_rgb(item.path)
            logits = model(normalize(torch.from_numpy(img)[None], torch.float32))
            logits = torch.nn.functional.interpolate(logits, size=img.shape[:2], mode="bilinear")
            preds.append(logits.argmax(1)[0].numpy())
            targets.append(table[np.load(item.label)])
    want = brute_force_metrics(preds, targets, 19, 255)
    assert got["confusion_matrix"] == want["confusion_matrix"] and got["images"] == 3
    # null for a class absent from labels and predictions; pytest.approx takes no None (9.2+)
    assert [v is None for v in got["iou"]] == [v is None for v in want["iou"]]
    assert [v for v in got["iou"] if v is not None] == pytest.approx(
        [v for v in want["iou"] if v is not None], rel=1e-12)
    assert None in want["iou"] and out.read_text().count("null") == want["iou"].count(None)
    assert got["miou"] == pytest.approx(want["miou"], rel=1e-12)
    for name in ("road", "traffic light", "bicycle"):  # the table names the Cityscapes classes
        assert f"\n{name} " in printed
    assert f"mIoU {100 * want['miou']:.2f}%" in printed


@pytest.mark.parametrize("extra, option", [
    (["--label-map", "ade20k"], "--label-map"),
    (["--crop", "12xq"], "--crop"),
    (["--stride", "8x8"], "--stride"),                        # no --crop
    (["--crop", "8x8", "--stride", "9x8"], "--stride"),       # a gap between windows
    (["--scales", "1,-0.5"], "--scales"),
    (["--random-weights", "--checkpoint", "w.pth"], "--random-weights"),
    ([], "--checkpoint"),                                     # neither weights nor --random-weights
])
def test_eval_bad_arguments_are_usage_errors(tmp_path, capsys, no_model, extra, option):
    images, labels = _eval_dataset(tmp_path)
    assert_usage_error(capsys, ["eval", "--images", images, "--labels", labels] + TINY + extra, option)
    assert not no_model


def test_eval_missing_label_is_one_error_before_any_model(tmp_path, capsys, no_model):
    images, labels = _eval_dataset(tmp_path)
    os.remove(os.path.join(labels, "bonn", "bonn_000001_000019_gtFine_labelIds.npy"))
    assert_one_line_error(capsys, ["eval", "--images", images, "--labels", labels, "--random-weights"]
                          + TINY, "no label map", "bonn_000001_000019_leftImg8bit.ppm")
    assert not no_model


def test_eval_label_of_another_size_is_one_error(tmp_path, capsys):
    images, labels = _eval_dataset(tmp_path)
    np.save(os.path.join(labels, "aachen", "aachen_000002_000019_gtFine_labelIds.npy"),
            np.zeros((20, 27), np.uint8))
    line = assert_one_line_error(
        capsys, ["eval", "--images", images, "--labels", labels, "--random-weights", "--workers", "0",
                 "--quiet", "--label-map", "cityscapes", "--json", str(tmp_path / "m.json")] + TINY,
        "aachen_000002_000019_gtFine_labelIds.npy", "27x20")
    assert "28x20" in line and not (tmp_path / "m.json").exists()


def test_segment_folder_argument_errors(tmp_path, capsys, no_model):
    (tmp_path / "in").mkdir()
    _ppm(tmp_path / "in" / "a.ppm")
    assert_one_line_error(capsys, ["segment", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                                   "--labels", str(tmp_path / "l.png")] + TINY, "--labels")
    assert_one_line_error(capsys, ["segment", str(tmp_path / "in")] + TINY, "--out DIR")
    assert_one_line_error(capsys, ["segment", str(tmp_path / "in" / "*.jpg"), "--out",
                                   str(tmp_path / "o")] + TINY, "no image matches")
    assert_one_line_error(capsys, ["segment", str(tmp_path / "in"), str(tmp_path / "nope.ppm"),
                                   "--out", str(tmp_path / "o")] + TINY, "not found", "nope.ppm")
    assert not no_model and not (tmp_path / "o").exists()
