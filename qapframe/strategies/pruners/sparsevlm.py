"""SparseVLM's pruner: a rank-based adaptive count at each stage, and the deleted tokens recycled into merged ones.

Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference"
(ICML 2025); pair it with the `sparsevlm` scorer (its text raters and stages).
- **Count.** The paper deletes ``N = lambda * (L_v - rank(P))`` of the ``L_v`` remaining vision tokens at a
  stage, ``P [R, L_v]`` the raters' attention rows (mean over heads): the rank is how many independent
  directions the raters' attention takes, ``L_v - rank(P)`` the redundancy. Here ``lambda`` is the stage's
  planned deletion share ``(L_v - t) / L_v``, ``t`` the planned count that the in-LLM stages step toward the
  pruner's budget (geometrically, as for PyramidDrop), so a full-rank ``P`` deletes nothing and a rank-1
  ``P`` nearly the whole plan (rounded half up). The last stage always lands on the budget, which makes the
  retention comparable with every other method. (The authors' first code kept ``13.5 * rank(P)`` tokens,
  later code a fixed count per layer.) Counts are net: a stage leaves ``kept + merged`` tokens, the budget
  counts merged tokens as VisionZip's does. Singular values below ``RANK_RTOL`` of the largest count as 0,
  so that float noise (a batched run against a single one) cannot change the rank.
- **Recycling.** Of the ``D`` deleted tokens, the ``int(tau * D) + 1`` with the highest scores are recycled
  (tau = 0.3): clustered by density peaks on their hidden states (DPC-kNN as in the authors' code: distances
  over ``sqrt(dim)``, density ``exp(-mean d^2)`` over the ``C`` nearest tokens, self included, centres by
  density x distance to a denser token), ``C = int(theta * recycled) + 1`` clusters (theta = 0.1), each
  averaged into one merged token. Ties go to the earlier token (the code adds random noise instead).
  At a budget too small for the rule's cluster count, the count is capped at the budget.
"""

from __future__ import annotations

import torch
from pydantic import Field

from qapframe.strategies.base import PRUNERS, Pruner, PrunerConfig, Selection, keep_top_k
from qapframe.strategies.context import Requirements, ScoringContext
from qapframe.strategies.pruners.selection import density_peak_clusters

RANK_RTOL = 1e-4


class SparseVLMConfig(PrunerConfig):
    recycle_ratio: float = Field(
        0.3, ge=0.0, le=1.0, description="tau: int(tau * deleted) + 1 best-scored deleted tokens are recycled (0: none)"
    )
    cluster_ratio: float = Field(
        0.1, gt=0.0, le=1.0, description="theta: the recycled tokens merge into int(theta * recycled) + 1 tokens"
    )


def recycled_count(deleted: int, tau: float) -> int:
    return 0 if deleted <= 0 or tau <= 0 else min(deleted, int(tau * deleted) + 1)


def cluster_count(recycled: int, theta: float) -> int:
    return 0 if recycled <= 0 else min(recycled, int(theta * recycled) + 1)


def split(n: int, total: int, tau: float, theta: float) -> tuple[int, int]:
    """(kept, merged) tokens out of ``n`` so that ``kept + merged == total``: the most kept tokens whose deleted
    rest, recycled by the rule, fits (each token fewer kept adds at most one cluster, so the sum is met exactly)."""
    if total >= n:
        return n, 0
    for kept in range(total, -1, -1):
        merged = cluster_count(recycled_count(n - kept, tau), theta)
        if kept + merged <= total:
            return kept, merged
    return 0, total  # the rule's clusters alone exceed the budget: fewer of them


def adapted_total(n: int, planned: int, rank: int) -> int:
    """Tokens a stage leaves: ``n - lambda * (n - rank)`` with ``lambda = (n - planned) / n``, rounded half up."""
    deleted = ((n - planned) * (n - rank) * 2 + n) // (2 * n)
    return n - deleted


def attention_rank(rows: torch.Tensor) -> torch.Tensor:
    """``rows [B, R, N]`` (zero rows pad) -> ``[B]`` numerical rank, relative tolerance `RANK_RTOL`."""
    return torch.linalg.matrix_rank(rows.double(), rtol=RANK_RTOL)


def density_peak_merge(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """``x [R, D]`` -> ``[C, D]``: DPC-kNN centres (ascending), every token averaged into its nearest centre's;
    density over the ``C`` nearest tokens, as the authors' code counts them."""
    assign = density_peak_clusters(x, clusters, neighbours=clusters)
    sums = x.double().new_zeros(clusters, x.shape[1]).index_add_(0, assign, x.double())
    counts = torch.bincount(assign, minlength=clusters).to(torch.float64)
    return (sums / counts[:, None]).to(x.dtype)


@PRUNERS.register("sparsevlm")
class SparseVLMPruner(Pruner):
    """Top-scored tokens, as many as the raters' attention rank allows, plus the best deleted ones merged."""

    Config = SparseVLMConfig
    config: SparseVLMConfig

    def requirements(self) -> Requirements:
        return Requirements(llm_hidden=True, rater_attention=True)

    def counts(self, n: int, context: ScoringContext) -> tuple[int, int]:
        """(kept, merged) for images of ``n`` tokens: the budget, or at an adaptive stage its rank-adapted share."""
        total = self.budget(n)
        if context.adaptive_budget and total < n:
            ranks = attention_rank(context.require("rater_attention", "sparsevlm pruner")).tolist()
            totals = {max(total, adapted_total(n, total, int(rank))) for rank in ranks}
            if len(totals) > 1:
                raise ValueError(f"sparsevlm pruner: the images' adapted counts differ ({sorted(totals)}); "
                                 f"an adaptive stage selects one image at a time")
            total = totals.pop()
        return split(n, total, self.config.recycle_ratio, self.config.cluster_ratio)

    def select(self, scores: torch.Tensor, context: ScoringContext) -> Selection:
        b, n = scores.shape
        kept, merged = self.counts(n, context)
        keep = keep_top_k(scores, kept)  # [B, K]
        if merged == 0:
            return Selection(keep_index=keep)
        hidden = context.require("llm_hidden", "sparsevlm pruner")  # [B, N, D]
        deleted = torch.ones_like(scores, dtype=torch.bool).scatter_(1, keep, False)
        deleted = deleted.nonzero()[:, 1].view(b, n - kept)  # [B, N - K] ascending
        recycled = recycled_count(n - kept, self.config.recycle_ratio)
        best = deleted.gather(1, keep_top_k(scores.gather(1, deleted), recycled))  # [B, R]
        extra = torch.stack([density_peak_merge(hidden[i, best[i]], merged) for i in range(b)])  # [B, C, D]
        return Selection(keep_index=keep, extra_tokens=extra)
