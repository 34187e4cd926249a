"""A quantizer from outside qapframe: weight-only FP8 (E4M3) with one scale per output channel."""

from __future__ import annotations

import fnmatch

import torch
from pydantic import Field

from qapframe import Quantizer, StrategyConfig

E4M3_MAX = 448.0  # largest finite float8_e4m3fn value


class FP8WeightConfig(StrategyConfig):
    ignore: list[str] = Field(
        default_factory=lambda: ["*vision_tower*", "*multi_modal_projector*", "*lm_head*"],
        description="fnmatch patterns of Linear module names left in full precision",
    )


def fp8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """Scale each output row onto E4M3's range, cast to float8 and back: ``[O, I] -> [O, I]``."""
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    return ((w / scale).to(torch.float8_e4m3fn).float() * scale).to(weight.dtype)


class FP8WeightQuantizer(Quantizer):
    """Needs no calibration: FP8 keeps ~3 significant bits at every magnitude, so outliers survive."""

    Config = FP8WeightConfig
    config: FP8WeightConfig

    def apply(self, model: torch.nn.Module, calibration=None) -> torch.nn.Module:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not any(
                fnmatch.fnmatch(name, pattern) for pattern in self.config.ignore
            ):
                with torch.no_grad():
                    module.weight.copy_(fp8_round_trip(module.weight))
        return model
