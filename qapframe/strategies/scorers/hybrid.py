"""QAPruner's hybrid score: semantic importance fused with quantization sensitivity.

``score = alpha * norm(SP) + (1 - alpha) * (w_E * norm(E) + w_R * norm(R))`` where SP is any registered
scorer, E the L2 error of the token's group-wise simulated activation quantization and R its value
range (max - min); ``w_E = w_R = 0.5`` in the paper, ablations set one of them to 0.

How E simulates quantization is named by ``e_mode`` (and recorded with the config in every result):
- ``"paper"`` (default): QAPruner's definition, group-wise INT4 per token, groups of 128 channels,
  symmetric, each group's range taken from the token itself (``bits``/``group_size``/``symmetric``
  override these three).
- ``"pipeline"``: the error the pipeline's own activation quantizer makes on each vision token, as it
  quantizes at run time: the first quantized linear the token reaches (the adapter knows which; for
  LLaMA-style LLMs layer 0's ``q_proj`` after its input norm), with its static calibrated range and
  observer, smoothing or rotation included; the model adapter computes it (``activation_error``).
  Until 2026-12 the scorer used the pipeline's bits/group/symmetry per token whatever the pipeline did;
  ``e_mode: paper`` with explicit ``bits``/``group_size``/``symmetric`` reproduces any such setting.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from qapframe.kernels import hybrid_sensitivity
from qapframe.strategies.specs import ScorerSpec
from qapframe.strategies.base import SCORERS, Scorer
from qapframe.strategies.context import QuantSettings, Requirements, ScoringContext
from qapframe.strategies.normalization import Normalization, fuse
from qapframe.strategy import StrategyConfig

PAPER_QUANT = QuantSettings(bits=4, group_size=128, symmetric=True)  # QAPruner's E: INT4, g128, symmetric, per token


class HybridConfig(StrategyConfig):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the semantic score SP")
    semantic: ScorerSpec = Field(default_factory=lambda: ScorerSpec(name="visionzip"), description="scorer giving SP")
    quant_error_weight: float = Field(0.5, ge=0.0, description="weight of norm(E) inside SQ")
    outlier_weight: float = Field(0.5, ge=0.0, description="weight of norm(R) inside SQ")
    normalization: Normalization = "minmax"
    e_mode: Literal["paper", "pipeline"] = Field(
        "paper",
        description="E as QAPruner defines it (per-token INT4, group 128, symmetric) or as the pipeline's "
        "activation quantizer really quantizes (static range and observer included)",
    )
    bits: int | None = Field(None, ge=2, le=16, description="e_mode=paper: override the 4 bits")
    group_size: int | None = Field(None, description="e_mode=paper: override the group of 128 (-1 = whole token)")
    symmetric: bool | None = Field(None, description="e_mode=paper: override symmetric=True")

    @model_validator(mode="after")
    def _check(self) -> "HybridConfig":
        if self.alpha < 1.0 and self.quant_error_weight + self.outlier_weight <= 0:
            raise ValueError("quant_error_weight and outlier_weight are both 0, so SQ is empty; set alpha=1 or a weight > 0")
        if self.group_size is not None and self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be a positive channel count or -1, got {self.group_size}")
        if self.e_mode == "pipeline" and (self.bits, self.group_size, self.symmetric) != (None, None, None):
            raise ValueError(
                "bits/group_size/symmetric only apply to e_mode='paper'; e_mode='pipeline' takes them from the "
                "pipeline's activation quantizer"
            )
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
        own = Requirements(activation_error=self.config.e_mode == "pipeline")
        return self.semantic.requirements().union(own)

    def quant_settings(self) -> QuantSettings:
        """e_mode=paper: the explicit config fields, else INT4 / group 128 / symmetric."""
        c = self.config
        return QuantSettings(
            bits=PAPER_QUANT.bits if c.bits is None else c.bits,
            group_size=PAPER_QUANT.group_size if c.group_size is None else c.group_size,
            symmetric=PAPER_QUANT.symmetric if c.symmetric is None else c.symmetric,
        )

    def score(self, context: ScoringContext) -> torch.Tensor:
        q = self.quant_settings()
        error, spread = hybrid_sensitivity(context.vision_embeds, q.bits, q.group_size, q.symmetric)  # [B, N] each
        if self.config.e_mode == "pipeline":
            if context.activation_error is None:
                raise ValueError(
                    "hybrid e_mode='pipeline' needs the error of the pipeline's activation quantizer, but this "
                    "pipeline does not quantize activations (use e_mode='paper', or a W*A* quantizer)"
                )
            error = context.activation_error  # [B, N]
        semantic = self.semantic.score(context).float()  # [B, N]
        c = self.config
        weights = [c.alpha, (1 - c.alpha) * c.quant_error_weight, (1 - c.alpha) * c.outlier_weight]
        return fuse([semantic, error.float(), spread.float()], weights, c.normalization)  # [B, N]
