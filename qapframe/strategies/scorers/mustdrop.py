"""MustDrop's prefilling stage: dual-attention filtering by the text, with the encoder's key tokens protected.

Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model" (2024),
as the authors' code runs it on LLaVA-1.5. At each pruning layer (the code's layers 2, 6, 10 and 14 of 32:
pruned stages start at fractions 3/32, 7/32, 11/32, 15/32) every text token after the image attends to the
remaining vision tokens (``A [T, N]``, mean over heads). A token survives the paper's rule when its *global*
attention ``g_j = sum_t A[t, j]`` is at least ``global_threshold * sum_k g_k`` **or** its *individual* attention
``m_j = max_t A[t, j]`` is at least ``individual_threshold``. The score here is

    score_j = max(g_j / (global_threshold * sum_k g_k), m_j / individual_threshold)

so a token passes the rule exactly when ``score_j >= 1``, and keeping the top-k by it is the same rule with
both thresholds scaled by one factor until k survive: the pruner's budget replaces the thresholds' variable
count. The *key tokens*, the ``ceil(key_ratio * N)`` with the highest vision-encoder [CLS] attention (the
code: 8 %, at the encoder's last layer), always rank first. Pair it with `topk`; the stages then keep
``retention ** (1 / stages)`` each, as PyramidDrop's do. The vision-encoding stage (merging similar 3x3
windows) is the `mustdrop_merge` pruner, before the LLM; the decoding stage (cutting earlier layers' KV cache
to the final set) is not implemented: here pruned tokens leave every later layer's cache already.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from qapframe.strategies.base import SCORERS, Scorer
from qapframe.strategies.context import Requirements, ScoringContext
from qapframe.strategies.scorers.pyramiddrop import PyramidDropConfig


class MustDropConfig(PyramidDropConfig):
    stages: list[float] = Field(
        [3 / 32, 7 / 32, 11 / 32, 15 / 32],
        min_length=1,
        description="first layer of each pruned stage as a fraction of the LLM's depth, ascending in (0, 1) "
        "(default: after layers 2, 6, 10, 14 of 32, the authors' code)",
    )
    global_threshold: float = Field(0.001, gt=0.0, description="share of the summed text attention a token needs")
    individual_threshold: float = Field(0.001, gt=0.0, description="attention from one text token that suffices")
    key_ratio: float = Field(
        0.08, ge=0.0, le=1.0, description="share of tokens with the top [CLS] attention, always kept first"
    )


def dual_attention_scores(
    rows: torch.Tensor, mask: torch.Tensor, global_threshold: float, individual_threshold: float
) -> torch.Tensor:
    """``rows [B, R, N]`` text -> vision attention, ``mask [B, R]`` real rows -> ``[B, N]`` (>= 1: passes)."""
    rows = rows * mask[..., None].to(rows.dtype)  # padding rows count in neither the sum nor the max
    total = rows.sum(dim=1)  # [B, N] g_j
    share = total / (global_threshold * total.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny))
    return torch.maximum(share, rows.amax(dim=1) / individual_threshold)


@SCORERS.register("mustdrop")
class MustDropScorer(Scorer):
    """Global-or-individual text attention (MustDrop's dual filter) at each stage; key tokens first."""

    Config = MustDropConfig
    config: MustDropConfig

    def requirements(self) -> Requirements:
        # text_raters None: every text token after the image rates it, as in the authors' code
        return Requirements(stage_fractions=tuple(self.config.stages), rater_attention=True, cls_attention=True)

    def score(self, context: ScoringContext) -> torch.Tensor:
        rows = context.require("rater_attention", "mustdrop").double()  # [B, R, N]
        mask = context.require("rater_mask", "mustdrop")  # [B, R]
        c = self.config
        scores = dual_attention_scores(rows, mask, c.global_threshold, c.individual_threshold)  # [B, N]
        n = scores.shape[-1]
        keys = min(n, math.ceil(c.key_ratio * n))
        if keys:
            cls = context.require("cls_attention", "mustdrop").double()  # [B, N]
            key_index = torch.sort(cls, dim=-1, descending=True, stable=True).indices[:, :keys]  # ties: earlier
            # above every other token, in their own dual-attention order
            lift = scores.amax(dim=-1, keepdim=True) + 1.0
            scores = scores.scatter_add(1, key_index, lift.expand(-1, keys))
        return scores.float()
