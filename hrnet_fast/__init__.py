"""hrnet_fast: fast, exact HRNet inference on NVIDIA GPUs, with a faithful PyTorch reference."""
from .checkpoints import CheckpointError, LoadReport, load_checkpoint
from .config import PRESET_NAMES, HRNetConfig, StageConfig
from .engine import HRNetEngine, optimize
from .export import export_onnx
from .model import HRNet
from .backends import BackendUnavailable

__version__ = "0.1.0"

__all__ = [
    "HRNet", "HRNetConfig", "StageConfig", "PRESET_NAMES", "load_checkpoint", "LoadReport",
    "CheckpointError", "optimize", "HRNetEngine", "export_onnx", "BackendUnavailable", "__version__",
]
