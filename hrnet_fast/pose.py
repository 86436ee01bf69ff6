"""Top-down pose post-processing: heatmap decoding and the flip test, as the published HRNet test.

Decoding (``keypoints_from_heatmaps``), per image n and joint k of heatmaps ``hm`` [N, K, H, W]:

* arg-max over the flattened H*W map (the first index on ties): ``score = max``, ``x = idx % W``,
  ``y = idx // W``; a score <= 0 (or NaN) puts the point at the origin (0, 0);
* ``refine="quarter"`` (the published default): with ``px, py = floor(x + 0.5), floor(y + 0.5)``,
  if ``1 < px < W-1`` and ``1 < py < H-1``:
  ``x += 0.25 * sign(hm[py, px+1] - hm[py, px-1])``, ``y += 0.25 * sign(hm[py+1, px] - hm[py-1, px])``;
* ``refine="dark"`` (distribution-aware refinement, Zhang et al. 2020): ``B`` = the map blurred by
  a normalised ``blur_kernel`` x ``blur_kernel`` Gaussian (sigma ``0.3 * ((k - 1) / 2 - 1) + 0.8``,
  OpenCV's default for the size) over zero padding, rescaled by ``max(hm) / max(B)``;
  ``L = log(max(B, 1e-10))``; then, if ``1 < px < W-2`` and ``1 < py < H-2``, one Newton step
  ``(x, y) -= H^-1 g`` with ``g = ((L[py,px+1] - L[py,px-1]) / 2, (L[py+1,px] - L[py-1,px]) / 2)``
  and ``H = [[Lxx, Lxy], [Lxy, Lyy]]``, ``Lxx = (L[py,px+2] - 2 L[py,px] + L[py,px-2]) / 4``,
  ``Lyy`` alike, ``Lxy = (L[py+1,px+1] - L[py-1,px+1] - L[py+1,px-1] + L[py-1,px-1]) / 4``;
  skipped where ``det H == 0`` or the step is not finite. The score stays the raw maximum;
* ``refine=None``: the integer arg-max;
* with ``boxes`` [N, 4] = (x1, y1, x2, y2): ``x -> x1 + x (x2 - x1) / W``,
  ``y -> y1 + y (y2 - y1) / H``. (The published transform from a center and a scale is this map
  for the box it cropped, whose aspect ratio it made W:H.)

Flip test (``flip_test``): with ``f`` = the model, ``m`` = the horizontal mirror and ``P`` the
left/right joint swap, ``out = (f(x) + S(P(m(f(m(x)))))) / 2`` where ``S`` (``shift=True``) moves
the map one pixel right (``S(h)[..., 1:] = h[..., :-1]``, column 0 kept) as the published test
does. ``x`` and ``m(x)`` go through the model as one batch of 2N images.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["COCO_FLIP_PAIRS", "MPII_FLIP_PAIRS", "REFINEMENTS", "keypoints_from_heatmaps",
           "flip_test"]

# Left/right joint pairs: COCO (nose, then eye, ear, shoulder, elbow, wrist, hip, knee, ankle
# pairs), MPII (ankles, knees, hips, wrists, elbows, shoulders).
COCO_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
MPII_FLIP_PAIRS = ((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13))
REFINEMENTS = (None, "quarter", "dark")
DARK_LOG_EPS = 1e-10  # the published clamp before the log


def _check_heatmaps(heatmaps) -> None:
    if not isinstance(heatmaps, torch.Tensor):
        raise TypeError(f"heatmaps must be a torch.Tensor, got {type(heatmaps).__name__}")
    if heatmaps.dim() != 4:
        raise ValueError(f"heatmaps must be a 4-D [N, K, H, W] tensor, got shape "
                         f"{tuple(heatmaps.shape)}")
    if not heatmaps.is_floating_point():
        raise ValueError(f"heatmaps must be a floating-point tensor, got {heatmaps.dtype}")
    if heatmaps.shape[2] == 0 or heatmaps.shape[3] == 0:
        raise ValueError(f"heatmaps must have a non-empty H x W, got shape {tuple(heatmaps.shape)}")


def _box_tensor(boxes, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    try:
        b = torch.as_tensor(boxes, dtype=dtype, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"boxes must be an [N, 4] tensor of (x1, y1, x2, y2), got "
                         f"{type(boxes).__name__}") from None
    if b.shape != (n, 4):
        raise ValueError(f"boxes must have shape [{n}, 4] (one x1, y1, x2, y2 box per heatmap "
                         f"image), got {tuple(b.shape)}")
    return b


def _at(maps: torch.Tensor, px: torch.Tensor, py: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``maps[n, k, py + dy, px + dx]`` for every (n, k), indices clamped into the map (the callers
    mask out the points whose neighbourhood leaves it)."""
    h, w = maps.shape[-2:]
    x = (px + dx).clamp(0, w - 1)
    y = (py + dy).clamp(0, h - 1)
    return maps.flatten(2).gather(2, (y * w + x).unsqueeze(2)).squeeze(2)


