"""The ``triton`` backend: the Triton fuse-step and seg-head kernels (``hrnet_fast/kernels``), and,
on an explicit ``backend="triton"``, a measured per-shape choice between cuDNN and the Triton conv
for every convolution and between the batched form and the one-launch chain kernel for the strided
fuse chains.

Triton convs and chain kernels autotune on first use of each shape (seconds per shape on a GPU), so
``auto`` keeps convolutions on cuDNN and a first call that returns in seconds, except for the problem
classes with a config pinned for the card (``kernels/conv.py`` ``PINNED_CONFIGS``: one compile, no
autotuning), which choose per shape, measured, between cuDNN and the pinned Triton conv. Under ``auto`` on a
GPU where the CUDA extension is ready, the fuse step picks per shape between the Triton and CUDA
kernels. On the CPU (the interpreter) nothing can be timed: the Triton conv and chain join only
when ``HRNET_FAST_FORCE_<OP>`` names them (tests).
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..kernels import triton_status
from ..plan import BlockPlan, ConvSpec, FusePlan
from .base import Backend, fuse_then_classify
from .native import native_backend


@lru_cache(maxsize=None)
def kernel_module(name: str):
    """``hrnet_fast.kernels.<name>``, imported on first use (importing it imports triton)."""
    return importlib.import_module(f"hrnet_fast.kernels.{name}")


def kernels_status(device: torch.device, module: str = "upsample_add_relu") -> Tuple[bool, str]:
    ok, why = triton_status(device)
    if not ok:
        return ok, why
    try:
        kernel_module(module)
    except Exception as e:  # a broken Triton install must not take the package down
        return False, f"the Triton kernels failed to import: {type(e).__name__}: {e}"
    return True, ""


def fuse_triton(base, contributions, mode, align_corners, relu=True, bias=None):
    kernel_module("upsample_add_relu")
    return torch.ops.hrnet_fast.upsample_add_relu_triton(base, list(contributions), mode,
                                                         bool(align_corners), bool(relu), bias)


def seg_head_triton(base, contributions, weight, bias, mode, align_corners):
    kernel_module("seg_head")
    return torch.ops.hrnet_fast.seg_head_triton(base, list(contributions), weight, bias, mode,
                                                bool(align_corners))


def conv2d_bias_act_triton(x, weight, bias, stride, padding, residual, relu, relu_ranges):
    return kernel_module("conv").conv2d_bias_act(x, weight, bias, stride=stride, padding=padding,
                                                 residual=residual, relu=relu,
                                                 relu_ranges=relu_ranges)


def _conv_key(x, spec: ConvSpec, residual=None):
    return (tuple(x.shape), tuple(spec.weight.shape), str(x.dtype), spec.stride, spec.padding,
            residual is not None, spec.relu, spec.relu_ranges)


def _block_key(x, block: BlockPlan):
    return (tuple(x.shape), str(x.dtype), x.is_contiguous(memory_format=torch.channels_last),
            tuple(c.bias is not None for c in block.convs))


def fusable_basic_block(block: BlockPlan) -> bool:
    """A BasicBlock the block kernel computes: two 3x3 stride-1 pad-1 convs C -> C, each with a ReLU
    on every channel, no downsample (the residual is the block's input)."""
    if block.downsample is not None or len(block.convs) != 2:
        return False
    shape = tuple(block.convs[0].weight.shape)
    return (len(shape) == 4 and shape[0] == shape[1] and shape[2:] == (3, 3)
            and all(tuple(c.weight.shape) == shape and c.stride == 1 and c.padding == 1
                    and c.relu and c.relu_ranges is None for c in block.convs))


def _branch_blocks(plan) -> List[BlockPlan]:
    """Every residual block of the stages' branches."""
    return [b for stage in plan.stages for module in stage for blocks in module.branches
            for b in blocks]


def _down_key(x, fuse: FusePlan, j: int):
    chains = tuple(tuple(tuple(c.weight.shape) for c in fuse.down_chains[(j, s.target)])
                   for s in fuse.down_first[j].splits)
    return (tuple(x.shape), str(x.dtype), chains)


# Devices where a ReLU-range conv runs as cuDNN without bias + the bias-act kernel (one pass) instead
# of F.conv2d's separate bias add + a ReLU per range (two passes): cuDNN's, whose fused epilogue has
# no per-channel ReLU. Tests add "cpu" to run it under the interpreter.
RANGE_EPILOGUE_DEVICES = {"cuda"}
# Devices where ``auto`` offers the Triton conv for the problem classes pinned on the card
# (``_offer_pinned_convs``) and the block kernel for the pinned block widths
# (``_offer_pinned_blocks``). Tests add "cpu" to run them under the interpreter.
PINNED_CONV_DEVICES = {"cuda"}
# Devices where the seg head computes its branch-0 projection inside the head kernel
# (kernels/seg_head.py, ``seg_head_projected_triton``: the Cs-channel base, 71 MB for w18 and
# 189 MB for w48 at 1024x2048 in fp16, is then never written and read back). Off until measured
# on a GPU (benchmarks/gpu_steps.py ab_head); tests add "cpu" to run it under the interpreter.
PROJECTED_HEAD_DEVICES: set = set()


class Triton(Backend):
    name = "triton"

    @classmethod
    def available(cls, device: torch.device) -> Tuple[bool, str]:
        return kernels_status(device)

    def __init__(self, plan, device, dtype, *, auto: bool = False) -> None:
        from . import selection
        super().__init__(plan, device, dtype, auto=auto)
        self.native = native_backend(plan, device, dtype)
        fuse: Callable = fuse_triton
        if device.type == "cuda" and auto:
            from .cuda import cuda_ext_ready, fuse_cuda
            if cuda_ext_ready():
                fuse = selection.SelectingOp("upsample_add_relu",
                                             {"triton": fuse_triton, "cuda": fuse_cuda},
                                             selection.fuse_key)
        self.fuse = fuse
        native_conv = self.native.conv
        if device.type in RANGE_EPILOGUE_DEVICES and kernels_status(device, "bias_act")[0]:
            native_conv = self._conv_native_ranges
        self.conv = native_conv
        triton_convs = False
        blocks: List[BlockPlan] = []
        self._pinned: Dict[int, ConvSpec] = {}
        self._packed: Dict[int, torch.Tensor] = {}
        self._masks: Dict[int, torch.Tensor] = {}
        self._block: Optional[Callable] = None
        # ids of the blocks the block choice takes: every fusable one (explicit backend="triton")
        # or, under auto, those of a pinned width
        self._offered_blocks: set = set()
        if not auto and kernels_status(device, "conv")[0]:
            conv_options = selection.candidates(
                "conv2d_bias_act", {"torch": native_conv}, {"triton": self._conv_triton}, device)
            if len(conv_options) > 1 or "triton" in conv_options:
                self.conv = selection.SelectingOp("conv2d_bias_act", conv_options, _conv_key)
                triton_convs = True
            down_options = selection.candidates(
                "fuse_down", {"batched": self._down_batched}, {"chain": self._down_chained}, device)
            if len(down_options) > 1:
                self.down = selection.SelectingOp("fuse_down", down_options, _down_key)
                triton_convs = True
            elif "chain" in down_options:
                self.down = self._down_chained
                triton_convs = True
            block_options = selection.candidates(
                "basic_block", {"convs": self._block_convs}, {"fused": self._block_fused}, device)
            if "fused" in block_options:
                self._block = (selection.SelectingOp("basic_block", block_options, _block_key)
                               if len(block_options) > 1 else self._block_fused)
                self._offered_blocks = {id(b) for b in _branch_blocks(plan) if fusable_basic_block(b)}
                triton_convs = True
        elif auto and device.type in PINNED_CONV_DEVICES and kernels_status(device, "conv")[0]:
            triton_convs = self._offer_pinned_convs(plan, native_conv)
            blocks = self._offer_pinned_blocks(plan)
            triton_convs = triton_convs or bool(blocks)
        if triton_convs:
            # auto packs only what it offers: the pinned convs and the offered blocks' convs
            offered = {**self._pinned, **{id(c): c for b in blocks for c in b.convs}} if auto else None
            self._pack(plan, offered)
            if selection.conv_tma_requested():
                kernel_module("conv_tma").TMA_MODE = "on"
        self._projected_head = (device.type in PROJECTED_HEAD_DEVICES
                                and kernels_status(device, "seg_head")[0])

    def _offer_pinned_convs(self, plan, native_conv) -> bool:
        """``auto``: the convs whose problem class has a pinned Triton config on this card
        (``kernels/conv.py`` ``PINNED_CONFIGS``: one compile, nothing autotuned) choose per shape,
        measured, between cuDNN and that Triton conv; every other conv stays on cuDNN. Whether any
        conv was offered."""
        conv = kernel_module("conv")
        for spec in plan.conv_specs():
            cout, cin, k, _ = spec.weight.shape
            if conv.pinned_config(self.device, self.dtype, cin, cout, k, spec.stride) is not None:
                self._pinned[id(spec)] = spec
        if not self._pinned:
            return False
        from . import selection
        # its own op name: the disk cache must not hand this choice (a pinned Triton config) to an
        # explicit backend="triton" engine's choice (an autotuned one), or back
        options = selection.candidates("conv2d_bias_act_pinned", {"torch": native_conv},
                                       {"triton": self._conv_triton}, self.device)
        if "triton" not in options:  # the CPU without HRNET_FAST_FORCE_CONV2D_BIAS_ACT_PINNED
            self._pinned.clear()
            return False
        self._native_conv = native_conv
        self._pinned_choice = selection.SelectingOp("conv2d_bias_act_pinned", options, _conv_key)
        self.conv = self._conv_auto
        return True

    def _offer_pinned_blocks(self, plan) -> List[BlockPlan]:
        """``auto``: the fusable BasicBlocks whose width has a pinned block-kernel config on this
        card (``kernels/basic_block.py`` ``PINNED_BLOCK_CONFIGS``) choose per shape, measured,
        between their two convs and that kernel; the offered blocks (their convs are packed)."""
        from . import selection
        pinned = kernel_module("basic_block").pinned_block_config
        offered = [b for b in _branch_blocks(plan) if fusable_basic_block(b)
                   and pinned(self.device, self.dtype, b.convs[0].weight.shape[0]) is not None]
        if not offered:
            return []
        # its own op name, as the pinned convs': the disk cache keeps the two kinds of choice apart
        options = selection.candidates("basic_block_pinned", {"convs": self._block_convs},
                                       {"fused": self._block_fused}, self.device)
        if "fused" not in options:  # the CPU without HRNET_FAST_FORCE_BASIC_BLOCK_PINNED
            return []
        self._block = selection.SelectingOp("basic_block_pinned", options, _block_key)
        self._offered_blocks = {id(b) for b in offered}
        return offered

    def _conv_auto(self, x, spec: ConvSpec, residual=None):
        if id(spec) in self._pinned:
            return self._pinned_choice(x, spec, residual)
        return self._native_conv(x, spec, residual)

    def _pack(self, plan, specs: Optional[Dict[int, ConvSpec]] = None) -> None:
        """GEMM-packed weights [k*k*Cin, Cout] and per-channel ReLU masks, once per plan (``specs``:
        only those convs)."""
        conv = kernel_module("conv")
        for spec in (specs.values() if specs is not None else plan.conv_specs()):
            self._packed[id(spec)] = conv.pack_weight(spec.weight)
            if spec.relu_ranges is not None:
                self._masks[id(spec)] = conv.relu_mask(spec.relu_ranges, spec.out_channels,
                                                       self.device)

    @property
    def packs_weights(self) -> bool:
        return bool(self._packed)

    def _weight(self, spec: ConvSpec) -> torch.Tensor:
        return self._packed.get(id(spec), spec.weight)

    def _conv_native_ranges(self, x, spec: ConvSpec, residual=None):
        """The native (cuDNN) conv; one with ReLU ranges, a bias and no residual (the batched
        stride-2 convs) as the conv without bias plus the one-pass bias-act kernel."""
        if spec.relu_ranges is None or spec.bias is None or residual is not None:
            return self.native.conv(x, spec, residual)
        # the Triton conv's per-channel mask (int8, cached per ranges, width and device)
        mask = kernel_module("conv").relu_mask(spec.relu_ranges, spec.out_channels, self.device)
        kernel_module("bias_act")
        y = F.conv2d(x, spec.weight, None, spec.stride, spec.padding)
        return torch.ops.hrnet_fast.bias_relu_mask_triton(y, spec.bias, mask)

    def _conv_triton(self, x, spec: ConvSpec, residual=None):
        ranges = self._masks.get(id(spec), spec.relu_ranges)
        return conv2d_bias_act_triton(x, self._weight(spec), spec.bias, spec.stride, spec.padding,
                                      residual, spec.relu, ranges)

    def _down_batched(self, x, fuse: FusePlan, j: int) -> List[torch.Tensor]:
        return Backend.down(self, x, fuse, j)

    def _down_chained(self, x, fuse: FusePlan, j: int) -> List[torch.Tensor]:
        """Chains leaving source j, each of two or three convs in one launch of the chain kernel
        (intermediates stay on chip); single-conv chains run as a conv."""
        strided_chain = kernel_module("conv_chain").strided_chain
        out = []
        for s in fuse.down_first[j].splits:
            chain = fuse.down_chains[(j, s.target)]
            if len(chain) == 1:
                out.append(self.conv(x, chain[0]))
            else:
                out.append(strided_chain(x, [self._weight(c) for c in chain],
                                         [c.bias for c in chain]))
        return out

    def down(self, x, fuse: FusePlan, j: int) -> List[torch.Tensor]:
        return self._down_batched(x, fuse, j)

    def _block_convs(self, x, block: BlockPlan) -> torch.Tensor:
        """A BasicBlock as two convs (the engine's form; functional: x is not written, so the
        measured choice may run it repeatedly on the same x)."""
        first, second = block.convs
        return self.conv(self.conv(x, first), second, x)

    def _block_fused(self, x, block: BlockPlan) -> torch.Tensor:
        """A BasicBlock in one launch of the block kernel (its intermediate stays on chip)."""
        first, second = block.convs
        kernel_module("basic_block")
        return torch.ops.hrnet_fast.basic_block_triton(x, self._weight(first), first.bias,
                                                       self._weight(second), second.bias)

    def blocks(self, x, blocks) -> Optional[torch.Tensor]:
        """Explicit ``backend="triton"``: every plain BasicBlock (``fusable_basic_block``) chooses
        per shape, measured, between two convs and the one-launch block kernel; under ``auto``
        only those of a width with a pinned config (``_offer_pinned_blocks``); other blocks run
        as the engine runs them. None (the engine's block-by-block run) where no block here is a
        candidate (or on the CPU without ``HRNET_FAST_FORCE_BASIC_BLOCK[_PINNED]``)."""
        offered = self._offered_blocks
        if not any(id(b) in offered for b in blocks):
            return None
        from ..engine import run_block
        for b in blocks:
            x = self._block(x, b) if id(b) in offered else run_block(self, x, b)
        return x

    def projected_head(self, x, projection: ConvSpec, contributions, weight, bias, mode,
                       align_corners):
        """The head with branch 0's 1x1 projection inside the head kernel, where it fits
        (``seg_head.projected_head_fits``); None otherwise (the engine runs the conv, then
        ``head``)."""
        if (not self._projected_head or projection.stride != 1 or projection.padding != 0
                or projection.relu or projection.relu_ranges is not None):
            return None
        head = kernel_module("seg_head")
        if not head.projected_head_fits(x, contributions, projection.weight, weight):
            return None
        return torch.ops.hrnet_fast.seg_head_projected_triton(
            x, projection.weight, projection.bias, list(contributions), weight, bias, mode,
            bool(align_corners))

    def head(self, base, contributions, weight, bias, mode, align_corners):
        if weight.shape[-1] != 1:  # the fused head kernel takes a 1x1 classifier only
            return fuse_then_classify(self.fuse)(base, contributions, weight, bias, mode,
                                                 align_corners)
        return seg_head_triton(base, contributions, weight, bias, mode, align_corners)
