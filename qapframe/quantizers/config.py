"""Parameters shared by every quantizer: bit widths (or a preset), grouping, targets, calibration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from qapframe.quantizers.observers import OBSERVERS
from qapframe.quantizers.rotations.base import RotationSpec
from qapframe.quantizers.targets import DEFAULT_IGNORE
from qapframe.strategy import StrategySpec
from qapframe.strategy import StrategyConfig

# scheme -> (weight_bits, act_bits); act_bits 16 means activations stay in the model's dtype.
PRESETS: dict[str, tuple[int, int]] = {"W4A16": (4, 16), "W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}


@dataclass(frozen=True)
class WeightSpec:
    """How one weight matrix is quantized."""

    bits: int
    group_size: int  # input channels per group; -1 = one group per output channel
    symmetric: bool
    full_range: bool = False  # symmetric grids: the code range spans [-max|x|, max|x|] (qapframe.quant_grid)


@dataclass(frozen=True)
class ActSpec:
    """How a quantized Linear's input is fake-quantized."""

    bits: int
    group_size: int  # channels per group within a token; -1 = the whole token
    symmetric: bool
    dynamic: bool  # per token at run time; otherwise one static range per tensor from calibration
    full_range: bool = False  # symmetric grids: the code range spans [-max|x|, max|x|] (qapframe.quant_grid)


class ObserverSpec(StrategySpec):
    """``{name: minmax | percentile | mse | <plugin>, **params}``: how static activation ranges are chosen."""

    registry = OBSERVERS  # type: ignore[assignment]


class QuantizerConfig(StrategyConfig):
    """Shared quantizer parameters; ``scheme`` fills ``weight_bits``/``act_bits`` (default W4A16)."""

    scheme: Literal["W4A16", "W8A8", "W4A8", "W4A4"] | None = Field(
        None, description="preset for weight_bits/act_bits; explicit values must agree with it"
    )
    weight_bits: int = Field(4, description="weight bits, 2..8")
    act_bits: int = Field(16, description="activation bits, 4..16 (16 = activations not quantized)")
    group_size: int = Field(128, description="input channels per weight group; -1 = per output channel")
    symmetric: bool = Field(False, description="symmetric weight grid (no zero point)")
    act_group_size: int = Field(-1, description="channels per activation group; -1 = per token")
    act_symmetric: bool = Field(False, description="symmetric activation grid")
    act_dynamic: bool = Field(True, description="dynamic per-token ranges; False = static per-tensor from calibration")
    symmetric_grid: Literal["narrow", "full"] = Field(
        "narrow", description="symmetric weight grid: narrow = scale max|w|/(2^(b-1)-1), nothing clipped; full = "
        "scale max|w|/(2^(b-1)-0.5), a finer step that clips the largest by at most half a step (compressed-tensors')")
    act_symmetric_grid: Literal["narrow", "full"] = Field(
        "narrow", description="symmetric activation grid, as symmetric_grid; full halves SmolLM2's W4A4 RTN perplexity")
    targets: list[str] = Field(default_factory=lambda: ["*"], description="Linear names to quantize (fnmatch, or 're:<regex>')")
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE), description="Linear names left in fp")
    calibration_samples: int | None = Field(
        None, ge=1, description="calibration inputs used (seeded choice when more are given); None = every one given. "
        "In a spec, evaluation.calibration_samples decides how many records are built; a value here must equal it"
    )
    seed: int = Field(0, description="seed of the calibration choice")
    act_observer: ObserverSpec = Field(
        default_factory=lambda: ObserverSpec(name="minmax"),
        description="how static activation ranges (act_dynamic=false) are chosen: minmax, percentile, mse",
    )
    rotation: RotationSpec | None = Field(
        None, description="rotation applied before quantizing, e.g. {name: hadamard, seed: 0}; None = none"
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_scheme(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("scheme") is None:
            return data
        scheme = data["scheme"]
        if scheme not in PRESETS:
            return data  # the Literal check reports it with the valid names
        w, a = PRESETS[scheme]
        for field, value in (("weight_bits", w), ("act_bits", a)):
            if field in data and data[field] != value:
                raise ValueError(f"{field}={data[field]} contradicts scheme {scheme} ({field}={value}); drop one of them")
        return {**data, "weight_bits": w, "act_bits": a}

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # With a scheme the bit widths are implied: leaving them out lets a sweep vary the scheme.
        data = handler(self)
        if self.scheme is not None:
            data.pop("weight_bits", None)
            data.pop("act_bits", None)
        return data

    @field_validator("weight_bits")
    @classmethod
    def _weight_bits(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError(f"weight_bits must be in 2..8, got {v}")
        return v

    @field_validator("act_bits")
    @classmethod
    def _act_bits(cls, v: int) -> int:
        if not 4 <= v <= 16:
            raise ValueError(f"act_bits must be in 4..16 (16 = no activation quantization), got {v}")
        return v

    @field_validator("group_size", "act_group_size")
    @classmethod
    def _group(cls, v: int, info) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"{info.field_name} must be a positive channel count or -1, got {v}")
        return v

    @property
    def weight_spec(self) -> WeightSpec:
        return WeightSpec(self.weight_bits, self.group_size, self.symmetric,
                          self.symmetric and self.symmetric_grid == "full")

    @property
    def act_spec(self) -> ActSpec | None:
        if self.act_bits >= 16:
            return None
        return ActSpec(self.act_bits, self.act_group_size, self.act_symmetric, self.act_dynamic,
                       self.act_symmetric and self.act_symmetric_grid == "full")


__all__ = ["ActSpec", "DEFAULT_IGNORE", "ObserverSpec", "PRESETS", "QuantizerConfig", "WeightSpec"]
