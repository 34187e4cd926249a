"""CDPruner's relevance: how similar each vision token is to the instruction.

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs" (NeurIPS 2025) rate token i by the cosine similarity of its CLIP image embedding with the CLIP
text embeddings of the instruction, averaged over the text tokens. A LLaVA model has no text tower, so
the stand-in here is the LLM's own input embedding table: ``r_i = mean_t cos(v_i, e_t)`` with ``v_i`` the
projected vision token (which the projector trained to live in that space) and ``e_t`` the input
embedding of each real prompt text token of the image's sequence (image placeholders and padding
excluded); the model adapter supplies ``text_embeds``/``text_mask``. A plugin scorer may supply
another relevance: the `cdpruner` pruner uses whatever scorer it is paired with.
"""

from __future__ import annotations

import torch

from qapframe.strategies.base import SCORERS, Scorer
from qapframe.strategies.context import Requirements, ScoringContext


def text_relevance(vision: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``vision [B, N, D]``, ``text [B, T, D]``, ``mask [B, T]`` -> mean cosine over real text tokens ``[B, N]``."""
    v = torch.nn.functional.normalize(vision.float(), dim=-1)
    t = torch.nn.functional.normalize(text.float(), dim=-1)
    cos = v @ t.transpose(1, 2)  # [B, N, T]
    weight = mask.to(cos.dtype)
    count = weight.sum(dim=-1, keepdim=True).clamp_min(1.0)  # [B, 1]; no text at all -> 0 relevance
    return (cos * weight[:, None, :]).sum(dim=-1) / count


@SCORERS.register("cdpruner")
class CDPrunerScorer(Scorer):
    """Mean cosine similarity of each vision token to the prompt's LLM input embeddings (CDPruner's r)."""

    def requirements(self) -> Requirements:
        return Requirements(text_embeds=True)

    def score(self, context: ScoringContext) -> torch.Tensor:
        text = context.require("text_embeds", "cdpruner")
        mask = context.require("text_mask", "cdpruner")
        return text_relevance(context.vision_embeds, text, mask)  # [B, N]
