"""A scorer from outside qapframe: rank vision tokens by their variance across channels."""

from __future__ import annotations

import torch

from qapframe import Scorer, ScoringContext, StrategyConfig


class ChannelVarianceConfig(StrategyConfig):
    unbiased: bool = False


class ChannelVarianceScorer(Scorer):
    """Variance of each token's channels: high-variance tokens carry outliers a low-bit LLM must see."""

    Config = ChannelVarianceConfig
    config: ChannelVarianceConfig

    def score(self, context: ScoringContext) -> torch.Tensor:
        x = context.vision_embeds.float()  # [B, N, D]
        return x.var(dim=-1, unbiased=self.config.unbiased)  # [B, N]
