"""qapframe: quantization-aware vision-token pruning plus post-training quantization for LLaVA-family models."""

from qapframe.errors import QapframeError, SpecError
from qapframe.models.base import ADAPTERS, ModelAdapter
from qapframe.pipeline import Pipeline, quantize
from qapframe.quantizers.base import QUANTIZERS, Quantizer
from qapframe.registry import Registry
from qapframe.spec import PipelineSpec, load_spec
from qapframe.strategies.base import PRUNERS, SCORERS, Pruner, Scorer, Selection
from qapframe.strategies.context import QuantSettings, ScoringContext
from qapframe.strategy import Strategy, StrategyConfig

from qapframe.deploy import export, load

__version__ = "0.1.0"  # the only copy: pyproject.toml reads it (dynamic version), `qapframe --version` prints it

__all__ = [
    "__version__",
    "ADAPTERS",
    "ModelAdapter",
    "PRUNERS",
    "Pipeline",
    "PipelineSpec",
    "Pruner",
    "QUANTIZERS",
    "QapframeError",
    "QuantSettings",
    "Quantizer",
    "Registry",
    "SCORERS",
    "Scorer",
    "ScoringContext",
    "Selection",
    "SpecError",
    "Strategy",
    "StrategyConfig",
    "export",
    "load",
    "load_spec",
    "quantize",
]
