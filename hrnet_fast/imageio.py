"""Image reading and writing for ``hrnet-fast segment`` and ``hrnet-fast eval``.

PNG/JPEG and other formats are read with Pillow when it is installed (``pip install Pillow``); binary
PPM (P6) and ``.npy`` (HxWx3 uint8) work without it. Label maps and colour images are written as
8-bit PNG with the standard library alone (zlib), so the output never needs Pillow.

Reading never trusts the file: every failure (missing file, a directory or FIFO, a bad or truncated
header, a payload shorter than the header declares, an image over ``MAX_PIXELS``, anything Pillow
raises) is one ``ImageReadError`` whose message names the file and the problem. The payload size is
checked against the header before anything is allocated, and nothing larger than what the file
actually holds is ever allocated.

PPM: binary P6 only, with maxval 1..65535 (maxval < 256: one byte per sample; 256..65535: two bytes,
big-endian, as Netpbm defines). Samples are scaled to 8 bits as round(v * 255 / maxval); a sample
above maxval is an error. Comments (``#`` to the end of the line) may stand anywhere in the header.

Label maps (``read_label``): single-channel class ids, HxW. ``.npy`` (any integer dtype up to 32 bits)
works without Pillow; PNG and other formats need Pillow and must be greyscale (8 or 16 bit, or 32-bit
integer) or palette images (the palette indices are the ids). An RGB file is refused: it is a colour
rendering, not ids.
"""
from __future__ import annotations

import os
import re
import stat
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


class ImageReadError(ValueError):
    """An image file could not be read: the message names the file and what is wrong with it."""


# Larger images are refused before anything is allocated (2^28 pixels: 768 MiB as 8-bit RGB).
MAX_PIXELS = 1 << 28
# A PPM header (with its comments) longer than this is refused rather than scanned.
MAX_HEADER_BYTES = 1 << 16
_MAX_DIGITS = 12  # longer numbers than this in a header are refused before int() sees them

_WHITESPACE = b" \t\n\r\x0b\x0c"
_PPM_SKIP = re.compile(rb"(?:[ \t\n\r\x0b\x0c]|#[^\r\n]*)*")  # whitespace and comments
_PPM_TOKEN = re.compile(rb"[^ \t\n\r\x0b\x0c#]+")


def _fail(name: str, problem: str) -> ImageReadError:
    return ImageReadError(f"{name}: {problem}")


def _check_size(name: str, h: int, w: int) -> None:
    if h < 1 or w < 1:
        raise _fail(name, f"empty image: {w}x{h} pixels")
    if h * w > MAX_PIXELS:
        raise _fail(name, f"image too large: {w}x{h} = {h * w} pixels, over the limit of "
                          f"{MAX_PIXELS} (2^28)")


def _read_exactly(f, n: int, name: str, declared: str) -> bytes:
    data = f.read(n)
    if len(data) != n:  # the size was checked first: only a file that shrank gets here
        raise _fail(name, f"truncated: {declared}, which needs {n} bytes of pixel data; read {len(data)}")
    return data


def _parse_ppm_header(head: bytes, name: str, complete: bool):
    """(width, height, maxval, offset of the raster) from the start of a PPM file. ``complete``: whether
    ``head`` is the whole file (otherwise running off its end means the header is too long)."""
    if len(head) == 0:
        raise _fail(name, "empty file")
    if head[:2] != b"P6" or (len(head) > 2 and head[2:3] not in _WHITESPACE + b"#"):
        magic = head[:2].decode("latin1")
        raise _fail(name, f"not a binary PPM: the file starts with {magic!r}, not 'P6' "
                          "(only binary PPM, P6, is read; ASCII P3 is not)")

    def ran_out(what: str) -> ImageReadError:
        if complete:
            return _fail(name, f"truncated PPM header: the file ends before the {what}")
        return _fail(name, f"PPM header longer than {MAX_HEADER_BYTES} bytes (before the {what})")

    pos, values = 2, []
    for field in ("width", "height", "maxval"):
        pos = _PPM_SKIP.match(head, pos).end()
        if pos >= len(head):
            raise ran_out(field)
        token = _PPM_TOKEN.match(head, pos).group()  # non-empty: head[pos] is neither space nor '#'
        pos += len(token)
        if pos >= len(head) and not complete:
            raise ran_out(field)
        shown = token[:_MAX_DIGITS + 8].decode("latin1")
        if token[:1] == b"-" and token[1:].isdigit():
            raise _fail(name, f"{field} must be positive, got {shown}")
        if not token.isdigit():  # ASCII digits only: no sign, no '_', no '0x', no '1e3'
            raise _fail(name, f"{field} is not a decimal number: {shown!r}")
        if len(token.lstrip(b"0")) > _MAX_DIGITS:
            raise _fail(name, f"{field} is absurdly large: {shown}...")
        values.append(int(token))
    w, h, maxval = values
    if w < 1:
        raise _fail(name, f"width must be positive, got {w}")
    if h < 1:
        raise _fail(name, f"height must be positive, got {h}")
    if not 1 <= maxval <= 65535:
        raise _fail(name, f"maxval must be 1..65535, got {maxval}")
    # Exactly one whitespace character (or a comment with its line end) separates maxval from the raster.
    if pos >= len(head):
        raise ran_out("pixel data")
    if head[pos:pos + 1] == b"#":
        ends = [i for i in (head.find(b"\n", pos), head.find(b"\r", pos)) if i >= 0]
        if not ends:
            raise ran_out("pixel data")
        pos = min(ends)
    return w, h, maxval, pos + 1


