"""QAPruner's hybrid score: semantic importance fused with quantization sensitivity.

``score = alpha * norm(SP) + (1 - alpha) * (w_E * norm(E) + w_R * norm(R))`` where SP is any registered
scorer, E the L2 error of the token's group-wise simulated activation quantization and R its value
range (max - min); ``w_E = w_R = 0.5`` in the paper, ablations set one of them to 0.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from qapframe.kernels import hybrid_sensitivity
from qapframe.spec import ScorerSpec
from qapframe.strategies.base import SCORERS, Scorer
from qapframe.strategies.context import QuantSettings, Requirements, ScoringContext
from qapframe.strategies.normalization import Normalization, fuse
from qapframe.strategy import StrategyConfig

DEFAULT_QUANT = QuantSettings(bits=4, group_size=128, symmetric=False)


class HybridConfig(StrategyConfig):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the semantic score SP")
    semantic: ScorerSpec = Field(default_factory=lambda: ScorerSpec(name="visionzip"), description="scorer giving SP")
    quant_error_weight: float = Field(0.5, ge=0.0, description="weight of norm(E) inside SQ")
    outlier_weight: float = Field(0.5, ge=0.0, description="weight of norm(R) inside SQ")
    normalization: Normalization = "minmax"
    bits: int | None = Field(None, ge=2, le=16, description="override the pipeline's activation bits")
    group_size: int | None = Field(None, description="override the pipeline's group size (-1 = whole token)")
    symmetric: bool | None = Field(None, description="override the pipeline's symmetric/asymmetric choice")

    @model_validator(mode="after")
    def _check(self) -> "HybridConfig":
        if self.alpha < 1.0 and self.quant_error_weight + self.outlier_weight <= 0:
            raise ValueError("quant_error_weight and outlier_weight are both 0, so SQ is empty; set alpha=1 or a weight > 0")
        if self.group_size is not None and self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be a positive channel count or -1, got {self.group_size}")
        return self


@SCORERS.register("hybrid")
class HybridScorer(Scorer):
    """QAPruner: alpha * SP + (1 - alpha) * SQ over per-image normalized scores."""

    Config = HybridConfig
    config: HybridConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.semantic: Scorer = self.config.semantic.build()

    def requirements(self) -> Requirements:
        return self.semantic.requirements()

    def quant_settings(self, context: ScoringContext) -> QuantSettings:
        """Explicit config fields win, then the pipeline's quantizer, then 4-bit / group 128 / asymmetric."""
        base = context.quant or DEFAULT_QUANT
        c = self.config
        return QuantSettings(
            bits=base.bits if c.bits is None else c.bits,
            group_size=base.group_size if c.group_size is None else c.group_size,
            symmetric=base.symmetric if c.symmetric is None else c.symmetric,
        )

    def score(self, context: ScoringContext) -> torch.Tensor:
        q = self.quant_settings(context)
        error, spread = hybrid_sensitivity(context.vision_embeds, q.bits, q.group_size, q.symmetric)  # [B, N] each
        semantic = self.semantic.score(context).float()  # [B, N]
        c = self.config
        weights = [c.alpha, (1 - c.alpha) * c.quant_error_weight, (1 - c.alpha) * c.outlier_weight]
        return fuse([semantic, error.float(), spread.float()], weights, c.normalization)  # [B, N]
