"""The inference engine: interprets an :class:`~hrnet_fast.plan.HRNetPlan` with one backend,
watches the source model's weights, and replays CUDA graphs.

Backends live in ``hrnet_fast/backends`` (one module each: torch on the CPU and on CUDA, compile,
triton, cuda); ``hrnet_fast/backends/selection.py`` chooses among them (``auto``) and per shape.
"""
from __future__ import annotations

import contextlib
import logging
import operator
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .backends import selection
from .backends.base import Backend, BackendUnavailable
from .lanes import SERIAL, LanePool, SerialLanes
from .plan import BlockPlan, ConvSpec, HRNetPlan, ModulePlan, build_plan
from .side_path import in_side_path, ordinary_call
from .reference import HighResolutionNet, check_image_batch, fuse_resize

logger = logging.getLogger(__name__)

# Input shapes whose CUDA graphs an engine keeps (least recently used dropped first). Each graph
# keeps its own memory pool (every intermediate activation of one forward; see the README for the
# measured size), so a few shapes, not dozens.
MAX_CUDA_GRAPHS = 4
ENGINE_BACKENDS = selection.ENGINE_BACKENDS
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
    return selection.resolve_backend(backend, device)


# ------------------------------------------------------------------------ the plan's interpreter

def run_convs(be: Backend, x: torch.Tensor, specs: List[ConvSpec]) -> torch.Tensor:
    for spec in specs:
        x = be.conv(x, spec)
    return x


def run_block(be: Backend, x: torch.Tensor, block: BlockPlan) -> torch.Tensor:
    """A residual block. Its input ``x`` is the engine's own intermediate, read by nothing after the
    block (a previous block's output, a transition's or fuse step's output: every transition output
    is computed before any block of the stage runs), so the last conv may accumulate into it."""
    h = run_convs(be, x, block.convs[:-1])
    if block.downsample is None:
        return be.conv_into_residual(h, block.convs[-1], x)
    merged = be.conv_with_downsample(h, block.convs[-1], x, block.downsample)
    if merged is not None:
        return merged
    return be.conv_into_residual(h, block.convs[-1], be.conv(x, block.downsample))


def run_blocks(be: Backend, x: torch.Tensor, blocks: List[BlockPlan]) -> torch.Tensor:
    chained = be.blocks(x, blocks)  # the CPU backend's thin-layer chain (TorchCPU.blocks)
    if chained is not None:
        return chained
    for b in blocks:
        x = run_block(be, x, b)
    return x


def run_module_branches(be: Backend, xs: List[torch.Tensor], m: ModulePlan, mode: str = "",
                        align: bool = False, lanes: SerialLanes = SERIAL):
    """A module's branches and the contributions each fuse output receives (None: no fuse).

    Branch j's blocks and the contributions it sends (its strided chains and its 1x1 conv) run on
    lane j; each target's contributions are then delivered to the target's lane
    (``hrnet_fast/lanes.py``). A target's contributions are its strided ones by source, then its
    resized ones by source: the order a serial run sums them in.

    ``mode="mmseg"``: a resized contribution whose source is not exactly 2^k times smaller than its
    target (input sizes not divisible by 32) is resized here in mmseg's two steps, to the target's
    size; every other contribution goes to the fuse op as it is (there the first step alone reaches
    the target and equals the fuse op's size-based bilinear resize)."""
    f = m.fuse
    n = 0 if f is None else f.num_outputs
    down: List[List[torch.Tensor]] = [[] for _ in range(n)]
    up: List[List[torch.Tensor]] = [[] for _ in range(n)]
    sources: List[Dict[int, object]] = [{} for _ in range(n)]
    out = list(xs)
    for j, blocks in enumerate(m.branches):
        with lanes.on(j):
            out[j] = run_blocks(be, xs[j], blocks)
            targets = _contributions_from(be, out, f, j, mode, align, down, up) if n else ()
            ready = lanes.mark(j) if targets else None
        for i in targets:
            sources[i][j] = ready
    if f is None:
        return out, None
    contributions = [d + u for d, u in zip(down, up)]
    for i, c in enumerate(contributions):
        lanes.deliver(i, c, sources[i])
    return out, contributions


def _contributions_from(be: Backend, xs: List[torch.Tensor], f, j: int, mode: str, align: bool,
                        down: List[List[torch.Tensor]], up: List[List[torch.Tensor]]) -> set:
    """Source j's strided contributions (appended to ``down[target]``) and resized ones (to
    ``up[target]``); returns the targets."""
    targets = set()
    if j in f.down_first:
        for s, z in zip(f.down_first[j].splits, be.down(xs[j], f, j)):
            down[s.target].append(z)
            targets.add(s.target)
    if j in f.up:
        batched = f.up[j]
        y = be.conv(xs[j], batched.conv)
        for s in batched.splits:
            z = y[:, s.start:s.end]
            if mode == "mmseg":
                factor, size = 2 ** (j - s.target), xs[s.target].shape[-2:]
                if (z.shape[-2] * factor, z.shape[-1] * factor) != tuple(size):
                    z = fuse_resize(z, size, mode, align, factor)
            up[s.target].append(z)
            targets.add(s.target)
    return targets


