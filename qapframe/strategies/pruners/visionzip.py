"""VisionZip: keep dominant tokens by score, merge the rest into a few contextual tokens.

Contextual tokens follow VisionZip: targets are picked uniformly among the remaining tokens, every
other remaining token joins the target whose key is most cosine-similar, and each cluster (target
included) is averaged. (The VisionZip code adds the target to the members' mean instead; the plain
cluster average keeps the merged token on the embeddings' scale.)
"""

from __future__ import annotations

import torch
from pydantic import Field

from qapframe.strategies.base import PRUNERS, Pruner, PrunerConfig, Selection, gather_rows, keep_top_k
from qapframe.strategies.context import Requirements, ScoringContext


class VisionZipConfig(PrunerConfig):
    dominant_ratio: float = Field(
        54 / 64, ge=0.0, le=1.0, description="share of the token budget kept as dominant tokens (VisionZip: 54/64)"
    )


def merge_contextual(
    embeds: torch.Tensor, keys: torch.Tensor, remaining: torch.Tensor, num_contextual: int
) -> torch.Tensor:
    """Cluster ``remaining [B, R]`` token indices into ``num_contextual`` averaged tokens ``[B, C, D]``.

    ``embeds [B, N, D]`` are averaged; ``keys [B, N, Dk]`` decide the clusters by cosine similarity.
    """
    b, r = remaining.shape
    step = max(1, r // num_contextual)
    is_target = torch.zeros(r, dtype=torch.bool, device=remaining.device)
    is_target[torch.arange(0, r, step, device=remaining.device)[:num_contextual]] = True
    targets, members = remaining[:, is_target], remaining[:, ~is_target]  # [B, C], [B, R - C]

    def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return gather_rows(x, idx)

    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    similarity = take(k, members) @ take(k, targets).transpose(1, 2)  # [B, R - C, C]
    assign = torch.nn.functional.one_hot(similarity.argmax(-1), targets.shape[1]).float()  # [B, R - C, C]
    sums = take(embeds.float(), targets) + assign.transpose(1, 2) @ take(embeds.float(), members)  # [B, C, D]
    counts = 1 + assign.sum(dim=1).unsqueeze(-1)  # [B, C, 1]
    return (sums / counts).to(embeds.dtype)


@PRUNERS.register("visionzip")
class VisionZipPruner(Pruner):
    """Dominant top-k by score plus contextual tokens merged from the dropped ones, budget(N) in total."""

    Config = VisionZipConfig
    config: VisionZipConfig

    def requirements(self) -> Requirements:
        return Requirements(vision_keys=True)

    def split(self, num_tokens: int) -> tuple[int, int]:
        """(dominant, contextual) token counts for an image of ``num_tokens`` tokens."""
        budget = self.budget(num_tokens)
        if budget >= num_tokens:
            return num_tokens, 0  # nothing dropped, nothing to merge
        dominant = min(budget, max(1, round(self.config.dominant_ratio * budget)))
        contextual = min(budget - dominant, num_tokens - dominant)
        return dominant, contextual

    def select(self, scores: torch.Tensor, context: ScoringContext) -> Selection:
        n = scores.shape[-1]
        dominant, contextual = self.split(n)
        keep = keep_top_k(scores, dominant)  # [B, K]
        if contextual == 0:
            return Selection(keep_index=keep)
        keys = context.require("vision_keys", "visionzip pruner")
        dropped = torch.ones_like(scores, dtype=torch.bool).scatter_(1, keep, False)
        remaining = dropped.nonzero()[:, 1].view(scores.shape[0], n - dominant)  # [B, R] ascending
        extra = merge_contextual(context.vision_embeds, keys, remaining, contextual)
        return Selection(keep_index=keep, extra_tokens=extra)