def _read_ppm(f, size: int, name: str) -> np.ndarray:
    head = f.read(min(size, MAX_HEADER_BYTES))
    w, h, maxval, offset = _parse_ppm_header(head, name, complete=len(head) >= size)
    _check_size(name, h, w)
    itemsize = 1 if maxval < 256 else 2
    need = h * w * 3 * itemsize
    have = size - offset
    declared = f"the header declares {w}x{h} (maxval {maxval})"
    if have < need:
        raise _fail(name, f"truncated: {declared}, which needs {need} bytes of pixel data; "
                          f"the file has {max(have, 0)}")
    f.seek(offset)
    raw = _read_exactly(f, need, name, declared)
    samples = np.frombuffer(raw, dtype=np.uint8 if itemsize == 1 else ">u2")
    if maxval != 255:
        top = int(samples.max())
        if top > maxval:
            raise _fail(name, f"a sample value {top} exceeds maxval {maxval}")
        samples = ((samples.astype(np.uint32) * 255 + maxval // 2) // maxval).astype(np.uint8)
    else:
        samples = samples.copy()  # writable, owning its memory
    return samples.reshape(h, w, 3)


def _read_npy_header(f, size: int, name: str):
    """(shape, fortran_order, dtype) of a .npy file, parsed by numpy; a bad header is an ImageReadError."""
    from numpy.lib import format as npy_format

    if size == 0:
        raise _fail(name, "empty file")
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    except Exception as e:  # numpy raises ValueError, SyntaxError, TypeError, ... on bad headers
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise _fail(name, f"not a valid .npy file: {reason}") from None
    return shape, fortran, dtype


def _read_npy_payload(f, size: int, name: str, shape, fortran: bool, dtype) -> np.ndarray:
    """The array the header declared, after checking the file holds that many bytes."""
    need = int(np.prod(shape)) * dtype.itemsize
    have = size - f.tell()
    declared = f"the header declares shape {shape}"
    if have < need:
        raise _fail(name, f"truncated: {declared}, which needs {need} bytes of data; "
                          f"the file has {max(have, 0)}")
    arr = np.frombuffer(_read_exactly(f, need, name, declared), dtype=dtype)
    if fortran:
        return np.ascontiguousarray(arr.reshape(shape, order="F"))
    return arr.reshape(shape).copy()


def _read_npy(f, size: int, name: str) -> np.ndarray:
    """An HxWx3 uint8 array from a .npy file; header parsed by numpy, everything else checked here."""
    shape, fortran, dtype = _read_npy_header(f, size, name)
    if dtype != np.dtype(np.uint8):
        raise _fail(name, f"expected an HxWx3 uint8 RGB image, got dtype {dtype}")
    if len(shape) != 3 or shape[2] != 3:
        raise _fail(name, f"expected an HxWx3 uint8 RGB image, got shape {shape}")
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise _fail(name, f"shape {shape} has no pixels: height and width must be positive")
    _check_size(name, h, w)
    return _read_npy_payload(f, size, name, (h, w, 3), fortran, dtype)


def _pillow_image(path: Path, name: str, what: str, without: str):
    """PIL.Image, or the reader's error saying what works without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        suffix = path.suffix.lower() or "extension-less"
        raise _fail(name, f"reading {suffix} {what} needs Pillow (pip install Pillow); without it, "
                          f"{without}") from None
    return Image


def _read_with_pillow(path: Path, name: str) -> np.ndarray:
    Image = _pillow_image(path, name, "images", ".ppm (P6) and .npy (HxWx3 uint8) work")
    try:
        with Image.open(path) as im:
            w, h = im.size
            _check_size(name, h, w)  # before decoding a single pixel
            return np.asarray(im.convert("RGB"))
    except ImageReadError:
        raise
    except MemoryError:
        raise _fail(name, "out of memory while decoding the image") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, struct.error...
        reason = " ".join(str(e).split())[:200]
        raise _fail(name, f"cannot decode the image ({type(e).__name__}{': ' + reason if reason else ''})"
                    ) from None


def _check_regular_file(path: Path, name: str, what: str) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _fail(name, f"{what} not found") from None
    except OSError as e:
        raise _fail(name, f"cannot access the {what}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        article = "an" if what[0] in "aeiou" else "a"
        raise _fail(name, f"is a directory, not {article} {what} file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device could block forever or never end
        raise _fail(name, "not a regular file")


def read_rgb(path) -> np.ndarray:
    """An HxWx3 uint8 RGB array from ``path``; any failure is an ``ImageReadError`` naming the file."""
    path = Path(path)
    name = str(path)
    _check_regular_file(path, name, "image")
    suffix = path.suffix.lower()
    try:
        if suffix in (".npy", ".ppm", ".pnm"):
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                arr = (_read_npy if suffix == ".npy" else _read_ppm)(f, size, name)
        else:
            arr = _read_with_pillow(path, name)
    except OSError as e:  # the file vanished, is unreadable, or an I/O error while reading it
        raise _fail(name, f"cannot read the image: {e.strerror or e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8 or 0 in arr.shape:
        raise _fail(name, f"expected an HxWx3 uint8 RGB image, got {arr.shape} {arr.dtype}")
    return arr


# Pillow modes that hold class ids: greyscale 8/16/32 bit and palette (the indices are the ids).
_LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")
_MAX_LABEL_ITEMSIZE = 4


def _read_npy_label(f, size: int, name: str) -> np.ndarray:
    shape, fortran, dtype = _read_npy_header(f, size, name)
    if dtype.kind not in "iub" or dtype.itemsize > _MAX_LABEL_ITEMSIZE:
        raise _fail(name, f"expected an HxW integer label map, got dtype {dtype}")
    if len(shape) != 2:
        raise _fail(name, f"expected an HxW integer label map, got shape {shape}")
    h, w = int(shape[0]), int(shape[1])
    _check_size(name, h, w)
    return _read_npy_payload(f, size, name, (h, w), fortran, dtype)


def _read_label_with_pillow(path: Path, name: str) -> np.ndarray:
    Image = _pillow_image(path, name, "label maps", ".npy (HxW integers) works")
    try:
        with Image.open(path) as im:
            w, h = im.size
            _check_size(name, h, w)
            if im.mode not in _LABEL_MODES:
                raise _fail(name, f"a label map must be one channel of class ids (greyscale or palette), "
                                  f"got a {im.mode} image")
            return np.array(im)
    except ImageReadError:
        raise
    except MemoryError:
        raise _fail(name, "out of memory while decoding the label map") from None
    except Exception as e:  # Pillow's many exception types, as in _read_with_pillow
        reason = " ".join(str(e).split())[:200]
        raise _fail(name, f"cannot decode the label map ({type(e).__name__}"
                          f"{': ' + reason if reason else ''})") from None


def read_label(path) -> np.ndarray:
    """An HxW integer array of class ids from ``path`` (``.npy``, or PNG etc. with Pillow); any failure
    is an ``ImageReadError`` naming the file."""
    path = Path(path)
    name = str(path)
    _check_regular_file(path, name, "label map")
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as f:
                arr = _read_npy_label(f, os.fstat(f.fileno()).st_size, name)
        else:
            arr = _read_label_with_pillow(path, name)
    except OSError as e:
        raise _fail(name, f"cannot read the label map: {e.strerror or e}") from None
    if arr.ndim != 2 or arr.dtype.kind not in "iub":
        raise _fail(name, f"expected an HxW integer label map, got {arr.shape} {arr.dtype}")
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
