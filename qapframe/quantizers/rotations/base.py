"""The rotation interface: a function-preserving change of basis applied to a model before quantization."""

from __future__ import annotations

import abc

from torch import nn

from qapframe.registry import Registry
from qapframe.strategy import StrategySpec
from qapframe.strategy import Strategy

ROTATIONS: Registry[type["Rotation"]] = Registry(
    "rotation", "qapframe.rotations", ("qapframe.quantizers.rotations.quarot",)
)


class Rotation(Strategy, abc.ABC):
    """Rewrites a model's weights so that its fp outputs are unchanged and its activations quantize better."""

    @abc.abstractmethod
    def apply(self, model: nn.Module) -> nn.Module:
        """Rotate ``model`` in place and return it; raise ValueError for an architecture it cannot rotate."""


class RotationSpec(StrategySpec):
    """``{name: <registered rotation>, **params}``, as the ``rotation`` field of a quantizer."""

    registry = ROTATIONS  # type: ignore[assignment]


__all__ = ["ROTATIONS", "Rotation", "RotationSpec"]
