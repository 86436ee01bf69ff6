"""Image readers on bad input: every failure is one ImageReadError naming the file, never a hang, never
a huge allocation, never another exception type. Targeted cases first, then bounded fuzzing with
hypothesis (random bytes, mutated valid PPM and .npy files)."""
import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import warnings
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from hrnet_fast import imageio
from hrnet_fast.imageio import MAX_PIXELS, ImageReadError, read_rgb, write_png


class Hang(BaseException):
    """Raised by time_limit; a BaseException so that no reader's ``except Exception`` can swallow it."""


@contextlib.contextmanager
def time_limit(seconds):
    """Fail (instead of hanging the test run) when the block takes longer than ``seconds``. SIGALRM
    interrupts Python loops and blocking system calls alike; where it is not available (not POSIX, or
    not the main thread) the block runs unguarded."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def read_bytes_as(tmp_dir, name, data):
    """``read_rgb`` of ``data`` written to ``tmp_dir/name``, guarded against hangs."""
    path = os.path.join(tmp_dir, name)
    with open(path, "wb") as f:
        f.write(data)
    with time_limit(5):
        return read_rgb(path)


def assert_read_error(tmp_dir, name, data, *words):
    """Reading ``data`` as ``name`` raises ImageReadError whose message names the file and ``words``."""
    with pytest.raises(ImageReadError) as e:
        read_bytes_as(tmp_dir, name, data)
    msg = str(e.value)
    assert name in msg, msg
    for w in words:
        assert w in msg.lower(), msg
    assert "\n" not in msg, msg
    return msg


def ppm(w, h, maxval=255, payload=None, sep=b"\n"):
    if payload is None:
        payload = bytes((i * 7) % (maxval + 1) for i in range(w * h * 3)) if maxval < 256 else \
            np.arange(w * h * 3, dtype=">u2").tobytes()
    return b"P6" + sep + str(w).encode() + b" " + str(h).encode() + sep + str(maxval).encode() + b"\n" + payload


def npy_bytes(shape_text="(2, 3, 3)", descr="'|u1'", fortran="False", payload=None, version=1):
    """A .npy file built by hand so that its header may say anything."""
    header = f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape_text}, }}".encode("latin1")
    lenbytes = 2 if version == 1 else 4
    pad = -(10 + (lenbytes - 2) + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    return (b"\x93NUMPY" + bytes([version, 0]) + len(header).to_bytes(lenbytes, "little") + header
            + (payload if payload is not None else bytes(range(18))))


# ---------------------------------------------------------------------------------------------------
# PPM, targeted


def assert_truncated_fast_and_small(path):
    """A header declaring a huge image over a 100-byte payload: 'truncated' within 1 s, and no
    allocation near the declared size (traced peak under 4 MiB)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ImageReadError, match="truncated"), time_limit(5):
            read_rgb(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0
    assert peak < 4 << 20, f"peak allocation {peak} bytes for a 100-byte payload"


def test_ppm_round_trip_8bit(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    got = read_bytes_as(tmp_path, "a.ppm", b"P6\n# made by hand\n7 5\n255\n" + img.tobytes())
    assert got.dtype == np.uint8 and got.shape == (5, 7, 3) and (got == img).all()
    # Comments anywhere in the header, also glued to a number, and trailing data after the raster.
    got = read_bytes_as(tmp_path, "b.ppm", b"P6#c\n7#w\n# x\r\n 5\t255#m\n" + img.tobytes() + b"extra")
    assert (got == img).all()


def test_ppm_small_maxval_and_16bit_are_scaled_to_8bit(tmp_path):
    got = read_bytes_as(tmp_path, "m.ppm", ppm(1, 1, 15, bytes([0, 15, 8])))
    assert got.tolist() == [[[0, 255, 136]]]  # round(v * 255 / maxval)
    got = read_bytes_as(tmp_path, "s.ppm", ppm(2, 1, 65535, np.array([0, 65535, 257, 32768, 1, 128],
                                                                     ">u2").tobytes()))
    assert got.tolist() == [[[0, 255, 1], [128, 0, 0]]]
    got = read_bytes_as(tmp_path, "t.ppm", ppm(1, 1, 1000, np.array([1000, 500, 2], ">u2").tobytes()))
    assert got.tolist() == [[[255, 128, 1]]]


@pytest.mark.parametrize("data, words", [
    (b"", ["empty"]),
    (b"P6", ["header"]),
    (b"P6\n", ["header"]),
    (b"P6\n4 4", ["header"]),
    (b"P6\n4 4\n255", ["header"]),
    (b"P6 # a comment that never ends", ["header"]),
    (b"P6\n4 4\n255\n", ["truncated"]),
    (b"P6\n4 4\n255\n" + bytes(47), ["truncated", "48"]),
    (b"P6\n-4 4\n255\n" + bytes(48), ["width", "-4"]),
    (b"P6\n4 -4\n255\n" + bytes(48), ["height"]),
    (b"P6\n0 4\n255\n", ["width"]),
    (b"P6\n4 0\n255\n", ["height"]),
    (b"P6\n4 4\n0\n" + bytes(48), ["maxval"]),
    (b"P6\n4 4\n65536\n" + bytes(96), ["maxval"]),
    (b"P6\n4 4\n-1\n" + bytes(48), ["maxval"]),
    (b"P6\n+4 4\n255\n" + bytes(48), ["width"]),
    (b"P6\n1_0 4\n255\n" + bytes(120), ["width"]),
    (b"P6\n0x4 4\n255\n" + bytes(48), ["width"]),
    (b"P6\n4.0 4\n255\n" + bytes(48), ["width"]),
    (b"P64 4\n255\n" + bytes(48), ["p6"]),
    (b"P3\n1 1\n255\n0 0 0\n", ["p6"]),
    (b"\x89PNG\r\n\x1a\n", ["p6"]),
    (b"P6\n1 1\n7\n" + bytes([0, 8, 0]), ["maxval", "8"]),
    (b"P6\n100000 100000\n255\n" + bytes(10), ["too large"]),
    (b"P6\n99999999999999999999999 1\n255\n", ["width"]),
])
def test_ppm_bad_files_raise_one_error_naming_the_file(tmp_path, data, words):
    assert_read_error(tmp_path, "bad.ppm", data, *words)


def test_ppm_huge_header_with_tiny_payload_fails_fast_without_allocating(tmp_path):
    side = 16383  # 2^28 - a little: under the pixel cap, so only the payload check can stop it
    assert side * side <= MAX_PIXELS
    path = tmp_path / "huge.ppm"
    path.write_bytes(f"P6\n{side} {side}\n255\n".encode() + bytes(100))
    for data in (path.read_bytes(), f"P6\n{side} {side}\n65535\n".encode() + bytes(100)):
        path.write_bytes(data)
        assert_truncated_fast_and_small(path)


def test_header_longer_than_the_limit_is_an_error_not_a_scan_of_the_file(tmp_path):
    data = b"P6\n#" + b"x" * (imageio.MAX_HEADER_BYTES + 10) + b"\n1 1\n255\n" + bytes(3)
    assert_read_error(tmp_path, "long.ppm", data, "header")


# ---------------------------------------------------------------------------------------------------
# .npy, targeted


def test_npy_round_trip_and_fortran_order(tmp_path):
    img = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    for arr in (img, np.asfortranarray(img)):
        buf = io.BytesIO()
        np.save(buf, arr)
        got = read_bytes_as(tmp_path, "a.npy", buf.getvalue())
        assert got.shape == (4, 6, 3) and got.flags.c_contiguous and (got == img).all()


@pytest.mark.parametrize("data, words", [
    (b"", ["empty"]),
    (b"\x93NUMPY", ["npy"]),
    (b"not an npy file at all", ["npy"]),
    (npy_bytes()[:20], ["npy"]),
    (npy_bytes(payload=bytes(17)), ["truncated", "18"]),
    (npy_bytes(payload=b""), ["truncated"]),
    (npy_bytes("(-2, 3, 3)"), ["shape"]),
    (npy_bytes("(0, 3, 3)"), ["shape"]),
    (npy_bytes("(2, 3)"), ["hxwx3"]),
    (npy_bytes("(2, 3, 4)"), ["hxwx3"]),
    (npy_bytes("(1, 2, 3, 3)"), ["hxwx3"]),
    (npy_bytes(descr="'<f4'"), ["uint8"]),
    (npy_bytes(descr="'|O'"), ["uint8"]),
    (npy_bytes(descr="[('a', '|u1')]"), ["uint8"]),
    (npy_bytes("(100000, 100000, 3)"), ["too large"]),
    (npy_bytes("'abc'"), ["npy"]),
    (npy_bytes(descr="'nonsense'"), ["npy"]),
    (npy_bytes(fortran="'yes'"), ["npy"]),
])
def test_npy_bad_files_raise_one_error_naming_the_file(tmp_path, data, words):
    assert_read_error(tmp_path, "bad.npy", data, *words)


def test_npy_huge_header_with_tiny_payload_fails_fast_without_allocating(tmp_path):
    path = tmp_path / "huge.npy"
    path.write_bytes(npy_bytes("(16383, 16383, 3)", payload=bytes(100)))
    assert_truncated_fast_and_small(path)


# ---------------------------------------------------------------------------------------------------
# Paths and Pillow


def test_missing_file_directory_and_fifo(tmp_path):
    with pytest.raises(ImageReadError, match="not found") as e:
        read_rgb(tmp_path / "nope.ppm")
    assert "nope.ppm" in str(e.value)
    (tmp_path / "dir.ppm").mkdir()
    with pytest.raises(ImageReadError, match="directory"):
        read_rgb(tmp_path / "dir.ppm")
    if hasattr(os, "mkfifo"):  # reading a FIFO nobody writes to would block forever
        os.mkfifo(tmp_path / "fifo.ppm")
        with pytest.raises(ImageReadError, match="not a regular file"), time_limit(5):
            read_rgb(tmp_path / "fifo.ppm")


def test_cli_reader_does_not_hang_on_an_empty_ppm(tmp_path):
    """End to end in a child process with a timeout, so that a hang fails the test instead of hanging it."""
    for name, data in (("empty.ppm", b""), ("magic.ppm", b"P6"), ("hdr.ppm", b"P6\n3 3\n255")):
        (tmp_path / name).write_bytes(data)
    code = textwrap.dedent("""
        import sys
        from hrnet_fast.imageio import read_rgb
        for path in sys.argv[1:]:
            try:
                read_rgb(path)
            except Exception as e:
                print(type(e).__name__, e, flush=True)
    """)
    try:
        r = subprocess.run([sys.executable, "-c", code] + [str(tmp_path / n) for n in
                                                           ("empty.ppm", "magic.ppm", "hdr.ppm")],
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"read_rgb hangs on a short PPM (output so far: {e.stdout!r})")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 3, r.stdout + r.stderr
    for line, name in zip(lines, ("empty.ppm", "magic.ppm", "hdr.ppm")):
        assert line.startswith("ImageReadError") and name in line, line


class _FakeImage:
    def __init__(self, size, mode="RGB", fail_on=None, exc=None):
        self.size, self.mode, self.fail_on, self.exc = size, mode, fail_on, exc

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def convert(self, mode):
        if self.fail_on == "convert":
            raise self.exc
        return np.zeros((self.size[1], self.size[0], 3), np.uint8)


def _fake_pil(monkeypatch, open_fn):
    import types
    pil = types.ModuleType("PIL")
    pil.Image = types.SimpleNamespace(open=open_fn)
    monkeypatch.setitem(sys.modules, "PIL", pil)
    monkeypatch.setitem(sys.modules, "PIL.Image", pil.Image)


@pytest.mark.parametrize("exc", [OSError("cannot identify image file"), SyntaxError("not a PNG"),
                                 ValueError("bad"), EOFError(), RuntimeError("decompression bomb"),
                                 __import__("struct").error("unpack requires a buffer")])
@pytest.mark.parametrize("where", ["open", "convert"])
def test_pillow_errors_become_image_read_errors(tmp_path, monkeypatch, exc, where):
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG garbage")

    def open_fn(p):
        if where == "open":
            raise exc
        return _FakeImage((4, 3), fail_on="convert", exc=exc)

    _fake_pil(monkeypatch, open_fn)
    with pytest.raises(ImageReadError) as e:
        read_rgb(path)
    assert "x.png" in str(e.value) and "\n" not in str(e.value)


def test_pillow_huge_declared_size_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG garbage")
    _fake_pil(monkeypatch, lambda p: _FakeImage((100000, 100000), fail_on="convert",
                                                exc=AssertionError("decoded anyway")))
    with pytest.raises(ImageReadError, match="too large"):
        read_rgb(path)


def test_without_pillow_png_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG")
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL -> ImportError
    with pytest.raises(ImageReadError, match="Pillow") as e:
        read_rgb(path)
    assert "x.png" in str(e.value)


def test_real_pillow_on_a_truncated_png(tmp_path):
    pytest.importorskip("PIL")
    img = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    write_png(tmp_path / "ok.png", img)
    assert (read_rgb(tmp_path / "ok.png") == img).all()
    data = (tmp_path / "ok.png").read_bytes()
    for n in (0, 8, 20, 40, len(data) // 2, len(data) * 3 // 4):
        assert_read_error(tmp_path, f"cut{n}.png", data[:n])


# ---------------------------------------------------------------------------------------------------
# Fuzzing, bounded to a few seconds in all: 120 examples per test, a 2 s deadline per example (each
# takes about a millisecond; time_limit fails a hang at 5 s), no shrinking (a hanging example would be
# retried again and again while shrinking) and no example database.

FUZZ = settings(max_examples=120, deadline=timedelta(seconds=2), database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

WEIRD_NUMBERS = [b"-1", b"0", b"-0", b"+3", b"3.0", b"1e3", b"0x10", b"1_0", b"", b"#", b"4294967296",
                 b"99999999999999999999", b"65536", b"256", b"\xd9\xa3", b"3 3", b"16383"]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fuzz"))


def check_decodes_or_raises(fuzz_dir, name, data, expansion=1):
    """The fuzz property: an HxWx3 uint8 image, or ImageReadError naming the file; nothing else, not
    even a warning (numpy's divide-by-zero warning, say, would mean a header field went unchecked).
    The image holds at most ``expansion`` bytes per byte of the file: 1 for the uncompressed formats
    (PPM, .npy), more for PNG, whose deflate stream may expand up to 1032-fold and whose grey or
    palette pixels come out as 3 bytes (a plain 6x6 grey PNG of 103 bytes decodes to 108)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            arr = read_bytes_as(fuzz_dir, name, data)
    except ImageReadError as e:
        assert name in str(e) and "\n" not in str(e), str(e)
        return None
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert arr.shape[0] >= 1 and arr.shape[1] >= 1 and arr.nbytes <= expansion * len(data)
    return arr


@st.composite
def ppm_and_pixels(draw):
    w, h = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    maxval = draw(st.sampled_from([1, 7, 255, 256, 1000, 65535]))
    samples = np.array(draw(st.lists(st.integers(0, maxval), min_size=w * h * 3, max_size=w * h * 3)))
    seps = [b" ", b"\n", b"\t", b"\r\n", b"\n# c\n", b" #x\r", b"\x0b", b"\x0c"]
    tokens = [b"P6", str(w).encode(), str(h).encode(), str(maxval).encode()]
    header = tokens[0]
    for t in tokens[1:]:
        header += draw(st.sampled_from(seps)) + t
    raster = samples.astype(">u2" if maxval > 255 else np.uint8).tobytes()
    want = ((samples * 255 + maxval // 2) // maxval).astype(np.uint8).reshape(h, w, 3)
    return header + draw(st.sampled_from([b"\n", b" ", b"\r", b"\t"])) + raster, want


@st.composite
def mutations(draw, data):
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "number"]))
        i = draw(st.integers(0, len(data)))
        if op == "truncate":
            del data[i:]
        elif op == "flip" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 8))]
        elif op == "number":  # replace the first run of digits at or after i with a strange number
            j = next((k for k in range(i, len(data)) if 48 <= data[k] <= 57), None)
            if j is not None:
                k = j
                while k < len(data) and 48 <= data[k] <= 57:
                    k += 1
                data[j:k] = draw(st.sampled_from(WEIRD_NUMBERS))
    return bytes(data)


@FUZZ
@given(st.binary(max_size=64), st.sampled_from([b"", b"P6", b"P6\n", b"P6 3 3 ", b"\x93NUMPY\x01\x00"]),
       st.sampled_from(["r.ppm", "r.npy"]))
def test_fuzz_random_bytes(fuzz_dir, tail, prefix, name):
    check_decodes_or_raises(fuzz_dir, name, prefix + tail)


@FUZZ
@given(ppm_and_pixels())
def test_fuzz_valid_ppm_round_trips(fuzz_dir, case):
    data, want = case
    got = check_decodes_or_raises(fuzz_dir, "v.ppm", data)
    assert got is not None and (got == want).all()


# Header numbers that no valid PPM has: a reader that accepts one of them has a hole in its checks.
INVALID_NUMBERS = [b"-1", b"-3", b"0", b"-0", b"+3", b"3.0", b"1e3", b"0x10", b"1_0", b"\xd9\xa3",
                   b"4294967296", b"99999999999999999999"]


@FUZZ
@given(st.data())
def test_fuzz_invalid_header_numbers_are_refused(fuzz_dir, data):
    w, h = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    maxval = data.draw(st.sampled_from([1, 255, 1000, 65535]))
    fields = [str(w).encode(), str(h).encode(), str(maxval).encode()]
    which = data.draw(st.sets(st.integers(0, 2), min_size=1))
    for i in which:
        fields[i] = data.draw(st.sampled_from(INVALID_NUMBERS + ([b"65536", b"100000"] if i == 2 else [])))
    raster = bytes(w * h * 3 * (2 if maxval > 255 else 1) * data.draw(st.sampled_from([1, 2, 4])))
    ppm_data = b"P6\n" + fields[0] + b" " + fields[1] + b"\n" + fields[2] + b"\n" + raster
    arr = check_decodes_or_raises(fuzz_dir, "h.ppm", ppm_data)
    assert arr is None, f"decoded a PPM whose header has {[fields[i] for i in sorted(which)]}"


@FUZZ
@given(st.data())
def test_fuzz_mutated_ppm(fuzz_dir, data):
    valid, _ = data.draw(ppm_and_pixels())
    check_decodes_or_raises(fuzz_dir, "m.ppm", data.draw(mutations(valid)))


@st.composite
def npy_files(draw):
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.uint8, np.uint8, np.float32, np.int16]))
    shape = draw(st.sampled_from([(h, w, 3), (h, w, 3), (h, w), (h, w, 4), (h, w, 3, 1)]))
    arr = (np.arange(int(np.prod(shape))) % 251).astype(dtype).reshape(shape)
    if draw(st.booleans()):
        arr = np.asfortranarray(arr)
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@FUZZ
@given(st.data())
def test_fuzz_mutated_npy(fuzz_dir, data):
    base = data.draw(npy_files())
    if data.draw(st.booleans()):  # a header that says something else, with a consistent length field
        shape = data.draw(st.sampled_from(["(-1, 2, 3)", "(2, 2, 3)", "(16383, 16383, 3)", "(2**40, 1, 3)",
                                           "()", "(1,)*40", "[2, 2, 3]", "(2, 2, 3.0)", "(True, 1, 3)"]))
        base = npy_bytes(shape, payload=bytes(12))
    check_decodes_or_raises(fuzz_dir, "m.npy", data.draw(mutations(base)))


@pytest.mark.skipif(__import__("importlib").util.find_spec("PIL") is None, reason="needs Pillow")
def test_small_grey_png_decodes_to_more_bytes_than_its_file(fuzz_dir):
    """The case the fuzz test once drew and wrongly failed (its bound was 1 byte per file byte):
    PNG compresses, and grey comes out as RGB."""
    path = os.path.join(fuzz_dir, "grey.png")
    write_png(path, np.arange(36, dtype=np.uint8).reshape(6, 6) * 3)
    with open(path, "rb") as f:
        data = f.read()
    arr = check_decodes_or_raises(fuzz_dir, "g.png", data, expansion=3 * 1032)
    assert arr.shape == (6, 6, 3) and arr.nbytes > len(data)


@pytest.mark.skipif(__import__("importlib").util.find_spec("PIL") is None, reason="needs Pillow")
@FUZZ
@given(st.data())
def test_fuzz_mutated_png_through_pillow(fuzz_dir, data):
    h, w = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    img = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
    path = os.path.join(fuzz_dir, "base.png")
    write_png(path, img if data.draw(st.booleans()) else img[..., 0])
    with open(path, "rb") as f:
        base = f.read()
    check_decodes_or_raises(fuzz_dir, "m.png", data.draw(mutations(base)), expansion=3 * 1032)
