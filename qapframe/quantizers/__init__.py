"""Post-training quantizers; importing this package registers the built-ins (rtn, gptq, awq, smoothquant).

Also here: the observers of static activation ranges (`OBSERVERS`) and the rotations applied before
quantizing (`ROTATIONS`), both selected in a quantizer's config.
"""

from qapframe.quantizers.base import QUANTIZERS, CalibrationData, Quantizer
from qapframe.quantizers.config import PRESETS, QuantizerConfig
from qapframe.quantizers.fake_quant import QuantizedLinear
from qapframe.quantizers.observers import OBSERVERS, Observer
from qapframe.quantizers.rotations import ROTATIONS, Rotation
from qapframe.quantizers.rtn import RTN
from qapframe.quantizers.gptq import GPTQ
from qapframe.quantizers.awq import AWQ
from qapframe.quantizers.smoothquant import SmoothQuant
from qapframe.quantizers.serialization import load_quantized, save_quantized

__all__ = [
    "AWQ", "CalibrationData", "GPTQ", "OBSERVERS", "Observer", "PRESETS", "QUANTIZERS", "QuantizedLinear", "Quantizer",
    "QuantizerConfig", "ROTATIONS", "RTN", "Rotation", "SmoothQuant", "load_quantized", "save_quantized",
]
