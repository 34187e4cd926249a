"""Save a quantized model (codes, scales, zeros, folded weights) and load it back exactly.

A directory holds ``model.safetensors`` (the state dict: integer codes and quantization parameters of
each `QuantizedLinear`, every other tensor as is) and ``quantization.json`` (the quantizer's config and
each quantized module's layout). Loading rebuilds the same modules on a freshly built fp model of the
same architecture; dequantized weights are recomputed from the codes, so the round trip is bit-exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from qapframe.quantizers.config import ActSpec, WeightSpec
from qapframe.quantizers.fake_quant import QuantizedLinear
from qapframe.quantizers.layerwise import QUANT_CONFIG_ATTR
from qapframe.quantizers.targets import set_module

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "quantization.json"
FORMAT_VERSION = 1


def _describe(module: QuantizedLinear) -> dict:
    act = module.act_quant
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
        "dtype": str(module.weight.dtype).removeprefix("torch."),
        "weight": vars(module.weight_spec),
        "act": None if act is None else {**vars(act.spec), "enabled": act.enabled},
        "smooth": module.smooth is not None,
        "quantized": module.quantized,
    }


def save_quantized(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (quantized with qapframe) to ``directory``; returns the directory."""
    directory = Path(directory)
    modules = {name: _describe(m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not modules:
        raise ValueError("save_quantized: the model has no QuantizedLinear modules; quantize it first")
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT_VERSION, "quantizer": getattr(model, QUANT_CONFIG_ATTR, None), "modules": modules}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    save_model(model, str(directory / WEIGHTS_FILE))  # de-duplicates tied tensors (embeddings / lm_head)
    return directory


def load_quantized(model: nn.Module, directory: str | Path) -> nn.Module:
    """Turn a freshly built fp ``model`` of the saved architecture into the saved quantized model."""
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory / MANIFEST_FILE}: format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
    device = next(model.parameters()).device
    for name, meta in manifest["modules"].items():
        act = meta["act"]
        module = QuantizedLinear(
            meta["in_features"], meta["out_features"], meta["bias"], WeightSpec(**meta["weight"]),
            None if act is None else ActSpec(**{k: v for k, v in act.items() if k != "enabled"}),
            getattr(torch, meta["dtype"]), device,
        )
        if meta["smooth"]:
            module.smooth = torch.ones(meta["in_features"], device=device)  # placeholder the load fills
        if act is not None:
            module.act_quant.enabled = act["enabled"]
        module.quantized = meta["quantized"]
        try:
            set_module(model, name, module)
        except AttributeError:
            raise ValueError(f"{directory}: quantized module {name!r} does not exist in this model") from None
    missing, unexpected = load_model(model, str(directory / WEIGHTS_FILE), strict=True, device=str(device))
    for m in model.modules():
        if isinstance(m, QuantizedLinear) and m.quantized:
            m.refresh_weight()
    setattr(model, QUANT_CONFIG_ATTR, manifest["quantizer"])
    return model


__all__ = ["load_quantized", "save_quantized"]
