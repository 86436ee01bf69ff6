"""``hrnet_fast.HRNet``: the drop-in model.

The same modules and state-dict keys as the reference, and it trains as the reference does. In eval
mode with autograd off (``torch.no_grad()`` / ``torch.inference_mode()``) its forward runs the
inference engine: built lazily on first use, cached, rebuilt when weights, device or dtype change.
Whatever the engine could not reproduce (hooks, a submodule in training mode, another dtype,
tracing or compiling) runs the reference forward instead: ``_engine_blocker`` says why.
"""
from __future__ import annotations

import logging
import operator
import warnings
from typing import Any, Optional, Tuple, Union

import torch
from torch.nn.modules import module as nn_module

from .config import HRNetConfig
from .engine import HRNetEngine, ModuleTree
from .reference import HighResolutionNet

logger = logging.getLogger(__name__)

ENGINE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Reasons for the reference path that the caller chose or expects: no warning.
FAST_OFF = "fast is off"
GRAD_ENABLED = "autograd is enabled"
TRAINING = "the model is in training mode"
TRACING = "tracing, scripting, exporting or compiling"
_SILENT = frozenset((FAST_OFF, GRAD_ENABLED, TRAINING, TRACING))
_TRAINING = operator.attrgetter("training")


def _tracing() -> bool:
    """torch.compile/dynamo, torch.export, TorchScript tracing or scripting, or ONNX export."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
            or torch.onnx.is_in_onnx_export())


class HRNet(HighResolutionNet):
    """HRNet with official keys. ``HRNet(config)`` or ``HRNet("w48", num_classes=19)``.

    ``fast`` (default True) lets eval-mode, no-grad calls run the fused engine with ``fast_backend``
    (None: ``HRNET_FAST_BACKEND`` or "auto"), CUDA graphs (``fast_cuda_graphs``: None = on for
    CUDA, captured on the second call of an input shape; False opts out) and branch streams
    (``fast_branch_streams``: None = on with CUDA graphs; False opts out; ``hrnet_fast/lanes.py``).
    """

    def __init__(self, config: Union[HRNetConfig, str] = "w18", *, fast: bool = True,
                 fast_backend: Optional[str] = None, fast_cuda_graphs: Optional[bool] = None,
                 fast_branch_streams: Optional[bool] = None, **overrides: Any) -> None:
        if isinstance(config, str):
            config = HRNetConfig.preset(config, **overrides)
        elif overrides:
            config = config.replace(**overrides)
        super().__init__(config)
        self.fast = fast
        self.fast_backend = fast_backend
        self.fast_cuda_graphs = fast_cuda_graphs
        self.fast_branch_streams = fast_branch_streams
        # {"key": (device, dtype, settings), "engine": HRNetEngine, "tree": (ModuleTree, hook dicts)}
        self._engine_slot: dict = {}
        self._fast_warned: set = set()  # fallback reasons already warned about

    def configure_fast(self, enabled: bool = True, backend: Optional[str] = None,
                       cuda_graphs: Optional[bool] = None,
                       branch_streams: Optional[bool] = None) -> "HRNet":
        """Choose how eval-mode, no-grad calls run; drops the cached engine."""
        self.fast, self.fast_backend, self.fast_cuda_graphs = enabled, backend, cuda_graphs
        self.fast_branch_streams = branch_streams
        self._engine_slot.clear()
        return self

    @property
    def engine(self) -> Optional[HRNetEngine]:
        """The cached engine, if one was built."""
        return self._engine_slot.get("engine")

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_engine_slot"] = {}  # engines hold device buffers and graphs: never pickled or copied
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        try:  # hrnet_fast.load_checkpoint comes here too
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:  # copies into inference tensors move no version counter: always refold
            self.rebuild_fast()

    def rebuild_fast(self) -> "HRNet":
        """Refold the weights on the next engine call: after in-place edits the engine cannot see
        (through ``.data``, or of inference tensors)."""
        engine = self.engine
        if engine is not None:
            engine.invalidate()
        return self

    def train(self, mode: bool = True) -> "HRNet":
        # BatchNorm in training mode updates its running statistics in place without moving their
        # version counters (torch 2.13): whatever ran meanwhile, leaving training mode refolds.
        if self._any_training():
            self.rebuild_fast()
        return super().train(mode)

    def _any_training(self) -> bool:
        return any(map(_TRAINING, self._tree()[0].modules))

    def _tree(self) -> Tuple[ModuleTree, list]:
        """The submodules and their forward (pre-)hook dicts, gathered again when the tree changes."""
        cached = self._engine_slot.get("tree")
        if cached is None or cached[0].changed():
            tree = ModuleTree(self)
            hooks = [d for m in tree.modules[1:] for d in (m._forward_hooks, m._forward_pre_hooks)]
            cached = self._engine_slot["tree"] = (tree, hooks)
        return cached

    def _engine_blocker(self) -> Optional[str]:
        """Why this call must run the reference forward; None when the engine may serve it.
        Hooks on the model itself fire either way; hooks on submodules fire only in the reference."""
        if not self.fast:
            return FAST_OFF
        if torch.is_grad_enabled():
            return GRAD_ENABLED
        if self.training:
            return TRAINING
        if _tracing():
            return TRACING
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return "a global module forward hook or pre-hook is registered"
        tree, hooks = self._tree()
        if any(hooks):
            name = next(n for n, m in zip(tree.names, tree.modules)
                        if m is not self and (m._forward_hooks or m._forward_pre_hooks))
            return f"a forward hook or pre-hook is registered on submodule {name!r}"
        if any(map(_TRAINING, tree.modules)):
            name = next(n for n, m in zip(tree.names, tree.modules) if m.training)
            return f"submodule {name!r} is in training mode"
        param = next(self.parameters())
        if param.dtype not in ENGINE_DTYPES:
            return f"the engine does not run {param.dtype} (only float32, float16, bfloat16)"
        if param.device.type == "cpu" and param.dtype != torch.float32:
            from .backends.torch_cpu import native_precision
            ok, why = native_precision(param.dtype)
            if not ok:
                return why
        return None

    def _warn_fallback(self, reason: str) -> None:
        warned = self.__dict__.setdefault("_fast_warned", set())
        if reason not in warned:  # once per model and reason
            warned.add(reason)
            warnings.warn(f"hrnet_fast: running the reference forward, not the engine: {reason}",
                          RuntimeWarning, stacklevel=3)

    def _engine_for(self, x: torch.Tensor) -> HRNetEngine:
        param = next(self.parameters())
        if x.device != param.device:
            raise ValueError(f"input is on {x.device} but the model is on {param.device}")
        if x.dtype != param.dtype:
            raise ValueError(f"input dtype {x.dtype} does not match the model's {param.dtype}; "
                             f"convert one of them (x.to({param.dtype}) or model.to({x.dtype}))")
        streams = getattr(self, "fast_branch_streams", None)  # absent in older pickles
        key: Tuple = (param.device, param.dtype, self.fast_backend, self.fast_cuda_graphs, streams)
        if self._engine_slot.get("key") != key:
            self._engine_slot.pop("engine", None)  # one at a time: a device move frees the old one
            engine = HRNetEngine(self, backend=self.fast_backend, cuda_graphs=self.fast_cuda_graphs,
                                 branch_streams=streams)
            self._engine_slot.update(key=key, engine=engine)
        return self._engine_slot["engine"]

    def forward(self, x: torch.Tensor):
        reason = self._engine_blocker()
        if reason is not None:
            if reason not in _SILENT:
                self._warn_fallback(reason)
            if not torch.compiler.is_compiling() and self._any_training():
                self.rebuild_fast()  # this forward may update BatchNorm statistics (see train())
            return super().forward(x)
        self.check_input(x)
        engine = self._engine_for(x)
        try:
            return engine(x)
        except Exception as e:
            if not engine.auto or engine.backend == "torch":
                raise
            # A kernel backend that "auto" chose failed on this machine: say so once and run the
            # plain torch engine from now on, rather than failing the user's call.
            warnings.warn(f"hrnet_fast: the {engine.backend} backend failed ({type(e).__name__}: "
                          f"{e}); falling back to the torch backend", RuntimeWarning, stacklevel=2)
            self.fast_backend = "torch"
            self._engine_slot.clear()
            return self._engine_for(x)(x)
