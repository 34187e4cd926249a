"""FastV: the attention the last text token pays to each vision token inside the LLM.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2" (ECCV 2024). K follows the paper and its
official code: the attention map of decoder layer K - 1 (0-based) ranks the vision tokens, and layers
K and later see only the kept ones (FastV's K=2: layers 0-1 see every token).

Migration: the field used to be ``layer`` = the ranking layer, so ``layer: L`` meant ``k: L + 1``;
``layer`` is still accepted (with a DeprecationWarning naming the replacement) and keeps its meaning.
The *default* changed: ``{name: fastv}`` used to rank at layer 2 (K=3) and now ranks at layer 1 (K=2).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from pydantic import Field, model_validator

from qapframe.strategies.base import SCORERS, Scorer
from qapframe.strategies.context import Requirements, ScoringContext
from qapframe.strategy import StrategyConfig


class FastVConfig(StrategyConfig):
    k: int = Field(2, ge=1, description="FastV's K: layer K-1's attention ranks tokens; layers >= K see only kept ones")

    @model_validator(mode="before")
    @classmethod
    def _migrate_layer(cls, data: Any) -> Any:
        if isinstance(data, dict) and "layer" in data:
            if "k" in data:
                raise ValueError("fastv: give `k` only (`layer` is its deprecated predecessor, `k` = layer + 1)")
            data = dict(data)
            layer = data.pop("layer")
            if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
                raise ValueError(f"fastv: `layer` (deprecated) must be an integer >= 0, got {layer!r}")
            warnings.warn(
                f"fastv `layer: {layer}` is deprecated; use `k: {layer + 1}` (FastV's K: layer K-1 ranks, "
                f"layers >= K see only kept tokens), which means the same",
                DeprecationWarning,
                stacklevel=2,
            )
            data["k"] = layer + 1
        return data

    @property
    def ranking_layer(self) -> int:
        return self.k - 1


@SCORERS.register("fastv")
class FastVScorer(Scorer):
    """Last text token -> vision token attention at decoder layer K - 1, mean over heads (FastV, K=2)."""

    Config = FastVConfig
    config: FastVConfig

    def requirements(self) -> Requirements:
        return Requirements(text_attention_layer=self.config.ranking_layer)

    def score(self, context: ScoringContext) -> torch.Tensor:
        return context.require("text_attention", "fastv").float()  # [B, N]
