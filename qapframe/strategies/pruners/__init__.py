"""Built-in pruners; importing this package registers them."""

from qapframe.strategies.pruners import topk, visionzip  # noqa: F401
