"""SparseVLM's scores: how much the text raters, the prompt tokens most related to the image, attend to each vision token.

Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference"
(ICML 2025). Raters are chosen once, before the first LLM layer, among the text tokens that follow the
image (the question): with ``v`` the image's vision tokens and ``t`` those text tokens as the LLM receives
them, the relevance of text token ``t`` is ``mean_v softmax_t(v . t)`` (softmax over the text tokens, as in
the authors' code, unscaled), and the tokens at or above the mean relevance rate the image (``>=`` so that
one is always chosen; the code's strict ``>`` chooses none when all are equal). At each stage's ranking
layer a vision token's score is its attention from the raters, mean over heads and raters. The stages
default to the paper's pruning layers 2, 6 and 15 of LLaVA-1.5-7B's 32 (pruned after those layers:
fractions 3/32, 7/32, 1/2 of the depth); the `sparsevlm` pruner adds the rank-based count and recycling.
"""

from __future__ import annotations

import torch
from pydantic import Field

from qapframe.strategies.base import SCORERS, Scorer
from qapframe.strategies.context import Requirements, ScoringContext
from qapframe.strategies.scorers.pyramiddrop import PyramidDropConfig


def text_raters(vision: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``vision [N, D]``, ``text [T, D]`` LLM input embeddings -> ``[T]`` bool, True = a rater."""
    dtype = torch.promote_types(vision.dtype, torch.float32)
    logits = vision.to(dtype) @ text.to(dtype).transpose(0, 1)  # [N, T]
    relevance = logits.softmax(dim=-1).mean(dim=0)  # [T]
    return relevance >= relevance.mean()


class SparseVLMConfig(PyramidDropConfig):
    """PyramidDrop's staging (the same validated fractions), with SparseVLM's pruning layers as the default."""

    stages: list[float] = Field(
        [3 / 32, 7 / 32, 0.5],
        min_length=1,
        description="first layer of each pruned stage as a fraction of the LLM's depth, ascending in (0, 1) "
        "(default: after layers 2, 6, 15 of 32, the paper's)",
    )


@SCORERS.register("sparsevlm")
class SparseVLMScorer(Scorer):
    """Text raters' attention to each vision token at the end of each stage, mean over heads and raters."""

    Config = SparseVLMConfig
    config: SparseVLMConfig

    def requirements(self) -> Requirements:
        return Requirements(stage_fractions=tuple(self.config.stages), rater_attention=True, text_raters=text_raters)

    def score(self, context: ScoringContext) -> torch.Tensor:
        rows = context.require("rater_attention", "sparsevlm").float()  # [B, R, N]
        mask = context.require("rater_mask", "sparsevlm").to(rows.dtype)  # [B, R]
        count = mask.sum(dim=-1, keepdim=True).clamp_min(1.0)  # [B, 1]
        return (rows * mask[..., None]).sum(dim=1) / count  # [B, N]
