"""Vision-token strategies: scorers rate tokens, pruners keep the best within a budget."""

from qapframe.strategies.base import PRUNERS, SCORERS, Pruner, PrunerConfig, Scorer, Selection, keep_top_k
from qapframe.strategies.context import QuantSettings, Requirements, ScoringContext

__all__ = [
    "PRUNERS",
    "SCORERS",
    "Pruner",
    "PrunerConfig",
    "QuantSettings",
    "Requirements",
    "Scorer",
    "ScoringContext",
    "Selection",
    "keep_top_k",
]
