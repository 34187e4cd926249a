"""FastV: the attention the last text token pays to each vision token inside the LLM."""

from __future__ import annotations

import torch
from pydantic import Field

from qapframe.strategies.base import SCORERS, Scorer
from qapframe.strategies.context import Requirements, ScoringContext
from qapframe.strategy import StrategyConfig


class FastVConfig(StrategyConfig):
    layer: int = Field(2, ge=0, description="LLM decoder layer K (0-based) whose attention scores tokens; layers > K see only kept tokens")


@SCORERS.register("fastv")
class FastVScorer(Scorer):
    """Last text token -> vision token attention at decoder layer K, mean over heads (FastV, K=2)."""

    Config = FastVConfig
    config: FastVConfig

    def requirements(self) -> Requirements:
        return Requirements(text_attention_layer=self.config.layer)

    def score(self, context: ScoringContext) -> torch.Tensor:
        return context.require("text_attention", "fastv").float()  # [B, N]
