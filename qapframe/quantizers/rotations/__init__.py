"""Rotations applied before quantization (QuaRot-style randomised Hadamard); registry `ROTATIONS`."""

from qapframe.quantizers.rotations.base import ROTATIONS, Rotation, RotationSpec
from qapframe.quantizers.rotations.hadamard import (
    HadamardLinear, OnlineHadamard, hadamard_factors, hadamard_matrix, random_hadamard, random_orthogonal,
)
from qapframe.quantizers.rotations.quarot import HadamardRotation, OrthogonalRotation

__all__ = [
    "HadamardLinear", "HadamardRotation", "OnlineHadamard", "OrthogonalRotation", "ROTATIONS", "Rotation",
    "RotationSpec", "hadamard_factors", "hadamard_matrix", "random_hadamard", "random_orthogonal",
]
