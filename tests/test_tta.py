"""Test-time augmentation against its definition: a plain per-image, per-scale, per-window loop written
here, one model call per crop."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hrnet_fast.tta import TTA, default_stride, predict_logits, window_starts


class PoolNet(torch.nn.Module):
    """A stand-in for HRNet whose output for one image does not depend on the rest of the batch (only
    element-wise ops and pooling), so batched and per-crop calls agree bit for bit. Logits come at 1/4
    of the input like HRNet's; a horizontal difference makes it not mirror-symmetric, so a flip that is
    not undone shows."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1.5, 1.3, 3 * num_classes).view(num_classes, 3))
        self.config = SimpleNamespace(num_classes=num_classes, align_corners=False)
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        p = F.avg_pool2d(x, 4, ceil_mode=True)
        dx = torch.cat([p[..., 1:], p[..., -1:]], dim=-1) - p
        mixed = [sum(self.w[k, c] * p[:, c] for c in range(3)) for k in range(self.w.shape[0])]
        return torch.stack([torch.sin(3 * m) + dx[:, k % 3] for k, m in enumerate(mixed)], 1)


def _up(y, size, align_corners):
    return F.interpolate(y.float(), size=size, mode="bilinear", align_corners=align_corners)


def _one(model, crop, flip, ac):
    """Logits of one crop (1 x 3 x h x w) at its size, plus the flipped crop's flipped back."""
    size = crop.shape[-2:]
    out = _up(model(crop), size, ac)
    if flip:
        out = out + _up(model(torch.flip(crop, dims=[3])), size, ac).flip(3)
    return out


def loop_reference(model, x, scales, flip, crop, stride, ac, pad_value):
    """The official test, literally: for each image and scale, resize, pad to the crop, slide windows
    (last one flush), one crop at a time, average by the count, cut, resize back, sum the scales."""
    n, _, h, w = x.shape
    result = []
    for i in range(n):
        img = x[i:i + 1]
        total = None
        for s in scales:
            sh, sw = max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))
            xs = img if (sh, sw) == (h, w) else F.interpolate(img, size=(sh, sw), mode="bilinear",
                                                               align_corners=False)
            if crop is None:
                logits = _one(model, xs, flip, ac)
            else:
                ch, cw = crop
                ph, pw = max(sh, ch), max(sw, cw)
                padded = torch.empty(1, 3, ph, pw)
                for c in range(3):
                    padded[:, c] = pad_value[c]
                padded[:, :, :sh, :sw] = xs
                rows = math.ceil((ph - ch) / stride[0]) + 1
                cols = math.ceil((pw - cw) / stride[1]) + 1
                acc = None
                count = torch.zeros(1, 1, ph, pw)
                for r in range(rows):
                    for c in range(cols):
                        h0 = min(r * stride[0], ph - ch)
                        w0 = min(c * stride[1], pw - cw)
                        out = _one(model, padded[:, :, h0:h0 + ch, w0:w0 + cw], flip, ac)
                        if acc is None:
                            acc = torch.zeros(1, out.shape[1], ph, pw)
                        acc[:, :, h0:h0 + ch, w0:w0 + cw] += out
                        count[:, :, h0:h0 + ch, w0:w0 + cw] += 1
                logits = (acc / count)[:, :, :sh, :sw]
            if (sh, sw) != (h, w):
                logits = _up(logits, (h, w), ac)
            total = logits if total is None else total + logits
        result.append(total)
    return torch.cat(result)


PAD = (-2.1, -2.0, -1.8)

CASES = [
    # scales, flip, crop, stride, crop_batch, input size
    ((1.0,), False, None, None, 8, (23, 37)),
    ((0.5, 1.0, 1.75), True, None, None, 8, (23, 37)),
    ((1.0,), False, (16, 16), (11, 11), 3, (23, 37)),        # overlaps, last window flush
    ((1.0,), True, (32, 24), (20, 13), 4, (23, 37)),         # taller than the image: padded
    ((0.75, 1.0, 1.5), True, (16, 20), None, 5, (23, 37)),   # default stride, every augmentation
    ((1.0,), False, (8, 8), (8, 8), 64, (24, 40)),           # stride == crop: tiles, one call
]


