"""The kernel benchmarks' shapes (recorded from the plan, benchmarks/kernel_ab.py) against what the
architecture implies, derived here independently; their listings and the shared runner on the CPU."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import bench_conv_kernels  # noqa: E402
import bench_fuse_kernels  # noqa: E402
import kernel_ab  # noqa: E402
from hrnet_fast.backends.recording import TensorInfo  # noqa: E402

W18_INPUT = (1, 3, 1024, 2048)
W18_WIDTHS = {8: (24, 40, 72, 144), 1: (18, 36, 72, 144)}  # padded to multiples of 8, and raw
MODULES_PER_STAGE = {2: 1, 3: 4, 4: 3}  # w18: stage s has s branches


def _halve(size):
    return tuple((s + 1) // 2 for s in size)  # a 3x3 stride-2 conv, padding 1


def _branch_sizes(height, width):
    size = _halve(_halve((height, width)))  # the stem halves twice: branch 0 at 1/4
    sizes = [size]
    for _ in range(3):
        sizes.append(_halve(sizes[-1]))
    return sizes


def _expected_slice(widths, nb, i, j):
    """Where the plan puts contribution j -> i: j > i, source j's 1x1 convs to targets 0..j-1
    stacked; j = i - 1, the first convs of source j's chains to targets j+1..nb-1 stacked (the
    one-conv chain to j+1 first, the others carry C_j channels); j < i - 1, a chain's own last
    conv (dense). With widths that are all multiples of the alignment, a split starts where the
    previous one ends."""
    if j > i:
        stacked = list(widths[:j])
        start = sum(widths[:i])
    elif j == i - 1:
        stacked = [widths[j + 1]] + [widths[j]] * (nb - j - 2)
        start = 0
    else:
        return None
    return None if len(stacked) == 1 else (sum(stacked), start)


@pytest.mark.parametrize("multiple", [8, 1])
def test_w18_fuse_and_head_cases_follow_the_architecture(multiple):
    widths = W18_WIDTHS[multiple]
    sizes = _branch_sizes(*W18_INPUT[2:])
    cases = bench_fuse_kernels.build_cases(["w18"], [W18_INPUT], channel_multiple=multiple)
    fuses = [c for c in cases if c.kind == "fuse"]
    heads = [c for c in cases if c.kind == "head"]

    expected = {}
    for nb, modules in MODULES_PER_STAGE.items():
        for i in range(nb):
            others = [j for j in range(nb) if j != i]  # the engine's order: sources ascending
            expected[f"stage{nb} ->b{i}"] = (
                (1, widths[i]) + sizes[i],
                tuple((1, widths[i]) + (sizes[j] if j > i else sizes[i]) for j in others),
                tuple(_expected_slice(widths, nb, i, j) for j in others),
                modules)
    got = {c.name.split(" ", 2)[2]: (c.base, c.contributions, c.slices, c.calls_per_forward)
           for c in fuses}
    assert got == expected
    assert sum(c.calls_per_forward for c in fuses) == 26  # 1 x 2 + 4 x 3 + 3 x 4
    assert all(len(c.contributions) == int(c.name.split("stage")[1][0]) - 1 for c in fuses)
    assert all(c.name.startswith("w18 1x3x1024x2048 ") for c in cases)

    head_width = -(-(18 + 36 + 72 + 144) // multiple) * multiple  # 272 padded, 270 raw
    assert len(heads) == 1 and heads[0].calls_per_forward == 1 and heads[0].classes == 19
    assert heads[0].base == (1, head_width) + sizes[0]
    assert heads[0].contributions == tuple((1, head_width) + s for s in sizes[1:])
    assert heads[0].slices == (None, None, None)

    slices = [s for c in fuses for s in c.slices if s is not None]
    assert len(slices) == 10  # stage3: 3 of 6 contributions, stage4: 7 of 12
    if multiple == 8:
        assert all(start % 8 == 0 for _, start in slices)


def test_dense_option_drops_the_slices():
    cases = bench_fuse_kernels.build_cases(["w18_small_v1"], [(1, 3, 64, 96)], model_layout=False)
    assert cases and all(c.slices == () for c in cases)


def test_channel_slice_reads_the_layout_of_real_tensors():
    wide = torch.empty(2, 64, 5, 7).contiguous(memory_format=torch.channels_last)
    assert kernel_ab.channel_slice(TensorInfo.of(wide[:, 24:64])) == (64, 24)
    assert kernel_ab.channel_slice(TensorInfo.of(wide[:, 0:40])) == (64, 0)
    assert kernel_ab.channel_slice(TensorInfo.of(wide)) is None
    tall = torch.empty(1, 64, 5, 1).contiguous(memory_format=torch.channels_last)  # W = 1, N = 1
    assert kernel_ab.channel_slice(TensorInfo.of(tall[:, 8:16])) == (64, 8)
    with pytest.raises(ValueError, match="not a channel slice"):
        kernel_ab.channel_slice(TensorInfo.of(torch.empty(2, 64, 5, 7)[:, 8:16]))  # NCHW


def test_fuse_listing_runs_on_the_cpu(capsys):
    assert bench_fuse_kernels.main(["--list", "--presets", "w18_small_v1",
                                    "--inputs", "1x3x64x96"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # w18_small_v1: one module per stage, every output fused (2 + 3 + 4), then the head.
    assert len(lines) == 10
    assert lines[0].startswith("w18_small_v1 1x3x64x96 stage2 ->b0")
    assert "head" in lines[-1] and "K19" in lines[-1]


def test_unknown_preset_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench_fuse_kernels.main(["--list", "--presets", "w18,w99"])
    assert "w99" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_conv_kernels.main(["--list", "--presets", "w99", "--size", "64x96"])
    assert "w99" in capsys.readouterr().err


def test_conv_listing_and_chains_follow_the_architecture(capsys):
    assert bench_conv_kernels.main(["--list", "--presets", "w18_small_v1", "--size", "64x96"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    shapes = bench_conv_kernels.build_shapes("w18_small_v1", 64, 96, 1)
    chains = bench_conv_kernels.build_chains("w18_small_v1", 64, 96, 1)
    blocks = bench_conv_kernels.build_blocks("w18_small_v1", 64, 96, 1)
    assert len(lines) == len(shapes) + len(chains) + len(blocks)
    assert all(line.startswith("w18_small_v1 {'name': ") for line in lines)
    # Convs of one forward, counted from the architecture: stem 2; layer1 one Bottleneck with
    # downsample 4; transitions 2 + 1 + 1; branch blocks (2 BasicBlocks of 2 convs per branch)
    # 8 + 12 + 16; fuse convs: stage2 2, stage3 4 + 1 chain step, stage4 6 + 4 chain steps; head
    # projections 4 and the classifier 1.
    assert sum(s.count for s in shapes) == 2 + 4 + 4 + 36 + 2 + 5 + 10 + 5
    assert [s.count for s in shapes if s.residual] == [1, 6, 6, 4, 2]  # layer1, then b0..b3
    sizes = _branch_sizes(64, 96)
    widths = (16, 32, 64, 128)
    # BasicBlocks: 2 per branch and module (the residual convs above, less layer1's Bottleneck)
    assert [(b.c, (b.h, b.w), b.count) for b in blocks] == [
        (widths[k], sizes[k], n) for k, n in enumerate((6, 6, 4, 2))]
    got = {c.name.split(" ")[1]: (c.cj, c.ci, c.steps, (c.h, c.w), c.count) for c in chains}
    assert got == {"0->2": (widths[0], widths[2], 2, sizes[0], 2),  # stage3 and stage4
                   "0->3": (widths[0], widths[3], 3, sizes[0], 1),
                   "1->3": (widths[1], widths[3], 2, sizes[1], 1)}


def test_runner_rows_share_one_format():
    ref = torch.ones(4, 4)
    impls = {"good": lambda: ref * 1.5, "bad": lambda: 1 / 0}
    r = kernel_ab.measure_case("c", {"kind": "fuse", "calls_per_forward": 3}, 2e6, 4e9, impls,
                               lambda: ref, timer="events", rep=1, device="cpu")
    assert r.rel_err == {"good": pytest.approx(0.5)} and "ZeroDivisionError" in r.errors["bad"]
    env = {"card": "card", "torch": "t", "triton": "tr", "command": "cmd"}
    rows = kernel_ab.json_rows("fuse", [r], env, {"dtype": "fp16", "timer": "events"})
    assert [row["impl"] for row in rows] == ["good", "bad"]
    assert all(tuple(row) == kernel_ab.ROW_KEYS for row in rows)
    ms = rows[0]["median_ms"]
    assert rows[0]["gbps"] == pytest.approx(2e6 / (ms * 1e-3) / 1e9)
    assert rows[0]["tflops"] == pytest.approx(4e9 / (ms * 1e-3) / 1e12)
    assert rows[0]["calls_per_forward"] == 3 and rows[0]["card"] == "card"
    assert rows[1]["median_ms"] is None and "ZeroDivisionError" in rows[1]["error"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the CPU smoke run needs the Triton interpreter (tests/conftest.py "
                           "sets it where there is no GPU)")
def test_fuse_cpu_smoke_writes_the_shared_format(tmp_path, capsys):
    out = tmp_path / "fuse.json"
    assert bench_fuse_kernels.main(["--cpu-smoke", "--presets", "w18_small_v1", "--inputs",
                                    "1x3x16x16", "--kind", "fuse", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert len(rows) == 2 * 9  # torch and triton on each fuse case
    assert all(tuple(row) == kernel_ab.ROW_KEYS and row["error"] is None for row in rows)
    assert all(row["median_ms"] > 0 and row["rel_err"] < 5e-3 for row in rows)
    assert {row["impl"] for row in rows} == {"torch", "triton"}


def test_conv_ab_records_every_timed_config(monkeypatch):
    """A variant whose first call tunes a problem leaves every timed config's median in the sink;
    a call that tunes nothing new leaves nothing."""
    class FakeTuner:
        cache: dict = {}
        configs_timings: dict = {}

    tuner = FakeTuner()
    monkeypatch.setattr(bench_conv_kernels, "_autotuners", lambda: [tuner])

    def tunes():
        tuner.cache = {("k", 1): "cfg a"}
        tuner.configs_timings = {"cfg a": [0.0125, 0.01, 0.02], "cfg b": [0.03, 0.02, 0.04]}
        return 7

    sink = {}
    assert bench_conv_kernels._recording_tuning(tunes, sink, "triton")() == 7
    assert sink == {"triton": {"cfg a": 0.0125, "cfg b": 0.03}}
    assert bench_conv_kernels._recording_tuning(lambda: 8, sink, "triton_tma")() == 8
    assert "triton_tma" not in sink


def _conv_row(cls, triton_ms, cudnn_ms, timed, count=12):
    r = kernel_ab.CaseResult("case", {"kind": "conv", "preset": "w18", "problem_class": list(cls),
                                      "calls_per_forward": count,
                                      "config_ms": {"triton": timed} if timed is not None else {}},
                             bytes=1.0)
    r.ms = {"triton": triton_ms, "cudnn": cudnn_ms * 1.5, "cudnn_fused": cudnn_ms}
    return r


def test_pin_suggestions_take_the_fastest_timed_config_where_triton_won_at_every_size():
    import torch
    fast = "BLOCK_M: 128, BLOCK_N: 32, BLOCK_K: 32, TILE_W: 16, num_warps: 4, num_ctas: 1, num_stages: 1, maxnreg: None"
    slow = "BLOCK_M: 64, BLOCK_N: 64, BLOCK_K: 32, TILE_W: 0, num_warps: 4, num_ctas: 1, num_stages: 4, maxnreg: None"
    rows = [_conv_row((24, 24, 3, 1), 0.010, 0.0186, {fast: 0.011, slow: 0.02}),
            _conv_row((24, 24, 3, 1), 0.011, 0.0200, {fast: 0.012, slow: 0.02}),   # +res: won too
            _conv_row((40, 40, 3, 1), 0.013, 0.0193, {slow: 0.012, fast: 0.02}),
            _conv_row((40, 40, 3, 1), 0.020, 0.0175, {slow: 0.021, fast: 0.03}),   # lost here
            _conv_row((72, 72, 3, 1), 0.009, 0.0103, None)]                         # nothing timed
    lines = bench_conv_kernels.pin_suggestions(rows, "sm90", "fp16")
    assert len(lines) == 1 and "best cuDNN / Triton >= 1.82x" in lines[0]
    entry = eval("{\n" + lines[0] + "\n}", {"torch": torch})                      # pastes as is
    assert entry == {("sm90", torch.float16, 24, 24, 3, 1): (128, 32, 32, 16, 4, 1)}


def test_conv_ab_runs_a_pinned_class_beside_the_autotuned_list(monkeypatch):
    """The A/B autotunes every class (pins off) and adds "triton_pinned" where a pin exists."""
    import torch
    from hrnet_fast.kernels import triton_status
    ok, why = triton_status(torch.device("cpu"))
    if not ok or torch.cuda.is_available():
        pytest.skip(why or "the CPU smoke path (interpreter)")
    from hrnet_fast.kernels import conv as kconv
    monkeypatch.setattr(kconv, "PINNED_CONFIGS",
                        {("cpu", torch.float32, 16, 16, 3, 1): (128, 16, 16, 0, 4, 4)})
    monkeypatch.setattr(kconv, "PINNED_MODE", "on")          # run() turns it off; restored after
    monkeypatch.setattr(bench_conv_kernels, "_DEVICE", "cpu")
    results = bench_conv_kernels.run(["w18_small_v1"], 32, 48, 1, "fp32", False, False, min_count=6)
    pinned = [r for r in results if "triton_pinned" in r.ms]
    assert {tuple(r.info["problem_class"]) for r in pinned} == {(16, 16, 3, 1)}
    assert all(r.rel_err["triton_pinned"] < 1e-5 and r.rel_err["triton"] < 1e-5 for r in pinned)
    assert kconv.PINNED_MODE == "off"


def test_block_ab_runs_the_block_kernel_against_two_convs(monkeypatch):
    """``--kinds block``: one row per BasicBlock shape: the block kernel against the unfused convs,
    equal within the fp32 bound, and its pinned config where the width has one (the CPU smoke
    path: no timings)."""
    import torch
    from hrnet_fast.kernels import triton_status
    ok, why = triton_status(torch.device("cpu"))
    if not ok or torch.cuda.is_available():
        pytest.skip(why or "the CPU smoke path (interpreter)")
    from hrnet_fast.kernels import basic_block as kblock
    from hrnet_fast.kernels import conv as kconv
    monkeypatch.setattr(kconv, "PINNED_MODE", "on")          # run() turns it off; restored after
    monkeypatch.setattr(kblock, "PINNED_BLOCK_CONFIGS",
                        {("cpu", torch.float32, 16): (8, 8, 64, 32, 4, 1)})  # the interpreter's
    monkeypatch.setattr(bench_conv_kernels, "_DEVICE", "cpu")
    rows = bench_conv_kernels.run(["w18_small_v1"], 32, 48, 1, "fp32", False, False, min_count=6,
                                  kinds=("block",))
    assert [r.info["shape"] for r in rows] == ["block 16 8x12", "block 32 4x6"]
    assert [r.info["block_class"] for r in rows] == [[16], [32]]
    assert all(err < 1e-5 for r in rows for name, err in r.rel_err.items()), [r.rel_err for r in rows]
    assert ["triton_block_pinned" in r.ms for r in rows] == [True, False]   # the pinned width only


def test_block_pin_suggestions_parse_the_block_kernel_configs():
    import torch
    fast = "TH: 8, TW: 16, BLOCK_M: 64, BLOCK_K: 32, num_warps: 4, num_ctas: 1, num_stages: 2, maxnreg: 255"
    slow = "TH: 16, TW: 16, BLOCK_M: 128, BLOCK_K: 32, num_warps: 8, num_ctas: 1, num_stages: 2, maxnreg: 255"

    def row(c, tri, cud, timed):
        r = kernel_ab.CaseResult("case", {"kind": "block", "preset": "w18", "block_class": [c],
                                          "calls_per_forward": 32,
                                          "config_ms": {"triton_block": timed}}, bytes=1.0)
        r.ms = {"triton_block": tri, "cudnn": cud * 2, "cudnn_fused": cud}
        return r

    rows = [row(24, 0.020, 0.039, {fast: 0.021, slow: 0.03}),
            row(40, 0.040, 0.037, {slow: 0.041, fast: 0.05})]                  # lost: no line
    assert bench_conv_kernels.pin_suggestions(rows, "sm90", "fp16") == []     # no conv rows
    lines = bench_conv_kernels.pin_suggestions(rows, "sm90", "fp16", kind="block")
    assert len(lines) == 1 and "best cuDNN / Triton >= 1.95x" in lines[0]
    entry = eval("{\n" + lines[0] + "\n}", {"torch": torch})
    assert entry == {("sm90", torch.float16, 24): (8, 16, 64, 32, 4, 2)}