def kernel_mode(mode: str) -> str:
    """The resize the backends' fuse and head ops do: "mmseg" is bilinear there (run_module_branches
    does mmseg's extra step)."""
    return "bilinear" if mode == "mmseg" else mode


def run_module(be: Backend, xs: List[torch.Tensor], m: ModulePlan, mode: str, align: bool,
               lanes: SerialLanes = SERIAL):
    xs, contributions = run_module_branches(be, xs, m, mode, align, lanes)
    if contributions is None:
        return xs
    op_mode, bias = kernel_mode(mode), m.fuse.bias
    out = []
    for i, c in enumerate(contributions):
        with lanes.on(i):
            out.append(be.fuse(xs[i], c, op_mode, align, True, bias.get(i)))
    return out


def run_plan(plan: HRNetPlan, be: Backend, x: torch.Tensor, lanes: SerialLanes = SERIAL):
    """The whole forward pass of ``plan`` on ``x`` (already of the plan's dtype and layout); with
    ``lanes``, each branch on a CUDA stream of its own (``hrnet_fast/lanes.py``)."""
    lanes.fork()
    with lanes.on(0):
        out = _run_plan(plan, be, x, lanes)
    lanes.join()
    return out


def _run_plan(plan: HRNetPlan, be: Backend, x: torch.Tensor, lanes: SerialLanes):
    x = run_convs(be, x, plan.stem)
    x = run_blocks(be, x, plan.layer1)
    xs = [x]
    mode, align = plan.upsample, plan.align_corners
    pose, last = plan.head_kind == "pose", len(plan.stages) - 1
    for s, (transition, stage) in enumerate(zip(plan.transitions, plan.stages)):
        xs = run_transition(be, xs, transition, lanes)
        for k, m in enumerate(stage):
            if pose and s == last and k == len(stage) - 1 and m.fuse is not None:
                # The last module fuses branch 0 only; its fuse and final_layer are one head op.
                xs, contributions = run_module_branches(be, xs, m, mode, align, lanes)
                final = plan.head.final
                return be.head(xs[0], contributions[0], final.weight, final.bias,
                               kernel_mode(mode), align)
            xs = run_module(be, xs, m, mode, align, lanes)
    if plan.head_kind == "seg":
        return run_seg_head(be, plan.head, xs, kernel_mode(mode), align, lanes)
    # The other heads run on lane 0.
    lanes.deliver(0, xs[1:], {k: lanes.mark(k) for k in range(1, len(xs))})
    if plan.head_kind == "features":
        # A padded plan (build_plan's channel_multiple) carries zero channels past the real widths.
        return [x if x.shape[1] == c else x[:, :c] for x, c in zip(xs, plan.branch_channels)]
    head = plan.head
    y = run_blocks(be, xs[0], head.incre[0])
    for i, spec in enumerate(head.downsamp):
        y = run_blocks(be, xs[i + 1], head.incre[i + 1]) + be.conv(y, spec)
    y = be.conv(y, head.final)
    return F.linear(y.flatten(2).mean(2), head.fc_weight, head.fc_bias)


def run_transition(be: Backend, xs: List[torch.Tensor], transition,
                   lanes: SerialLanes = SERIAL) -> List[torch.Tensor]:
    """A stage's input branches: kept, re-widthed or (new branches) strided from the last one. A
    conv chain runs on its source's lane and its result is delivered to its branch's lane."""
    out = []
    for k, (chain, src) in enumerate(zip(transition.branches, transition.sources)):
        if chain is None:
            out.append(xs[src])
            continue
        with lanes.on(src):
            y = run_convs(be, xs[src], chain)
            ready = lanes.mark(src)
        lanes.deliver(k, [y], {src: ready})
        out.append(y)
    return out


