"""Top-down pose around the model, for ``hrnet-fast pose``: person boxes to model inputs, heatmaps back
to image keypoints, the skeleton drawn on the image, and the JSON record.

Coordinates are those of the published pose code (and OpenCV): pixel ``(col, row)`` of an image has
its centre at ``(x, y) = (col, row)``; boxes are ``(x1, y1, x2, y2)`` in these coordinates.

Crop (``crop_region``), as deep-high-resolution-net.pytorch's ``_box2cs`` and
``get_affine_transform``: for a box of width ``w = x2 - x1`` and height ``h = y2 - y1`` and a model
input of ``H x W`` pixels, the centre is the box centre ``(cx, cy)``; the box is widened or heightened
to the input's aspect ratio ``W / H`` (``w = max(w, h W / H)``) and padded by ``BOX_PADDING`` (1.25),
giving the region width ``s = 1.25 w``. Output pixel ``(col, row)`` of the crop samples the image at
``x = cx + (col - W / 2) s / W``, ``y = cy + (row - H / 2) s / W``: the region
``(cx - s/2, cy - s H / 2W, cx + s/2, cy + s H / 2W)`` scaled onto the input, its corner
``(x1, y1)`` on pixel ``(0, 0)``. The samples are bilinear over the four pixels around ``(x, y)``,
pixels outside the image count as 0 (black), and the result is rounded to 8 bits (halves up), as
``cv2.warpAffine(..., INTER_LINEAR)`` of the uint8 image does. The warp is ``F.grid_sample``
(``align_corners=False``, whose normalised ``g`` is pixel ``((g + 1) W_image - 1) / 2``, so
``g = (2 x + 1) / W_image - 1`` puts pixel centres at integers) in float64; OpenCV quantises the
sample positions to 1/32 pixel, so it differs from this exact bilinear by under 1/64 pixel.

Back to the image (``heatmap_regions``): the published ``transform_preds`` maps heatmap
``(hx, hy)`` of an ``h x w`` heatmap to ``(cx + (hx - w/2) s / w, cy + (hy - h/2) s / w)``; that is
``keypoints_from_heatmaps`` with the box ``(cx - s/2, cy - s h / 2w, cx + s/2, cy + s h / 2w)``,
the crop region itself when the heatmap is exactly 1/4 of the input.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .infer import normalize
from .pose import COCO_FLIP_PAIRS, MPII_FLIP_PAIRS, flip_test, keypoints_from_heatmaps

BOX_PADDING = 1.25  # the published crop: the (aspect-corrected) box plus a quarter
ROUND_TIE_SLACK = 1e-6  # warped values this close below a half still round up (crop_inputs)

# Skeleton edges (joint index pairs): COCO's 19 limbs (joints: nose, eyes, ears, shoulders, elbows,
# wrists, hips, knees, ankles, left before right) and MPII's 15 (right ankle, knee, hip, left hip,
# knee, ankle, pelvis, thorax, upper neck, head top, right wrist, elbow, shoulder, left shoulder,
# elbow, wrist).
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
                 (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))
MPII_SKELETON = ((0, 1), (1, 2), (2, 6), (6, 3), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9), (7, 12),
                 (12, 11), (11, 10), (7, 13), (13, 14), (14, 15))
# Edge colours by side (the first / second joint of each flip pair, the middle), joints on top.
SIDE_COLOURS = ((255, 128, 0), (0, 128, 255), (0, 200, 0))
JOINT_COLOUR = (255, 0, 0)


def parse_box(text: str) -> Tuple[float, float, float, float]:
    """``"x1,y1,x2,y2"`` -> four finite floats with x2 > x1 and y2 > y1; a ValueError names the
    problem otherwise."""
    parts = text.split(",")
    if len(parts) != 4:
        raise ValueError(f"a box is x1,y1,x2,y2 (four comma-separated numbers), got {text!r} "
                         f"({len(parts)} value{'s' if len(parts) != 1 else ''})")
    try:
        x1, y1, x2, y2 = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"a box is x1,y1,x2,y2 (four comma-separated numbers), got {text!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box {text!r}: coordinates must be finite numbers")
    if x2 <= x1:
        raise ValueError(f"box {text!r}: x2 must be greater than x1")
    if y2 <= y1:
        raise ValueError(f"box {text!r}: y2 must be greater than y1")
    return x1, y1, x2, y2


def box_outside_image(box: Sequence[float], height: int, width: int) -> bool:
    """Whether ``box`` misses every pixel centre of a ``height x width`` image."""
    x1, y1, x2, y2 = box
    return x2 < 0 or y2 < 0 or x1 > width - 1 or y1 > height - 1


def crop_region(boxes: torch.Tensor, input_size: Tuple[int, int]) -> torch.Tensor:
    """The published crop region [N, 4] (x1, y1, x2, y2) of each box [N, 4]: centred on the box,
    widened or heightened to the input's aspect ratio, padded by ``BOX_PADDING`` (module docstring).
    Its height is exactly its width times H / W."""
    h_in, w_in = input_size
    b = boxes.to(torch.float64)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    width = torch.maximum(b[:, 2] - b[:, 0], (b[:, 3] - b[:, 1]) * (w_in / h_in)) * BOX_PADDING
    half_w, half_h = width / 2, width * h_in / w_in / 2
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=1)


def heatmap_regions(regions: torch.Tensor, heatmap_size: Tuple[int, int]) -> torch.Tensor:
    """The boxes for ``keypoints_from_heatmaps`` that give the published mapping back to the image
    (module docstring): the crop regions when the heatmap has the input's aspect ratio."""
    hm_h, hm_w = heatmap_size
    r = regions.to(torch.float64)
    cy = (r[:, 1] + r[:, 3]) / 2
    half_h = (r[:, 2] - r[:, 0]) * hm_h / hm_w / 2
    return torch.stack((r[:, 0], cy - half_h, r[:, 2], cy + half_h), dim=1)


