"""``hrnet-fast pose`` end to end, and ``demo``/``bench``/``check --head pose``.

The keypoints the command writes are compared with an independent computation of the published
top-down test, written out plainly here: the crop as deep-high-resolution-net.pytorch's ``_box2cs``
and ``get_affine_transform`` define it (sampled bilinearly in numpy, rounded to 8 bits as OpenCV's
uint8 warp, halves up), the reference model (engine off), the flip test from its definition, the published
arg-max and quarter-pixel decoding, and ``transform_preds`` back into the image.
"""
import json
import sys

import numpy as np
import pytest
import torch

from hrnet_fast import HRNet, HRNetConfig
from hrnet_fast.cli import main
from hrnet_fast.pose_io import marker_sizes
from helpers import randomize_bn, torch_threads
from test_cli import _read_png, assert_one_line_error, assert_usage_error

TINY = ["--preset", "w18_small_v1", "--input-size", "64x48"]
IN_SIZE = (64, 48)
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
# Left/right joint pairs and limbs, written here independently of the package: COCO's limbs as the
# COCO annotation file lists them (1-based), MPII's pairs (right ankle 0 ... left wrist 15).
COCO_PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]
MPII_PAIRS = [(0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13)]
COCO_LIMBS_1BASED = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7],
                     [6, 8], [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6],
                     [5, 7]]


@pytest.fixture(autouse=True)
def _one_thread():
    """Models this small run faster on one thread, which also leaves other processes their cores."""
    with torch_threads(1):
        yield


