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


def test_segment_bad_image(tmp_path):
    bad = tmp_path / "x.npy"
    import numpy as np
    np.save(bad, np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        main(["segment", str(bad), "--preset", "w18_small_v1"])


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
