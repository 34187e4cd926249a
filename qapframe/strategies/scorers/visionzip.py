"""VisionZip's dominant-token score: [CLS] attention at the vision encoder's feature layer."""

from __future__ import annotations

import torch

from qapframe.strategies.base import SCORERS, Scorer
from qapframe.strategies.context import Requirements, ScoringContext


@SCORERS.register("visionzip")
class VisionZipScorer(Scorer):
    """[CLS] -> patch attention, mean over heads; tokens the encoder aggregates into [CLS] rank first."""

    def requirements(self) -> Requirements:
        # Keys too: the `visionzip` pruner merges the dropped tokens by key similarity.
        return Requirements(cls_attention=True, vision_keys=True)

    def score(self, context: ScoringContext) -> torch.Tensor:
        return context.require("cls_attention", "visionzip").float()  # [B, N]
