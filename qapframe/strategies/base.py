"""The token-strategy interfaces: a `Scorer` rates vision tokens, a `Pruner` picks the ones to keep."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import Field

from qapframe.registry import Registry
from qapframe.strategies.context import Requirements, ScoringContext
from qapframe.strategy import Strategy, StrategyConfig

SCORERS: Registry[type["Scorer"]] = Registry("scorer", "qapframe.scorers", ("qapframe.strategies.scorers",))
PRUNERS: Registry[type["Pruner"]] = Registry("pruner", "qapframe.pruners", ("qapframe.strategies.pruners",))


class Scorer(Strategy, abc.ABC):
    """Rates each vision token of each image; higher means more worth keeping."""

    @abc.abstractmethod
    def score(self, context: ScoringContext) -> torch.Tensor:
        """Return float32 scores ``[B, N]`` on the embeddings' device; must be finite."""

    def requirements(self) -> Requirements:
        """Context beyond ``vision_embeds`` that the model adapter must compute for this scorer."""
        return Requirements()


@dataclass
class Selection:
    """Which tokens survive, per image, plus any synthesized tokens to append after them."""

    keep_index: torch.Tensor  # [B, K] int64, ascending: kept tokens in their original order
    extra_tokens: torch.Tensor | None = None  # [B, M, D] e.g. VisionZip's merged contextual tokens

    @property
    def num_tokens(self) -> int:
        extra = 0 if self.extra_tokens is None else self.extra_tokens.shape[1]
        return self.keep_index.shape[1] + extra

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """Apply the selection to ``tokens [B, N, D]`` -> ``[B, K(+M), D]``."""
        index = self.keep_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        kept = tokens.gather(1, index)
        if self.extra_tokens is None:
            return kept
        return torch.cat([kept, self.extra_tokens.to(kept.dtype)], dim=1)


class PrunerConfig(StrategyConfig):
    """A token budget: a retention ratio or an absolute token count (the count wins when set)."""

    retention: float = Field(0.125, gt=0.0, le=1.0, description="fraction of vision tokens kept, in (0, 1]")
    num_tokens: int | None = Field(None, gt=0, description="tokens kept per image; overrides retention")


class Pruner(Strategy, abc.ABC):
    """Turns scores into a per-image selection that fits the budget."""

    Config: ClassVar[type[PrunerConfig]] = PrunerConfig
    config: PrunerConfig

    def budget(self, num_tokens: int) -> int:
        """Tokens the LLM receives per image (kept plus appended), at least 1, at most ``num_tokens``."""
        if self.config.num_tokens is not None:
            return min(self.config.num_tokens, num_tokens)
        return max(1, min(num_tokens, round(self.config.retention * num_tokens)))

    @abc.abstractmethod
    def select(self, scores: torch.Tensor, context: ScoringContext) -> Selection:
        """``scores [B, N]`` -> a selection of ``budget(N)`` tokens per image."""

    def requirements(self) -> Requirements:
        """Context the pruner itself needs (e.g. keys for merging), unioned with the scorer's."""
        return Requirements()


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, k]`` of the k highest scores per row, in ascending (original) order.

    Ties break toward the earlier token so that the result is deterministic across backends.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values
