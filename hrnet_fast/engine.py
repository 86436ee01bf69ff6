"""The inference engine: runs an :class:`~hrnet_fast.plan.HRNetPlan` with one backend.

Backends:
* ``torch``: aten ops over folded weights (cuDNN's fused conv epilogues on CUDA for fp16/bf16);
* ``compile``: ``torch.compile`` of the torch plan, compiled once per input shape;
* ``triton``: the Triton fuse-step and head kernels, convolutions on cuDNN;
* ``cuda``: the CUDA-extension fuse kernels, convolutions on cuDNN;
* ``auto``: ``triton`` on a CUDA GPU when Triton works, else ``torch``.
"""
from __future__ import annotations

import contextlib
import logging
import operator
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import cuda_ext
from .ops import registry
from .ops import cpu_conv
from .ops.conv import conv2d_bias_act_torch
from .ops.fuse import seg_head_torch, upsample_add_relu_torch
from .ops.registry import BackendUnavailable
from .ops.selection import SelectingOp, fuse_key
from .plan import BlockPlan, ConvSpec, FusePlan, HRNetPlan, ModulePlan, build_plan
from .reference import HighResolutionNet, check_image_batch, resize

logger = logging.getLogger(__name__)

# Input shapes whose CUDA graphs an engine keeps (least recently used dropped first). Each graph
# keeps its own memory pool (every intermediate activation of one forward; see the README for the
# measured size), so a few shapes, not dozens.
MAX_CUDA_GRAPHS = 4
ENGINE_BACKENDS = ("auto", "torch", "compile", "triton", "cuda")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}


def parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    key = str(dtype).lower()
    if key not in DTYPES:
        raise ValueError(f"dtype must be fp32, fp16 or bf16, got {dtype!r}")
    return DTYPES[key]


def resolve_engine_backend(backend: Optional[str], device: torch.device) -> str:
    """The concrete engine backend for ``backend`` on ``device``; BackendUnavailable says why not."""
    name = (backend or registry.default_backend()).lower()
    if name not in ENGINE_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {ENGINE_BACKENDS}")
    if name == "auto":
        if device.type == "cuda":
            if registry.status("upsample_add_relu", "triton", device)[0]:
                return "triton"
            if cuda_ext.usable_without_build():
                return "cuda"
        return "torch"
    if name in ("triton", "cuda"):
        ok, why = registry.status("upsample_add_relu", name, device)
        if not ok:
            raise BackendUnavailable(f"backend {name!r} is not available on {device.type}: {why}")
    return name


def _plain_conv(x, spec: ConvSpec, residual=None):
    return conv2d_bias_act_torch(x, spec.weight, spec.bias, spec.stride, spec.padding, residual,
                                 spec.relu, spec.relu_ranges)


def _torch_conv(x, spec: ConvSpec, residual=None):
    """The torch backend's conv: on the CPU, oneDNN with a once-reordered weight and the epilogue
    fused (ops/cpu_conv.py); elsewhere, or for ReLU ranges, ``conv2d_bias_act_torch``."""
    if x.device.type == "cpu" and spec.relu_ranges is None:
        y = cpu_conv.conv_fused(x, spec.weight, spec.bias, spec.stride, spec.padding, residual,
                                spec.relu, spec.cpu_cache)
        if y is not None:
            return y
    return _plain_conv(x, spec, residual)


def _triton_conv(x, spec: ConvSpec, residual=None):
    from .kernels.conv import conv2d_bias_act
    weight = spec.packed if spec.packed is not None else spec.weight
    ranges = spec.relu_mask if spec.relu_mask is not None else spec.relu_ranges
    return conv2d_bias_act(x, weight, spec.bias, stride=spec.stride, padding=spec.padding,
                           residual=residual, relu=spec.relu, relu_ranges=ranges)


def _spec_key(x, spec: ConvSpec, residual=None):
    return (tuple(x.shape), tuple(spec.weight.shape), str(x.dtype), spec.stride, spec.padding,
            residual is not None, spec.relu, spec.relu_ranges)


