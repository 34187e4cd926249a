"""Rotations applied before quantization (QuaRot's randomised Hadamard, SpinQuant's learned); registry `ROTATIONS`.

`spinquant` lives in `qapframe.quantizers.rotations.spinquant`, loaded by the registry on first lookup (it needs
the quantizer modules, which import this package).
"""

from qapframe.quantizers.rotations.base import ROTATIONS, CalibrationContext, Rotation, RotationSpec
from qapframe.quantizers.rotations.hadamard import (
    HadamardLinear, OnlineHadamard, hadamard_factors, hadamard_matrix, random_hadamard, random_orthogonal,
)
from qapframe.quantizers.rotations.quarot import HadamardRotation, OrthogonalRotation

__all__ = [
    "CalibrationContext", "HadamardLinear", "HadamardRotation", "OnlineHadamard", "OrthogonalRotation", "ROTATIONS",
    "Rotation", "RotationSpec", "hadamard_factors", "hadamard_matrix", "random_hadamard", "random_orthogonal",
]