def run_seg_head(be: Backend, head, xs: List[torch.Tensor], mode: str, align: bool,
                 lanes: SerialLanes = SERIAL) -> torch.Tensor:
    """``classifier(relu(W0 x0 + b + sum_k resize(W_k x_k)))``.

    Each branch is projected at its own resolution (on its own lane) and resized (the rewrite: on a
    GPU the fused head kernel reads the projections at low resolution). A backend with
    ``resize_narrow_head_branches`` (the CPU's: resizing costs more than the conv there) resizes the
    branches narrower than half the head width first, ``W_k resize(x_k)`` (the same value: resizing
    commutes with a 1x1 conv), and projects them together with branch 0 as one conv over their
    concatenation: for w18 one 126-channel conv writing the 270-channel map once, instead of three
    convs of 18, 36 and 72 channels each writing it (and two of them reading it back)."""
    size = xs[0].shape[-2:]
    narrow = [k for k in range(1, len(xs))
              if be.resize_narrow_head_branches and 2 * xs[k].shape[1] < head.projections[k].out_channels]
    contributions, ready = [], {}
    for k in range(1, len(xs)):
        with lanes.on(k):
            if k not in narrow:
                contributions.append(be.conv(xs[k], head.projections[k]))
            ready[k] = lanes.mark(k)
    lanes.deliver(0, contributions + [xs[k] for k in narrow], ready)
    if narrow:
        x = be.resize_concat([xs[0]] + [xs[k] for k in narrow], size, mode, align)
        projection = merged_projection(be, head, narrow)
    else:
        x, projection = xs[0], head.projections[0]
    c = head.classifier
    y = be.projected_head(x, projection, contributions, c.weight, c.bias, mode, align)
    if y is not None:
        return y
    return be.head(be.conv(x, projection), contributions, c.weight, c.bias, mode, align)


