"""Per-image score normalizations and weighted fusion, as pure functions over ``[B, N]`` tensors.

Scores from different scorers live on unrelated scales (attention probabilities, L2 errors, value
ranges); fusing them is only meaningful after each row is mapped onto a common scale. Every function
computes in float64 and returns the input's dtype, and a constant row maps to the scale's centre
(never NaN), since it carries no ranking information.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch

Normalization = Literal["minmax", "zscore", "rank", "none"]


def check_finite(scores: torch.Tensor, what: str = "scores") -> None:
    """Reject NaN/inf and wrong shapes up front: they would silently corrupt a top-k."""
    if scores.dim() != 2:
        raise ValueError(f"{what} must have shape [B, N], got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {scores.dtype}")
    bad = ~torch.isfinite(scores)
    if bad.any():
        rows = sorted(set(bad.nonzero()[:, 0].tolist()))
        raise ValueError(f"{what} contain NaN or inf (rows {rows[:8]}); scorers must return finite values")


def minmax(scores: torch.Tensor) -> torch.Tensor:
    """Map each row linearly onto [0, 1]; a constant row becomes 0.5."""
    check_finite(scores)
    x = scores.double()
    lo = x.amin(dim=-1, keepdim=True)
    span = x.amax(dim=-1, keepdim=True) - lo
    out = torch.where(span > 0, (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.full_like(x, 0.5))
    return out.clamp_(0.0, 1.0).to(scores.dtype)


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """Centre each row and scale it to unit (population) standard deviation; a constant row becomes 0."""
    check_finite(scores)
    x = scores.double()
    centred = x - x.mean(dim=-1, keepdim=True)
    std = centred.square().mean(dim=-1, keepdim=True).sqrt()
    # Test constancy exactly: the mean of a constant row can round off its value, leaving a
    # rounding-noise `centred` that dividing by its own std would blow up to +-1.
    varying = x.amax(dim=-1, keepdim=True) > x.amin(dim=-1, keepdim=True)
    out = torch.where(varying & (std > 0), centred / std.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))
    return out.to(scores.dtype)


def rank(scores: torch.Tensor) -> torch.Tensor:
    """Replace each score by its rank scaled to [0, 1] (ties share their mean rank)."""
    check_finite(scores)
    x = scores.double()
    n = x.shape[-1]
    if n == 1:
        return torch.full_like(scores, 0.5)
    # rank = (#less) + (#equal - 1) / 2, the mean rank of a tie group; O(N^2) memory is fine for
    # vision-token counts (<= a few thousand) and keeps ties exact.
    less = (x.unsqueeze(-1) > x.unsqueeze(-2)).sum(-1).double()
    equal = (x.unsqueeze(-1) == x.unsqueeze(-2)).sum(-1).double()
    return ((less + (equal - 1) / 2) / (n - 1)).to(scores.dtype)


def identity(scores: torch.Tensor) -> torch.Tensor:
    check_finite(scores)
    return scores


NORMALIZATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "minmax": minmax,
    "zscore": zscore,
    "rank": rank,
    "none": identity,
}


def normalize(scores: torch.Tensor, method: Normalization = "minmax") -> torch.Tensor:
    try:
        fn = NORMALIZATIONS[method]
    except KeyError:
        raise ValueError(f"unknown normalization {method!r}; valid: {', '.join(NORMALIZATIONS)}") from None
    return fn(scores)


def fuse(
    scores: Sequence[torch.Tensor], weights: Sequence[float], normalization: Normalization = "minmax"
) -> torch.Tensor:
    """Weighted sum of per-row normalized scores: ``sum_i w_i * norm(s_i)`` -> ``[B, N]``.

    Weights are used as given (not renormalized) so that ``alpha * SP + (1 - alpha) * SQ`` reads
    exactly as in the QAPruner paper.
    """
    if len(scores) == 0 or len(scores) != len(weights):
        raise ValueError(f"fuse needs one weight per score tensor, got {len(scores)} scores and {len(weights)} weights")
    if any(not (w >= 0.0 and w != float("inf")) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"fusion weights must be finite, non-negative and not all zero, got {list(weights)}")
    shape = scores[0].shape
    for i, s in enumerate(scores):
        if s.shape != shape:
            raise ValueError(f"score tensor {i} has shape {tuple(s.shape)}, expected {tuple(shape)}")
    total = torch.zeros(shape, dtype=torch.float64, device=scores[0].device)
    for s, w in zip(scores, weights):
        if w:
            total += w * normalize(s, normalization).double()
        else:
            check_finite(s)
    return total.to(scores[0].dtype)