def _image(h=60, w=80, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pose_checkpoints(tmp_path_factory):
    """{joints: (path, reference model)}: random pose weights with random BatchNorm statistics."""
    root = tmp_path_factory.mktemp("pose_ckpt")
    out = {}
    for joints in (17, 16, 5):
        torch.manual_seed(joints)
        model = randomize_bn(HRNet(HRNetConfig.preset("w18_small_v1", head="pose", num_classes=joints),
                                   fast=False)).eval()
        path = root / f"pose{joints}.pth"
        torch.save(model.state_dict(), path)
        out[joints] = (str(path), model)
    return out


# ---------------------------------------------------------------------------------------------------
# The published top-down test, plainly

def published_crop(img, box, in_size=IN_SIZE):
    """``_box2cs`` + ``get_affine_transform`` + bilinear ``warpAffine`` of the uint8 image: the crop
    and (center, src_w)."""
    IN_H, IN_W = in_size
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx, cy = x1 + w * 0.5, y1 + h * 0.5
    aspect = IN_W / IN_H
    if w > aspect * h:
        h = w / aspect
    elif w < aspect * h:
        w = h * aspect
    src_w = w * 1.25  # scale[0] * pixel_std after the 1.25 padding
    out = np.zeros((IN_H, IN_W, 3))
    height, width = img.shape[:2]
    for r in range(IN_H):
        for c in range(IN_W):
            # the inverse of the affine map: dst centre (W/2, H/2) <- src centre, scale src_w / W
            x = cx + (c - IN_W / 2) * src_w / IN_W
            y = cy + (r - IN_H / 2) * src_w / IN_W
            x0, y0 = int(np.floor(x)), int(np.floor(y))
            fx, fy = x - x0, y - y0
            acc = np.zeros(3)
            for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                    if 0 <= yy < height and 0 <= xx < width:
                        acc += wy * wx * img[yy, xx]
            out[r, c] = acc
    # 8 bits, halves rounded up (OpenCV's fixed point); 1e-6 so that float noise cannot decide a half
    return np.clip(np.floor(out + 0.5 + 1e-6), 0, 255).astype(np.uint8), (cx, cy, src_w)


def published_decode(hm):
    """``get_max_preds`` + the quarter-pixel step of ``get_final_preds``, one joint at a time."""
    n, k, h, w = hm.shape
    coords, scores = np.zeros((n, k, 2)), np.zeros((n, k))
    for i in range(n):
        for j in range(k):
            flat = hm[i, j].reshape(-1)
            idx = int(np.argmax(flat))
            score = flat[idx]
            x, y = (float(idx % w), float(idx // w)) if score > 0 else (0.0, 0.0)
            px, py = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
            if 1 < px < w - 1 and 1 < py < h - 1:
                x += 0.25 * np.sign(hm[i, j, py, px + 1] - hm[i, j, py, px - 1])
                y += 0.25 * np.sign(hm[i, j, py + 1, px] - hm[i, j, py - 1, px])
            coords[i, j], scores[i, j] = (x, y), score
    return coords, scores


def published_keypoints(model, img, boxes, flip_pairs, quarter=True, in_size=IN_SIZE):
    crops, centres = zip(*(published_crop(img, b, in_size) for b in boxes))
    x = (np.stack(crops) / 255.0 - MEAN) / STD
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        hm = model(x)
        if flip_pairs is not None:
            back = model(x.flip(3)).flip(3)
            perm = list(range(hm.shape[1]))
            for a, b in flip_pairs:
                perm[a], perm[b] = b, a
            back = back[:, perm]
            back[..., 1:] = back[..., :-1].clone()  # SHIFT_HEATMAP
            hm = (hm + back) * 0.5
    hm = hm.double().numpy()
    coords, scores = published_decode(hm) if quarter else _argmax_only(hm)
    hm_h, hm_w = hm.shape[-2:]
    out = np.zeros_like(coords)
    for i, (cx, cy, src_w) in enumerate(centres):  # transform_preds: uniform scale src_w / hm_w
        out[i, :, 0] = cx + (coords[i, :, 0] - hm_w / 2) * src_w / hm_w
        out[i, :, 1] = cy + (coords[i, :, 1] - hm_h / 2) * src_w / hm_w
    return out, scores


def _argmax_only(hm):
    n, k, h, w = hm.shape
    flat = hm.reshape(n, k, -1)
    idx, score = flat.argmax(-1), flat.max(-1)
    xy = np.stack([idx % w, idx // w], -1).astype(np.float64) * (score > 0)[..., None]
    return xy, score


def _run_pose(tmp_path, img, ckpt, extra, name="a"):
    np.save(tmp_path / f"{name}.npy", img)
    out, js = tmp_path / f"{name}_pose.png", tmp_path / f"{name}.json"
    code = main(["pose", str(tmp_path / f"{name}.npy"), "--checkpoint", ckpt, "--out", str(out),
                 "--json", str(js)] + TINY + extra)
    assert code == 0
    return json.load(open(js)), out


# Boxes: inside the image, reaching past its border (zero padding), tall (widened to 3:4) and wide
# (heightened to 3:4).
BOXES = [(12.5, 6.0, 50.0, 55.0), (-8.0, 20.0, 30.0, 70.0), (40.0, 2.0, 55.0, 58.0),
         (5.0, 30.0, 75.0, 50.0)]


@pytest.mark.parametrize("joints, extra, flip_pairs, quarter, in_size", [
    (17, ["--batch", "3"], COCO_PAIRS, True, IN_SIZE),      # defaults (flip test, quarter), 3 + 1 boxes
    (16, ["--refine", "none"], MPII_PAIRS, False, IN_SIZE),  # MPII pairs for 16 joints
    # No pairs known: flip test off. 66x50 gives 17x13 heatmaps, not of the input's aspect ratio.
    (5, ["--refine", "none", "--input-size", "66x50"], None, False, (66, 50)),
])
def test_keypoints_equal_the_published_top_down_test(tmp_path, capsys, pose_checkpoints, joints, extra,
                                                     flip_pairs, quarter, in_size):
    ckpt, model = pose_checkpoints[joints]
    img = _image()
    box_args = ["--box"] + [",".join(map(str, b)) for b in BOXES]
    got, _ = _run_pose(tmp_path, img, ckpt, ["--num-joints", str(joints)] + extra + box_args)
    want_xy, want_scores = published_keypoints(model, img, BOXES, flip_pairs, quarter, in_size)
    assert got["joints"] == joints and got["flip"] == (flip_pairs is not None)
    assert got["boxes"] == [list(b) for b in BOXES]
    np.testing.assert_allclose(np.array(got["keypoints"]), want_xy, rtol=0, atol=1e-3)
    np.testing.assert_allclose(np.array(got["scores"]), want_scores, rtol=0, atol=5e-5)  # engine vs reference
    # Not a vacuous match: the peaks spread over the crops, not all at the crop origin.
    assert len({tuple(p) for person in np.round(want_xy, 3) for p in person}) > joints
    err = capsys.readouterr().err
    assert ("no left/right joint pairs" in err) == (flip_pairs is None)


def test_the_whole_image_as_a_box_equals_no_box(tmp_path, pose_checkpoints):
    ckpt, model = pose_checkpoints[17]
    img = _image(50, 70, seed=1)
    whole, _ = _run_pose(tmp_path, img, ckpt, ["--box", "0,0,70,50"], name="box")
    none, _ = _run_pose(tmp_path, img, ckpt, [], name="nobox")
    assert none["boxes"] == [[0.0, 0.0, 70.0, 50.0]]
    assert none["keypoints"] == whole["keypoints"] and none["scores"] == whole["scores"]
    want_xy, _ = published_keypoints(model, img, [(0, 0, 70, 50)], COCO_PAIRS)
    np.testing.assert_allclose(np.array(none["keypoints"][0]), want_xy[0], rtol=0, atol=1e-3)


def _limb_mask(h, w, p, q, half_width):
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    d = np.subtract(q, p)
    t = np.clip(((xs - p[0]) * d[0] + (ys - p[1]) * d[1]) / max(d @ d, 1e-300), 0, 1)
    return (xs - p[0] - t * d[0]) ** 2 + (ys - p[1] - t * d[1]) ** 2 <= half_width ** 2


def test_the_drawing_changes_exactly_the_skeleton_pixels(tmp_path, pose_checkpoints):
    ckpt, _ = pose_checkpoints[17]
    img = _image(90, 120, seed=2)
    boxes = ["10,10,70,85", "60,5,115,80"]
    first, _ = _run_pose(tmp_path, img, ckpt, ["--box"] + boxes, name="probe")
    scores = np.array(first["scores"])
    threshold = float(np.median(scores))  # about half the joints are drawn
    got, out = _run_pose(tmp_path, img, ckpt, ["--box"] + boxes + ["--min-score", repr(threshold)])
    drawn = _read_png(out)
    assert drawn.shape == img.shape
    h, w = img.shape[:2]
    radius, half_width = marker_sizes(h, w)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    expected = np.zeros((h, w), bool)
    assert 0 < (np.array(got["scores"]) >= threshold).sum() < scores.size  # some drawn, some not
    for person, person_scores in zip(np.array(got["keypoints"]), np.array(got["scores"])):
        shown = person_scores >= threshold
        for a, b in COCO_LIMBS_1BASED:
            if shown[a - 1] and shown[b - 1]:
                expected |= _limb_mask(h, w, person[a - 1], person[b - 1], half_width)
        for (x, y), s in zip(person, shown):
            if s:
                expected |= (xs - x) ** 2 + (ys - y) ** 2 <= radius ** 2
    changed = (drawn != img).any(-1)
    assert expected.sum() > 20
    assert np.array_equal(changed, expected)


# ---------------------------------------------------------------------------------------------------
# Errors: one line, before any model, and no output left behind

@pytest.fixture
def built(monkeypatch):
    """Records each pose model build; the tests that expect none assert it stays empty."""
    import hrnet_fast.cli as cli
    calls = []
    real = cli.HRNet
    monkeypatch.setattr(cli, "HRNet", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _outputs(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".png", ".json", ".tmp")
                  or p.name.startswith("."))


def test_bad_boxes_are_usage_errors(tmp_path, capsys, built):
    np.save(tmp_path / "a.npy", _image())
    base = ["pose", str(tmp_path / "a.npy"), "--random-weights", "--out", str(tmp_path / "o.png"),
            "--json", str(tmp_path / "o.json")] + TINY
    for box, words in (("1,2,3", "four"), ("1,2,3,4,5", "four"), ("1,2,x,4", "four"),
                       ("30,0,10,20", "x2 must be greater than x1"), ("0,20,10,20", "y2 must be"),
                       ("0,0,nan,3", "finite")):
        line = assert_usage_error(capsys, base + ["--box", box], "--box")
        assert words in line and box in line, line
    assert_one_line_error(capsys, base + ["--box", "1,1,5,5", "100,10,120,30"],
                          "100,10,120,30", "outside the 80x60 image")
    assert not built and _outputs(tmp_path) == []


def test_weights_are_required_and_exclusive(tmp_path, capsys, built):
    np.save(tmp_path / "a.npy", _image())
    argv = ["pose", str(tmp_path / "a.npy"), "--out", str(tmp_path / "o.png")] + TINY
    assert_usage_error(capsys, argv, "--checkpoint")
    assert_usage_error(capsys, argv + ["--random-weights", "--checkpoint", str(tmp_path / "a.npy")],
                       "--random-weights")
    assert not built and _outputs(tmp_path) == []


def test_unreadable_images_are_one_line_errors(tmp_path, capsys, built, monkeypatch):
    out = ["--random-weights", "--out", str(tmp_path / "o.png"), "--json", str(tmp_path / "o.json")]
    assert_one_line_error(capsys, ["pose", str(tmp_path / "none.ppm")] + out + TINY, "none.ppm",
                          "not found")
    (tmp_path / "trunc.ppm").write_bytes(b"P6\n32 24\n255\n" + bytes(100))
    assert_one_line_error(capsys, ["pose", str(tmp_path / "trunc.ppm")] + out + TINY, "trunc.ppm",
                          "truncated")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    assert_one_line_error(capsys, ["pose", str(tmp_path / "junk.png")] + out + TINY, "junk.png",
                          "cannot decode")
    # Without Pillow: reading a PNG, or writing a JPEG, says what to install.
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    assert_one_line_error(capsys, ["pose", str(tmp_path / "junk.png")] + out + TINY, "Pillow")
    np.save(tmp_path / "a.npy", _image())
    assert_one_line_error(capsys, ["pose", str(tmp_path / "a.npy"), "--random-weights", "--out",
                                   str(tmp_path / "o.jpg")] + TINY, "JPEG", "Pillow")
    assert not built and _outputs(tmp_path) == ["junk.png"]


def test_a_checkpoint_of_another_model_is_a_one_line_error(tmp_path, capsys, pose_checkpoints):
    np.save(tmp_path / "a.npy", _image())
    torch.manual_seed(0)
    seg = HRNet(HRNetConfig.preset("w18_small_v1", num_classes=17), fast=False)
    torch.save({"state_dict": seg.state_dict()}, tmp_path / "seg.pth")
    argv = ["pose", str(tmp_path / "a.npy"), "--out", str(tmp_path / "o.png"), "--json",
            str(tmp_path / "o.json")] + TINY
    assert_one_line_error(capsys, argv + ["--checkpoint", str(tmp_path / "seg.pth")], "seg.pth",
                          "no pose head")
    assert_one_line_error(capsys, argv + ["--checkpoint", pose_checkpoints[17][0], "--num-joints", "16"],
                          "final_layer", "--num-joints")
    assert _outputs(tmp_path) == []


def test_a_failing_output_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "a.npy", _image())

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", broken)  # the PNG is staged first, then the JSON fails
    assert_one_line_error(capsys, ["pose", str(tmp_path / "a.npy"), "--random-weights", "--out",
                                   str(tmp_path / "o.png"), "--json", str(tmp_path / "o.json")] + TINY,
                          "No space left")
    assert _outputs(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# demo, bench, check with --head pose

@pytest.fixture
def spy(monkeypatch):
    """Wraps cli.<name> to record the keyword arguments of each call."""
    import hrnet_fast.cli as cli
    calls = []

    def wrap(name):
        real = getattr(cli, name)
        monkeypatch.setattr(cli, name, lambda *a, **k: calls.append((name, a, k)) or real(*a, **k))
    return wrap, calls


def test_demo_runs_a_pose_model(capsys):
    assert main(["demo", "--head", "pose", "--num-joints", "16", "--preset", "w18_small_v1",
                 "--size", "64x48", "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    pose = HRNet(HRNetConfig.preset("w18_small_v1", head="pose", num_classes=16))
    params = sum(p.numel() for p in pose.parameters())  # the seg model's differ: its head is larger
    assert f"w18_small_v1 pose ({params / 1e6:.2f} M parameters" in out
    assert "1x16x16x12 heatmaps" in out
    assert float(out.split("hrnet_fast (torch)")[1].split()[3]) < 1e-5


def test_bench_runs_pose_presets(tmp_path, capsys, spy):
    wrap, calls = spy
    wrap("run_bench")
    path = tmp_path / "b.json"
    assert main(["bench", "--head", "pose", "--preset", "w18_small_v1", "--size", "64x48", "--batch",
                 "2", "--repeats", "1", "--warmup", "0", "--impls", "torch", "--json", str(path),
                 "--quiet", "--device", "cpu"]) == 0
    assert calls[0][2]["head"] == "pose" and calls[0][2]["num_classes"] == 17
    rows = json.load(open(path))["rows"]
    assert {(r["size"], r["batch"]) for r in rows} == {("64x48", 2)}
    assert all(r["rel_err"] < 1e-5 for r in rows)
    assert "17 joints" in capsys.readouterr().out


def test_check_runs_pose_models_and_mmseg(capsys, spy):
    wrap, calls = spy
    wrap("run_check")
    assert main(["check", "--head", "pose", "--preset", "w18_small_v1", "--size", "33x47", "--batch", "1",
                 "--backends", "torch", "--upsample", "nearest", "mmseg", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "head=pose (17 joints), upsample=nearest" in out and "upsample=mmseg" in out
    assert out.count(" ok") == 2
    assert [(k["head"], k["num_classes"], k["upsample"]) for _, _, k in calls] == \
        [("pose", 17, "nearest"), ("pose", 17, "mmseg")]
