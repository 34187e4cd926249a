"""CDPruner: keep the vision tokens that maximise the *conditional* diversity of a DPP.

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs" (NeurIPS 2025). The kernel is ``L = diag(r) S diag(r)``: ``S [N, N]`` the cosine similarity of
the vision tokens, ``r [N]`` each token's relevance to the instruction, min-max normalised per image.
The kept set is the DPP's greedy MAP (`greedy_dpp_map`, Chen et al. 2018's Cholesky updates), so it
trades relevance (the kernel's diagonal ``r_i^2``) against redundancy (the volume spanned).

Relevance is the *scorer's* score: the `cdpruner` scorer gives CDPruner's text-image similarity;
any other scorer plugs in. With the QAPruner `hybrid` scorer, ``r = minmax(alpha SP + (1 - alpha) SQ)``:
the DPP then prefers tokens that are relevant *and* quantization-sensitive (large E, wide range R),
while still refusing near-duplicates of tokens already kept; alpha = 1 is CDPruner with SP's relevance.
"""

from __future__ import annotations

import torch

from qapframe.strategies.base import PRUNERS, Pruner, Selection
from qapframe.strategies.context import ScoringContext
from qapframe.strategies.normalization import minmax
from qapframe.strategies.pruners.selection import greedy_dpp_map, symmetric_gram, unit_rows


def conditional_kernel(embeds: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """``embeds [B, N, D]``, ``relevance [B, N]`` -> ``L = diag(r) S diag(r)`` ``[B, N, N]``.

    Formed as the Gram matrix of the unit tokens scaled by their relevance, ``L_ij = (r_i u_i) . (r_j u_j)``:
    the same kernel without two N x N elementwise passes.
    """
    unit = unit_rows(embeds)
    return symmetric_gram(relevance.to(unit.dtype)[:, :, None] * unit)


@PRUNERS.register("cdpruner")
class CDPrunerPruner(Pruner):
    """Greedy MAP of the conditional DPP whose relevance is the scorer's (min-max normalised) score."""

    def select(self, scores: torch.Tensor, context: ScoringContext) -> Selection:
        n = scores.shape[-1]
        k = self.budget(n)
        if k >= n:
            index = torch.arange(n, device=scores.device).expand(scores.shape[0], n)
            return Selection(keep_index=index.clone())
        relevance = minmax(scores.float())  # [B, N] in [0, 1], as CDPruner normalises it
        kernel = conditional_kernel(context.vision_embeds, relevance)
        picks = greedy_dpp_map(kernel, k, fallback=relevance)  # [B, k]
        return Selection(keep_index=picks.sort(dim=-1).values)
