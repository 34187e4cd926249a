"""The library entry point: quantize a model and install token pruning, from a spec or from objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Union

import torch

from qapframe.errors import QapframeError
from qapframe.quantizers.base import CalibrationData, Quantizer
from qapframe.spec import PipelineSpec, PrunerSpec, QuantizerSpec, ScorerSpec, StrategySpec, load_spec
from qapframe.strategies.base import Pruner, Scorer
from qapframe.strategies.context import QuantSettings
from qapframe.strategy import Strategy

StrategyLike = Union[Strategy, StrategySpec, Mapping[str, Any], None]


def _build(value: StrategyLike, spec_type: type[StrategySpec], base: type[Strategy]) -> Any:
    """Accept a strategy object, its spec model, or a ``{name, **params}`` dict."""
    if value is None or isinstance(value, base):
        return value
    if isinstance(value, Mapping):
        value = spec_type.model_validate(dict(value))
    if isinstance(value, spec_type):
        return value.build()
    raise TypeError(f"expected a {base.__name__}, a {spec_type.__name__} or a dict, got {type(value).__name__}")


class Pipeline:
    """Quantizer + scorer + pruner, applied to a model in that order."""

    def __init__(
        self,
        quantizer: StrategyLike = None,
        scorer: StrategyLike = None,
        pruner: StrategyLike = None,
        *,
        adapter: str | None = None,
        seed: int = 0,
    ):
        self.quantizer: Quantizer | None = _build(quantizer, QuantizerSpec, Quantizer)
        self.scorer: Scorer | None = _build(scorer, ScorerSpec, Scorer)
        self.pruner: Pruner | None = _build(pruner, PrunerSpec, Pruner)
        if self.pruner is not None and self.scorer is None:
            raise ValueError("a pruner needs a scorer to rank tokens; pass `scorer=`")
        if self.scorer is not None and self.pruner is None:
            self.pruner = _build({"name": "topk"}, PrunerSpec, Pruner)
        self.adapter = adapter
        self.seed = seed

    @classmethod
    def from_spec(cls, spec_or_path: Union[str, Path, dict, PipelineSpec], seed: int | None = None) -> "Pipeline":
        spec = load_spec(spec_or_path)
        if spec.sweep:
            raise QapframeError(
                "this spec has a `sweep` of several configurations; run it with `qapframe run`, or "
                "build one pipeline per configuration from `spec.expand()`"
            )
        return cls(
            quantizer=spec.quantizer,
            scorer=spec.scorer,
            pruner=spec.pruner,
            adapter=spec.model.adapter,
            seed=spec.evaluation.seeds[0] if seed is None else seed,
        )

    @property
    def quant_settings(self) -> QuantSettings | None:
        """The activation quantizer the vision tokens will meet, handed to scorers as ``ScoringContext.quant``
        (the hybrid's ``e_mode: pipeline`` measures the real quantizer instead; plugins may read this)."""
        settings = self.quantizer.activation_settings() if self.quantizer is not None else None
        return QuantSettings(**settings) if settings else None

    def apply(self, model: torch.nn.Module, calibration: CalibrationData | None = None) -> torch.nn.Module:
        """Quantize ``model`` (calibrating on ``calibration``) and install pruning; returns the model."""
        return self.install_pruning(self.quantize(model, calibration))

    def quantize(self, model: torch.nn.Module, calibration: CalibrationData | None = None) -> torch.nn.Module:
        """The quantizer's step alone (``model`` unchanged without one): calibration never sees the pruning."""
        return model if self.quantizer is None else self.quantizer.apply(model, calibration)

    def install_pruning(self, model: torch.nn.Module) -> torch.nn.Module:
        """The scorer and pruner installed by the model's adapter (``model`` unchanged without a scorer)."""
        if self.scorer is None:
            return model
        from qapframe.models import adapter_for

        return adapter_for(model, self.adapter).install(
            model, self.scorer, self.pruner, quant=self.quant_settings, seed=self.seed
        )

    def remove_pruning(self, model: torch.nn.Module) -> torch.nn.Module:
        """Undo `install_pruning`, so the same quantized model can take another scorer and pruner."""
        if self.scorer is None:
            return model
        from qapframe.models import adapter_for

        return adapter_for(model, self.adapter).remove(model)

    def __repr__(self) -> str:
        return f"Pipeline(quantizer={self.quantizer!r}, scorer={self.scorer!r}, pruner={self.pruner!r})"


def quantize(
    model: torch.nn.Module, quantizer: StrategyLike, calibration: CalibrationData | None = None
) -> torch.nn.Module:
    """Quantize any transformers model: ``quantizer`` is a spec dict, its pydantic model, or a `Quantizer`."""
    return Pipeline(quantizer=quantizer).apply(model, calibration)
