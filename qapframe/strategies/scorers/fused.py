"""A scorer that combines other registered scorers' normalized scores with weights."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from qapframe.strategies.specs import ScorerSpec
from qapframe.strategies.base import SCORERS, Scorer
from qapframe.strategies.context import Requirements, ScoringContext
from qapframe.strategies.normalization import Normalization, fuse
from qapframe.strategy import StrategyConfig


class WeightedScorer(StrategyConfig):
    scorer: ScorerSpec
    weight: float = Field(1.0, ge=0.0)


class FusedConfig(StrategyConfig):
    scorers: list[WeightedScorer] = Field(min_length=1, description="[{scorer: {name, ...}, weight}]")
    normalization: Normalization = "minmax"

    @field_validator("scorers")
    @classmethod
    def _some_weight(cls, value: list[WeightedScorer]) -> list[WeightedScorer]:
        if sum(item.weight for item in value) <= 0:
            raise ValueError("at least one weight must be positive")
        return value


@SCORERS.register("fused")
class FusedScorer(Scorer):
    """``sum_i w_i * norm(score_i)``: the generic form of which the hybrid scorer is one instance."""

    Config = FusedConfig
    config: FusedConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.members = [item.scorer.build() for item in self.config.scorers]

    def requirements(self) -> Requirements:
        out = Requirements()
        for member in self.members:
            out = out.union(member.requirements())
        return out

    def score(self, context: ScoringContext) -> torch.Tensor:
        scores = [member.score(context).float() for member in self.members]
        weights = [item.weight for item in self.config.scorers]
        return fuse(scores, weights, self.config.normalization)  # [B, N]
