"""Save a quantized model (codes, scales, zeros, folded weights) and load it back exactly.

qapframe's own format (for a directory other tools read, see `qapframe.export`). A directory holds
``model.safetensors`` (the state dict: packed integer codes and quantization parameters of each
`QuantizedLinear`, every other tensor as is) and ``quantization.json`` (the quantizer's config and each
quantized module's layout). Loading rebuilds the same modules on a freshly built fp model of the same
architecture; weights are dequantized from the codes, so the round trip is bit-exact. Format 1 (one code
per byte, qapframe <= 0.1.0 before packing) is still read: its codes are packed on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from qapframe.quantizers.config import ActSpec, WeightSpec
from qapframe.quant_grid import code_range
from qapframe.quantizers.fake_quant import QuantizedLinear
from qapframe.quantizers.packing import pack_codes
from qapframe.quantizers.layerwise import QUANT_CONFIG_ATTR
from qapframe.quantizers.targets import set_module

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "quantization.json"
FORMAT_VERSION = 2  # 2: codes packed in int32 words; 1: one code per byte
READABLE_FORMATS = (1, 2)


def _describe(module: QuantizedLinear) -> dict:
    act = module.act_quant
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
        "dtype": str(module.dtype).removeprefix("torch."),
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
    version = manifest.get("format")
    if version not in READABLE_FORMATS:
        raise ValueError(
            f"{directory / MANIFEST_FILE}: format {version!r}; this qapframe reads formats {list(READABLE_FORMATS)} "
            "(a newer qapframe wrote it: upgrade qapframe)"
        )
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
    state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    if version == 1:
        state = _pack_format_1(state, manifest["modules"])
    _load_state(model, state, directory / WEIGHTS_FILE)
    setattr(model, QUANT_CONFIG_ATTR, manifest["quantizer"])
    return model


def _pack_format_1(state: dict[str, torch.Tensor], modules: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Format 1 stored ``qweight`` as one code per byte ``[O, I]``; pack it as `QuantizedLinear` now holds it."""
    for name, meta in modules.items():
        spec = meta["weight"]
        lo, _ = code_range(spec["bits"], spec["symmetric"])
        key = f"{name}.qweight"
        state[key] = pack_codes(state[key].to(torch.int64) - lo, spec["bits"])
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Strict load, except for tensors `save_model` de-duplicated (tied to a tensor that is in ``state``)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path}: tensors {sorted(unexpected)[:5]} do not exist in this model")
    tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    loaded = {tensors[k].data_ptr() for k in state if k in tensors}
    untied = [k for k in missing if tensors[k].data_ptr() not in loaded]
    if untied:
        raise ValueError(f"{path}: tensors {sorted(untied)[:5]} of this model are missing from the file")


__all__ = ["load_quantized", "save_quantized"]
