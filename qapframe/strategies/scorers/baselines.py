"""Reference scorers with no model knowledge: a seeded random ranking and the embedding L2 norm."""

from __future__ import annotations

import torch

from qapframe.strategies.base import SCORERS, Scorer
from qapframe.strategies.context import ScoringContext


@SCORERS.register("random")
class RandomScorer(Scorer):
    """Uniform random scores: the floor any real scorer must beat.

    One generator per scorer instance (i.e. per run), seeded from the context's seed on first use, and
    each image draws its own N numbers in turn: consecutive batches get different positions, and a
    batch of B images gets exactly the scores of B single-image calls made in the same order.
    """

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self._generator: torch.Generator | None = None
        self._seed: int | None = None

    def score(self, context: ScoringContext) -> torch.Tensor:
        if self._generator is None or self._seed != context.seed:
            self._generator = torch.Generator(device="cpu").manual_seed(context.seed)
            self._seed = context.seed
        rows = [torch.rand(context.num_tokens, generator=self._generator) for _ in range(context.batch_size)]
        return torch.stack(rows).to(context.vision_embeds.device)  # [B, N]


@SCORERS.register("l2norm")
class L2NormScorer(Scorer):
    """Token embedding L2 norm: large-norm tokens tend to carry more signal (and more outliers)."""

    def score(self, context: ScoringContext) -> torch.Tensor:
        return context.vision_embeds.float().norm(dim=-1)  # [B, N]
