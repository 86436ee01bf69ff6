"""``hrnet_fast.HRNet``: the public model class, with the reference's modules and state-dict keys."""
from __future__ import annotations

from typing import Any, Union

from .config import HRNetConfig
from .reference import HighResolutionNet


class HRNet(HighResolutionNet):
    """HRNet with official keys. ``HRNet(config)`` or ``HRNet("w48", num_classes=19)``."""

    def __init__(self, config: Union[HRNetConfig, str] = "w18", **overrides: Any) -> None:
        if isinstance(config, str):
            config = HRNetConfig.preset(config, **overrides)
        elif overrides:
            config = config.replace(**overrides)
        super().__init__(config)
