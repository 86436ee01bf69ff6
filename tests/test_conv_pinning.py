"""Pinned Triton conv configs (``kernels/conv.py`` ``PINNED_CONFIGS``) and ``auto``'s offer of the
pinned classes (``backends/triton.py`` ``_offer_pinned_convs``): a pinned class compiles its one
config and times nothing; a pin the autotuner would not time there is ignored; under ``auto``
only the pinned classes may leave cuDNN, by a measured per-shape choice, and the model still
matches the reference."""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE, hoisted_w18_small_v1, poisoned_allocations, rel_err
from oracles import MODEL_FP32_TOL, conv_oracle
from hrnet_fast.kernels import triton_status

_ok, _why = triton_status(DEVICE)
pytestmark = pytest.mark.skipif(not _ok, reason=_why)

if _ok:
    from hrnet_fast.kernels import conv as kconv

# fp32 configs the autotuner times for a 3x3 8 -> 16 conv (BLOCK_N <= 16, BLOCK_K <= 16 after
# pruning keeps only this one) and one it never times there (BLOCK_N 128 > 16 output channels)
SMALL = (128, 16, 16, 0, 4, 4)
PRUNED_HERE = (128, 128, 32, 0, 8, 3)


@pytest.fixture(autouse=True)
def _fresh_tuning(monkeypatch):
    """No autotuner from another test, NaN-filled outputs, no pins but the test's own."""
    monkeypatch.setattr(kconv, "_TUNED", {})
    monkeypatch.setattr(kconv, "PINNED_CONFIGS", {})
    monkeypatch.setattr(kconv, "_debug_poison_outputs", True)


def _conv_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 9, 11, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 8, 3, 3, generator=g) / 72 ** 0.5
    b = torch.randn(16, generator=g)
    return x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)


def _pin(cfg, cin=8, cout=16, k=3, stride=1, dtype=torch.float32):
    kconv.PINNED_CONFIGS[(kconv.device_arch(DEVICE), dtype, cin, cout, k, stride)] = cfg


def _tuned_config_lists():
    """The config list (as tuples) of every autotuner built so far."""
    return [[cfg[:6] for cfg in key] for key in kconv._TUNED]


def _run_and_check(x, w, b):
    out = kconv.conv2d_bias_act(x, w, b, stride=1, relu=True)
    want = conv_oracle(x.double(), w.double(), b.double(), 1, 1)
    assert rel_err(out, want) < MODEL_FP32_TOL


def test_a_pinned_class_compiles_its_config_alone():
    x, w, b = _conv_case()
    assert SMALL in [kconv._config_tuple(c) for c in kconv.gpu_configs(torch.float32)]
    _pin(SMALL)
    _run_and_check(x, w, b)
    assert _tuned_config_lists() == [[SMALL]]


def test_a_pin_is_per_class_arch_and_dtype():
    x, w, b = _conv_case()
    _pin(SMALL, cout=24)                       # another class
    _pin(SMALL, dtype=torch.float16)           # another dtype
    kconv.PINNED_CONFIGS[("sm_none", torch.float32, 8, 16, 3, 1)] = SMALL   # another card
    _run_and_check(x, w, b)
    assert _tuned_config_lists() == [[kconv._config_tuple(c) for c in
                                      kconv._prune_configs(kconv.conv_configs(torch.float32), 8, 16, 3)]]


@pytest.mark.parametrize("why", ["pruned here", "mode off", "env off"])
def test_an_unusable_pin_falls_back_to_the_autotune_list(why, monkeypatch):
    x, w, b = _conv_case()
    if why == "pruned here":
        _pin(PRUNED_HERE)
    else:
        _pin(SMALL)
        if why == "mode off":
            monkeypatch.setattr(kconv, "PINNED_MODE", "off")
        else:
            monkeypatch.setenv("HRNET_FAST_CONV_PINS", "0")
    _run_and_check(x, w, b)
    unpinned = [kconv._config_tuple(c)
                for c in kconv._prune_configs(kconv.conv_configs(torch.float32), 8, 16, 3)]
    assert _tuned_config_lists() == [unpinned]


def _body_class(plan):
    """(spec list, class) of the plan's most frequent 3x3 stride-1 conv class."""
    from collections import Counter
    classes = Counter((s.weight.shape[1], s.weight.shape[0]) for s in plan.conv_specs()
                      if s.weight.shape[-1] == 3 and s.stride == 1)
    (cin, cout), _ = classes.most_common(1)[0]
    specs = [s for s in plan.conv_specs() if s.weight.shape[-1] == 3 and s.stride == 1
             and (s.weight.shape[1], s.weight.shape[0]) == (cin, cout)]
    return specs, (cin, cout)


@pytest.mark.parametrize("forced,mode", [("triton", "bilinear"), ("triton", "nearest"),
                                         ("torch", "bilinear")])
def test_auto_offers_only_the_pinned_classes(forced, mode, monkeypatch):
    """``auto``'s Triton backend with one class pinned: with the choice forced to the Triton conv,
    exactly that class's convs run it and the model matches the reference; forced to cuDNN (or,
    on the CPU, not forced: nothing can be timed there), no Triton conv runs."""
    from hrnet_fast.backends import triton as triton_backend
    from hrnet_fast.engine import run_plan

    monkeypatch.setattr(triton_backend, "PINNED_CONV_DEVICES", {"cpu", "cuda"})
    monkeypatch.setenv("HRNET_FAST_FORCE_CONV2D_BIAS_ACT_PINNED", forced)
    model, x, plan = hoisted_w18_small_v1(mode)
    specs, (cin, cout) = _body_class(plan)
    _pin(SMALL if cout <= 16 else (128, 32, 32, 0, 8, 3), cin=cin, cout=cout)
    calls = []
    real = torch.ops.hrnet_fast.conv2d_bias_act_triton

    def spy(*args):
        calls.append((args[0].shape[1], args[1].shape[1]))
        return real(*args)

    be = triton_backend.Triton.prepare(plan, DEVICE, torch.float32, auto=True)
    monkeypatch.setattr(torch.ops.hrnet_fast, "conv2d_bias_act_triton", spy)
    with torch.no_grad(), poisoned_allocations(monkeypatch):
        got = run_plan(plan, be, x)
        want = model(x)
    assert rel_err(got, want) < MODEL_FP32_TOL
    if forced == "triton":
        assert calls and set(calls) == {(cin, cout)}
        assert len(calls) >= len(specs)
    else:
        assert calls == []


def test_auto_on_the_cpu_without_a_forced_choice_keeps_every_conv_native(monkeypatch):
    from hrnet_fast.backends import triton as triton_backend
    if torch.device(DEVICE).type != "cpu":
        pytest.skip("on a GPU the choice is measured")
    monkeypatch.setattr(triton_backend, "PINNED_CONV_DEVICES", {"cpu"})
    monkeypatch.delenv("HRNET_FAST_FORCE_CONV2D_BIAS_ACT_PINNED", raising=False)
    _, _, plan = hoisted_w18_small_v1("bilinear")
    _, (cin, cout) = _body_class(plan)
    _pin(SMALL, cin=cin, cout=cout)
    be = triton_backend.Triton.prepare(plan, DEVICE, torch.float32, auto=True)
    assert not be._pinned and not be._packed and be.conv != be._conv_auto
