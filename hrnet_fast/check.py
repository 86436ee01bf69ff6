"""Numerical report: every engine backend against the reference (``hrnet-fast check``).

Bounds of the design: fp32 (TF32 off) within 1e-5 relative error of the fp32 reference; fp16/bf16
at most 2x the reference's own error in that dtype, both measured against an fp64 reference.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import HRNetConfig
from .engine import optimize, resolve_engine_backend
from .backends import BackendUnavailable
from .reference import HighResolutionNet

FP32_BOUND = 1e-5
LOW_PRECISION_FACTOR = 2.0


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters in every BatchNorm (the defaults would make
    folding bugs invisible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def rel_err(a, b) -> float:
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise ValueError(f"cannot compare {len(a)} outputs with {len(b)}")
        num = sum(float((x.detach().double() - y.detach().double()).norm() ** 2) for x, y in zip(a, b))
        den = sum(float(y.detach().double().norm() ** 2) for y in b)
        bad = any(not torch.isfinite(x).all() for x in a)
        return float("inf") if bad else (num / max(den, 1e-60)) ** 0.5
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_check(preset: str = "w18_small_v2", size: Tuple[int, int] = (257, 385), batch: int = 2,
              device: Optional[torch.device] = None, upsample: str = "bilinear", head: str = "seg",
              backends: Sequence[str] = ("torch", "triton", "cuda", "compile"),
              dtypes: Optional[Sequence[torch.dtype]] = None, seed: int = 0,
              num_classes: Optional[int] = None) -> List[Dict]:
    """One row per (backend, dtype): error, bound and verdict, or why the backend was skipped.
    ``head``/``num_classes`` choose the model ("pose" with 17 joints for COCO keypoints)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtypes is None:
        dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device.type == "cuda" else [])
    torch.manual_seed(seed)
    extra = {} if num_classes is None else {"num_classes": num_classes}
    cfg = HRNetConfig.preset(preset, upsample=upsample, head=head, **extra)
    ref = randomize_batchnorm(HighResolutionNet(cfg), seed).eval().to(device)
    x = torch.randn(batch, cfg.in_channels, *size, device=device)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = []
    try:
        with torch.no_grad():
            ref64 = clone_as(ref, torch.float64)(x.double())
            for dtype in dtypes:
                ref_d = clone_as(ref, dtype)
                ref_out = ref_d(x.to(dtype))
                ref_err = rel_err(ref_out, ref64)
                bound = FP32_BOUND if dtype == torch.float32 else LOW_PRECISION_FACTOR * ref_err
                for backend in backends:
                    row = {"backend": backend, "dtype": str(dtype).replace("torch.", ""),
                           "reference_err": ref_err, "bound": bound}
                    try:
                        resolve_engine_backend(backend, device)
                        engine = optimize(ref_d, backend=backend)
                        out = engine(x.to(dtype))
                    except BackendUnavailable as e:
                        row.update(status="unavailable", note=str(e))
                        rows.append(row)
                        continue
                    # fp32 is judged against the fp32 reference, low precision against fp64.
                    err = rel_err(out, ref_out if dtype == torch.float32 else ref64)
                    row.update(err=err, status="ok" if err <= bound else "FAIL")
                    rows.append(row)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return rows


def clone_as(model: HighResolutionNet, dtype: torch.dtype) -> HighResolutionNet:
    clone = HighResolutionNet(model.config).to(next(model.parameters()).device)
    clone.load_state_dict(model.state_dict())
    return clone.to(dtype).eval()
