"""Plain-torch reference of the hybrid sensitivity: the ground truth every backend is tested against.

E is measured on qapframe's one quantization grid (`qapframe.quant_grid`, shared with the weight and
activation quantizers): groups of ``group_size`` consecutive channels (the last may be shorter; -1 = the
whole token), float32, round-half-to-even, plain min/max; a constant group is reproduced exactly.
"""

from __future__ import annotations

import torch

from qapframe.quant_grid import fake_quantize_groups


def check_args(x: torch.Tensor, bits: int, group_size: int) -> int:
    """Validate inputs; return the effective group size."""
    if x.dim() != 3:
        raise ValueError(f"vision embeddings must have shape [B, N, D], got {tuple(x.shape)}")
    if x.shape[-1] < 1:
        raise ValueError(f"vision embeddings must have at least one channel (D >= 1), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"vision embeddings must be float32, float16 or bfloat16, got {x.dtype}")
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    if group_size == -1:
        return max(1, x.shape[-1])
    if group_size < 1:
        raise ValueError(f"group_size must be a positive channel count or -1 (whole token), got {group_size}")
    return group_size


def hybrid_sensitivity_reference(
    x: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, N, D]`` -> ``(E [B, N], R [B, N])``: quantization-error L2 norm and max - min, float32."""
    check_args(x, bits, group_size)
    xf = x.float()
    error = (xf - fake_quantize_groups(xf, bits, group_size, symmetric)).norm(dim=-1)
    spread = xf.amax(dim=-1) - xf.amin(dim=-1)
    return error, spread


def _unit_interval(scores: torch.Tensor) -> torch.Tensor:
    """Per-row min-max of ``[B, N]`` onto [0, 1] in float64, rounded to float32; a constant row -> 0.5."""
    s = scores.double()
    lo = s.amin(dim=-1, keepdim=True)
    span = s.amax(dim=-1, keepdim=True) - lo
    unit = torch.where(span > 0, (s - lo) / torch.where(span > 0, span, 1.0), 0.5).clamp(0.0, 1.0)
    return unit.float()


def sensitivity_score_reference(
    x: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [B, N, D]`` -> ``(E, R, SQ)``, each ``[B, N]`` float32, ``SQ = 0.5 * minmax(E) + 0.5 * minmax(R)``.

    The halves are float32 and summed in float64, so SQ equals the minmax fusion of
    `qapframe.strategies.normalization` bit for bit.
    """
    error, spread = hybrid_sensitivity_reference(x, bits, group_size, symmetric)
    if x.shape[1] == 0:
        return error, spread, error.clone()
    score = 0.5 * _unit_interval(error).double() + 0.5 * _unit_interval(spread).double()
    return error, spread, score.float()


__all__ = ["check_args", "hybrid_sensitivity_reference", "sensitivity_score_reference"]
