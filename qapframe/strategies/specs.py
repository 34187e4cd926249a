"""The spec entries of the token strategies: ``scorer: {name, ...}`` and ``pruner: {name, ...}``.

Defined here, beside the registries they look names up in, so that scorers composing other scorers
(`hybrid`, `fused`) need nothing from `qapframe.spec`, which composes these.
"""

from __future__ import annotations

from qapframe.strategies.base import PRUNERS, SCORERS
from qapframe.strategy import StrategySpec


class ScorerSpec(StrategySpec):
    registry = SCORERS  # type: ignore[assignment]


class PrunerSpec(StrategySpec):
    registry = PRUNERS  # type: ignore[assignment]


__all__ = ["PrunerSpec", "ScorerSpec"]
