"""The one integer quantization grid of qapframe: weights, activations and the hybrid score's E all use it.

Groups of ``g`` consecutive channels along the last dim (the last group may be shorter; -1 = all channels),
float32 arithmetic, round-half-to-even, plain min/max:
- asymmetric: ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min / scale)``,
  ``q = clamp(round(x / scale) + zero, 0, 2^b - 1)``;
- symmetric: ``scale = max|x| / (2^(b-1) - 1)``, ``zero = 0``, ``q = clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1)``
  (the narrow grid: ``+-max|x|`` on codes ``+-(2^(b-1) - 1)``, nothing clipped); with ``full_range``,
  ``scale = max|x| / (2^(b-1) - 0.5)``: the whole code range ``[-2^(b-1), 2^(b-1) - 1]`` spans
  ``[-max|x|, max|x|]``: a finer step (at 4 bits 1/7.5 of max|x|, not 1/7), the largest values clipped by at
  most half a step, as much as rounding errs elsewhere (compressed-tensors' and vLLM's convention);
- ``x_hat = (q - zero) * scale``. A constant group (zero range) gets scale ``|value|`` (1 for zeros), so its
  value is still represented exactly.
Only torch is imported: the quantizers, the kernels' reference and the observers all build on this module.
"""

from __future__ import annotations

import torch


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest integer code."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def qparams(x: torch.Tensor, bits: int, symmetric: bool, full_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the groups along the last dim: ``x [..., g]`` -> ``([..., 1], [..., 1])`` float32.

    ``full_range`` only changes symmetric grids (see the module docstring)."""
    x = x.float()
    if symmetric:
        scale = x.abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - (0.5 if full_range else 1))
        return torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(scale)
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    fallback = torch.where(lo != 0, lo.abs(), torch.ones_like(lo))
    scale = torch.where(scale > 0, scale, fallback)
    return scale, torch.round(-lo / scale)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Integer codes (as float32) of ``x`` on the grid ``(scale, zero)`` (broadcast)."""
    lo, hi = code_range(bits, symmetric)
    return torch.clamp(torch.round(x.float() / scale) + zero, lo, hi)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.float() - zero) * scale


def channel_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x [..., D]`` -> float32 ``[..., G, g]``; a short last group is padded with copies of its first
    element, which leaves its min, max and max|x| unchanged."""
    x = x.float()
    d = x.shape[-1]
    g = d if group_size == -1 else group_size
    pad = (-d) % g
    if pad:
        start = d - d % g
        x = torch.cat([x, x[..., start : start + 1].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, g)


def fake_quantize_groups(x: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                         full_range: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``x [..., D]`` group-wise along the last dim on this grid, in float32."""
    d = x.shape[-1]
    groups = channel_groups(x, group_size)  # [..., G, g]
    scale, zero = qparams(groups, bits, symmetric, full_range)
    deq = dequantize(quantize(groups, scale, zero, bits, symmetric), scale, zero)
    return deq.reshape(*x.shape[:-1], -1)[..., :d]


__all__ = ["channel_groups", "code_range", "dequantize", "fake_quantize_groups", "qparams", "quantize"]