@pytest.mark.parametrize("scales, flip, crop, stride, crop_batch, size", CASES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_tta_equals_the_per_crop_loop_exactly(scales, flip, crop, stride, crop_batch, size, align_corners):
    torch.manual_seed(0)
    model = PoolNet()
    x = torch.randn(2, 3, *size)
    tta = TTA(scales=scales, flip=flip, crop=crop, stride=stride, crop_batch=crop_batch)
    with torch.no_grad():
        got = predict_logits(model, x, tta, align_corners=align_corners, pad_value=PAD)
        want = loop_reference(model, x, scales, flip, crop, tta.stride, align_corners, PAD)
    assert got.dtype == torch.float32 and got.shape == (2, 4, *size)
    assert torch.equal(got, want)  # the same float operations in the same order


def test_crops_go_through_the_model_in_batches():
    model = PoolNet()
    tta = TTA(crop=(16, 16), stride=(8, 8), crop_batch=4, flip=True)
    with torch.no_grad():
        predict_logits(model, torch.randn(2, 3, 24, 40), tta)
    # 2 x 4 windows per image (rows 0,8 x cols 0,8,16,24), 2 images: 16 crops = 4 calls of 4, twice (flip)
    assert model.calls == [(4, 3, 16, 16)] * 8


def test_hrnet_tta_matches_the_loop_within_fp32_rounding():
    """With HRNet the batched convolutions may sum in another order than single-crop ones, so the two
    agree to fp32 rounding, not bit for bit."""
    from hrnet_fast import HRNet, HRNetConfig
    from helpers import randomize_bn, rel_err

    torch.manual_seed(0)
    model = randomize_bn(HRNet(HRNetConfig.preset("w18_small_v1", num_classes=3))).eval()
    x = torch.randn(1, 3, 28, 64)  # padded to 32 high; 3 windows: calls of 2 and 1 crops
    tta = TTA(scales=(1.0,), crop=(32, 32), stride=(16, 16), crop_batch=2)
    with torch.inference_mode():
        got = predict_logits(model, x, tta, pad_value=PAD)
        want = loop_reference(model, x, tta.scales, False, (32, 32), (16, 16), False, PAD)
    assert rel_err(got, want) < 1e-5


def test_default_tta_is_the_model_resized_to_the_input():
    model = PoolNet()
    x = torch.randn(1, 3, 21, 30)
    with torch.no_grad():
        got = predict_logits(model, x)
        want = F.interpolate(model(x), size=(21, 30), mode="bilinear", align_corners=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("size, crop, stride", [(2048, 1024, 683), (1024, 1024, 683), (37, 16, 11),
                                                (40, 8, 8), (41, 8, 8), (100, 7, 1)])
def test_windows_cover_the_axis_on_the_stride_grid_with_the_last_flush(size, crop, stride):
    starts = window_starts(size, crop, stride)
    assert starts[0] == 0 and starts[-1] == size - crop
    assert all(s == i * stride for i, s in enumerate(starts[:-1]))  # on the grid, but the last
    covered = set()
    for s in starts:
        covered.update(range(s, s + crop))
    assert covered == set(range(size))
    assert len(starts) == len(set(starts))  # no window twice


def test_default_stride_is_two_thirds_of_the_crop():
    assert default_stride((1024, 1024)) == (683, 683)
    assert TTA(crop=(30, 9)).stride == (20, 6)


@pytest.mark.parametrize("kwargs, words", [
    ({"scales": ()}, "scales"),
    ({"scales": (1.0, 0.0)}, "scales"),
    ({"scales": (float("nan"),)}, "scales"),
    ({"stride": (4, 4)}, "needs a crop"),
    ({"crop": (8, 8), "stride": (9, 4)}, "larger than the crop"),
    ({"crop": (0, 8)}, "crop must be positive"),
    ({"crop": (8,)}, "crop must be (height, width)"),
    ({"crop_batch": 0}, "crop_batch"),
])
def test_bad_tta_settings_name_the_field(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        TTA(**kwargs)
