"""Round-to-nearest: every weight group on its own min/max grid; the baseline of every comparison."""

from __future__ import annotations

from qapframe.quantizers.base import QUANTIZERS
from qapframe.quantizers.config import QuantizerConfig
from qapframe.quantizers.layerwise import LayerwiseQuantizer


class RTNConfig(QuantizerConfig):
    """RTN adds nothing to the shared parameters."""


@QUANTIZERS.register("rtn")
class RTN(LayerwiseQuantizer):
    """Round to nearest; needs calibration data only for static activation ranges."""

    Config = RTNConfig
    config: RTNConfig


__all__ = ["RTN", "RTNConfig"]