def crop_inputs(image: torch.Tensor, regions: torch.Tensor, input_size: Tuple[int, int]) -> torch.Tensor:
    """Each region of ``image`` (H x W x 3 uint8, any device) warped to ``input_size``: [N, h, w, 3]
    uint8, bilinear with zeros outside the image, rounded as OpenCV's uint8 warp (module docstring)."""
    h_in, w_in = input_size
    height, width = image.shape[:2]
    n = regions.shape[0]
    r = regions.to(device=image.device, dtype=torch.float64)
    cols = torch.arange(w_in, dtype=torch.float64, device=image.device)
    rows = torch.arange(h_in, dtype=torch.float64, device=image.device)
    xs = r[:, 0:1] + cols * ((r[:, 2:3] - r[:, 0:1]) / w_in)  # [N, w_in] sample x of each column
    ys = r[:, 1:2] + rows * ((r[:, 3:4] - r[:, 1:2]) / h_in)  # [N, h_in] sample y of each row
    # Only the pixels that some sample reads go to float64: the window around all samples.
    x0 = int(min(max(math.floor(xs.min().item()), 0), width - 1))
    x1 = int(min(max(math.floor(xs.max().item()) + 1, 0), width - 1))
    y0 = int(min(max(math.floor(ys.min().item()), 0), height - 1))
    y1 = int(min(max(math.floor(ys.max().item()) + 1, 0), height - 1))
    window = image[y0:y1 + 1, x0:x1 + 1].permute(2, 0, 1)[None].to(torch.float64)
    win_h, win_w = window.shape[-2:]
    gx = (2 * (xs - x0) + 1) / win_w - 1
    gy = (2 * (ys - y0) + 1) / win_h - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    out = F.grid_sample(window, grid.reshape(1, n * h_in, w_in, 2), mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    # Half up, as OpenCV's fixed-point rounding: exact halves are frequent (a region width of 1.75
    # input pixels, say) and ROUND_TIE_SLACK keeps float64 noise from deciding them.
    out = (out + (0.5 + ROUND_TIE_SLACK)).floor().clamp(0, 255).to(torch.uint8)  # [1, 3, N*h_in, w_in]
    return out.reshape(3, n, h_in, w_in).permute(1, 2, 3, 0).contiguous()


def predict_keypoints(model, image: torch.Tensor, boxes: torch.Tensor, input_size: Tuple[int, int], *,
                      flip_pairs: Optional[Sequence[Tuple[int, int]]] = None,
                      refine: Optional[str] = "quarter", batch_size: int = 32,
                      dtype: torch.dtype = torch.float32):
    """``(regions [N, 4], keypoints [N, K, 2], scores [N, K])`` of the people in ``boxes`` [N, 4]
    (x1, y1, x2, y2) of ``image`` (H x W x 3 uint8 on the model's device): each crop region
    (``crop_region``) warped to ``input_size``, normalised as the official models (RGB / 255, ImageNet
    mean and std), its heatmaps (averaged with the flip test's when ``flip_pairs`` is given, () for a
    mirror without swapping joints) decoded with ``refine`` and mapped back into image pixels.
    ``batch_size`` crops per model call; keypoints and scores are float64 on the CPU.
    Call under ``torch.inference_mode()`` with the model in eval mode."""
    regions = crop_region(boxes, input_size)
    keypoints, scores = [], []
    for start in range(0, regions.shape[0], batch_size):
        part = regions[start:start + batch_size]
        x = normalize(crop_inputs(image, part, input_size), dtype)
        heatmaps = model(x) if flip_pairs is None else flip_test(model, x, flip_pairs)
        heatmaps = heatmaps.detach().to("cpu", torch.float64)
        back = heatmap_regions(part, tuple(heatmaps.shape[-2:]))
        k, s = keypoints_from_heatmaps(heatmaps, back, refine=refine)
        keypoints.append(k)
        scores.append(s)
    return regions, torch.cat(keypoints), torch.cat(scores)


def flip_pairs_for(num_joints: int) -> Optional[Tuple[Tuple[int, int], ...]]:
    """COCO's left/right pairs for 17 joints, MPII's for 16; None (unknown) otherwise."""
    return {17: COCO_FLIP_PAIRS, 16: MPII_FLIP_PAIRS}.get(num_joints)


def skeleton_for(num_joints: int) -> Tuple[Tuple[int, int], ...]:
    """COCO's edges for 17 joints, MPII's for 16; none (points only) otherwise."""
    return {17: COCO_SKELETON, 16: MPII_SKELETON}.get(num_joints, ())


def marker_sizes(height: int, width: int) -> Tuple[float, float]:
    """(joint disc radius, half the limb line width) in pixels, growing with the image."""
    radius = max(1.5, 0.006 * max(height, width))
    return radius, max(0.75, radius / 2)


def _paint(canvas: np.ndarray, mask_of, bounds, colour) -> None:
    """Paint ``colour`` where ``mask_of(xs, ys)`` holds, for pixels inside ``bounds`` (x0, y0, x1, y1)."""
    height, width = canvas.shape[:2]
    x0, y0 = max(int(math.floor(bounds[0])), 0), max(int(math.floor(bounds[1])), 0)
    x1, y1 = min(int(math.ceil(bounds[2])), width - 1), min(int(math.ceil(bounds[3])), height - 1)
    if x0 > x1 or y0 > y1:
        return
    ys, xs = np.mgrid[y0:y1 + 1, x0:x1 + 1].astype(np.float64)
    canvas[y0:y1 + 1, x0:x1 + 1][mask_of(xs, ys)] = colour


def _segment_mask(p, q, half_width: float):
    """Pixels whose centre lies within ``half_width`` of the segment from ``p`` to ``q``."""
    (px, py), (qx, qy) = p, q
    dx, dy = qx - px, qy - py
    length2 = dx * dx + dy * dy

    def mask(xs, ys):
        t = np.zeros_like(xs) if length2 == 0 else np.clip(((xs - px) * dx + (ys - py) * dy) / length2, 0, 1)
        return (xs - (px + t * dx)) ** 2 + (ys - (py + t * dy)) ** 2 <= half_width ** 2
    return mask


def _edge_colour(edge: Tuple[int, int], num_joints: int):
    pairs = flip_pairs_for(num_joints) or ()
    first, second = {a for a, _ in pairs}, {b for _, b in pairs}
    if any(j in first for j in edge):
        return SIDE_COLOURS[0]
    if any(j in second for j in edge):
        return SIDE_COLOURS[1]
    return SIDE_COLOURS[2]


def draw_pose(image: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, min_score: float) -> np.ndarray:
    """A copy of ``image`` (H x W x 3 uint8) with each person's skeleton: joints [N, K, 2] whose score
    is at least ``min_score`` as discs (``marker_sizes``), and the limbs (``skeleton_for(K)``)
    between two such joints as lines. A pixel is drawn when its centre is inside a disc or within half
    the line width of a limb."""
    canvas = image.copy()
    keypoints = np.asarray(keypoints, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    radius, half_width = marker_sizes(*image.shape[:2])
    num_joints = keypoints.shape[1]
    shown = (scores >= min_score) & np.isfinite(keypoints).all(-1)
    for person, visible in zip(keypoints, shown):
        for a, b in skeleton_for(num_joints):
            if visible[a] and visible[b]:
                p, q = person[a], person[b]
                bounds = (min(p[0], q[0]) - half_width, min(p[1], q[1]) - half_width,
                          max(p[0], q[0]) + half_width, max(p[1], q[1]) + half_width)
                _paint(canvas, _segment_mask(p, q, half_width), bounds, _edge_colour((a, b), num_joints))
        for (x, y), show in zip(person, visible):
            if show:
                _paint(canvas, lambda xs, ys, x=x, y=y: (xs - x) ** 2 + (ys - y) ** 2 <= radius ** 2,
                       (x - radius, y - radius, x + radius, y + radius), JOINT_COLOUR)
    return canvas


def pose_record(boxes: Iterable[Sequence[float]], regions: torch.Tensor, keypoints: torch.Tensor,
                scores: torch.Tensor, *, image: str, image_size: Tuple[int, int], preset: str,
                input_size: Tuple[int, int], flip: bool, refine: Optional[str]) -> Dict:
    """The JSON of ``hrnet-fast pose``: per box, its crop region, keypoints [[x, y], ...] in image
    pixels and their scores."""
    return {
        "image": image, "image_size": [image_size[1], image_size[0]],  # width, height
        "preset": preset, "joints": int(keypoints.shape[1]),
        "input_size": [input_size[0], input_size[1]],  # height, width, as --input-size
        "flip": flip, "refine": refine or "none",
        "boxes": [[float(v) for v in b] for b in boxes],
        "regions": regions.cpu().double().tolist(),
        "keypoints": keypoints.cpu().double().tolist(),
        "scores": scores.cpu().double().tolist(),
    }
