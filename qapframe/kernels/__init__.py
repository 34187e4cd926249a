"""Scoring kernels for the hybrid (QAPruner) sensitivity, with one dispatch over backends.

Backends: ``torch`` (the reference, any device), ``numba-cpu`` (CPU tensors) and ``numba-cuda`` (CUDA
tensors; also CPU tensors, copied, which is how the CUDA simulator runs it). A numba backend is
registered only where it can run; `UNAVAILABLE` says why one is missing. `hybrid_sensitivity` picks
one from the tensor's device unless told.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from qapframe.kernels.reference import check_args, hybrid_sensitivity_reference, sensitivity_score_reference

Kernel = Callable[[torch.Tensor, int, int, bool], "tuple[torch.Tensor, torch.Tensor]"]
ScoreKernel = Callable[[torch.Tensor, int, int, bool], "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class Backend:
    """One backend's kernels: ``sensitivity`` -> (E, R), ``score`` -> (E, R, SQ), all ``[B, N]`` float32.

    Calling a backend runs ``sensitivity``, so ``BACKENDS[name](x, bits, group_size, symmetric)`` works.
    """

    name: str
    sensitivity: Kernel
    score: ScoreKernel
    devices: tuple[str, ...] | None  # tensor device types it accepts; None = any

    def __call__(self, x: torch.Tensor, bits: int, group_size: int, symmetric: bool):
        return self.sensitivity(x, bits, group_size, symmetric)


# Filled on first use (`_backends`): importing numba costs a second, and `qapframe list` or a quantizer
# that never scores tokens should not pay it. ``BACKENDS`` / ``UNAVAILABLE`` are served by `__getattr__`.
_BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", hybrid_sensitivity_reference, sensitivity_score_reference, None)
}
_UNAVAILABLE: dict[str, str] = {}  # backend name -> why it is not registered
_loaded = False


def _register_optional(name: str, module: str, prefix: str, devices: tuple[str, ...]) -> None:
    try:
        mod = importlib.import_module(f"qapframe.kernels.{module}")
        reason = mod.unavailable_reason() if hasattr(mod, "unavailable_reason") else None
    except Exception as exc:  # a broken numba install must not take the package down
        reason = f"importing qapframe.kernels.{module} failed: {type(exc).__name__}: {exc}"
    if reason:
        _UNAVAILABLE[name] = reason
        return
    _BACKENDS[name] = Backend(
        name, getattr(mod, f"hybrid_sensitivity_{prefix}"), getattr(mod, f"sensitivity_score_{prefix}"), devices
    )


def _backends() -> dict[str, Backend]:
    """Every registered backend, the optional numba ones imported on the first call."""
    global _loaded
    if not _loaded:
        _loaded = True
        _register_optional("numba-cpu", "cpu", "cpu", ("cpu",))
        _register_optional("numba-cuda", "cuda", "cuda", ("cuda", "cpu"))
    return _BACKENDS


def __getattr__(name: str):
    if name == "BACKENDS":
        return _backends()
    if name == "UNAVAILABLE":
        _backends()
        return _UNAVAILABLE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _default_backend(x: torch.Tensor) -> str:
    preferred = "numba-cuda" if x.is_cuda else "numba-cpu"
    return preferred if preferred in _backends() else "torch"


def _resolve(x: torch.Tensor, backend: str | None) -> Backend:
    backends = _backends()
    name = backend or _default_backend(x)
    available = ", ".join(backends)
    if name not in backends:
        why = f" ({_UNAVAILABLE[name]})" if name in _UNAVAILABLE else ""
        raise ValueError(f"scoring backend {name!r} is not available{why}; available: {available}")
    chosen = backends[name]
    if chosen.devices is not None and x.device.type not in chosen.devices:
        raise ValueError(
            f"scoring backend {name!r} takes {' or '.join(chosen.devices)} tensors, got one on {x.device}; "
            f"available: {available}"
        )
    return chosen


def hybrid_sensitivity(
    x: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, N, D]`` (fp32/fp16/bf16) -> ``(E, R)``, each ``[B, N]`` float32 on ``x``'s device.

    E is the L2 norm of the group-wise quantize-dequantize error, R the token's max - min.
    """
    check_args(x, bits, group_size)
    return _resolve(x, backend).sensitivity(x, bits, group_size, symmetric)


def sensitivity_score(
    x: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False, backend: str | None = None
) -> torch.Tensor:
    """``x [B, N, D]`` -> ``SQ [B, N] = 0.5 * minmax(E) + 0.5 * minmax(R)`` per image, float32.

    Equal to the minmax `fuse` of `qapframe.strategies.normalization`, computed in the same kernel call.
    """
    check_args(x, bits, group_size)
    error, spread, score = _resolve(x, backend).score(x, bits, group_size, symmetric)
    bad = ~(torch.isfinite(error) & torch.isfinite(spread))
    if bad.any():
        rows = sorted(set(bad.nonzero()[:, 0].tolist()))
        raise ValueError(f"vision embeddings give non-finite E or R (images {rows[:8]}); inputs must be finite")
    return score


__all__ = [
    "BACKENDS",
    "UNAVAILABLE",
    "Backend",
    "hybrid_sensitivity",
    "hybrid_sensitivity_reference",
    "sensitivity_score",
    "sensitivity_score_reference",
]
