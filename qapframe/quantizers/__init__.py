"""Post-training quantizers; importing this package registers the built-ins."""

from qapframe.quantizers.base import QUANTIZERS, CalibrationData, Quantizer

__all__ = ["QUANTIZERS", "CalibrationData", "Quantizer"]
