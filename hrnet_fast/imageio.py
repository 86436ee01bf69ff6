"""Image reading and writing for ``hrnet-fast segment``.

PNG/JPEG and other formats are read with Pillow when it is installed (``pip install Pillow``); binary
PPM (P6) and ``.npy`` (HxWx3 uint8) work without it. Label maps and colour images are written as
8-bit PNG with the standard library alone (zlib), so the output never needs Pillow.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

# Cityscapes' 19 training classes, in order (road ... bicycle), and their customary colours.
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)


def palette(num_classes: int) -> np.ndarray:
    """Cityscapes colours for 19 classes; otherwise a fixed pseudo-random palette."""
    if num_classes == len(CITYSCAPES_PALETTE):
        return CITYSCAPES_PALETTE
    rng = np.random.default_rng(12345)
    return rng.integers(0, 256, size=(num_classes, 3), dtype=np.uint8)


def _read_ppm(data: bytes, path: str) -> np.ndarray:
    tokens, pos = [], 0
    while len(tokens) < 4:  # magic, width, height, maxval; '#' starts a comment
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        tokens.append(data[pos:end])
        pos = end
    pos += 1
    if tokens[0] != b"P6" or int(tokens[3]) != 255:
        raise ValueError(f"{path}: only binary 8-bit PPM (P6, maxval 255) is supported")
    w, h = int(tokens[1]), int(tokens[2])
    pixels = np.frombuffer(data, dtype=np.uint8, count=w * h * 3, offset=pos)
    return pixels.reshape(h, w, 3).copy()


def read_rgb(path) -> np.ndarray:
    """An HxWx3 uint8 RGB array from ``path``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif suffix in (".ppm", ".pnm"):
        arr = _read_ppm(path.read_bytes(), str(path))
    else:
        try:
            from PIL import Image
        except ImportError:
            raise RuntimeError(f"reading {suffix or 'this'} images needs Pillow (pip install Pillow); "
                               "without it, .ppm (P6) and .npy (HxWx3 uint8) work") from None
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{path}: expected an HxWx3 uint8 RGB image, got {arr.shape} {arr.dtype}")
    return arr


def write_png(path, image: np.ndarray) -> None:
    """Write an HxW (grey) or HxWx3 (RGB) uint8 array as PNG, with zlib only."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"write_png needs HxW or HxWx3 uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    color_type = 0 if image.ndim == 2 else 2
    rows = image.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 per row

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + tag + payload
                + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)
