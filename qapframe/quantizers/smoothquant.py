"""SmoothQuant (Xiao et al., ICML 2023): migrate activation outliers into the weights before W8A8.

Per input channel ``j`` of a group of Linears sharing an input: ``s_j = max|X_j|^a / max|W_j|^(1-a)``
(``W_j`` over all the group's weights), the input divided by ``s`` (folded upstream, see `scaling`),
the weight columns multiplied by it; then the weights are quantized by RTN or GPTQ.
"""

from __future__ import annotations

import torch
from pydantic import Field

from qapframe.distributed import all_reduce_
from qapframe.quantizers.base import QUANTIZERS
from qapframe.quantizers.calibration import BlockData
from qapframe.quantizers.fake_quant import QuantizedLinear
from qapframe.quantizers.layerwise import LayerwiseQuantizer
from qapframe.quantizers.scaling import ScalingConfig, apply_scales, quantize_weights


class SmoothQuantConfig(ScalingConfig):
    """Defaults to W8A8 with per-channel weights and dynamic per-token activations."""

    weight_bits: int = 8
    act_bits: int = 8
    group_size: int = -1
    alpha: float = Field(0.5, ge=0, le=1, description="migration strength: 0 keeps activations, 1 moves all to weights")


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|X_j| [I]``, ``max|W_j| [I]`` -> ``s [I]``; channels never seen (or all-zero weights) keep 1."""
    s = act_max.float().pow(alpha) / weight_max.float().clamp_min(1e-5).pow(1 - alpha)
    valid = (act_max > 0) & (weight_max > 0)
    return torch.where(valid, s, torch.ones_like(s)).clamp_min(1e-5)


@QUANTIZERS.register("smoothquant")
class SmoothQuant(LayerwiseQuantizer):
    """SmoothQuant scaling, then RTN or GPTQ weights (declarative composition).

    Compose with GPTQ in a spec as ``{name: smoothquant, scheme: W8A8, alpha: 0.5,
    weight_quantizer: gptq, gptq: {dampening: 0.01, act_order: true}}``; bit widths, groups and
    targets are shared by both steps.
    """

    Config = SmoothQuantConfig
    config: SmoothQuantConfig

    def needs_calibration(self) -> bool:
        return True

    def process_block(self, data: BlockData, modules: dict[str, QuantizedLinear]) -> None:
        groups = data.input_groups(modules)
        leaders = {group[0]: modules[group[0]] for group in groups}
        act_max = {name: torch.zeros(m.in_features, device=m.weight.device) for name, m in leaders.items()}

        def record(name: str, x: torch.Tensor) -> None:
            if x.shape[0]:
                act_max[name] = torch.maximum(act_max[name], x.abs().amax(dim=0).float())

        with data.observe(leaders, record):
            reference = data.forward()[:1]  # maxima over every input; one output checks the folds
        for name in act_max:
            all_reduce_(act_max[name], "max")  # every rank smooths with the global maxima
        for group in groups:
            weight_max = torch.cat([modules[n].weight.abs().float() for n in group]).amax(dim=0)
            s = smoothing_scales(act_max[group[0]], weight_max, self.config.alpha)
            apply_scales(data, modules, group, s, self.config.unfused_scales, reference)
        quantize_weights(data, modules, self.config)


__all__ = ["SmoothQuant", "SmoothQuantConfig", "smoothing_scales"]
