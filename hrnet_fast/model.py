"""``hrnet_fast.HRNet``: the drop-in model.

The same modules and state-dict keys as the reference, and it trains as the reference does. In eval
mode with autograd off (``torch.no_grad()`` / ``torch.inference_mode()``) its forward runs the
inference engine: built lazily on first use, cached, rebuilt when weights, device or dtype change.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Optional, Tuple, Union

import torch

from .config import HRNetConfig
from .engine import HRNetEngine
from .reference import HighResolutionNet

logger = logging.getLogger(__name__)


class HRNet(HighResolutionNet):
    """HRNet with official keys. ``HRNet(config)`` or ``HRNet("w48", num_classes=19)``.

    ``fast`` (default True) lets eval-mode, no-grad calls run the fused engine with ``fast_backend``
    (None: ``HRNET_FAST_BACKEND`` or "auto") and CUDA graphs (``fast_cuda_graphs``: None = on for
    CUDA, captured on the second call of an input shape; False opts out).
    """

    def __init__(self, config: Union[HRNetConfig, str] = "w18", *, fast: bool = True,
                 fast_backend: Optional[str] = None, fast_cuda_graphs: Optional[bool] = None,
                 **overrides: Any) -> None:
        if isinstance(config, str):
            config = HRNetConfig.preset(config, **overrides)
        elif overrides:
            config = config.replace(**overrides)
        super().__init__(config)
        self.fast = fast
        self.fast_backend = fast_backend
        self.fast_cuda_graphs = fast_cuda_graphs
        self._engine_slot: dict = {}  # {"key": (device, dtype, settings), "engine": HRNetEngine}

    def configure_fast(self, enabled: bool = True, backend: Optional[str] = None,
                       cuda_graphs: Optional[bool] = None) -> "HRNet":
        """Choose how eval-mode, no-grad calls run; drops the cached engine."""
        self.fast, self.fast_backend, self.fast_cuda_graphs = enabled, backend, cuda_graphs
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
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:  # new Parameter objects: the engine's watch list would be stale
            self._engine_slot.clear()
        return result

    def _use_engine(self) -> bool:
        return self.fast and not self.training and not torch.is_grad_enabled()

    def _engine_for(self, x: torch.Tensor) -> HRNetEngine:
        param = next(self.parameters())
        if x.device != param.device:
            raise ValueError(f"input is on {x.device} but the model is on {param.device}")
        if x.dtype != param.dtype:
            raise ValueError(f"input dtype {x.dtype} does not match the model's {param.dtype}; "
                             f"convert one of them (x.to({param.dtype}) or model.to({x.dtype}))")
        key: Tuple = (param.device, param.dtype, self.fast_backend, self.fast_cuda_graphs)
        if self._engine_slot.get("key") != key:
            self._engine_slot.clear()  # one engine at a time: a device move frees the old one
            engine = HRNetEngine(self, backend=self.fast_backend, cuda_graphs=self.fast_cuda_graphs)
            self._engine_slot.update(key=key, engine=engine)
        return self._engine_slot["engine"]

    def forward(self, x: torch.Tensor):
        if not self._use_engine():
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
