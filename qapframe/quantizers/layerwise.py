"""The shared quantizer driver: pick target Linears, wrap them, calibrate block by block, quantize."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qapframe.quantizers.base import CalibrationData, Quantizer
from qapframe.quantizers.calibration import BlockData, calibrate_sequential, select_samples
from qapframe.quantizers.config import QuantizerConfig
from qapframe.quantizers.fake_quant import QuantizedLinear, quantize_weight_rtn
from qapframe.quantizers.observers import check_full_range
from qapframe.quantizers.rotations.base import CalibrationContext
from qapframe.quantizers.targets import select_linears, set_module

QUANT_CONFIG_ATTR = "qapframe_quantization"  # set on a quantized model: the quantizer's name and config


class LayerwiseQuantizer(Quantizer):
    """Base of the built-in quantizers; subclasses override `process_block` (default: round to nearest)."""

    Config = QuantizerConfig
    config: QuantizerConfig

    def needs_calibration(self) -> bool:
        return self.config.act_spec is not None and not self.config.act_spec.dynamic

    def activation_settings(self) -> dict[str, Any] | None:
        spec = self.config.act_spec
        if spec is None:
            return None
        return {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric,
                "full_range": spec.full_range}

    def wrap(self, linear: nn.Linear) -> QuantizedLinear:
        module = QuantizedLinear.from_linear(linear, self.config.weight_spec, self.config.act_spec)
        if module.act_quant is not None and not module.act_quant.spec.dynamic:
            module.act_quant.observer = self.config.act_observer.build()  # one per module: it keeps samples
        return module

    @torch.no_grad()
    def apply(self, model: nn.Module, calibration: CalibrationData | None = None) -> nn.Module:
        cfg = self.config
        rotation = cfg.rotation.build() if cfg.rotation is not None else None
        device = next(model.parameters()).device
        needs = self.needs_calibration()
        learns = rotation is not None and rotation.needs_calibration()
        # A quantizer that needs no data (RTN with weight-only or dynamic activations) ignores what it is
        # given, unless its rotation learns from it: running the sequential calibration would only cost time.
        samples = select_samples(calibration, cfg.calibration_samples, cfg.seed, device) if needs or learns else []
        if not samples and (needs or learns):
            who = f"{self.name}" if needs else f"{self.name} with rotation {cfg.rotation.name}"
            raise ValueError(
                f"{who} needs calibration data (an iterable of model-input dicts); "
                "only RTN with dynamic activations (act_dynamic=true) and a fixed rotation runs without it"
            )
        act = cfg.act_spec
        if act is not None and act.full_range and not act.dynamic:  # before any time is spent
            check_full_range(cfg.act_observer.build())
        was_training = model.training
        model.eval()
        if rotation is not None:  # first: every later step sees the rotated model
            if learns:
                rotation.fit(model, CalibrationContext(samples, cfg.weight_spec, cfg.act_spec, cfg.targets, cfg.ignore))
            rotation.apply(model)
        linears = select_linears(model, cfg.targets, cfg.ignore)
        if not linears:
            some = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:5]
            raise ValueError(
                f"{self.name}: no nn.Linear matches targets={cfg.targets} minus ignore={cfg.ignore}; "
                f"the model's Linears include {some or '(none)'}"
            )
        if needs:
            calibrate_sequential(model, linears, samples, self.wrap, self._process)
        else:
            for name, linear in linears.items():
                module = self.wrap(linear)
                module.set_quantized(*quantize_weight_rtn(module.weight, cfg.weight_spec))
                self._enable_activations({name: module})
                set_module(model, name, module)
        model.train(was_training)
        setattr(model, QUANT_CONFIG_ATTR, {"name": self.name, **cfg.model_dump(mode="json")})
        return model

    def _process(self, data: BlockData, modules: dict[str, QuantizedLinear]) -> None:
        self.process_block(data, modules)
        spec = self.config.act_spec
        if spec is not None:  # outputs computed before the activation quantizers were on are not final
            data.quantized_outputs = None
        if spec is not None and not spec.dynamic:
            # Static ranges see the block with its weights already quantized, activations still fp.
            with data.observe(modules, lambda name, x: modules[name].act_quant.observe(x)):
                data.forward()
            for module in modules.values():
                module.act_quant.reduce_over_ranks()
        self._enable_activations(modules)

    @staticmethod
    def _enable_activations(modules: dict[str, QuantizedLinear]) -> None:
        for module in modules.values():
            if module.act_quant is not None:
                module.act_quant.enabled = True

    def process_block(self, data: BlockData, modules: dict[str, QuantizedLinear]) -> None:
        """Quantize the weights of ``modules`` (fp `QuantizedLinear`s inside ``data.module``)."""
        for module in modules.values():
            module.set_quantized(*quantize_weight_rtn(module.weight, self.config.weight_spec))


__all__ = ["LayerwiseQuantizer", "QUANT_CONFIG_ATTR"]
