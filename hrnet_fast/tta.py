"""Test-time augmentation as the official HRNet segmentation test does it.

``predict_logits(model, x, TTA(...))`` returns float32 logits at the input's size, N x C x H x W, for a
normalised batch ``x`` (N x 3 x H x W):

- multi-scale: for each scale s the input is resized to round(H*s) x round(W*s) (bilinear, half-pixel
  centres, as OpenCV's INTER_LINEAR that the official test resizes with), predicted, and the logits are
  resized back to H x W (bilinear, the model's ``align_corners``); the scales' logits are summed;
- flip: each prediction adds the logits of the horizontally flipped input, flipped back;
- sliding window (``crop``): the input (at each scale) is padded at the bottom/right to at least the
  crop size with ``pad_value``, windows of exactly the crop size start every ``stride`` pixels with the
  last window flush against the border, each window's logits are resized to the crop size, and
  overlapping logits are averaged by a count map; the padding is cut off again. The windows of every
  image in the batch go through the model ``crop_batch`` at a time.

Every model output is first resized to the size of what went in (bilinear, ``align_corners``), as the
official ``inference`` does. Unlike the official test, logits are summed as they are (the official
test sums ``exp(logits)`` and averages the two flips): with one scale the argmax is the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Size = Tuple[int, int]


def default_stride(crop: Size) -> Size:
    """Two thirds of the crop, rounded up (1024 -> 683), the overlap the official Cityscapes test uses."""
    return tuple(math.ceil(2 * c / 3) for c in crop)


@dataclass(frozen=True)
class TTA:
    """How to predict: ``scales`` (each > 0), ``flip``, ``crop`` / ``stride`` (H, W) for sliding
    windows (stride defaults to ``default_stride(crop)``), ``crop_batch`` windows per model call."""

    scales: Tuple[float, ...] = (1.0,)
    flip: bool = False
    crop: Optional[Size] = None
    stride: Optional[Size] = None
    crop_batch: int = 8

    def __post_init__(self) -> None:
        scales = tuple(float(s) for s in self.scales)
        if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
            raise ValueError(f"scales must be positive numbers, got {self.scales!r}")
        object.__setattr__(self, "scales", scales)
        if self.crop is None:
            if self.stride is not None:
                raise ValueError("stride needs a crop: sliding windows are off without one")
        else:
            crop = _pair(self.crop, "crop")
            stride = default_stride(crop) if self.stride is None else _pair(self.stride, "stride")
            if stride[0] > crop[0] or stride[1] > crop[1]:
                raise ValueError(f"stride {stride[0]}x{stride[1]} is larger than the crop "
                                 f"{crop[0]}x{crop[1]}: pixels between windows would get no prediction")
            object.__setattr__(self, "crop", crop)
            object.__setattr__(self, "stride", stride)
        if not isinstance(self.crop_batch, int) or self.crop_batch < 1:
            raise ValueError(f"crop_batch must be a positive integer, got {self.crop_batch!r}")


def _pair(value, name: str) -> Size:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (height, width), got {value!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {h}x{w}")
    return h, w


def scaled_size(size: Size, scale: float) -> Size:
    return tuple(max(1, int(d * scale + 0.5)) for d in size)


def window_starts(size: int, crop: int, stride: int) -> List[int]:
    """Window offsets along one axis of length ``size`` >= ``crop``: every ``stride``, the last flush."""
    count = math.ceil((size - crop) / stride) + 1
    return [min(i * stride, size - crop) for i in range(count)]


def resize(x: torch.Tensor, size: Size, align_corners: bool) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def _logits(model: Callable, x: torch.Tensor, flip: bool, align_corners: bool) -> torch.Tensor:
    """The model's logits for ``x`` resized to ``x``'s size, plus those of the flipped input if asked."""
    size = x.shape[-2:]
    out = resize(model(x).float(), size, align_corners)
    if flip:
        out = out + resize(model(x.flip(-1)).float(), size, align_corners).flip(-1)
    return out


def _pad_to(x: torch.Tensor, size: Size, pad_value: Optional[torch.Tensor]) -> torch.Tensor:
    n, c, h, w = x.shape
    if (h, w) == tuple(size):
        return x
    fill = torch.zeros(c) if pad_value is None else torch.as_tensor(pad_value, dtype=torch.float32)
    out = fill.to(device=x.device, dtype=x.dtype).view(1, c, 1, 1).expand(n, c, *size).contiguous()
    out[:, :, :h, :w] = x
    return out


def _sliding_window(model: Callable, x: torch.Tensor, tta: TTA, align_corners: bool,
                    pad_value: Optional[torch.Tensor]) -> torch.Tensor:
    n, _, h, w = x.shape
    (ch, cw), (sh, sw) = tta.crop, tta.stride
    padded = _pad_to(x, (max(h, ch), max(w, cw)), pad_value)
    ph, pw = padded.shape[-2:]
    windows = [(r, c) for r in window_starts(ph, ch, sh) for c in window_starts(pw, cw, sw)]
    jobs = [(i, r, c) for i in range(n) for r, c in windows]  # image-major, windows row-major
    count = torch.zeros((1, 1, ph, pw), device=x.device)
    for r, c in windows:
        count[:, :, r:r + ch, c:c + cw] += 1
    total = None
    for start in range(0, len(jobs), tta.crop_batch):
        chunk = jobs[start:start + tta.crop_batch]
        crops = torch.stack([padded[i, :, r:r + ch, c:c + cw] for i, r, c in chunk])
        logits = _logits(model, crops, tta.flip, align_corners)
        if total is None:
            total = torch.zeros((n, logits.shape[1], ph, pw), device=x.device)
        for k, (i, r, c) in enumerate(chunk):
            total[i, :, r:r + ch, c:c + cw] += logits[k]
    return (total / count)[:, :, :h, :w]


def predict_logits(model: Callable, x: torch.Tensor, tta: TTA = TTA(), *, align_corners: bool = False,
                   pad_value: Optional[Sequence[float]] = None) -> torch.Tensor:
    """float32 logits N x C x H x W for the normalised batch ``x`` under ``tta`` (see the module doc).
    ``pad_value``: per input channel, for padding up to the crop (default 0)."""
    if x.dim() != 4:
        raise ValueError(f"expected an N x C x H x W batch, got shape {tuple(x.shape)}")
    size = tuple(x.shape[-2:])
    total = None
    for scale in tta.scales:
        at = scaled_size(size, scale)
        xs = x if at == size else resize(x.float(), at, align_corners=False).to(x.dtype)
        if tta.crop is None:
            logits = _logits(model, xs, tta.flip, align_corners)
        else:
            logits = _sliding_window(model, xs, tta, align_corners, pad_value)
        if at != size:
            logits = resize(logits, size, align_corners)
        total = logits if total is None else total + logits
    return total
