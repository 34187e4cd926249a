"""The rotation interface: a function-preserving change of basis applied to a model before quantization."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from qapframe.quantizers.targets import DEFAULT_IGNORE
from qapframe.registry import Registry
from qapframe.strategy import Strategy, StrategySpec

if TYPE_CHECKING:
    from qapframe.quantizers.config import ActSpec, WeightSpec

ROTATIONS: Registry[type["Rotation"]] = Registry(
    "rotation", "qapframe.rotations",
    ("qapframe.quantizers.rotations.quarot", "qapframe.quantizers.rotations.spinquant"),
)


@dataclass
class CalibrationContext:
    """What a learned rotation sees: the quantizer's calibration inputs and how it will quantize.

    ``targets``/``ignore`` are the quantizer's Linear name patterns (matched after the rotation's own module
    changes); ``act_spec`` is None for weight-only schemes.
    """

    samples: list[dict[str, Any]]
    weight_spec: "WeightSpec"
    act_spec: "ActSpec | None"
    targets: list[str] = field(default_factory=lambda: ["*"])
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))


class Rotation(Strategy, abc.ABC):
    """Rewrites a model's weights so that its fp outputs are unchanged and its activations quantize better.

    A fixed rotation (QuaRot's Hadamard) only implements `apply`. A learned one (SpinQuant) also returns True
    from `needs_calibration`; the quantizer then calls `fit` with its calibration data before `apply`.
    """

    def needs_calibration(self) -> bool:
        return False

    def fit(self, model: nn.Module, context: CalibrationContext) -> None:
        """Learn from calibration data (a learned rotation); may change ``model`` in function-preserving ways."""

    @abc.abstractmethod
    def apply(self, model: nn.Module) -> nn.Module:
        """Rotate ``model`` in place and return it; raise ValueError for an architecture it cannot rotate."""


class RotationSpec(StrategySpec):
    """``{name: <registered rotation>, **params}``, as the ``rotation`` field of a quantizer."""

    registry = ROTATIONS  # type: ignore[assignment]


__all__ = ["CalibrationContext", "ROTATIONS", "Rotation", "RotationSpec"]
