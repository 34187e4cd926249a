"""DART: in-LLM pruning by duplication, keeping the tokens least similar to a few pivot tokens.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(2025). After layer K - 1 (DART, like FastV, uses K=2), ``num_pivots`` pivot tokens are the vision tokens
whose keys have the largest L``p`` norm; every other vision token is rated by its highest cosine
similarity (of hidden states) to any pivot, and the pivots plus the least-duplicated tokens fill the
budget. Pivots here are taken among the vision tokens only (the paper also tries text pivots).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from qapframe.strategies.base import PRUNERS, Pruner, PrunerConfig, Selection, gather_rows, keep_top_k
from qapframe.strategies.context import Requirements, ScoringContext


class DARTConfig(PrunerConfig):
    k: int = Field(
        2, ge=1, description="as FastV's K: layer K-1's hidden states and keys decide; layers >= K see only kept tokens"
    )
    num_pivots: int = Field(8, ge=1, description="pivot tokens, by largest key norm (capped at the budget)")
    norm: Literal["l1", "l2"] = Field("l2", description="key norm that picks the pivots")


def duplication(hidden: torch.Tensor, pivots: torch.Tensor) -> torch.Tensor:
    """``hidden [B, N, D]``, ``pivots [B, P]`` -> each token's highest cosine similarity to a pivot ``[B, N]``."""
    unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
    anchor = gather_rows(unit, pivots)  # [B, P, D]
    return (unit @ anchor.transpose(1, 2)).amax(dim=-1)


@PRUNERS.register("dart")
class DARTPruner(Pruner):
    """Pivots by key norm, then the tokens least similar to every pivot; the scorer's scores are unused."""

    Config = DARTConfig
    config: DARTConfig

    def requirements(self) -> Requirements:
        return Requirements(text_attention_layer=self.config.k - 1, llm_hidden=True)

    def select(self, scores: torch.Tensor, context: ScoringContext) -> Selection:
        b, n = scores.shape
        budget = self.budget(n)
        if budget >= n:
            return Selection.everything(b, n, scores.device)
        hidden = context.require("llm_hidden", "dart pruner")  # [B, N, D]
        keys = context.require("llm_keys", "dart pruner")  # [B, N, Dk]
        p = min(self.config.num_pivots, budget)
        key_norm = keys.float().norm(p=1 if self.config.norm == "l1" else 2, dim=-1)  # [B, N]
        pivots = keep_top_k(key_norm, p)  # [B, P]
        similarity = duplication(hidden, pivots).scatter(1, pivots, float("inf"))  # pivots are never "others"
        others = keep_top_k(-similarity, budget - p)  # least duplicated
        return Selection(keep_index=torch.cat([pivots, others], dim=1).sort(dim=-1).values)
