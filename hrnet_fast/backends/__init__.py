"""Backends: one module per way of running the plan (torch_cpu, torch_cuda, compile, triton,
cuda), one interface (``base.Backend``), one place that chooses (``selection``).

Importing this package imports nothing heavy (no Triton, no CUDA extension)."""


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why (no GPU, no Triton, no extension)."""
