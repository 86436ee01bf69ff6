"""ONNX Runtime and OpenVINO as CPU peers of ``hrnet-fast bench``.

Each peer runs an ONNX export of the very reference model the other rows run (same weights, same
input), exported once per benchmark case into a temporary directory:

- ``onnxruntime``: an ORT session, ORT_ENABLE_ALL, intra-op threads = ``torch.get_num_threads()``;
- ``openvino-fp32``: OpenVINO with ``INFERENCE_PRECISION_HINT=f32`` (exact to fp32 rounding);
- ``openvino``: OpenVINO at its default precision, which is bf16 on CPUs with AVX512-BF16 or AMX,
  so its row carries the precision it ran and its error against the reference.

The packages are optional (``pip install -e '.[peers]'``) and imported only when a peer is built.
"""
from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .backends import BackendUnavailable

ONNX_PEERS = ("onnxruntime", "openvino-fp32", "openvino")
INSTALL_HINT = "pip install -e '.[peers]'"
# The legacy (TorchScript) exporter: it exports every op of the reference, needs no onnxscript, and
# is about 10x faster than dynamo=True on HRNet. Opset 17 has all those ops (Conv, Resize, Add,
# Relu, Concat) and ONNX Runtime and OpenVINO releases since 2022 read it.
OPSET = 17
# What each peer imports; the export itself needs the `onnx` package.
_PACKAGES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino-fp32": ("onnx", "openvino"),
             "openvino": ("onnx", "openvino")}

Outputs = Union[torch.Tensor, List[torch.Tensor]]
Peer = Tuple[Callable[[torch.Tensor], Outputs], Dict[str, Any]]  # (run, info): see build_peer


class PeerUnavailable(BackendUnavailable):
    """The peer cannot run here (package missing, not the CPU, not fp32); the message says why."""


def _import(package: str):
    """The module, or None when it cannot be imported."""
    try:
        return importlib.import_module(package)
    except ImportError:
        return None


def _check_name(name: str) -> None:
    if name not in ONNX_PEERS:
        raise ValueError(f"unknown ONNX peer {name!r}; choose from {', '.join(ONNX_PEERS)}")


def skip_reason(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why peer ``name`` cannot run for this case, or None when it can. Short: tables show it."""
    _check_name(name)
    if device.type != "cpu":
        return f"CPU-only peer (device is {device})"
    if dtype != torch.float32:
        return f"fp32 input only (got {str(dtype).replace('torch.', '')})"
    missing = [p for p in _PACKAGES[name] if _import(p) is None]
    if missing:
        return f"{' and '.join(missing)} not installed: {INSTALL_HINT}"
    return None


def export_reference(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """Export ``model`` (in eval mode) to ONNX at ``path`` for the shape of ``example``."""
    if model.training:
        raise ValueError("export_reference: put the model in eval mode first (model.eval()); "
                         "training-mode BatchNorm would be exported")
    with warnings.catch_warnings():
        # Expected here: the legacy exporter's deprecation notice, and the reference's input-shape
        # checks, which trace as constants (right for a fixed-shape export).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(model, (example,), path, dynamo=False, opset_version=OPSET,
                              input_names=["input"], do_constant_folding=True)


class OnnxExport:
    """The reference exported once, on first use, into a temporary directory that ``close()``
    removes. A failed export is remembered: every peer of the case reports the same reason."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        self.model, self.example = model, example
        self._dir: Optional[str] = None
        self._error: Optional[str] = None

    @property
    def path(self) -> str:
        if self._error is not None:
            raise PeerUnavailable(self._error)
        if self._dir is None:
            directory = tempfile.mkdtemp(prefix="hrnet_fast_onnx_")
            try:
                export_reference(self.model, self.example, os.path.join(directory, "model.onnx"))
            except Exception as e:
                shutil.rmtree(directory, ignore_errors=True)
                first_line = (str(e).strip().splitlines() or [""])[0]  # the rest can be a whole IR dump
                self._error = (f"torch.onnx.export of the reference failed: "
                               f"{type(e).__name__}: {first_line}")
                raise PeerUnavailable(self._error) from e
            self._dir = directory
        return os.path.join(self._dir, "model.onnx")

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "OnnxExport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_numpy(x: torch.Tensor):
    return x.detach().cpu().contiguous().numpy()  # no copy for the usual contiguous CPU input


def _as_torch(arrays) -> Outputs:
    tensors = [torch.from_numpy(a) for a in arrays]
    return tensors[0] if len(tensors) == 1 else tensors


def _onnxruntime(path: str, threads: int) -> Peer:
    ort = importlib.import_module("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one input at a time: parallelism is inside the ops
    # Spin within a run as by default, but not after it: ORT's workers would otherwise spin for
    # ~1M pause instructions (tens of ms) and take the cores from the next row of the benchmark.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> Outputs:
        return _as_torch(session.run(None, {input_name: _as_numpy(x)}))

    return run, {"precision": "f32", "threads": threads, "version": ort.__version__,
                 "options": "ORT_ENABLE_ALL, CPUExecutionProvider, no spinning between runs"}


def _openvino(path: str, threads: int, force_fp32: bool) -> Peer:
    ov = importlib.import_module("openvino")
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if force_fp32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(core.read_model(path), "CPU", config)
    request = compiled.create_infer_request()
    # What OpenVINO chose, not what was asked: the default row shows bf16 where the CPU has it.
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def run(x: torch.Tensor) -> Outputs:
        return _as_torch(request.infer({0: _as_numpy(x)}, share_inputs=True).to_tuple())

    options = "LATENCY hint" + (", INFERENCE_PRECISION_HINT=f32" if force_fp32 else "")
    return run, {"precision": precision, "threads": threads, "version": _short_version(ov),
                 "options": options}


def build_peer(name: str, export: OnnxExport, device: torch.device, dtype: torch.dtype,
               threads: Optional[int] = None) -> Peer:
    """``(run, info)``: ``run(x)`` returns the peer's output(s) as CPU tensors; ``info`` has the
    precision it runs in, its thread count and the runtime's version. Raises PeerUnavailable (a
    BackendUnavailable) when the peer cannot run here."""
    reason = skip_reason(name, device, dtype)
    if reason is not None:
        raise PeerUnavailable(reason)
    threads = torch.get_num_threads() if threads is None else threads
    if name == "onnxruntime":
        return _onnxruntime(export.path, threads)
    return _openvino(export.path, threads, force_fp32=name == "openvino-fp32")


def _short_version(module) -> str:
    return module.__version__.split("-")[0]  # OpenVINO appends its build hash and branch


def versions() -> Dict[str, str]:
    """Versions of the installed peer runtimes, for the benchmark's environment record."""
    found = {}
    for package in ("onnxruntime", "openvino"):
        module = _import(package)
        if module is not None:
            found[package] = _short_version(module)
    return found
