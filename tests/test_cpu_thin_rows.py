"""The row-pair format of the thin conv kernel (csrc/cpu_conv_thin.cpp: conv3x3_thin_rows_from,
conv3x3_thin_rows, conv3x3_thin_rows_into; the AVX2 variant csrc/cpu_conv_thin_avx2.cpp) and the
torch backend's row-pair chains (TorchCPU._blocks_rows in hrnet_fast/backends/torch_cpu.py).

The format is the AVX2 variant's: where torch's CPU capability is not AVX2 (AVX-512 CPUs, or no
AVX) or the kernels are not built, every test here is skipped with the reason, and the format is
then NOT tested (the planar chains of tests/test_cpu_conv_thin.py run there instead).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from helpers import (bn_model, failing_from_call, planted_failure_messages, poisoned_malloc,
                     require_cpu_kernels, seeded_cl, spy_calls, torch_threads)
from oracles import assert_close_to_oracle, assert_model_close, conv_oracle

from hrnet_fast import cpu_ext, optimize
from hrnet_fast.backends import torch_cpu
from hrnet_fast.reference import HighResolutionNet

CL = torch.channels_last
OPS = None  # torch.ops.hrnet_fast_cpu once built


@pytest.fixture(scope="module")
def built():
    require_cpu_kernels("the thin conv kernel's row-pair format")
    if not cpu_ext.thin_rows_supported():
        pytest.skip("torch's CPU capability is not AVX2: the row-pair format (AVX2 only) is NOT "
                    "tested here")
    global OPS
    OPS = torch.ops.hrnet_fast_cpu


def _weights(ci, co, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(co, ci, 3, 3, generator=g) / (3 * ci ** 0.5), torch.randn(co, generator=g)


def _padding_is_zero(rows, width):
    """The entries of a row-pair tensor that hold no pixel are exactly 0, as readers need."""
    a, b = rows[:, :, :, 0], rows[:, :, :, 1]
    return bool((a[..., 0] == 0).all() and (a[..., width // 2 + 1:] == 0).all()
                and (b[..., (width + 1) // 2:] == 0).all())


# (N, Ci, Co, H, W): odd and even heights and widths, one and two columns, one row, batch 2-3,
# channel counts off the register tiles (5, 7), w18's 18/36, a row that needs a 64-tile block plus
# leftovers (W 130: 65 tiles), and more than one 8-tile vector per row.
SHAPES = [(1, 5, 7, 7, 9), (2, 18, 18, 5, 13), (1, 32, 32, 9, 1), (2, 8, 16, 4, 2),
          (1, 36, 18, 11, 130), (1, 64, 64, 6, 48), (3, 16, 24, 1, 17)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_format_matches_the_kernel_bit_for_bit(built, shape):
    """Every combination of input (channels_last, NCHW or row-pair), residual (none or row-pair)
    and output (channels_last or row-pair), with and without bias and ReLU, computes the values
    of conv3x3_thin with a channels_last residual exactly (same operations, same order), and a
    row-pair output keeps its padding 0. One case is also held to the float64 oracle."""
    n, ci, co, h, w = shape
    x, r = seeded_cl((n, ci, h, w), 1), seeded_cl((n, co, h, w), 2)
    wt, b = _weights(ci, co, 3)
    packed = cpu_ext.conv3x3_thin_pack(wt, winograd=True)
    xr, rr = cpu_ext.conv3x3_thin_rows_from(x), cpu_ext.conv3x3_thin_rows_from(r)
    assert xr.shape == (n, h, ci, 2, cpu_ext.rows_pitch(w)) and _padding_is_zero(xr, w)
    for bias, relu in itertools.product([b, None], [True, False]):
        for res, res_rows in ((None, None), (r, rr)):
            ref = cpu_ext.conv3x3_thin_cpu(x, packed, bias, res, relu=relu)
            for inp, out_rows in itertools.product((x, x.contiguous(), xr), (False, True)):
                out = cpu_ext.conv3x3_thin_rows_cpu(inp, packed, bias, res_rows, relu=relu,
                                                    width=w, out_rows=out_rows)
                what = f"input {tuple(inp.shape)}, residual {res is not None}, out_rows {out_rows}"
                if out_rows:
                    assert _padding_is_zero(out, w), what
                    out = cpu_ext.rows_to_tensor(out, w)
                assert torch.equal(out, ref), what
    oracle = conv_oracle(x.double(), wt.double(), b.double(), 1, 1, r.double(), relu=True)
    out = cpu_ext.conv3x3_thin_rows_cpu(xr, packed, b, rr, relu=True, width=w, out_rows=True)
    assert_close_to_oracle(cpu_ext.rows_to_tensor(out, w), oracle, dtype=torch.float32,
                           what=f"row-pair conv {shape}")


@pytest.mark.parametrize("layout", ["cl", "nchw", "cl_slice", "nchw_cols"])
def test_rows_from_and_back(built, layout):
    """conv3x3_thin_rows_from reads any strides (transposes, copies, gathers) into the format, and
    rows_to_tensor gives the tensor back exactly."""
    base = seeded_cl((2, 20, 7, 22), 4)
    x = {"cl": base, "nchw": base.contiguous(), "cl_slice": base[:, 3:17],
         "nchw_cols": base.contiguous()[..., ::2]}[layout]
    rows = cpu_ext.conv3x3_thin_rows_from(x)
    w = x.shape[-1]
    assert rows.shape == (2, 7, x.shape[1], 2, cpu_ext.rows_pitch(w)) and _padding_is_zero(rows, w)
    assert torch.equal(cpu_ext.rows_to_tensor(rows, w), x)


def test_the_kernel_writes_every_entry(built):
    """Row-pair outputs on poisoned heap memory (every fresh float 3.4e38): each entry, padding
    included, is written, and the values still match."""
    x = seeded_cl((2, 12, 7, 19), 5)
    wt, b = _weights(12, 16, 5)
    packed = cpu_ext.conv3x3_thin_pack(wt, winograd=True)
    xr = cpu_ext.conv3x3_thin_rows_from(x)
    ref = cpu_ext.conv3x3_thin_cpu(x, packed, b, relu=False)
    with poisoned_malloc(), torch_threads(2):
        out = cpu_ext.conv3x3_thin_rows_cpu(xr, packed, b, relu=False, width=19, out_rows=True)
    assert _padding_is_zero(out, 19)
    assert torch.equal(cpu_ext.rows_to_tensor(out, 19), ref)


def test_into_residual_writes_the_residual(built):
    x, r = seeded_cl((1, 18, 9, 11), 6), seeded_cl((1, 18, 9, 11), 7)
    wt, b = _weights(18, 18, 6)
    packed = cpu_ext.conv3x3_thin_pack(wt, winograd=True)
    xr, rr = cpu_ext.conv3x3_thin_rows_from(x), cpu_ext.conv3x3_thin_rows_from(r)
    ref = cpu_ext.conv3x3_thin_cpu(x, packed, b, r, relu=True)
    out = cpu_ext.conv3x3_thin_rows_cpu(xr, packed, b, rr, relu=True, width=11, out_rows=True,
                                        into_residual=True)
    assert out is rr and _padding_is_zero(rr, 11)
    assert torch.equal(cpu_ext.rows_to_tensor(rr, 11), ref)


def test_nan_propagates(built):
    """A NaN input pixel reaches exactly the outputs whose 3x3 window holds it (through the ReLU),
    in both output formats, and never the row-pair padding."""
    x = seeded_cl((1, 18, 8, 9), 8)
    x[0, 4, 3, 8] = float("nan")  # the last column of an odd width: the last tile's odd lane
    wt, b = _weights(18, 18, 8)
    packed = cpu_ext.conv3x3_thin_pack(wt, winograd=True)
    expected = torch.isnan(conv_oracle(x.double(), wt.double(), b.double(), 1, 1))
    assert int(expected.sum()) == 18 * 3 * 2
    xr = cpu_ext.conv3x3_thin_rows_from(x)
    for out_rows in (False, True):
        out = cpu_ext.conv3x3_thin_rows_cpu(xr, packed, b, relu=True, width=9, out_rows=out_rows)
        if out_rows:
            assert _padding_is_zero(out, 9)
            out = cpu_ext.rows_to_tensor(out, 9)
        assert torch.equal(torch.isnan(out), expected)


def test_opcheck(built):
    """Schema, fake kernels (shapes, layouts) and dispatch agree with the real kernels."""
    x = seeded_cl((2, 18, 5, 21), 9)
    wt, b = _weights(18, 24, 9)
    packed = cpu_ext.conv3x3_thin_pack(wt, winograd=True)
    xr = cpu_ext.conv3x3_thin_rows_from(x)
    rr = cpu_ext.conv3x3_thin_rows_from(seeded_cl((2, 24, 5, 21), 10))
    torch.library.opcheck(OPS.conv3x3_thin_rows_from.default, (x,))
    for inp, res, out_rows in ((x, None, True), (xr, rr, False), (xr, rr, True)):
        torch.library.opcheck(OPS.conv3x3_thin_rows.default,
                              (inp, packed, b, res, True, 21, out_rows))
    torch.library.opcheck(OPS.conv3x3_thin_rows_into.default,
                          (rr.clone(), xr, packed, None, False, 21))


@pytest.mark.parametrize("bad,match", [
    ("pitch", "x must be a contiguous float32 CPU row-pair tensor \\[1, 6, 18, 2, 16\\]"),
    ("channels", "x must be a contiguous float32 CPU row-pair tensor"),
    ("width", "width 8 does not match x's 7"),
    ("direct", "takes Winograd weights"),
    ("residual_4d", "residual must be a contiguous float32 CPU row-pair tensor"),
    ("bias", "bias must be float32 \\[18\\]"),
    ("alias", "must not share memory with x"),
    ("dtype", "x must be a 4-d float32 CPU tensor or a row-pair tensor"),
])
def test_bad_input_gets_one_clear_error(built, bad, match):
    x = seeded_cl((1, 18, 6, 7), 11)
    wt, b = _weights(18, 18, 11)
    packed = cpu_ext.conv3x3_thin_pack(wt, winograd=True)
    xr = cpu_ext.conv3x3_thin_rows_from(x)
    inp, res, width, into = xr, None, 7, False
    if bad == "pitch":
        inp = torch.zeros(1, 6, 18, 2, 24)
    elif bad == "channels":
        inp = cpu_ext.conv3x3_thin_rows_from(x[:, :17])
    elif bad == "width":
        inp, width = x, 8
    elif bad == "direct":
        packed = cpu_ext.conv3x3_thin_pack(wt, winograd=False)
    elif bad == "residual_4d":
        res = x
    elif bad == "bias":
        b = b[:5]
    elif bad == "alias":
        res, into = xr, True
    else:
        inp = x.double()
    with pytest.raises(RuntimeError, match=match):
        cpu_ext.conv3x3_thin_rows_cpu(inp, packed, b, res, relu=True, width=width,
                                      out_rows=True, into_residual=into)


# ------------------------------------------------------------------------- the torch backend
@pytest.fixture
def rows_calls(built, monkeypatch):
    """Every row-pair conv the engine runs, as (x in the format, out_rows, into_residual), on two
    torch threads: whether a layer takes the row-pair kernel depends on the thread count
    (``thin_row_pays``: a row for every thread), and these tests' sizes are chosen for two (on one
    thread, as under ``pytest -n``, w18_small_v2 at 64x80 would run no row-pair conv at all)."""
    monkeypatch.setitem(torch_cpu._THIN, "on", True)
    monkeypatch.setitem(torch_cpu._ROWS, "on", True)
    calls = spy_calls(monkeypatch, "conv3x3_thin_rows_cpu", lambda x, *args, **kwargs: (
        x.dim() == 5, kwargs["out_rows"], kwargs.get("into_residual", False)))
    with torch_threads(2):
        yield calls


@pytest.mark.parametrize("preset,mode,head,size", [
    ("w18_small_v2", "bilinear", "seg", (2, 3, 75, 101)),
    ("w18_small_v2", "nearest", "seg", (1, 3, 64, 96)),
    ("w18", "bilinear", "seg", (1, 3, 47, 61)),
    ("w32", "nearest", "pose", (1, 3, 256, 192))])
def test_engine_chains_match_the_reference(rows_calls, preset, mode, head, size):
    """Whole engines whose thin chains keep their intermediates in the row-pair format, against
    the float64 reference: odd sizes, batch 2, both upsampling modes, randomized BatchNorm. Every
    chain reads its channels_last input once; each conv reads the format, block outputs
    accumulate into the block input, and only a chain's last conv writes channels_last."""
    model = bn_model(preset, mode, head)
    x = torch.randn(*size, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        out = optimize(model, backend="torch")(x)
        ref64 = HighResolutionNet.forward(model.double(), x.double())
    assert_model_close(out, ref64, dtype=torch.float32, what=f"{preset} {head} {mode} {size}")
    assert rows_calls and all(x_rows for x_rows, *_ in rows_calls)
    last = [c for c in rows_calls if not c[1]]
    into = [c for c in rows_calls if c[2]]
    # per chain of B blocks: B convs into the format, B - 1 accumulating, one writing channels_last
    assert last and into and len(rows_calls) == 2 * (len(into) + len(last))


def test_row_pair_chains_against_planar_chains(rows_calls, monkeypatch):
    """The same engine with the row-pair chains switched off (planar chains) agrees to float32
    rounding; the switch really changes the path."""
    model = bn_model("w18_small_v2")
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(12))
    engine = optimize(model, backend="torch")
    with torch.inference_mode():
        on = engine(x)
        count = len(rows_calls)
        assert count
        monkeypatch.setitem(torch_cpu._ROWS, "on", False)
        off = engine(x)
    assert len(rows_calls) == count
    assert_model_close(on, off.double(), dtype=torch.float32, what="row-pair against planar")


