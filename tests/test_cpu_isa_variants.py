"""The AVX2 variants of the CPU kernels (csrc/cpu_conv_thin_avx2.cpp, csrc/cpu_head_f32_avx2.cpp)
against the AVX-512 ones, on a CPU with AVX-512: the same inputs through both, the AVX2 variant in a
new process with ``ATEN_CPU_CAPABILITY=avx2`` (torch reads it once; the kernels follow torch's
capability). The variants do the same float32 operations in the same order, so they agree to float32
rounding (bit for bit unless the compiler contracts a multiply and an add differently).

On an AVX2-only CPU the AVX2 variants are what every other kernel test runs; the AVX-512 ones cannot
run there, and these tests are skipped with that reason.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hrnet_fast import cpu_ext
from helpers import rel_err

# Outputs of both kernels for fixed seeds: thin conv direct and Winograd (channels_last and planar
# out, with a residual; odd sizes, channel remainders) and the float32 head (both resize modes).
_CASES = """
import torch
from hrnet_fast import cpu_ext

def tensor(shape, seed, cl=True):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return t.contiguous(memory_format=torch.channels_last) if cl else t

def outputs():
    out = {}
    for n, ci, co, h, w in ((2, 18, 18, 13, 37), (1, 36, 40, 9, 70), (1, 72, 72, 6, 131)):
        x = tensor((n, ci, h, w), ci)
        wt = tensor((co, ci, 3, 3), co, cl=False) / (3 * ci ** 0.5)
        b = tensor((co,), 7, cl=False)
        res = tensor((n, co, h, w), 8, cl=False)
        for wino in (False, True):
            packed = cpu_ext.conv3x3_thin_pack(wt, winograd=wino)
            out[f"conv {ci}->{co} wino={wino}"] = cpu_ext.conv3x3_thin_cpu(x, packed, b, relu=True)
            out[f"conv {ci}->{co} wino={wino} planar+res"] = cpu_ext.conv3x3_thin_cpu(
                x, packed, b, res, relu=True, channels_last=False)
    x = tensor((2, 126, 9, 21), 1)
    wp, wc = tensor((270, 126, 1, 1), 2) / 126 ** 0.5, tensor((19, 270, 1, 1), 3) / 270 ** 0.5
    bp, bc = tensor((270,), 4, cl=False), tensor((19,), 5, cl=False)
    cs = [tensor((2, 270, 5, 11), 6), tensor((2, 270, 3, 6), 7)]
    for mode, align in (("bilinear", False), ("bilinear", True), ("nearest", False)):
        out[f"head {mode} {align}"] = cpu_ext.seg_head_f32_cpu(x, wp, bp, cs, wc, bc, mode=mode,
                                                              align_corners=align)
    return out
"""

_CHILD = """
import sys, torch
sys.path[:0] = [{root!r}]
assert torch.backends.cpu.get_cpu_capability() == "AVX2", torch.backends.cpu.get_cpu_capability()
{cases}
torch.save(outputs(), {path!r})
"""


def _outputs():
    scope: dict = {}
    exec(_CASES, scope)  # the same source as the child's, so the same inputs
    return scope["outputs"]()


def test_avx2_variants_match_avx512(tmp_path):
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or sys.platform != "linux":
        pytest.skip("needs a CPU with AVX-512 (torch's capability) to run both variants: the AVX2 "
                    "variants are NOT compared with the AVX-512 ones here")
    ok, why = cpu_ext.cpu_ext_status()
    if not ok:
        pytest.skip(f"the CPU kernels could not be built here ({why}): NOT tested")
    root = str(Path(__file__).resolve().parent.parent)
    path = str(tmp_path / "avx2.pt")
    code = _CHILD.format(root=root, cases=_CASES, path=path)
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs, ours = torch.load(path), _outputs()
    assert sorted(theirs) == sorted(ours)
    for name, want in ours.items():
        got = theirs[name]
        assert got.shape == want.shape and got.stride() == want.stride(), name
        assert rel_err(got, want) < 1e-6, (name, rel_err(got, want))
