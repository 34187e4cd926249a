"""Built-in scorers; importing this package registers them."""

from qapframe.strategies.scorers import baselines, cdpruner, fastv, fused, hybrid, pyramiddrop, visionzip  # noqa: F401
