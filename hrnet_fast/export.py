"""ONNX export (``export_onnx``): the fused plan, or the plain reference, as an ONNX file for ONNX
Runtime, OpenVINO or TensorRT (``trtexec --onnx=model.onnx --fp16``)."""
from __future__ import annotations

import os
import warnings
from typing import Tuple, Union

import torch

from .reference import HighResolutionNet

OPSET = 17


def export_onnx(model: HighResolutionNet, path: Union[str, os.PathLike], *,
                input_size: Tuple[int, int], dtype: torch.dtype = torch.float32, fused: bool = True,
                dynamic_batch: bool = True, batch: int = 1) -> str:
    """Write ``model`` (eval mode) as ONNX to ``path`` for ``input_size`` (H, W) inputs; returns path.

    ``fused=True`` exports the engine's plan: BatchNorm folded, the fuse steps' convs batched, the
    seg head rewritten (no 270/720-channel concatenation; the CPU engine's form, which concatenates
    the branches narrower than half the head width, 126 channels for w18), the pose head's last fuse step and final
    conv as one op; ``fused=False`` the plain reference model. ``dynamic_batch`` makes the batch
    dimension of the input ``x`` and the output ``y`` free; the spatial size is fixed (resizes
    are exported with constant sizes). ``dtype`` float32 or float16 (float16 is exported from the
    CPU: slow to trace where the CPU has no native float16, but exact to the model's numerics)."""
    from .engine import optimize, parse_dtype
    if not isinstance(model, HighResolutionNet):
        raise TypeError(f"export_onnx needs an hrnet_fast HRNet, got {type(model).__name__}")
    if model.training:
        raise ValueError("export_onnx needs an eval-mode model (BatchNorm running statistics); "
                         "call model.eval() first")
    dtype = parse_dtype(dtype)
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"export_onnx exports float32 or float16, got {dtype}")
    h, w = (int(v) for v in input_size)
    if h < 1 or w < 1:
        raise ValueError(f"input_size must be two positive integers, got {input_size!r}")
    cpu = torch.device("cpu")
    if fused:
        module = optimize(model, backend="torch", dtype=dtype, device=cpu, cuda_graphs=False)
    else:
        module = HighResolutionNet(model.config).eval()
        module.load_state_dict(model.state_dict())
        module = module.to(dtype)
    x = torch.randn(batch, model.config.in_channels, h, w, dtype=dtype)
    dynamic = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
    outputs = ["y"] if model.config.head != "features" else [f"y{i}" for i in range(4)]
    if dynamic and model.config.head == "features":
        dynamic = {"x": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    path = os.fspath(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's and exporter's deprecation notes
        torch.onnx.export(module, (x,), path, dynamo=False, opset_version=OPSET,
                          input_names=["x"], output_names=outputs, dynamic_axes=dynamic)
    return path
