"""Built-in scorers; importing this package registers them."""

from qapframe.strategies.scorers import (  # noqa: F401
    baselines, cdpruner, fastv, fused, hybrid, mustdrop, pyramiddrop, sparsevlm, visionzip,
)
