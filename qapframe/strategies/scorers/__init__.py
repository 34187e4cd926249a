"""Built-in scorers; importing this package registers them."""

from qapframe.strategies.scorers import baselines, fastv, fused, hybrid, visionzip  # noqa: F401
