"""Built-in pruners; importing this package registers them."""

from qapframe.strategies.pruners import (  # noqa: F401
    cdpruner, dart, divprune, dycoke, fastvid, holitom, mustdrop, prunevid, sparsevlm, tome, topk, vispruner, visionzip,
)
