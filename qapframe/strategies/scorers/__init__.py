"""Built-in scorers; importing this package registers them."""

from qapframe.strategies.scorers import baselines, fused  # noqa: F401
