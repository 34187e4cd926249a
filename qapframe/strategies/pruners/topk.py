"""Keep the highest-scoring tokens, in their original order."""

from __future__ import annotations

import torch

from qapframe.strategies.base import PRUNERS, Pruner, Selection, keep_top_k
from qapframe.strategies.context import ScoringContext


@PRUNERS.register("topk")
class TopKPruner(Pruner):
    """The pruner of FastV and QAPruner: top-k by score, no token merging."""

    def select(self, scores: torch.Tensor, context: ScoringContext) -> Selection:
        return Selection(keep_index=keep_top_k(scores, self.budget(scores.shape[-1])))
