"""The nearest-resize sweep: every upsampling size pair ``in -> out`` with ``in <= 64``,
``out <= 130`` (``out >= in``, equal sizes included), bit for bit against ``F.interpolate``.

PyTorch's legacy nearest takes ``src = min(floor(float32(dst) * scale), in - 1)`` with
``scale = float32(in) / float32(out)``: the product is rounded to float32 before the floor. The same
product in float64 picks another source row on about 1 in 10 of these pairs (e.g. 6 -> 46, 12 -> 46,
2 -> 50, 2 -> 58; HRNet meets 6 -> 46 and 12 -> 46 at inputs of 181-184 pixels), so a kernel must be
checked on all of them, not on a few sizes where both products agree.

The sweep runs one call per output size ``out``: the base is ``out x out`` zeros and the
contributions are ``i x i`` for every ``i`` of that ``out``, filled with random integers. Sums of
integers below 2^24 are exact in float32 in any order, so the result must equal the sum of the
``F.interpolate`` outputs exactly; any wrong source row or column changes it.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from helpers import torch_threads

MAX_IN, MAX_OUT = 64, 130
# Contribution values are integers below 2^16: 64 of them sum below 2^22, exact in float32.
_VALUE_BOUND = 2 ** 16

Run = Callable[[torch.Tensor, List[torch.Tensor]], torch.Tensor]


def one_cpu_thread():
    """torch on one CPU thread for the block: the sweep makes thousands of tiny CPU ops, where
    more threads only add waiting (tens of times slower on a busy machine)."""
    return torch_threads(1)


def sweep_pairs() -> List[Tuple[int, int]]:
    """Every (in, out) pair of the sweep, out >= in."""
    return [(i, o) for i in range(1, MAX_IN + 1) for o in range(i, MAX_OUT + 1)]


def inputs_by_output() -> Dict[int, List[int]]:
    """{out: [in, ...]} over :func:`sweep_pairs`."""
    table: Dict[int, List[int]] = {}
    for i, o in sweep_pairs():
        table.setdefault(o, []).append(i)
    return table


def float32_scale(i: int, o: int) -> np.float32:
    """PyTorch's size-based nearest scale, float32(in) / float32(out), correctly rounded."""
    return np.float32(i) / np.float32(o)


def nearest_sources(i: int, o: int, product_dtype) -> np.ndarray:
    """min(floor(dst * scale), in - 1) for dst = 0..out-1, the product taken in ``product_dtype``."""
    dst = np.arange(o).astype(product_dtype)
    src = np.floor(dst * product_dtype(float32_scale(i, o)))
    return np.minimum(src, i - 1).astype(np.int64)


def float64_product_disagrees(i: int, o: int) -> bool:
    """Whether the float64 product picks another source than PyTorch's float32 one for some dst."""
    return bool((nearest_sources(i, o, np.float32) != nearest_sources(i, o, np.float64)).any())


def integer_tensor(shape: Sequence[int], device, seed: int, channels_last: bool = False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, _VALUE_BOUND, tuple(shape), generator=g).to(device=device,
                                                                     dtype=torch.float32)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def assert_sweep_bit_exact(run: Run, device, *, channels: int = 1, channels_last: bool = False,
                           what: str = "") -> int:
    """``run(base, contributions)`` must return ``base + sum_k nearest(c_k, base size)`` (no
    activation) bit for bit, for every pair of the sweep. Returns the number of pairs checked.

    On a mismatch, each contribution of that output size is run alone, so the message names the
    failing ``in -> out`` pairs."""
    with one_cpu_thread():
        return sum(_check_output_size(run, o, ins, device, channels, channels_last, what)
                   for o, ins in inputs_by_output().items())


def _check_output_size(run: Run, o: int, ins: List[int], device, channels: int,
                       channels_last: bool, what: str) -> int:
    base = torch.zeros((1, channels, o, o), device=device)
    if channels_last:
        base = base.contiguous(memory_format=torch.channels_last)
    contribs = [integer_tensor((1, channels, i, i), device, seed=1000 * o + i,
                               channels_last=channels_last) for i in ins]
    resized = [F.interpolate(c, size=(o, o), mode="nearest") for c in contribs]
    want = torch.zeros_like(base)
    for r in resized:
        want += r
    got = run(base, contribs)
    if not torch.equal(got, want):
        bad = [f"{i}->{o}" for i, c, r in zip(ins, contribs, resized)
               if not torch.equal(run(base, [c]), r)]
        raise AssertionError(f"{what}: nearest resize differs from F.interpolate at output size "
                             f"{o} ({int((got != want).sum())} of {got.numel()} values); failing "
                             f"in->out pairs: {bad or 'none alone (only together)'}")
    return len(ins)
