"""The inference plan: an eval-mode reference HRNet as a short list of fused ops over folded weights.

The plan is pure data (dataclasses of tensors and ints); it knows nothing about backends (what a
backend derives from it, packed weights or oneDNN caches, lives in the backend's own state). Rewrites,
all exact in real arithmetic (only the order of fp additions changes):

* every conv + BN folded (``fold.py``);
* fuse step of every HighResolutionModule, output i:
  ``y_i = relu(x_i + sum_{j>i} resize(conv1x1_ij(x_j)) + sum_{j<i} chain_ij(x_j))``, one
  ``upsample_add_relu`` per target;
* horizontal batching: the 1x1 convs that read the same source j (one per target i<j) are one conv
  with stacked output channels; the first stride-2 convs of the chains leaving source j are one conv
  with stacked output channels, ReLU only on the ranges of chains that continue;
* head rewrite: ``conv1x1(concat[x0, up(x1), up(x2), up(x3)]) = W0 x0 + b + sum_k up(W_k x_k)``
  (resizing is linear with weights summing to one), so the 1x1 conv runs at each branch's own
  resolution and the concatenated tensor is never built;
* channel padding (``build_plan(model, channel_multiple=m)``, m=8 on CUDA): every tensor between the
  input image and the head output carries ``round_up(C, m)`` channels (at least ``min_channels``
  where that is set), the extra ones identically zero.
  Why: fp16/bf16 tensor-core convolutions (cuDNN) want channel counts that are multiples of 8, and
  the fuse kernels' 16-byte vector loads want channel offsets that are multiples of 8 elements (w18's
  18/36-channel branches give neither). How: each conv gets zero weight rows and zero bias for the
  output channels it adds and zero weight columns for the padded channels it reads; the stem reads
  the image unpadded and the classifier writes exactly ``num_classes``. In a horizontally batched
  conv each split starts at a multiple of m (zero rows fill any gap). Exact, for finite activations:
  a padded channel is 0 after every step (conv with zero rows and zero bias, ReLU, residual add,
  resize, sum), and a real channel only gains ``0 * 0`` terms from the padded columns. The
  features head slices each branch back to its real width (``HRNetPlan.branch_channels``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .fold import fold_conv_bn
from .reference import BasicBlock, Bottleneck, HighResolutionModule, HighResolutionNet


@dataclass
class ConvSpec:
    """``act(conv2d(x, weight, bias, stride, padding) [+ residual])`` with folded BN.

    ``relu_ranges`` (output-channel [start, end) pairs) overrides ``relu`` when set: only those
    channels take the ReLU (horizontally batched convs).
    """

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    stride: int = 1
    padding: int = 0
    relu: bool = True
    relu_ranges: Optional[Tuple[Tuple[int, int], ...]] = None

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


@dataclass
class BlockPlan:
    """A BasicBlock (convs [3x3, 3x3]) or Bottleneck (convs [1x1, 3x3, 1x1]); the last conv takes the
    residual (``x`` or ``downsample(x)``) and the ReLU."""

    convs: List[ConvSpec]
    downsample: Optional[ConvSpec] = None


@dataclass
class Split:
    """A target's channel range [start, end) inside a horizontally batched conv's output."""

    target: int
    start: int
    end: int


@dataclass
class BatchedConv:
    conv: ConvSpec
    splits: List[Split]


@dataclass
class FusePlan:
    """Fuse step of one module. ``up[j]`` batches the 1x1 convs from source j to every target i<j;
    ``down_first[j]`` batches the first stride-2 convs from j to every target i>j; ``down_rest[(j, i)]``
    holds the remaining convs of the chain j -> i, and ``down_chains[(j, i)]`` the whole chain
    unbatched (for the one-launch chain kernel, the alternative to batching)."""

    num_outputs: int
    # Output i's hoisted bias (``hoist_biases``): the summed biases of the last conv of every
    # contribution into i, which then run without one; the fuse op adds it once per channel.
    bias: Dict[int, torch.Tensor] = field(default_factory=dict)
    up: Dict[int, BatchedConv] = field(default_factory=dict)
    down_first: Dict[int, BatchedConv] = field(default_factory=dict)
    down_rest: Dict[Tuple[int, int], List[ConvSpec]] = field(default_factory=dict)
    down_chains: Dict[Tuple[int, int], List[ConvSpec]] = field(default_factory=dict)


@dataclass
class ModulePlan:
    branches: List[List[BlockPlan]]
    fuse: Optional[FusePlan]


@dataclass
class TransitionPlan:
    """``branches[i]`` is None (identity of branch i) or a conv chain reading ``sources[i]``."""

    branches: List[Optional[List[ConvSpec]]]
    sources: List[int]


@dataclass
class SegHeadPlan:
    """``classifier(relu(proj[0](x0) + sum_k resize(proj[k](x_k))))``; proj[0] carries the bias."""

    projections: List[ConvSpec]
    classifier: ConvSpec


@dataclass
class PoseHeadPlan:
    """The pose model's ``final_layer`` (no ReLU). The last module's fuse into branch 0 and this conv
    run as one head op: ``final(relu(x0 + sum_k contribution_k))``, the seg head's form, so a 1x1
    ``final_layer`` runs in the fused head kernel and the fused branch-0 tensor never reaches memory."""

    final: ConvSpec


@dataclass
class ClassificationHeadPlan:
    incre: List[List[BlockPlan]]
    downsamp: List[ConvSpec]
    final: ConvSpec
    fc_weight: torch.Tensor
    fc_bias: torch.Tensor


@dataclass
class HRNetPlan:
    stem: List[ConvSpec]
    layer1: List[BlockPlan]
    transitions: List[TransitionPlan]
    stages: List[List[ModulePlan]]
    head_kind: str
    head: object
    upsample: str
    align_corners: bool
    # Real widths of the final branches; a padded plan's branch tensors carry zero channels beyond.
    branch_channels: Tuple[int, ...]

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "HRNetPlan":
        """A copy with ``fn`` applied to every tensor (device / dtype / memory-format moves)."""
        return _map(self, fn)

    def conv_specs(self) -> List[ConvSpec]:
        """Every ConvSpec of the plan (each object once)."""
        seen: Dict[int, ConvSpec] = {}
        _walk(self, lambda o: seen.setdefault(id(o), o) if isinstance(o, ConvSpec) else None)
        return list(seen.values())

    def tensors(self) -> List[torch.Tensor]:
        out: List[torch.Tensor] = []
        _map(self, lambda t: out.append(t) or t)
        return out


def _map(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, list):
        return [_map(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map(v, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _walk(obj, visit) -> None:
    visit(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _walk(getattr(obj, f.name), visit)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk(v, visit)
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk(v, visit)


# --------------------------------------------------------------------------------------- building

def _round_up(c: int, m: int) -> int:
    return -(-c // m) * m


@dataclass(frozen=True)
class Padding:
    """Channel padding with a floor: every width rounds up to ``multiple`` and to at least
    ``minimum`` (w18 with (8, 32): 18 -> 32, 36 -> 40, 72 -> 72); split starts align to
    ``multiple``. A plain int m is Padding(m, 0)."""

    multiple: int
    minimum: int = 0

    def width(self, c: int) -> int:
        return max(_round_up(c, self.multiple), _round_up(self.minimum, self.multiple))


def _width(c: int, m) -> int:
    return m.width(c) if isinstance(m, Padding) else _round_up(c, m)


def _align(start: int, m) -> int:
    return _round_up(start, m.multiple if isinstance(m, Padding) else m)


def _pad(weight: torch.Tensor, bias: Optional[torch.Tensor], m, pad_in: bool = True,
         pad_out: bool = True):
    """``weight`` [Cout, Cin, k, k] with zero output rows (zero bias) and zero input columns appended
    up to the padded widths (``_width``): the added outputs are exactly 0 and the added inputs
    (zeros) add nothing."""
    cout, cin = weight.shape[:2]
    extra_out = _width(cout, m) - cout if pad_out else 0
    extra_in = _width(cin, m) - cin if pad_in else 0
    if extra_out or extra_in:
        weight = F.pad(weight, (0, 0, 0, 0, 0, extra_in, 0, extra_out))
        bias = None if bias is None else F.pad(bias, (0, extra_out))
    return weight, bias


def _conv_spec(seq_or_conv, bn=None, relu=True, m: int = 1, pad_in: bool = True) -> ConvSpec:
    """A ConvSpec from a conv (+ BN); ``seq_or_conv`` may be a Sequential(conv, bn[, relu]). Input
    and output channels are padded to multiples of ``m`` (``pad_in=False``: reads the image)."""
    if isinstance(seq_or_conv, nn.Sequential):
        mods = list(seq_or_conv)
        conv, bn = mods[0], (mods[1] if len(mods) > 1 else None)
        relu = any(isinstance(m, nn.ReLU) for m in mods[2:])
    else:
        conv = seq_or_conv
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.kernel_size[0] != conv.kernel_size[1]:
        raise ValueError(f"unsupported conv in plan: {conv}")
    w, b = _pad(*fold_conv_bn(conv, bn), m, pad_in=pad_in)
    return ConvSpec(w, b, stride=conv.stride[0], padding=conv.padding[0], relu=relu)


def _block_plan(block: nn.Module, m: int, hoist: bool = False) -> BlockPlan:
    """``hoist`` moves the downsample's bias into the last conv's (CUDA plans):
    ``relu(W3 y + b3 + (Wd x + bd)) = relu(W3 y + (b3 + bd) + Wd x)``. The last conv's bias goes
    into cuDNN's fused add + ReLU epilogue; a downsample with a bias costs a separate bias-add pass
    over its output (w18/w48's layer1: 256 channels at a quarter of the input size, 67 MB fp16 at
    1024x2048, one of the 12 bias adds an H200 profile still showed)."""
    ds = _conv_spec(block.downsample, relu=False, m=m) if block.downsample is not None else None
    if isinstance(block, Bottleneck):
        convs = [_conv_spec(block.conv1, block.bn1, m=m), _conv_spec(block.conv2, block.bn2, m=m),
                 _conv_spec(block.conv3, block.bn3, m=m)]
    elif isinstance(block, BasicBlock):
        convs = [_conv_spec(block.conv1, block.bn1, m=m), _conv_spec(block.conv2, block.bn2, m=m)]
    else:
        raise TypeError(f"unknown block type {type(block).__name__}")
    if hoist and ds is not None and ds.bias is not None:
        last = convs[-1]
        last.bias = ds.bias.clone() if last.bias is None else last.bias + ds.bias
        ds.bias = None
    return BlockPlan(convs, ds)


def _stack_convs(convs: List[ConvSpec], targets: List[int], m: int = 1) -> BatchedConv:
    """Stack convs that read the same input (same kernel, stride, padding) along output channels.
    Each split starts at a multiple of ``m`` (aligned vector loads of its slice); zero rows with zero
    bias fill the gaps."""
    first = convs[0]
    if any((c.stride, c.padding, c.weight.shape[1:]) != (first.stride, first.padding, first.weight.shape[1:])
           for c in convs):
        raise ValueError("only convs of the same geometry can be batched")
    splits, ranges, weights, biases, start = [], [], [], [], 0
    for c, t in zip(convs, targets):
        gap = _align(start, m) - start
        if gap:
            weights.append(c.weight.new_zeros((gap,) + c.weight.shape[1:]))
            biases.append(c.bias.new_zeros(gap))
        prev_end, start = start, start + gap
        end = start + c.out_channels
        splits.append(Split(t, start, end))
        if c.relu:
            # After a ReLU split (zero rows between at most: ReLU keeps them 0): one ReLU launch.
            if ranges and ranges[-1][1] == prev_end:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
        weights.append(c.weight)
        biases.append(c.bias)
        start = end
    weight = torch.cat(weights, 0)
    bias = torch.cat(biases, 0)
    all_relu = all(c.relu for c in convs)
    relu_ranges = None if all_relu or not ranges else tuple(ranges)
    return BatchedConv(ConvSpec(weight, bias, first.stride, first.padding, relu=all_relu,
                                relu_ranges=relu_ranges), splits)


def _fuse_plan(module: HighResolutionModule, m: int, hoist: bool = False) -> Optional[FusePlan]:
    if module.fuse_layers is None:
        return None
    plan = _fuse_plan_unhoisted(module, m)
    if hoist:
        _hoist_biases(plan)
    return plan


def _hoist_biases(plan: FusePlan) -> None:
    """Move the bias of every contribution's last conv into the fuse of its target:
    ``relu(x_i + sum_j resize(W x_j + b_j)) = relu(x_i + sum_j b_j + sum_j resize(W x_j))``, exact
    because resizing keeps a per-channel constant (bilinear weights sum to 1; nearest copies).
    Why: cuDNN adds a conv's bias in a separate kernel unless ReLU follows (its fused epilogue), so
    each of these ReLU-free convs cost a launch and a pass over its output (the w18 CUDA plan's
    convs whose bias cuDNN adds separately go from 70 to 13; an H200 profile put the elementwise
    kernels, mostly such bias adds, at 0.39-0.70 ms per forward: benchmarks/RESULTS.md); the fuse
    kernel adds the sum in the pass it makes anyway. A batched conv keeps the biases of its ReLU splits (first steps of
    longer chains)."""
    def take(i: int, b: Optional[torch.Tensor]) -> None:
        if b is not None:
            plan.bias[i] = b.clone() if i not in plan.bias else plan.bias[i] + b

    for batched in plan.up.values():  # 1x1 convs, no ReLU: every split is a whole contribution
        for sp in batched.splits:
            take(sp.target, batched.conv.bias[sp.start:sp.end])
        batched.conv.bias = None
    for j, batched in plan.down_first.items():
        keep = batched.conv.bias.clone()
        hoisted = [sp for sp in batched.splits if (j, sp.target) not in plan.down_rest]
        for sp in hoisted:  # one-conv chains: no ReLU, their biases go to the fuse
            take(sp.target, keep[sp.start:sp.end].clone())
            keep[sp.start:sp.end] = 0
            plan.down_chains[(j, sp.target)][0].bias = None
        batched.conv.bias = None if len(hoisted) == len(batched.splits) else keep
    for (j, i), rest in plan.down_rest.items():
        take(i, rest[-1].bias)
        rest[-1].bias = None  # the same ConvSpec ends down_chains[(j, i)]


def _fuse_plan_unhoisted(module: HighResolutionModule, m: int) -> FusePlan:
    nb = module.num_branches
    n_out = len(module.fuse_layers)
    plan = FusePlan(num_outputs=n_out)
    for j in range(nb):
        up_targets = [i for i in range(n_out) if i < j]
        if up_targets:
            convs = [_conv_spec(module.fuse_layers[i][j], relu=False, m=m) for i in up_targets]
            plan.up[j] = _stack_convs(convs, up_targets, m)
        down_targets = [i for i in range(n_out) if i > j]
        if down_targets:
            firsts = []
            for i in down_targets:
                chain = [_conv_spec(step, m=m) for step in module.fuse_layers[i][j]]
                plan.down_chains[(j, i)] = chain
                firsts.append(chain[0])
                if len(chain) > 1:
                    plan.down_rest[(j, i)] = chain[1:]
            plan.down_first[j] = _stack_convs(firsts, down_targets, m)
    return plan


def _transition_plan(transition: nn.ModuleList, n_prev: int, m: int) -> TransitionPlan:
    branches, sources = [], []
    for i, t in enumerate(transition):
        sources.append(i if i < n_prev else n_prev - 1)
        if t is None:
            branches.append(None)
        elif isinstance(t[0], nn.Conv2d):  # same resolution, new width: Sequential(conv, BN, ReLU)
            branches.append([_conv_spec(t, m=m)])
        else:  # a new branch: Sequential of stride-2 steps
            branches.append([_conv_spec(step, m=m) for step in t])
    return TransitionPlan(branches, sources)


def _seg_head_plan(model: HighResolutionNet, m: int, hoist: bool = False) -> SegHeadPlan:
    """``hoist`` (CUDA plans) moves the projection bias from branch 0's projection, at full branch-0
    size, to the lowest-resolution branch's: ``resize(W_k x_k + b) = resize(W_k x_k) + b`` (resizing
    keeps a per-channel constant). cuDNN adds a ReLU-free conv's bias in a pass of its own: over
    270 x 256 x 512 values for w18 at 1024x2048 (720 channels for w48) at branch 0, over 1/64 of
    that at branch 3."""
    ll = model.last_layer
    w, b = fold_conv_bn(ll[0], ll[1])
    projections, start = [], 0
    for k, c in enumerate(model.pre_stage_channels):
        # Reads the padded branch k; the head width (270 for w18) is padded too (zero bias: ReLU
        # keeps those channels 0 and the classifier's zero columns ignore them).
        wk, bias = _pad(w[:, start:start + c], b if k == 0 else None, m)
        projections.append(ConvSpec(wk.contiguous(), bias, 1, 0, relu=False))
        start += c
    if hoist and len(projections) > 1:
        projections[-1].bias, projections[0].bias = projections[0].bias, None
    cw, cb = _pad(*fold_conv_bn(ll[3], None), m, pad_out=False)  # exactly num_classes outputs
    classifier = ConvSpec(cw, cb, 1, ll[3].padding[0], relu=False)
    return SegHeadPlan(projections, classifier)


def _classification_head_plan(model: HighResolutionNet, m: int) -> ClassificationHeadPlan:
    fc_weight = model.classifier.weight.detach().to(torch.float64)
    final = _conv_spec(model.final_layer, m=m)
    return ClassificationHeadPlan(
        incre=[[_block_plan(b, m) for b in seq] for seq in model.incre_modules],
        downsamp=[_conv_spec(seq, m=m) for seq in model.downsamp_modules],
        final=final,
        # Zero columns for the (pooled, zero) channels a padded final conv adds.
        fc_weight=F.pad(fc_weight, (0, final.out_channels - fc_weight.shape[1])),
        fc_bias=model.classifier.bias.detach().to(torch.float64),
    )


def build_plan(model: HighResolutionNet, channel_multiple: int = 1,
               hoist_biases: bool = False, min_channels: int = 0) -> HRNetPlan:
    """Fold and rewrite an eval-mode reference model into a plan (float64 tensors on its device).

    ``channel_multiple`` m > 1 pads every tensor between the image and the head output to a multiple
    of m channels with zero channels, and aligns split starts of batched convs to m (module
    docstring); m = 1 leaves every width as the model has it. ``min_channels`` also pads every
    narrower width up to it (``Padding``). ``hoist_biases`` moves the biases of
    the fuse steps' ReLU-free convs into the fuse ops (``FusePlan.bias``; CUDA engines: there cuDNN
    adds a bias in a kernel of its own); not for the module whose fuse step is the pose head's. It
    also moves a block downsample's bias into the block's last conv and the seg head's projection
    bias to its lowest-resolution branch (``_block_plan``, ``_seg_head_plan``)."""
    m = channel_multiple
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"channel_multiple must be a positive integer, got {channel_multiple!r}")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 0:
        raise ValueError(f"min_channels must be a non-negative integer, got {min_channels!r}")
    if min_channels:
        m = Padding(m, min_channels)
    if not isinstance(model, HighResolutionNet):
        raise TypeError(f"build_plan needs a HighResolutionNet, got {type(model).__name__}")
    if model.training:
        raise ValueError("build_plan needs an eval-mode model (BatchNorm running statistics are "
                         "folded); call model.eval() first")
    cfg = model.config
    with torch.no_grad():
        stem = [_conv_spec(model.conv1, model.bn1, m=m, pad_in=False), _conv_spec(model.conv2, model.bn2, m=m)]
        layer1 = [_block_plan(b, m, hoist_biases) for b in model.layer1]
        transitions, stages = [], []
        n_prev = 1
        for idx in (1, 2, 3):
            transitions.append(_transition_plan(getattr(model, f"transition{idx}"), n_prev, m))
            stage = getattr(model, f"stage{idx + 1}")
            pose_last = cfg.head == "pose" and idx == 3
            stages.append([ModulePlan([[_block_plan(b, m, hoist_biases) for b in branch]
                                       for branch in mod.branches],
                                      _fuse_plan(mod, m, hoist_biases and not (
                                          pose_last and k == len(stage) - 1)))
                           for k, mod in enumerate(stage)])
            n_prev = stage[-1].num_branches
        if cfg.head == "seg":
            head = _seg_head_plan(model, m, hoist_biases)
        elif cfg.head == "classification":
            head = _classification_head_plan(model, m)
        elif cfg.head == "pose":
            fw, fb = _pad(*fold_conv_bn(model.final_layer, None), m, pad_out=False)  # K heatmaps
            head = PoseHeadPlan(ConvSpec(fw, fb, 1, model.final_layer.padding[0], relu=False))
        else:
            head = None
    return HRNetPlan(stem, layer1, transitions, stages, cfg.head, head, cfg.upsample,
                     cfg.align_corners, tuple(model.pre_stage_channels))
