"""Scoring kernels for the hybrid (QAPruner) sensitivity, with one dispatch over backends.

Backends: ``torch`` (the reference), ``numba-cpu`` and ``numba-cuda`` (added by their modules when
numba is importable). `hybrid_sensitivity` picks one from the tensor's device unless told.
"""

from __future__ import annotations

from typing import Callable

import torch

from qapframe.kernels.reference import check_args, hybrid_sensitivity_reference

Kernel = Callable[[torch.Tensor, int, int, bool], "tuple[torch.Tensor, torch.Tensor]"]

BACKENDS: dict[str, Kernel] = {"torch": hybrid_sensitivity_reference}


def _default_backend(x: torch.Tensor) -> str:
    preferred = "numba-cuda" if x.is_cuda else "numba-cpu"
    return preferred if preferred in BACKENDS else "torch"


def hybrid_sensitivity(
    x: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, N, D]`` (fp32/fp16/bf16) -> ``(E, R)``, each ``[B, N]`` float32 on ``x``'s device.

    E is the L2 norm of the group-wise quantize-dequantize error, R the token's max - min.
    """
    check_args(x, bits, group_size)
    name = backend or _default_backend(x)
    try:
        kernel = BACKENDS[name]
    except KeyError:
        raise ValueError(f"scoring backend {name!r} is not available; available: {', '.join(BACKENDS)}") from None
    return kernel(x, bits, group_size, symmetric)


__all__ = ["BACKENDS", "hybrid_sensitivity", "hybrid_sensitivity_reference"]
