"""Reference scorers with no model knowledge: a seeded random ranking and the embedding L2 norm."""

from __future__ import annotations

import torch

from qapframe.strategies.base import SCORERS, Scorer
from qapframe.strategies.context import ScoringContext


@SCORERS.register("random")
class RandomScorer(Scorer):
    """Uniform random scores from the context's seed: the floor any real scorer must beat."""

    def score(self, context: ScoringContext) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(context.seed)
        scores = torch.rand(context.batch_size, context.num_tokens, generator=generator)
        return scores.to(context.vision_embeds.device)  # [B, N]


@SCORERS.register("l2norm")
class L2NormScorer(Scorer):
    """Token embedding L2 norm: large-norm tokens tend to carry more signal (and more outliers)."""

    def score(self, context: ScoringContext) -> torch.Tensor:
        return context.vision_embeds.float().norm(dim=-1)  # [B, N]