def merged_projection(be: Backend, head, narrow: List[int]) -> ConvSpec:
    """One 1x1 ConvSpec projecting ``cat([x0] + [x_k for k in narrow])``: the projections' weights
    side by side along input channels, the sum of their biases (branch 0's alone unless a plan moved
    it). Built once per backend state (it lives beside the plan's, like the backend's other derived
    weights)."""
    key = ("merged_head_projection", id(head), tuple(narrow))
    spec = be.derived.get(key)
    if spec is None:
        specs = [head.projections[0]] + [head.projections[k] for k in narrow]
        weight = torch.cat([s.weight for s in specs], dim=1).contiguous()
        biases = [s.bias for s in specs if s.bias is not None]
        bias = torch.stack(biases).sum(0) if biases else None
        spec = be.derived[key] = ConvSpec(weight, bias, 1, 0, relu=False)
    return spec


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
                 cuda_graphs: Optional[bool] = None, branch_streams: Optional[bool] = None,
                 device=None) -> None:
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
        if self.device.type == "cpu":
            from .backends.torch_cpu import native_precision
            ok, why = native_precision(self.dtype)
            if not ok:
                raise BackendUnavailable(why)
        self.backend = resolve_engine_backend(backend, self.device)
        self.auto = (backend or selection.default_backend()).lower() == "auto"
        if cuda_graphs and self.device.type != "cuda":
            raise BackendUnavailable("cuda_graphs=True needs a CUDA device; the engine runs on "
                                     f"{self.device}")
        # On by default on CUDA: HRNet is launch-bound there (eager wall time is 2-4x its GPU time).
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if branch_streams and self.device.type != "cuda":
            raise BackendUnavailable("branch_streams=True needs a CUDA device; the engine runs on "
                                     f"{self.device}")
        # On by default with CUDA graphs (hrnet_fast/lanes.py): a replay runs the branches' small
        # convs side by side (w18 1.18x, w48 1.09x on an H200). Off by default without graphs:
        # there the forward is bound by host launch time, and the lanes' stream switches, events
        # and record_stream calls made it slower (w18 21.6 -> 25.5 ms per eager forward).
        self.branch_streams = (self.cuda_graphs if branch_streams is None
                               else bool(branch_streams))
        if self.backend == "compile":  # torch.compile traces the serial forward
            if branch_streams:
                raise BackendUnavailable("branch_streams=True does not combine with "
                                         "backend='compile' (torch.compile traces one stream)")
            self.branch_streams = False
        self._lane_pool = LanePool(priority_first=True)
        self.config = source.config
        # Not registered as a submodule: the engine must not show up in the source's state dict.
        object.__setattr__(self, "source", source)
        self._backend_class = selection.backend_class(self.backend, self.device)
        self._be: Optional[Backend] = None
        self._graphs: Dict[Tuple, _Graph] = {}
        self._seen_shapes: Dict[Tuple, None] = {}  # shapes run once eagerly: captured on the next call
        self._compiled: Optional[Callable] = None
        self.rebuild()
        self.eval()  # inference only: exporters and tracers see an eval-mode module

    def rebuild(self) -> None:
        """Fold the source model's current weights again (drops captured CUDA graphs)."""
        with torch.inference_mode(False), torch.no_grad():
            # Channel multiples of 8 for tensor-core convs and aligned vector loads; on the CPU the
            # zero channels would only cost time.
            # On CUDA the fuse steps' conv biases move into the fuse kernels (cuDNN adds a bias in a
            # kernel of its own); oneDNN adds it in the conv, so the CPU plan keeps them there.
            cuda = self.device.type == "cuda"
            multiple = selection.cuda_channel_multiple() if cuda else 1
            floor = selection.cuda_min_channels() if cuda else 0
            plan = build_plan(self.source, channel_multiple=multiple, hoist_biases=cuda,
                              min_channels=floor)
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format

            def move(t: torch.Tensor) -> torch.Tensor:
                t = t.to(device=self.device, dtype=self.dtype)
                return t.contiguous(memory_format=fmt) if t.dim() == 4 else t.contiguous()

            self.plan = plan.map_tensors(move)
            self._be = self._backend_class.prepare(self.plan, self.device, self.dtype,
                                                   auto=self.auto)
        self._watch = WeightWatch(self.source)
        self._stale = False
        self._graphs.clear()
        self._seen_shapes.clear()
        run = self._be.wrap_run(self._run_serial)
        self._compiled = None if run == self._run_serial else run

    def invalidate(self) -> None:
        """Refold the source's weights on the next call (for changes the watch cannot see)."""
        self._stale = True

    # What a backend derived from the weights (oneDNN's opaque reordered weights, the CPU kernels'
    # packs in this machine's instruction-set order, CUDA graphs) is never pickled or copied: a
    # pickled engine (torch.save, copy.deepcopy) keeps its source model and settings and folds
    # them again when loaded, on the machine that loads it.
    _DERIVED = ("plan", "_be", "_watch", "_compiled", "_lane_pool")

    def __getstate__(self):
        state = dict(super().__getstate__())
        for name in self._DERIVED:
            state.pop(name, None)
        state["_graphs"], state["_seen_shapes"] = {}, {}
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("branch_streams", self.cuda_graphs)  # older pickles
        self._lane_pool = LanePool(priority_first=True)
        self.rebuild()

    def extra_repr(self) -> str:
        return (f"preset={self.config.name}, backend={self.backend}, dtype={self.dtype}, "
                f"device={self.device}, channels_last={self.channels_last}, "
                f"cuda_graphs={self.cuda_graphs}, branch_streams={self.branch_streams}")

    def check_input(self, x) -> None:
        check_image_batch(x, self.config.in_channels)
        if x.dtype != self.dtype:
            raise ValueError(f"input dtype {x.dtype} does not match the engine's {self.dtype}; "
                             f"convert the input (x.to({self.dtype})) or build the engine with "
                             f"dtype={x.dtype}")
        if x.device != self.device and not (x.device.type == self.device.type == "cuda"
                                            and self.device.index is None):
            raise ValueError(f"input is on {x.device}, the engine on {self.device}")

    def _run_serial(self, x: torch.Tensor):
        return run_plan(self.plan, self._be, x)

    def _run(self, x: torch.Tensor):
        """One forward, on branch lanes where they apply: CUDA, not compiled (the compile backend
        runs ``_run_serial``), not traced or exported."""
        if not (self.branch_streams and x.is_cuda) or in_side_path():
            return self._run_serial(x)
        lanes = self._lane_pool.lanes(x.device, len(self.plan.branch_channels))
        return run_plan(self.plan, self._be, x, lanes)

    def forward(self, x: torch.Tensor):
        self.check_input(x)
        if self._stale or self._watch.changed():
            logger.info("source weights changed since the plan was built: rebuilding")
            self.rebuild()
        keep_cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Checked once per call (no compile wrapper, no trace or export running): the backends'
        # own checks then answer at once.
        ordinary = self._compiled is None and not in_side_path()
        with torch.no_grad(), _cudnn_benchmark(self.device.type == "cuda"), \
                (ordinary_call() if ordinary else contextlib.nullcontext()):
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
             branch_streams: Optional[bool] = None, device=None) -> HRNetEngine:
    """An inference-only module whose ``forward(x)`` equals ``model(x)`` (eval mode) within the
    design's numerics: BatchNorm folded, fuse steps and head fused, the chosen backend's kernels.

    ``dtype`` fp32/fp16/bf16 (default: the model's); ``channels_last`` on by default; ``cuda_graphs``
    (on by default on CUDA; ``False`` opts out) runs the first call of an input shape eagerly,
    captures a CUDA graph on the second and replays it after that, for at most
    ``MAX_CUDA_GRAPHS`` shapes (least recently used dropped). ``branch_streams`` (on by default
    with CUDA graphs; ``False`` opts out) runs each branch on a CUDA stream of its own
    (``hrnet_fast/lanes.py``; the same results). Asking for a backend that cannot run here
    raises BackendUnavailable saying why.
    """
    return HRNetEngine(model, backend=backend, dtype=dtype, channels_last=channels_last,
                       cuda_graphs=cuda_graphs, branch_streams=branch_streams, device=device)
