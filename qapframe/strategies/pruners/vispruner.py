"""VisPruner: important tokens by visual ([CLS]) attention, then diverse tokens by removing duplicates.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs" (ICCV 2025). A share of the budget goes to the top-scored tokens (pair it with the `visionzip`
scorer for [CLS] attention, as in the paper); the rest of the budget is filled from the remaining tokens
by repeatedly splitting them into two alternating halves and dropping the tokens of the first half that
are most cosine-similar to some token of the second, until the budget is met (`remove_duplicates`).
"""

from __future__ import annotations

import torch
from pydantic import Field

from qapframe.strategies.base import PRUNERS, Pruner, PrunerConfig, Selection, gather_rows, keep_top_k
from qapframe.strategies.context import ScoringContext
from qapframe.strategies.pruners.selection import unit_rows


class VisPrunerConfig(PrunerConfig):
    important_ratio: float = Field(
        0.5, ge=0.0, le=1.0, description="share of the token budget kept as important (top-scored) tokens"
    )


def remove_duplicates(embeds: torch.Tensor, candidates: torch.Tensor, target: int) -> torch.Tensor:
    """Shrink ``candidates [B, R]`` (token indices, ascending) to ``[B, target]`` diverse ones, ascending.

    Each round splits the candidates alternately into A (even slots) and B (odd slots), rates each A
    token by its highest cosine similarity to any B token, and drops the most similar A tokens (at most
    |A|, at most the excess); ties keep the earlier token.
    """
    rows = candidates
    unit = unit_rows(embeds)  # [B, N, D], normalised once for every round
    while rows.shape[1] > target:
        excess = rows.shape[1] - target
        a, b_ = rows[:, 0::2], rows[:, 1::2]
        if b_.shape[1] == 0:  # one candidate left and target 0
            return rows[:, :target]
        redundancy = (gather_rows(unit, a) @ gather_rows(unit, b_).transpose(1, 2)).amax(dim=-1)  # [B, |A|]
        drop = min(excess, a.shape[1])
        kept_a = keep_top_k(-redundancy, a.shape[1] - drop)  # positions within A, ascending
        rows = torch.cat([a.gather(1, kept_a), b_], dim=1).sort(dim=-1).values
    return rows


@PRUNERS.register("vispruner")
class VisPrunerPruner(Pruner):
    """``important_ratio`` of the budget by score, the rest as de-duplicated diverse tokens."""

    Config = VisPrunerConfig
    config: VisPrunerConfig

    def select(self, scores: torch.Tensor, context: ScoringContext) -> Selection:
        b, n = scores.shape
        k = self.budget(n)
        if k >= n:
            return Selection.everything(b, n, scores.device)
        important = min(k, round(self.config.important_ratio * k))
        keep = keep_top_k(scores, important)  # [B, I]
        rest = torch.ones_like(scores, dtype=torch.bool).scatter_(1, keep, False)
        remaining = rest.nonzero()[:, 1].view(b, n - important)  # [B, R] ascending
        diverse = remove_duplicates(context.vision_embeds, remaining, k - important)
        return Selection(keep_index=torch.cat([keep, diverse], dim=1).sort(dim=-1).values)
