"""Pose head (issue 13): the official PoseHighResolutionNet layout, heatmap decoding against a
per-joint loop of the published algorithm, DARK on a known sub-pixel centre, and the flip test
against its two-forward definition. Reference model only (the engine's pose support is tested with
the engine)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hrnet_fast import HRNet, HRNetConfig
from hrnet_fast.pose import (COCO_FLIP_PAIRS, MPII_FLIP_PAIRS, flip_test,
                             keypoints_from_heatmaps)
from hrnet_fast.reference import HighResolutionNet
from hrnet_fast.stats import count_parameters
from helpers import randomize_bn

# Published top-down pose parameter counts (HRNet paper, COCO; millions, 17 joints).
POSE_PARAMS_M = {"w32": 28.5, "w48": 63.6}


def pose_model(preset="w18_small_v1", joints=17, **kw):
    cfg = HRNetConfig.preset(preset, head="pose", num_classes=joints, **kw)
    return randomize_bn(HighResolutionNet(cfg)).eval()


# --- the model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", [1, 3])
def test_state_dict_is_the_official_pose_layout(kernel):
    # w18_small_v2: stage 4 has two modules, so the first must keep all four fuse outputs.
    cfg = HRNetConfig.preset("w18_small_v2", num_classes=16, final_conv_kernel=kernel)
    seg = HighResolutionNet(cfg).state_dict()
    pose = HighResolutionNet(cfg.replace(head="pose")).state_dict()
    last = f"stage4.{cfg.stage4.num_modules - 1}."
    expected = {k: v.shape for k, v in seg.items()
                if not k.startswith("last_layer.")
                and not k.startswith(tuple(f"{last}fuse_layers.{i}." for i in (1, 2, 3)))}
    expected["final_layer.weight"] = (16, 18, kernel, kernel)
    expected["final_layer.bias"] = (16,)
    assert {k: tuple(v.shape) for k, v in pose.items()} == {k: tuple(s) for k, s in expected.items()}
    assert any(k.startswith("stage4.0.fuse_layers.3.") for k in pose)
    assert {k.split(".")[3] for k in pose if k.startswith(f"{last}fuse_layers.")} == {"0"}


def test_module_flags_and_padding():
    model = pose_model("w18_small_v2", final_conv_kernel=3)
    assert [m.multi_scale_output for m in model.stage4] == [True, False]
    assert len(model.stage4[-1].fuse_layers) == 1
    assert all(m.multi_scale_output for m in model.stage3)
    assert model.final_layer.padding == (1, 1) and model.final_layer.bias is not None
    assert model.stage4[0].upsample == "nearest"
    assert not hasattr(model, "last_layer")


def test_published_w32_w48_sizes_and_keys():
    for name, params in POSE_PARAMS_M.items():
        with torch.device("meta"):  # no memory, no init cost
            model = HighResolutionNet(HRNetConfig.preset(name, head="pose", num_classes=17))
        assert round(count_parameters(model) / 1e6, 1) == params
        keys = set(model.state_dict())
        # Keys of the released pose_hrnet checkpoints.
        assert {"stage4.2.fuse_layers.0.3.1.running_var", "stage4.1.fuse_layers.3.2.0.1.weight",
                "transition3.3.0.0.weight", "final_layer.weight", "final_layer.bias"} <= keys
        assert "stage4.2.fuse_layers.1.0.0.0.weight" not in keys


def test_heatmaps_are_a_quarter_of_the_input():
    model = HighResolutionNet(HRNetConfig.preset("w18_small_v1", head="pose", num_classes=17))
    with torch.no_grad():
        for size, heatmap in [((256, 192), (64, 48)), ((384, 288), (96, 72)),
                              ((97, 75), (25, 19)), ((33, 190), (9, 48))]:
            assert tuple(model.eval()(torch.zeros(1, 3, *size)).shape) == (1, 17, *heatmap)


def test_heatmaps_are_final_layer_of_the_fused_branch_zero():
    torch.manual_seed(0)
    model = pose_model()
    features = HighResolutionNet(model.config.replace(head="features", upsample="nearest"))
    features.load_state_dict(model.state_dict(), strict=False)  # all but final_layer
    x = torch.randn(2, 3, 97, 75)
    out = model(x)  # autograd on: the plain reference forward
    assert tuple(out.shape) == (2, 17, 25, 19)
    # Output 0 of the last module is fused the same whether or not the others are computed.
    y0 = features.eval()(x)[0]
    want = F.conv2d(y0, model.final_layer.weight, model.final_layer.bias)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert len(model.forward_backbone(x)) == 1


def test_drop_in_pose_model_trains():
    model = HRNet("w18_small_v1", head="pose", num_classes=16, fast=False).train()
    assert model.config.upsample == "nearest"
    model(torch.randn(2, 3, 64, 48)).square().mean().backward()
    assert model.final_layer.weight.grad is not None and model.conv1.weight.grad is not None


# --- decoding: the published algorithm as a per-joint loop --------------------------------------

def published_decode(hm, boxes=None, refine="quarter", kernel=11):
    """get_max_preds + get_final_preds of the published test (DARK: its gaussian_blur + taylor),
    one joint at a time, in numpy."""
    hm = hm.numpy()
    n, k, h, w = hm.shape
    coords = np.zeros((n, k, 2))
    scores = np.zeros((n, k), dtype=hm.dtype)
    logs = dark_log_maps(hm, kernel) if refine == "dark" else None
    for i in range(n):
        for j in range(k):
            flat = hm[i, j].reshape(-1)
            idx = int(np.argmax(flat))
            scores[i, j] = flat[idx]
            if flat[idx] > 0:
                coords[i, j] = (idx % w, idx // w)
            px, py = int(math.floor(coords[i, j, 0] + 0.5)), int(math.floor(coords[i, j, 1] + 0.5))
            m = hm[i, j]
            if refine == "quarter" and 1 < px < w - 1 and 1 < py < h - 1:
                coords[i, j, 0] += 0.25 * np.sign(m[py][px + 1] - m[py][px - 1])
                coords[i, j, 1] += 0.25 * np.sign(m[py + 1][px] - m[py - 1][px])
            if refine == "dark":
                coords[i, j] += taylor_step(logs[i, j], px, py)
    if boxes is not None:
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            coords[i, :, 0] = x1 + coords[i, :, 0] * (x2 - x1) / w
            coords[i, :, 1] = y1 + coords[i, :, 1] * (y2 - y1) / h
    return torch.from_numpy(coords), torch.from_numpy(scores)


def dark_log_maps(hm, kernel):
    """Zero-padded 2-D Gaussian blur (OpenCV's sigma for the size), rescaled to the map's max,
    clamped at 1e-10, log."""
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    t = np.arange(kernel) - (kernel - 1) / 2
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    g2 = np.outer(g, g) / g.sum() ** 2
    r = kernel // 2
    out = np.zeros(hm.shape)
    for idx in np.ndindex(hm.shape[:2]):
        padded = np.pad(hm[idx].astype(np.float64), r)
        blurred = np.zeros(hm.shape[2:])
        for y in range(hm.shape[2]):
            for x in range(hm.shape[3]):
                blurred[y, x] = (padded[y:y + kernel, x:x + kernel] * g2).sum()
        with np.errstate(invalid="ignore"):  # an all-zero map gives 0/0, as in the published code
            blurred *= hm[idx].max() / blurred.max()
        out[idx] = np.log(np.maximum(blurred, 1e-10))
    return out


def taylor_step(lm, px, py):
    h, w = lm.shape
    if not (1 < px < w - 2 and 1 < py < h - 2):
        return np.zeros(2)
    dx = 0.5 * (lm[py][px + 1] - lm[py][px - 1])
    dy = 0.5 * (lm[py + 1][px] - lm[py - 1][px])
    dxx = 0.25 * (lm[py][px + 2] - 2 * lm[py][px] + lm[py][px - 2])
    dxy = 0.25 * (lm[py + 1][px + 1] - lm[py - 1][px + 1] - lm[py + 1][px - 1] + lm[py - 1][px - 1])
    dyy = 0.25 * (lm[py + 2][px] - 2 * lm[py][px] + lm[py - 2][px])
    if dxx * dyy - dxy ** 2 == 0:
        return np.zeros(2)
    return -np.linalg.inv(np.array([[dxx, dxy], [dxy, dyy]])) @ np.array([dx, dy])


def blob(h, w, cx, cy, sigma=2.0, dtype=torch.float32):
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2)).to(dtype)


def heatmap_zoo(n=3, k=17, h=16, w=12, dtype=torch.float32, seed=0):
    """Zero, negative and tied maps, peaks on and next to every border, equal neighbours, blobs."""
    g = torch.Generator().manual_seed(seed)
    maps = [torch.zeros(h, w), -torch.rand(h, w, generator=g) - 0.1,
            torch.randint(0, 3, (h, w), generator=g) / 2.0]  # ties in the max and the neighbours
    zero_peak = -torch.rand(h, w, generator=g) - 0.1
    zero_peak[4, 3] = 0.0  # a zero score away from the first pixel still decodes to the origin
    maps.append(zero_peak)
    for x, y in [(0, 5), (w - 1, 5), (5, 0), (5, h - 1), (1, 5), (w - 2, 5), (5, 1), (5, h - 2),
                 (2, 6), (w - 3, 6), (6, 2), (6, h - 3), (0, 0), (w - 1, h - 1), (2, 2)]:
        m = torch.rand(h, w, generator=g) * 0.5
        m[y, x] = 1.0
        maps.append(m)
    flat = torch.rand(h, w, generator=g) * 0.5
    flat[6, 5] = 1.0
    flat[6, 4] = flat[6, 6] = 0.25  # sign 0 in x
    maps.append(flat)
    while len(maps) < n * k:
        cx, cy = torch.rand(2, generator=g) * torch.tensor([w - 1.0, h - 1.0])
        maps.append(blob(h, w, float(cx), float(cy), 1.5 + float(torch.rand(1, generator=g)))
                    + 0.05 * torch.rand(h, w, generator=g))
    return torch.stack(maps[:n * k]).reshape(n, k, h, w).to(dtype)


@pytest.mark.parametrize("refine", ["quarter", None])
@pytest.mark.parametrize("shape", [(3, 17, 16, 12), (2, 16, 7, 9)])
def test_decoding_equals_the_published_loop(refine, shape):
    hm = heatmap_zoo(*shape)
    keypoints, scores = keypoints_from_heatmaps(hm, refine=refine)
    want, want_scores = published_decode(hm, refine=refine)
    assert keypoints.dtype == torch.float32 and keypoints.shape == (*shape[:2], 2)
    assert torch.equal(keypoints.double(), want) and torch.equal(scores, want_scores)
    assert (keypoints[0, [0, 1, 3]] == 0).all()  # zero, negative, zero-peak maps


def test_decoding_maps_into_boxes():
    hm = heatmap_zoo(3, 17)
    boxes = torch.tensor([[10.0, 20.0, 58.0, 84.0], [0.0, 0.0, 12.0, 16.0], [-5.5, 3.0, 30.0, 50.0]])
    want, _ = published_decode(hm, boxes=boxes.tolist())
    got, _ = keypoints_from_heatmaps(hm, boxes)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)
    got_list, _ = keypoints_from_heatmaps(hm, boxes.tolist(), refine="quarter")
    torch.testing.assert_close(got_list, got)


def test_dark_equals_the_published_loop():
    hm = heatmap_zoo(2, 17, 16, 13, dtype=torch.float64, seed=1)
    got, scores = keypoints_from_heatmaps(hm, refine="dark")
    want, want_scores = published_decode(hm, refine="dark")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    assert torch.equal(scores, want_scores)
    moved = (got != got.round()).any(-1)
    assert moved.sum() >= 10  # the refinement really ran on most maps
    got7, _ = keypoints_from_heatmaps(hm, refine="dark", blur_kernel=7)
    torch.testing.assert_close(got7, published_decode(hm, refine="dark", kernel=7)[0],
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dark_finds_a_known_subpixel_centre(dtype):
    centres = [(20.3, 30.7), (11.5, 9.25), (33.9, 52.1), (24.0, 32.0)]
    hm = torch.stack([blob(64, 48, cx, cy, dtype=dtype) for cx, cy in centres])[None]
    want = torch.tensor(centres, dtype=torch.float64)[None]
    dark, scores = keypoints_from_heatmaps(hm, refine="dark")
    assert (dark.double() - want).abs().max() < 0.01
    quarter, _ = keypoints_from_heatmaps(hm, refine="quarter")
    assert (quarter.double() - want).abs().max() > 0.1  # the blob is not trivially on the grid
    torch.testing.assert_close(scores, hm.flatten(2).amax(2))
    box = torch.tensor([[100.0, 50.0, 196.0, 178.0]])  # 2x the 48x64 map, shifted
    in_box, _ = keypoints_from_heatmaps(hm, box, refine="dark")
    torch.testing.assert_close(in_box, dark * 2 + torch.tensor([100.0, 50.0], dtype=dark.dtype))


@pytest.mark.gpu
def test_decoding_on_the_gpu_equals_the_cpu():
    hm = heatmap_zoo(4, 17, 64, 48)
    boxes = torch.tensor([[10.0, 20.0, 58.0, 84.0]]).repeat(4, 1)
    for refine in ("quarter", None):
        got = keypoints_from_heatmaps(hm.cuda(), boxes.cuda(), refine=refine)
        want = keypoints_from_heatmaps(hm, boxes, refine=refine)
        assert got[0].is_cuda
        torch.testing.assert_close([t.cpu() for t in got], list(want), rtol=0, atol=1e-5)
    got = keypoints_from_heatmaps(hm.cuda(), refine="dark")[0].cpu()
    torch.testing.assert_close(got, keypoints_from_heatmaps(hm, refine="dark")[0],
                               rtol=0, atol=1e-3)


@pytest.mark.parametrize("call,err,needle", [
    (lambda: keypoints_from_heatmaps(np.zeros((1, 1, 4, 4))), TypeError, "torch.Tensor"),
    (lambda: keypoints_from_heatmaps(torch.zeros(1, 4, 4)), ValueError, "4-D"),
    (lambda: keypoints_from_heatmaps(torch.zeros(1, 1, 4, 4, dtype=torch.int64)), ValueError,
     "floating-point"),
    (lambda: keypoints_from_heatmaps(torch.zeros(1, 1, 0, 4)), ValueError, "non-empty"),
    (lambda: keypoints_from_heatmaps(torch.zeros(2, 1, 4, 4), torch.zeros(1, 4)), ValueError,
     r"boxes must have shape \[2, 4\]"),
    (lambda: keypoints_from_heatmaps(torch.zeros(1, 1, 4, 4), [[0, 0, 1]]), ValueError,
     r"boxes must have shape \[1, 4\]"),
    (lambda: keypoints_from_heatmaps(torch.zeros(1, 1, 4, 4), "box"), ValueError, "boxes must be"),
    (lambda: keypoints_from_heatmaps(torch.zeros(1, 1, 4, 4), refine="taylor"), ValueError,
     "refine must be one of"),
    (lambda: keypoints_from_heatmaps(torch.zeros(1, 1, 4, 4), refine="dark", blur_kernel=4),
     ValueError, "blur_kernel must be a positive odd integer"),
])
def test_decoding_errors(call, err, needle):
    with pytest.raises(err, match=needle):
        call()


# --- flip test ----------------------------------------------------------------------------------

def flip_test_by_definition(model, images, pairs, shift):
    """The published test: two forwards, flip back, swap each pair, shift, average."""
    out = model(images)
    flipped = model(images.flip(3)).flip(3).clone()
    for a, b in pairs:
        tmp = flipped[:, a].clone()
        flipped[:, a] = flipped[:, b]
        flipped[:, b] = tmp
    if shift:
        flipped[:, :, :, 1:] = flipped.clone()[:, :, :, 0:-1]
    return (out + flipped) * 0.5


class CountingModel:
    def __init__(self, model):
        self.model, self.batches = model, []

    def __call__(self, x):
        self.batches.append(x.shape[0])
        return self.model(x)


@pytest.mark.parametrize("shift", [True, False])
def test_flip_test_equals_its_definition_on_the_pose_model(shift):
    torch.manual_seed(0)
    model = pose_model()
    images = torch.randn(2, 3, 64, 48)
    counting = CountingModel(model)
    with torch.no_grad():
        got = flip_test(counting, images, COCO_FLIP_PAIRS, shift=shift)
        want = flip_test_by_definition(model, images, COCO_FLIP_PAIRS, shift)
    assert counting.batches == [4]  # one forward of the 2N images
    assert got.shape == (2, 17, 16, 12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_flip_test_any_callable_mpii_and_inference_mode():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 3, 3, 3, generator=g)

    def model(x):  # not mirror symmetric: a random 3x3 conv, then 1/4 resolution
        return F.avg_pool2d(F.conv2d(x, weight, padding=1), 4)

    images = torch.randn(3, 3, 32, 24, generator=g)
    with torch.inference_mode():
        got = flip_test(model, images, MPII_FLIP_PAIRS)
    torch.testing.assert_close(got, flip_test_by_definition(model, images, MPII_FLIP_PAIRS, True),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("call,err,needle", [
    (lambda m: flip_test(m, torch.zeros(3, 8, 8)), ValueError, "4-D"),
    (lambda m: flip_test(m, [1, 2]), TypeError, "torch.Tensor"),
    (lambda m: flip_test(lambda x: x[:1], torch.zeros(2, 3, 8, 8)), ValueError,
     r"\[2N, K, h, w\].*4 images"),
    (lambda m: flip_test(m, torch.zeros(1, 3, 8, 8), [(1, 17)]), ValueError,
     "names joint 17, but the heatmaps have 17 joints"),
    (lambda m: flip_test(m, torch.zeros(1, 3, 8, 8), [(1, 2), (2, 3)]), ValueError,
     "joint 2 more than once"),
    (lambda m: flip_test(m, torch.zeros(1, 3, 8, 8), [1, 2]), ValueError, "pairs"),
])
def test_flip_test_errors(call, err, needle):
    def model(x):
        return torch.zeros(x.shape[0], 17, 2, 2)
    with pytest.raises(err, match=needle):
        call(model)
