"""DivPrune: keep the most diverse vision tokens, by greedy max-min diversity on cosine distance.

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (CVPR 2025).
The distance is ``1 - cos(x_i, x_j)`` between projected vision tokens; selection is `greedy_max_min`.
The scorer's scores are not used (DivPrune is score-free); any scorer may be paired with it.
"""

from __future__ import annotations

import torch

from qapframe.strategies.base import PRUNERS, Pruner, Selection
from qapframe.strategies.context import ScoringContext
from qapframe.strategies.pruners.selection import cosine_similarity_matrix, greedy_max_min


@PRUNERS.register("divprune")
class DivPrunePruner(Pruner):
    """The budget's tokens chosen by greedy max-min cosine distance, ignoring scores."""

    def select(self, scores: torch.Tensor, context: ScoringContext) -> Selection:
        n = scores.shape[-1]
        k = self.budget(n)
        if k >= n:
            return Selection(keep_index=torch.arange(n, device=scores.device).expand(scores.shape[0], n).clone())
        distance = 1.0 - cosine_similarity_matrix(context.vision_embeds)  # [B, N, N]
        return Selection(keep_index=greedy_max_min(distance, k).sort(dim=-1).values)
