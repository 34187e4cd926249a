"""PyramidDrop: drop vision tokens in stages, by the last instruction token's attention at each stage.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction" (CVPR 2025). The LLM is cut into stages at fractions of its depth (the paper's
layers 8 / 16 / 24 of 32); at the end of each stage the last instruction token's attention to the
remaining vision tokens, in that stage's last layer, ranks them and a share lambda survives into the next
stage. Here the pruner's budget is what is left after the *last* stage and each stage keeps
``lambda = retention ** (1 / stages)`` of what reaches it (lambda = 0.5 at 12.5 % over three stages,
the paper's setting); the scorer reads the attention row the adapter recomputes at each stage.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from qapframe.strategies.base import SCORERS, Scorer
from qapframe.strategies.context import Requirements, ScoringContext
from qapframe.strategy import StrategyConfig


class PyramidDropConfig(StrategyConfig):
    stages: list[float] = Field(
        [0.25, 0.5, 0.75],
        min_length=1,
        description="first layer of each pruned stage as a fraction of the LLM's depth, ascending in (0, 1)",
    )

    @field_validator("stages")
    @classmethod
    def _ascending(cls, value: list[float]) -> list[float]:
        if any(not 0.0 < f < 1.0 for f in value) or sorted(set(value)) != value:
            raise ValueError(f"stages must be distinct, ascending fractions in (0, 1), got {value}")
        return value


@SCORERS.register("pyramiddrop")
class PyramidDropScorer(Scorer):
    """Last instruction token -> vision token attention at the end of each stage, mean over heads."""

    Config = PyramidDropConfig
    config: PyramidDropConfig

    def requirements(self) -> Requirements:
        return Requirements(stage_fractions=tuple(self.config.stages))

    def score(self, context: ScoringContext) -> torch.Tensor:
        return context.require("text_attention", "pyramiddrop").float()  # [B, N]