def _quarter_offsets(hm: torch.Tensor, px: torch.Tensor, py: torch.Tensor, dtype: torch.dtype):
    h, w = hm.shape[-2:]
    inside = (px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)
    dx = torch.sign(_at(hm, px, py, 1, 0).to(dtype) - _at(hm, px, py, -1, 0).to(dtype))
    dy = torch.sign(_at(hm, px, py, 0, 1).to(dtype) - _at(hm, px, py, 0, -1).to(dtype))
    zero = torch.zeros((), dtype=dtype, device=hm.device)
    return torch.where(inside, 0.25 * dx, zero), torch.where(inside, 0.25 * dy, zero)


def _gaussian_blur(maps: torch.Tensor, kernel: int) -> torch.Tensor:
    """Each map convolved with the normalised ``kernel`` x ``kernel`` Gaussian, zero padding."""
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for this size
    t = torch.arange(kernel, dtype=maps.dtype, device=maps.device) - (kernel - 1) / 2
    g = torch.exp(-(t * t) / (2 * sigma * sigma))
    g = g / g.sum()
    n, k, h, w = maps.shape
    flat = maps.reshape(n * k, 1, h, w)
    flat = F.conv2d(flat, g.view(1, 1, kernel, 1), padding=(kernel // 2, 0))
    flat = F.conv2d(flat, g.view(1, 1, 1, kernel), padding=(0, kernel // 2))
    return flat.reshape(n, k, h, w)


def _dark_offsets(hm: torch.Tensor, px: torch.Tensor, py: torch.Tensor, kernel: int):
    h, w = hm.shape[-2:]
    blurred = _gaussian_blur(hm, kernel)
    # Keep the original maximum, as the published code does (it scales every map back to it).
    scale = hm.amax(dim=(2, 3)) / blurred.amax(dim=(2, 3))
    logs = (blurred * scale[..., None, None]).clamp_min(DARK_LOG_EPS).log()
    c = _at(logs, px, py, 0, 0)
    gx = 0.5 * (_at(logs, px, py, 1, 0) - _at(logs, px, py, -1, 0))
    gy = 0.5 * (_at(logs, px, py, 0, 1) - _at(logs, px, py, 0, -1))
    hxx = 0.25 * (_at(logs, px, py, 2, 0) - 2 * c + _at(logs, px, py, -2, 0))
    hyy = 0.25 * (_at(logs, px, py, 0, 2) - 2 * c + _at(logs, px, py, 0, -2))
    hxy = 0.25 * (_at(logs, px, py, 1, 1) - _at(logs, px, py, 1, -1)
                  - _at(logs, px, py, -1, 1) + _at(logs, px, py, -1, -1))
    det = hxx * hyy - hxy * hxy
    safe_det = torch.where(det != 0, det, torch.ones_like(det))
    # -H^-1 g with the 2x2 inverse written out: H^-1 = [[hyy, -hxy], [-hxy, hxx]] / det.
    ox = -(hyy * gx - hxy * gy) / safe_det
    oy = -(hxx * gy - hxy * gx) / safe_det
    ok = ((px > 1) & (px < w - 2) & (py > 1) & (py < h - 2) & (det != 0)
          & torch.isfinite(ox) & torch.isfinite(oy))
    zero = torch.zeros((), dtype=ox.dtype, device=ox.device)
    return torch.where(ok, ox, zero), torch.where(ok, oy, zero)


def keypoints_from_heatmaps(heatmaps: torch.Tensor, boxes=None, *, refine: Optional[str] = "quarter",
                            blur_kernel: int = 11) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode heatmaps [N, K, H, W] into ``(keypoints [N, K, 2] as (x, y), scores [N, K])``.

    The published decoding (module docstring): arg-max, points with a score <= 0 at the origin, then
    ``refine`` = "quarter" (published default), "dark" (``blur_kernel``: odd Gaussian size) or None.
    Coordinates are heatmap pixels, or image pixels inside ``boxes`` [N, 4] (x1, y1, x2, y2) when
    given. Vectorised, on the heatmaps' device; keypoints are float32 (float64 for float64 maps),
    scores keep the heatmaps' dtype. Not differentiable (works on detached maps).
    """
    _check_heatmaps(heatmaps)
    if refine not in REFINEMENTS:
        raise ValueError(f"refine must be one of {REFINEMENTS}, got {refine!r}")
    if isinstance(blur_kernel, bool) or not isinstance(blur_kernel, int) or blur_kernel < 1 \
            or blur_kernel % 2 == 0:
        raise ValueError(f"blur_kernel must be a positive odd integer, got {blur_kernel!r}")
    hm = heatmaps.detach()
    n, _, h, w = hm.shape
    dtype = torch.promote_types(hm.dtype, torch.float32)
    box = None if boxes is None else _box_tensor(boxes, n, dtype, hm.device)

    scores, idx = hm.flatten(2).max(dim=2)  # max returns the first index of the maximum
    found = scores > 0
    px = torch.where(found, idx % w, torch.zeros_like(idx))
    py = torch.where(found, idx // w, torch.zeros_like(idx))
    x, y = px.to(dtype), py.to(dtype)
    if refine == "quarter":
        ox, oy = _quarter_offsets(hm, px, py, dtype)
        x, y = x + ox, y + oy
    elif refine == "dark":
        ox, oy = _dark_offsets(hm.to(dtype), px, py, blur_kernel)
        x, y = x + ox, y + oy
    if box is not None:
        x = box[:, 0:1] + x * ((box[:, 2:3] - box[:, 0:1]) / w)
        y = box[:, 1:2] + y * ((box[:, 3:4] - box[:, 1:2]) / h)
    return torch.stack((x, y), dim=-1), scores


def _swap_permutation(flip_pairs: Sequence[Tuple[int, int]], num_joints: int) -> list:
    perm = list(range(num_joints))
    seen = set()
    try:
        pairs = [(int(a), int(b)) for a, b in flip_pairs]
    except (TypeError, ValueError):
        raise ValueError(f"flip_pairs must be (left, right) joint index pairs, got "
                         f"{flip_pairs!r}") from None
    for a, b in pairs:
        for j in (a, b):
            if not 0 <= j < num_joints:
                raise ValueError(f"flip_pairs names joint {j}, but the heatmaps have "
                                 f"{num_joints} joints")
            if j in seen:
                raise ValueError(f"flip_pairs names joint {j} more than once")
            seen.add(j)
        perm[a], perm[b] = b, a
    return perm


def flip_test(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
              flip_pairs: Sequence[Tuple[int, int]] = COCO_FLIP_PAIRS,
              shift: bool = True) -> torch.Tensor:
    """Heatmaps of ``images`` [N, C, H, W] averaged with those of their mirror images (flipped
    back, left/right joints swapped by ``flip_pairs``, shifted one pixel right if ``shift``), from
    one forward of the 2N images. ``model`` is any callable returning [2N, K, h, w]; call it under
    ``torch.no_grad()`` or ``torch.inference_mode()`` (and ``model.eval()``) for inference."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be a 4-D [N, C, H, W] tensor, got shape "
                         f"{tuple(images.shape)}")
    n = images.shape[0]
    out = model(torch.cat((images, images.flip(-1)), dim=0))
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != 2 * n:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"flip_test needs a model returning [2N, K, h, w] heatmaps for the "
                         f"{2 * n} images (N={n} and their mirrors), got {got}")
    perm = _swap_permutation(flip_pairs, out.shape[1])
    direct, mirrored = out[:n], out[n:]
    back = mirrored.flip(-1)[:, perm]
    if shift:  # the published test: back[..., 1:] = back[..., :-1], column 0 unchanged
        back = torch.cat((back[..., :1], back[..., :-1]), dim=-1)
    return (direct + back) * 0.5
