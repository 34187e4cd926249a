"""The post-training quantization interface: calibrate on data, then transform a model."""

from __future__ import annotations

import abc
from typing import Any, Iterable, Mapping

import torch

from qapframe.registry import Registry
from qapframe.strategy import Strategy

QUANTIZERS: Registry[type["Quantizer"]] = Registry(
    "quantizer", "qapframe.quantizers", ("qapframe.quantizers",)
)

CalibrationData = Iterable[Mapping[str, Any]]  # model-input dicts, as passed to `model(**inputs)`


class Quantizer(Strategy, abc.ABC):
    """Calibrates on model inputs and rewrites a model's weights (and activations, if configured)."""

    @abc.abstractmethod
    def apply(self, model: torch.nn.Module, calibration: CalibrationData | None = None) -> torch.nn.Module:
        """Quantize ``model`` in place and return it; ``forward``/``generate`` work as before."""

    def activation_settings(self) -> dict[str, Any] | None:
        """``{bits, group_size, symmetric}`` of the activation quantizer, or None when activations stay fp.

        Scorers see it as ``ScoringContext.quant`` (the pipeline's activation grid, for plugins that simulate it).
        """
        return None