@pytest.mark.parametrize("shape,fits", [((8, 32, 64, 48), True), ((1, 18, 128, 256), True),
                                        ((8, 64, 32, 24), False), ((8, 256, 8, 6), False)])
def test_packed_rows_keep_the_planar_chain(built, shape, fits):
    """Rows the kernel packs (several row pairs side by side: narrow pose rows) keep the planar
    chain; the others take the row-pair format."""
    with torch_threads(2):
        assert torch_cpu.thin_rows_fit(torch.empty(shape)) is fits


@pytest.mark.parametrize("fail_at", [1, 3])
def test_a_failing_kernel_warns_once_and_onednn_answers(rows_calls, monkeypatch, fail_at):
    """The row-pair conv raising at a chain's start or in its middle (call 3: after a block's
    input was accumulated into): one RuntimeWarning, the thin kernel off for the process, and the
    model's values unchanged (the chain's rest runs in oneDNN from the row-pair state)."""
    failing = failing_from_call(rows_calls, cpu_ext.conv3x3_thin_rows_cpu, fail_at)
    messages = planted_failure_messages(monkeypatch, "conv3x3_thin_rows_cpu", failing,
                                        f"failure at call {fail_at}")
    assert len(messages) == 1 and "planted failure" in messages[0] and "switched off" in messages[0]
    assert torch_cpu._THIN["on"] is False and len(rows_calls) == fail_at - 1
