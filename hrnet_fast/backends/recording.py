"""A backend that records the problems a plan hands its backend, for benchmarks and tests.

``record_problems(model_or_config, batch, height, width)`` runs the plan on the ``meta`` device (no
memory, no arithmetic) with the torch compositions and returns every call in order: the conv, fuse
and head problems exactly as the engine would pass them, with strides (channel slices of batched
convs stay slices) and the channel padding of the CUDA plan. Benchmarks derive their shapes from
it instead of re-deriving HRNet's branch arithmetic by hand.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch

from ..config import HRNetConfig
from ..plan import build_plan
from ..reference import HighResolutionNet
from .base import Backend

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class TensorInfo:
    """What a kernel sees of a tensor: shape, strides and the element offset into its storage."""

    shape: Shape
    stride: Shape
    offset: int

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorInfo":
        return cls(tuple(t.shape), tuple(t.stride()), t.storage_offset())


@dataclass(frozen=True)
class ConvProblem:
    x: TensorInfo
    weight: Shape
    stride: int
    padding: int
    residual: bool
    relu: bool
    relu_ranges: Optional[Tuple[Tuple[int, int], ...]]


@dataclass(frozen=True)
class FuseProblem:
    base: TensorInfo
    contributions: Tuple[TensorInfo, ...]
    mode: str
    align_corners: bool
    bias: bool = False  # the contributions' conv biases, hoisted into the fuse (CUDA plans)


@dataclass(frozen=True)
class HeadProblem:
    base: TensorInfo
    contributions: Tuple[TensorInfo, ...]
    weight: Shape
    mode: str
    align_corners: bool


Problem = Union[ConvProblem, FuseProblem, HeadProblem]


class Recording(Backend):
    """The torch compositions (any device, ``meta`` included), every call appended to ``calls``.
    ``resize_narrow_head_branches`` is off: every head branch reaches ``head`` at its own size, as
    on a GPU."""

    name = "recording"

    def __init__(self, plan, device, dtype, *, auto: bool = False) -> None:
        super().__init__(plan, device, dtype, auto=auto)
        self.calls: List[Problem] = []
        self.memory_format = torch.channels_last

    def conv(self, x, spec, residual=None):
        self.calls.append(ConvProblem(TensorInfo.of(x), tuple(spec.weight.shape), spec.stride,
                                      spec.padding, residual is not None, spec.relu,
                                      spec.relu_ranges))
        y = super().conv(x, spec, residual)
        # Meta convolutions return NCHW; cuDNN and oneDNN keep the engine's channels_last.
        return y.contiguous(memory_format=self.memory_format)

    def fuse(self, base, contributions, mode, align_corners, relu=True, bias=None):
        self.calls.append(FuseProblem(TensorInfo.of(base),
                                      tuple(TensorInfo.of(c) for c in contributions), mode,
                                      bool(align_corners), bias is not None))
        return super().fuse(base, contributions, mode, align_corners, relu, bias)

    def head(self, base, contributions, weight, bias, mode, align_corners):
        self.calls.append(HeadProblem(TensorInfo.of(base),
                                      tuple(TensorInfo.of(c) for c in contributions),
                                      tuple(weight.shape), mode, bool(align_corners)))
        return super().head(base, contributions, weight, bias, mode, align_corners)


def record_problems(model: Union[HighResolutionNet, HRNetConfig, str], batch: int, height: int,
                    width: int, *, channel_multiple: int = 8, channels_last: bool = True,
                    dtype: torch.dtype = torch.float16,
                    hoist_biases: Optional[bool] = None) -> List[Problem]:
    """Every backend call of one forward at ``batch x C x height x width``, in order.

    ``model``: a model (copied to ``meta``), a config, or a preset name (seg head, bilinear).
    ``channel_multiple`` 8 is the CUDA plan's padding, 1 the CPU's; ``hoist_biases`` (default: as
    the CUDA plan when ``channel_multiple`` > 1) moves the fuse steps' conv biases into the fuse."""
    from ..engine import run_plan  # the engine imports the backends package: import at call time
    if isinstance(model, str):
        model = HRNetConfig.preset(model)
    if isinstance(model, HRNetConfig):
        with torch.device("meta"):
            model = HighResolutionNet(model)
    else:
        model = copy.deepcopy(model).to("meta")
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device="meta", dtype=dtype)
        return t.contiguous(memory_format=fmt) if t.dim() == 4 else t.contiguous()

    if hoist_biases is None:
        hoist_biases = channel_multiple > 1
    plan = build_plan(model, channel_multiple=channel_multiple,
                      hoist_biases=hoist_biases).map_tensors(move)
    rec = Recording.prepare(plan, torch.device("meta"), dtype)
    rec.memory_format = fmt
    x = torch.empty(batch, model.config.in_channels, height, width, device="meta",
                    dtype=dtype).contiguous(memory_format=fmt)
    with torch.no_grad():
        run_plan(plan, rec, x)
    return rec.calls
