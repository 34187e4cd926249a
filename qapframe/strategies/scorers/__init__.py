"""Built-in scorers; importing this package registers them."""

from qapframe.strategies.scorers import (  # noqa: F401
    baselines, cdpruner, fastv, fused, hybrid, pyramiddrop, sparsevlm, visionzip,
)
