"""The shape-recording backend: what it records on the meta device is what the engine's backend
receives on real tensors."""
import torch

from hrnet_fast import HRNetConfig
from hrnet_fast.backends.recording import (ConvProblem, FuseProblem, HeadProblem, Recording,
                                           record_problems)
from hrnet_fast.engine import run_plan
from hrnet_fast.plan import build_plan
from hrnet_fast.reference import HighResolutionNet


def _real_calls(model, x, m):
    plan = build_plan(model, channel_multiple=m, hoist_biases=m > 1).map_tensors(
        lambda t: t.float().contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.float())
    rec = Recording.prepare(plan, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        run_plan(plan, rec, x.contiguous(memory_format=torch.channels_last))
    return rec.calls


def test_meta_recording_equals_a_real_run():
    cfg = HRNetConfig.preset("w18_small_v1")
    model = HighResolutionNet(cfg).eval()
    for m in (1, 8):
        meta = record_problems(model, 2, 45, 67, channel_multiple=m, dtype=torch.float32)
        real = _real_calls(model, torch.randn(2, 3, 45, 67), m)
        assert meta == real


def test_recorded_counts_follow_the_architecture():
    calls = record_problems("w18_small_v1", 1, 64, 96, channel_multiple=1)
    fuses = [c for c in calls if isinstance(c, FuseProblem)]
    # w18_small_v1: stages 2-4 with 1, 1, 1 modules of 2, 3, 4 branches, every output fused.
    assert [len(f.contributions) for f in fuses] == [1, 1] + [2] * 3 + [3] * 4
    heads = [c for c in calls if isinstance(c, HeadProblem)]
    assert len(heads) == 1 and heads[0].base.shape == (1, 16 + 32 + 64 + 128, 16, 24)
    assert [f.base.shape[1] for f in fuses[-4:]] == [16, 32, 64, 128]
    assert all(isinstance(c, ConvProblem) for c in calls if not isinstance(c, (FuseProblem, HeadProblem)))
