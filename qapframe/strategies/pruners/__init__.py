"""Built-in pruners; importing this package registers them."""

from qapframe.strategies.pruners import cdpruner, dart, divprune, sparsevlm, tome, topk, vispruner, visionzip  # noqa: F401
