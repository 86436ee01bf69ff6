"""The fused ops of the inference plan, each with a torch implementation (the oracle) and, where
available, Triton (``hrnet_fast/kernels``) and CUDA (``hrnet_fast._C``) implementations. Each public
op checks its arguments once, then runs the implementation that ``backend=`` names
(``hrnet_fast/backends/selection.py`` resolves it)."""
from ..backends import BackendUnavailable
from .conv import conv2d_bias_act
from .fuse import seg_head, upsample_add_relu

__all__ = ["conv2d_bias_act", "upsample_add_relu", "seg_head", "BackendUnavailable"]
