"""The backend interface: how the engine runs one plan on one device.

A backend is a class. ``available(device)`` says whether it can run there and, if not, why;
``prepare(plan, device, dtype)`` returns an instance holding everything the backend derives from
the plan (packed weights, ReLU masks, oneDNN weight caches, measured choices). That state lives in
the instance, beside the plan: the plan stays pure data and can be shared. The instance's ``conv``,
``fuse``, ``head`` and ``down`` run the plan's four kinds of step; the engine
(``hrnet_fast/engine.py``) only interprets the plan and calls them. Arguments come from the plan and
are trusted: public ops validate at their boundary (``hrnet_fast/ops``), backends do not.

The default methods here are the plain torch compositions, which every backend may keep.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..ops.conv import conv2d_bias_act_torch
from ..ops.fuse import seg_head_torch, upsample_add_relu_torch
from ..plan import BlockPlan, ConvSpec, FusePlan, HRNetPlan
from ..reference import resize
from ..side_path import in_side_path  # noqa: F401  (re-exported)
from . import BackendUnavailable  # noqa: F401  (re-exported)


def warn_once(cause, message: str, warned: set) -> None:
    """One ``RuntimeWarning`` per process and ``cause`` (remembered in ``warned``) for a downgrade
    that costs speed."""
    if cause in warned:
        return
    warned.add(cause)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class Backend:
    """One backend bound to one plan, device and dtype (see the module docstring).

    Subclasses set ``name`` (what ``backend=`` says) and override what they accelerate."""

    name = "base"
    # CPU only: seg-head branches narrower than half the head width are resized first and
    # projected at full resolution together with branch 0, as one conv (engine.py, ``run_seg_head``).
    resize_narrow_head_branches = False

    @classmethod
    def available(cls, device: torch.device) -> Tuple[bool, str]:
        return True, ""

    @classmethod
    def prepare(cls, plan: HRNetPlan, device: torch.device, dtype: torch.dtype,
                *, auto: bool = False) -> "Backend":
        """This backend's state for ``plan`` (already on ``device`` in ``dtype``). ``auto`` says
        the user asked for ``backend="auto"`` (no slow first calls: no autotuned conv kernels)."""
        return cls(plan, device, dtype, auto=auto)

    def __init__(self, plan: HRNetPlan, device: torch.device, dtype: torch.dtype,
                 *, auto: bool = False) -> None:
        self.device, self.dtype, self.auto = device, dtype, auto
        # Tensors the engine derives from the plan for this backend (engine.merged_projection).
        self.derived: dict = {}

    def conv(self, x: torch.Tensor, spec: ConvSpec, residual: Optional[torch.Tensor] = None):
        return conv2d_bias_act_torch(x, spec.weight, spec.bias, spec.stride, spec.padding, residual,
                                   spec.relu, spec.relu_ranges)

    def conv_into_residual(self, x: torch.Tensor, spec: ConvSpec, residual: torch.Tensor):
        """``conv(x, spec, residual)``, free to write its result into ``residual``'s memory: the
        engine passes a residual that it owns and reads no more (a block's input or its
        downsample's output)."""
        return self.conv(x, spec, residual)

    def conv_with_downsample(self, h: torch.Tensor, spec: ConvSpec, x: torch.Tensor,
                             downsample: ConvSpec) -> Optional[torch.Tensor]:
        """A residual block's last conv with its downsample in one op, ``act(conv(h, spec) +
        conv(x, downsample))`` (the downsample without activation), or None: then the engine runs
        the downsample and accumulates the last conv into its output."""
        return None

    def blocks(self, x: torch.Tensor, blocks: Sequence[BlockPlan]) -> Optional[torch.Tensor]:
        """A branch's residual blocks run as one chain by the backend, or None: then the engine runs
        them block by block (engine.run_block, whose contract holds here too: ``x`` is the engine's
        own intermediate, free to be overwritten). The result must have the layout a block-by-block
        run gives (channels_last on the CPU)."""
        return None

    def fuse(self, base, contributions: Sequence[torch.Tensor], mode: str, align_corners: bool,
             relu: bool = True, bias: Optional[torch.Tensor] = None):
        """``act(base [+ bias[c]] + sum_k resize(c_k))``; ``bias`` (the contributions' conv biases,
        hoisted by a CUDA plan) is contiguous [C]."""
        return upsample_add_relu_torch(base, contributions, mode, align_corners, relu, bias)

    def head(self, base, contributions, weight, bias, mode: str, align_corners: bool):
        return seg_head_torch(base, contributions, weight, bias, mode, align_corners)

    def projected_head(self, x: torch.Tensor, projection: ConvSpec,
                       contributions: Sequence[torch.Tensor], weight, bias, mode: str,
                       align_corners: bool) -> Optional[torch.Tensor]:
        """``head(conv(x, projection), contributions, weight, bias, ...)`` as one op, or None: then
        the engine runs the conv and ``head`` (engine.run_seg_head)."""
        return None

    def resize_concat(self, parts: Sequence[torch.Tensor], size, mode: str, align_corners: bool):
        """``cat([resize(p, size) for p in parts], dim=1)`` (the CPU seg head's input)."""
        return torch.cat([resize(p, size, mode, align_corners) for p in parts], dim=1)

    def down(self, x: torch.Tensor, fuse: FusePlan, j: int) -> List[torch.Tensor]:
        """Every strided chain leaving source j, in split order: the first convs of all of them as
        one batched conv (ReLU ranges), then the remaining convs of each chain on its slice."""
        batched = fuse.down_first[j]
        y = self.conv(x, batched.conv)
        out = []
        for s in batched.splits:
            z = y[:, s.start:s.end]
            for spec in fuse.down_rest.get((j, s.target), ()):
                z = self.conv(z, spec)
            out.append(z)
        return out

    def wrap_run(self, run: Callable) -> Callable:
        """The function the engine calls for a whole forward (``compile`` wraps it)."""
        return run


def fuse_then_classify(fuse: Callable) -> Callable:
    """A seg head from a fuse op: ``conv2d(fuse(base, contributions, relu=True), weight, bias)``."""
    def head(base, contributions, weight, bias, mode, align_corners):
        act = fuse(base, contributions, mode, align_corners, True)
        return F.conv2d(act, weight, bias, 1, weight.shape[-1] // 2)
    return head