def _down_key(ops, x, fuse: FusePlan, j: int):
    chains = tuple(tuple(tuple(c.weight.shape) for c in fuse.down_chains[(j, s.target)])
                   for s in fuse.down_first[j].splits)
    return (tuple(x.shape), str(x.dtype), chains)


def _choices(op: str, always: Dict[str, Callable], optional: Dict[str, Callable],
             device: torch.device) -> Dict[str, Callable]:
    """Candidates of a measured choice. On the CPU nothing can be timed, so the optional (Triton)
    candidates join only when ``HRNET_FAST_FORCE_<OP>`` names one (tests, interpreter)."""
    if device.type == "cuda":
        return {**always, **optional}
    forced = os.environ.get(f"HRNET_FAST_FORCE_{op.upper()}")
    return {**always, **({forced: optional[forced]} if forced in optional else {})}


@dataclass
class OpSet:
    """The implementations one engine calls, resolved once (no per-call dispatch or validation).

    ``conv(x, spec, residual)``, ``fuse(base, contributions, mode, align_corners, relu)``,
    ``head(base, contributions, weight, bias, mode, align_corners)`` and
    ``down(ops, x, fuse_plan, j)`` (every chain leaving source j, in split order)."""

    conv: Callable
    fuse: Callable
    head: Callable
    down: Callable
    packs_weights: bool = False
    # CPU only: head branches whose channels are below half the head width are resized first and
    # projected at full resolution (see _seg_head).
    resize_narrow_head_branches: bool = False

    @classmethod
    def for_backend(cls, backend: str, device: torch.device, auto: bool = False) -> "OpSet":
        """Implementations for an engine backend. On an explicit triton backend each conv shape
        picks the faster of cuDNN and the Triton conv, and each source's strided chains the faster
        of the batched form and the one-launch chain kernel (measured once per shape on CUDA).
        Under ``auto`` convolutions stay on cuDNN, and the fuse step picks per shape between the
        Triton and CUDA-extension kernels when both exist."""
        if backend in ("torch", "compile"):
            # compile traces plain aten convs (Inductor fuses them its own way).
            conv = _plain_conv if backend == "compile" else _torch_conv
            return cls(conv, upsample_add_relu_torch, seg_head_torch, _down_batched,
                       resize_narrow_head_branches=device.type == "cpu")
        _, fuse = registry.resolve("upsample_add_relu", backend, device)
        conv, down = _torch_conv, _down_batched
        # Triton convs and chain kernels autotune on first use of each shape (seconds per shape on
        # a GPU), so only an explicit backend="triton" takes them; auto keeps cuDNN convs and a
        # first call that returns in seconds.
        if (backend == "triton" and not auto
                and registry.status("conv2d_bias_act", "triton", device)[0]):
            conv_options = _choices("conv2d_bias_act", {"torch": _torch_conv},
                                    {"triton": _triton_conv}, device)
            if len(conv_options) > 1 or "triton" in conv_options:
                conv = SelectingOp("conv2d_bias_act", conv_options, _spec_key)
            down_options = _choices("fuse_down", {"batched": _down_batched},
                                    {"chain": _down_chained}, device)
            if len(down_options) > 1:
                down = SelectingOp("fuse_down", down_options, _down_key)
            elif "chain" in down_options:
                down = _down_chained
        if device.type == "cuda" and auto and backend != "cuda" and cuda_ext.usable_without_build():
            fuse = SelectingOp("upsample_add_relu", {
                "triton": fuse, "cuda": registry.resolve("upsample_add_relu", "cuda", device)[1]},
                fuse_key)
        if backend == "triton":
            _, head = registry.resolve("seg_head", "triton", device)
        else:
            def head(base, contributions, weight, bias, mode, align_corners):
                act = fuse(base, contributions, mode, align_corners, True)
                return F.conv2d(act, weight, bias, 1, weight.shape[-1] // 2)
        packs = conv is not _torch_conv or down is not _down_batched
        return cls(conv, fuse, head, down, packs)


def _down_batched(ops: "OpSet", x: torch.Tensor, fuse: FusePlan, j: int) -> List[torch.Tensor]:
    """Chains leaving source j: the first convs of all of them as one batched conv (ReLU ranges),
    then the remaining convs of each chain on its slice."""
    batched = fuse.down_first[j]
    y = _conv(ops, x, batched.conv)
    out = []
    for s in batched.splits:
        z = y[:, s.start:s.end]
        rest = fuse.down_rest.get((j, s.target))
        out.append(_chain(ops, z, rest) if rest else z)
    return out


def _down_chained(ops: "OpSet", x: torch.Tensor, fuse: FusePlan, j: int) -> List[torch.Tensor]:
    """Chains leaving source j, each of two or three convs in one launch of the chain kernel
    (intermediates stay on chip); single-conv chains run as a conv."""
    from .kernels.conv_chain import strided_chain
    out = []
    for s in fuse.down_first[j].splits:
        chain = fuse.down_chains[(j, s.target)]
        if len(chain) == 1:
            out.append(_conv(ops, x, chain[0]))
        else:
            out.append(strided_chain(x, [c.packed if c.packed is not None else c.weight for c in chain],
                                     [c.bias for c in chain]))
    return out


def _conv(ops: OpSet, x: torch.Tensor, spec: ConvSpec, residual=None) -> torch.Tensor:
    return ops.conv(x, spec, residual)


def _chain(ops: OpSet, x: torch.Tensor, specs: List[ConvSpec]) -> torch.Tensor:
    for spec in specs:
        x = _conv(ops, x, spec)
    return x


def _block(ops: OpSet, x: torch.Tensor, block: BlockPlan) -> torch.Tensor:
    residual = x if block.downsample is None else _conv(ops, x, block.downsample)
    h = x
    for spec in block.convs[:-1]:
        h = _conv(ops, h, spec)
    return _conv(ops, h, block.convs[-1], residual)


def _module(ops: OpSet, xs: List[torch.Tensor], m: ModulePlan, mode: str, align: bool):
    xs = [_chain_blocks(ops, x, blocks) for x, blocks in zip(xs, m.branches)]
    f = m.fuse
    if f is None:
        return xs
    contributions: List[List[torch.Tensor]] = [[] for _ in range(f.num_outputs)]
    for j, batched in sorted(f.down_first.items()):
        for s, z in zip(batched.splits, ops.down(ops, xs[j], f, j)):
            contributions[s.target].append(z)
    for j, batched in sorted(f.up.items()):
        y = _conv(ops, xs[j], batched.conv)
        for s in batched.splits:
            contributions[s.target].append(y[:, s.start:s.end])
    return [ops.fuse(xs[i], contributions[i], mode, align, True) for i in range(f.num_outputs)]


def _chain_blocks(ops: OpSet, x: torch.Tensor, blocks: List[BlockPlan]) -> torch.Tensor:
    for b in blocks:
        x = _block(ops, x, b)
    return x


def run_plan(plan: HRNetPlan, ops: OpSet, x: torch.Tensor):
    """The whole forward pass of ``plan`` on ``x`` (already of the plan's dtype and layout)."""
    for spec in plan.stem:
        x = _conv(ops, x, spec)
    x = _chain_blocks(ops, x, plan.layer1)
    xs = [x]
    mode, align = plan.upsample, plan.align_corners
    for transition, stage in zip(plan.transitions, plan.stages):
        xs = [xs[src] if chain is None else _chain(ops, xs[src], chain)
              for chain, src in zip(transition.branches, transition.sources)]
        for m in stage:
            xs = _module(ops, xs, m, mode, align)
    if plan.head_kind == "features":
        # A padded plan (build_plan's channel_multiple) carries zero channels past the real widths.
        return [x if x.shape[1] == c else x[:, :c] for x, c in zip(xs, plan.branch_channels)]
    head = plan.head
    if plan.head_kind == "seg":
        return _seg_head(ops, head, xs, mode, align)
    y = _chain_blocks(ops, xs[0], head.incre[0])
    for i, spec in enumerate(head.downsamp):
        y = _chain_blocks(ops, xs[i + 1], head.incre[i + 1]) + _conv(ops, y, spec)
    y = _conv(ops, y, head.final)
    return F.linear(y.flatten(2).mean(2), head.fc_weight, head.fc_bias)


def _seg_head(ops: OpSet, head, xs: List[torch.Tensor], mode: str, align: bool) -> torch.Tensor:
    """``classifier(relu(W0 x0 + b + sum_k resize(W_k x_k)))``.

    Each branch is projected at its own resolution and resized (the rewrite: on a GPU the fused head
    kernel reads the projections at low resolution). On the CPU, resizing is the cost that matters
    (about 2 ns per resized value against 0.013 ns per conv MAC, 2 cores, torch 2.13), so a branch
    narrower than half the head width (36 and 72 of w18's 270) is resized first and projected at full
    resolution, ``W_k resize(x_k)``: the same value, since resizing commutes with a 1x1 conv."""
    base = _conv(ops, xs[0], head.projections[0])
    contributions = []
    size = xs[0].shape[-2:]
    for xk, spec in zip(xs[1:], head.projections[1:]):
        if ops.resize_narrow_head_branches and 2 * xk.shape[1] < spec.out_channels:
            base = _conv(ops, resize(xk, size, mode, align), spec, residual=base)
        else:
            contributions.append(_conv(ops, xk, spec))
    c = head.classifier
    return ops.head(base, contributions, c.weight, c.bias, mode, align)


_VERSION = operator.attrgetter("_version")
_EPS = operator.attrgetter("eps")
_DATA_PTR = torch.Tensor.data_ptr


class ModuleTree:
    """A module's submodules (``modules``, ``names``), gathered once, and ``changed()``: a cheap test
    that the tree is still the one gathered. It holds every (dict, key, object) entry of each
    submodule's ``_modules`` (and, with ``tensors=True``, ``_parameters`` and ``_buffers``) and
    checks ``d[k] is obj`` for all (``nn.Module.__setattr__`` replaces entries in those dicts; a
    deleted entry is a KeyError) and that no ``_modules`` dict grew (a submodule set where there was
    none, e.g. ``block.downsample``)."""

    def __init__(self, root: nn.Module, tensors: bool = False) -> None:
        named = list(root.named_modules())
        self.names = [name for name, _ in named]
        self.modules = [m for _, m in named]
        kinds = ("_parameters", "_buffers", "_modules") if tensors else ("_modules",)
        entries = [(d, k, v) for m in self.modules for d in (getattr(m, a) for a in kinds)
                   for k, v in d.items()]
        self._dicts, self._keys, self._objs = (tuple(c) for c in zip(*entries)) if entries else ((),) * 3
        self._children = tuple(m._modules for m in self.modules)
        self._sizes = tuple(map(len, self._children))

    def changed(self) -> bool:
        try:
            same = all(map(operator.is_, map(operator.getitem, self._dicts, self._keys), self._objs))
        except KeyError:
            return True
        return not same or tuple(map(len, self._children)) != self._sizes


class WeightWatch:
    """Notices changes of a module after the plan was built, on every call: the module tree (a
    Parameter, buffer or submodule assigned or deleted: :class:`ModuleTree`), each floating tensor's
    version counter (in-place writes: ``load_state_dict``, optimizer steps, ``with no_grad():
    p.mul_(...)``) and storage pointer (``p.data = ...``, moves and casts), and BatchNorm ``eps``.
    Costs about 0.45 ms per call for w48 (1,839 tensors, 1,061 modules) on a busy 2-core CPU, where
    the version counters alone cost 0.13 ms (the lists are gathered once). Not seen: in-place
    edits through ``.data`` (a separate version counter) and in-place edits of inference tensors
    (none at all); call ``rebuild()`` after those."""

    def __init__(self, module: nn.Module) -> None:
        self.tree = ModuleTree(module, tensors=True)
        tensors = [t for t in list(module.parameters()) + list(module.buffers())
                   if t.is_floating_point()]  # num_batches_tracked does not enter the plan
        self._versioned = [t for t in tensors if not t.is_inference()]
        self._tensors = tensors
        self._bns = [m for m in self.tree.modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.snapshot = self.take()

    def take(self) -> Optional[Tuple]:
        try:
            versions = tuple(map(_VERSION, self._versioned))
        except RuntimeError:  # a tensor became an inference tensor (``p.data = ...``): changed
            return None
        return versions, tuple(map(_DATA_PTR, self._tensors)), tuple(map(_EPS, self._bns))

    def changed(self) -> bool:
        return self.tree.changed() or self.take() != self.snapshot


class _Graph:
    def __init__(self, graph, static_in, static_out) -> None:
        self.graph, self.static_in, self.static_out = graph, static_in, static_out


class HRNetEngine(nn.Module):
    """Inference-only HRNet over a folded, rewritten plan. ``forward(x)`` equals ``source(x)``
    (eval mode) within the numerics of the design. Rebuilt automatically when the source model's
    weights change (:class:`WeightWatch`), and on the next call after ``invalidate()``."""

    def __init__(self, source: HighResolutionNet, *, backend: str = "auto",
                 dtype: Optional[torch.dtype] = None, channels_last: Optional[bool] = None,
                 cuda_graphs: Optional[bool] = None, device=None) -> None:
        super().__init__()
        if not isinstance(source, HighResolutionNet):
            raise TypeError(f"optimize() needs an hrnet_fast HRNet, got {type(source).__name__}")
        if source.training:
            raise ValueError("optimize() needs an eval-mode model (BatchNorm running statistics are "
                             "folded into the convs); call model.eval() first")
        first = next(source.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = parse_dtype(dtype) or first.dtype
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        self.channels_last = True if channels_last is None else bool(channels_last)
        self.backend = resolve_engine_backend(backend, self.device)
        self.auto = (backend or registry.default_backend()).lower() == "auto"
        if cuda_graphs and self.device.type != "cuda":
            raise BackendUnavailable("cuda_graphs=True needs a CUDA device; the engine runs on "
                                     f"{self.device}")
        # On by default on CUDA: HRNet is launch-bound there (eager wall time is 2-4x its GPU time).
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self.config = source.config
        # Not registered as a submodule: the engine must not show up in the source's state dict.
        object.__setattr__(self, "source", source)
        self._ops = OpSet.for_backend(self.backend, self.device, self.auto)
        self._graphs: Dict[Tuple, _Graph] = {}
        self._seen_shapes: Dict[Tuple, None] = {}  # shapes run once eagerly: captured on the next call
        self._compiled: Optional[Callable] = None
        self.rebuild()

    def rebuild(self) -> None:
        """Fold the source model's current weights again (drops captured CUDA graphs)."""
        with torch.inference_mode(False), torch.no_grad():
            # Channel multiples of 8 for tensor-core convs and aligned vector loads; on the CPU the
            # zero channels would only cost time.
            plan = build_plan(self.source, channel_multiple=8 if self.device.type == "cuda" else 1)
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format

            def move(t: torch.Tensor) -> torch.Tensor:
                t = t.to(device=self.device, dtype=self.dtype)
                return t.contiguous(memory_format=fmt) if t.dim() == 4 else t.contiguous()

            self.plan = plan.map_tensors(move)
            if self._ops.packs_weights:
                from .kernels.conv import pack_weight, relu_mask
                for spec in self.plan.conv_specs():
                    spec.packed = pack_weight(spec.weight)
                    if spec.relu_ranges is not None:
                        spec.relu_mask = relu_mask(spec.relu_ranges, spec.out_channels, self.device)
        self._watch = WeightWatch(self.source)
        self._stale = False
        self._graphs.clear()
        self._seen_shapes.clear()
        if self.backend == "compile":
            self._compiled = torch.compile(self._run, dynamic=False)

    def invalidate(self) -> None:
        """Refold the source's weights on the next call (for changes the watch cannot see)."""
        self._stale = True

    def extra_repr(self) -> str:
        return (f"preset={self.config.name}, backend={self.backend}, dtype={self.dtype}, "
                f"device={self.device}, channels_last={self.channels_last}, "
                f"cuda_graphs={self.cuda_graphs}")

    def check_input(self, x) -> None:
        check_image_batch(x, self.config.in_channels)
        if x.dtype != self.dtype:
            raise ValueError(f"input dtype {x.dtype} does not match the engine's {self.dtype}; "
                             f"convert the input (x.to({self.dtype})) or build the engine with "
                             f"dtype={x.dtype}")
        if x.device != self.device and not (x.device.type == self.device.type == "cuda"
                                            and self.device.index is None):
            raise ValueError(f"input is on {x.device}, the engine on {self.device}")

    def _run(self, x: torch.Tensor):
        return run_plan(self.plan, self._ops, x)

    def forward(self, x: torch.Tensor):
        self.check_input(x)
        if self._stale or self._watch.changed():
            logger.info("source weights changed since the plan was built: rebuilding")
            self.rebuild()
        keep_cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), _cudnn_benchmark(self.device.type == "cuda"):
            if self.cuda_graphs:
                out, replayed = self._graph_forward(x)
                return _deliver(out, keep_cl, copy=replayed)
            return _deliver((self._compiled or self._run)(x), keep_cl, copy=False)

    def _graph_forward(self, x: torch.Tensor):
        """The first call of an input shape runs eagerly (it also warms up cuDNN's and Triton's
        per-shape choices); the second captures a CUDA graph, later calls replay it."""
        key = (tuple(x.shape), x.dtype, x.device, x.stride())
        entry = self._graphs.pop(key, None)
        run = self._compiled or self._run
        if entry is None:
            if key not in self._seen_shapes:
                self._seen_shapes[key] = None
                while len(self._seen_shapes) > 4 * MAX_CUDA_GRAPHS:
                    self._seen_shapes.pop(next(iter(self._seen_shapes)))
                return run(x), False
            while len(self._graphs) >= MAX_CUDA_GRAPHS:  # each graph keeps its own memory pool
                self._graphs.pop(next(iter(self._graphs)))  # least recently used first
            entry = self._capture(run, x)
        self._graphs[key] = entry  # (re)inserted last: the dict's order is least recent first
        entry.static_in.copy_(x)
        entry.graph.replay()
        return entry.static_out, True  # overwritten by the next replay: _deliver copies it

    def _capture(self, run, x: torch.Tensor) -> _Graph:
        static_in = x.clone()
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):  # one warm-up on a side stream, as capture requires
            run(static_in)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = run(static_in)
        return _Graph(graph, static_in, static_out)


@contextlib.contextmanager
def _cudnn_benchmark(on: bool):
    """cuDNN's measured algorithm choice for the engine's convolutions, restored afterwards.

    Its heuristics alone picked sm80-generation kernels for many of HRNet's thin convs on an H200
    (torch 2.11, cuDNN 9.19); measuring once per shape costs the first call of each input shape
    only. The first call of a shape always runs eagerly, so the measuring never happens inside a
    CUDA-graph capture."""
    if not on:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _deliver(out, keep_channels_last: bool, copy: bool):
    """The engine's output in the caller's layout (NCHW-contiguous unless the input was
    channels_last), always a tensor of its own when ``copy`` (CUDA-graph static outputs)."""
    def one(t: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if keep_channels_last else torch.contiguous_format
        if t.is_contiguous(memory_format=fmt):
            return t.clone() if copy else t
        # A new dense tensor already (also for the channel slices of a padded plan's features).
        return t.contiguous(memory_format=fmt)
    return [one(t) for t in out] if isinstance(out, list) else one(out)


def optimize(model: HighResolutionNet, *, backend: str = "auto", dtype=None,
             channels_last: Optional[bool] = None, cuda_graphs: Optional[bool] = None,
             device=None) -> HRNetEngine:
    """An inference-only module whose ``forward(x)`` equals ``model(x)`` (eval mode) within the
    design's numerics: BatchNorm folded, fuse steps and head fused, the chosen backend's kernels.

    ``dtype`` fp32/fp16/bf16 (default: the model's); ``channels_last`` on by default; ``cuda_graphs``
    (on by default on CUDA; ``False`` opts out) runs the first call of an input shape eagerly,
    captures a CUDA graph on the second and replays it after that, for at most
    ``MAX_CUDA_GRAPHS`` shapes (least recently used dropped). Asking for a backend that
    cannot run here raises BackendUnavailable saying why.
    """
    return HRNetEngine(model, backend=backend, dtype=dtype, channels_last=channels_last,
                       cuda_graphs=cuda_graphs, device=device)
