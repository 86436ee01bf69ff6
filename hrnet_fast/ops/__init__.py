"""The fused ops of the inference plan, each with a torch implementation (the oracle) and, where
available, Triton (``hrnet_fast/kernels``) and CUDA (``hrnet_fast._C``) implementations."""
from . import registry
from .conv import conv2d_bias_act
from .fuse import seg_head, upsample_add_relu
from .registry import BackendUnavailable
from . import accelerated  # noqa: F401  (registers the triton / cuda implementations)

__all__ = ["conv2d_bias_act", "upsample_add_relu", "seg_head", "registry", "BackendUnavailable"]
