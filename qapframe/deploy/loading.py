"""`load`: an exported directory back as a qapframe model, quantization and token pruning installed.

transformers reads the checkpoint (its compressed-tensors integration builds the fp layers); each quantized
Linear is then replaced by the `QuantizedLinear` the manifest describes, filled from the checkpoint's
codes and scales (packed, as qapframe holds them), and the recorded scorer and pruner are installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qapframe.deploy.manifest import read_manifest
from qapframe.deploy.scheme import ExportError, decompress_codes
from qapframe.deploy.writer import read_tensors
from qapframe.quantizers.config import ActSpec, WeightSpec
from qapframe.quantizers.fake_quant import QuantizedLinear, group_index
from qapframe.quantizers.layerwise import QUANT_CONFIG_ATTR
from qapframe.quantizers.targets import set_module


def _model_class(directory: Path):
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ExportError(f"{directory}/config.json: architectures {names} name no transformers model class")


def _scheme_of(config_groups: dict, name: str) -> dict:
    for group in config_groups.values():
        if group["targets"] == ["Linear"] or name in group["targets"]:
            return group
    raise ExportError(f"config.json: no quantization config group targets {name!r}")


def _rebuild(model: nn.Module, name: str, entry: dict, tensors: dict, group: dict) -> None:
    weight_spec = WeightSpec(**entry["weight"])
    act = entry["act"]
    act_spec = None if act is None else ActSpec(**{k: v for k, v in act.items() if k != "enabled"})
    dtype = tensors[f"{name}.weight_scale"].dtype  # written in the module's compute dtype
    shape = tensors[f"{name}.weight_shape"].tolist() if f"{name}.weight_shape" in tensors else list(tensors[f"{name}.weight"].shape)
    device = tensors[f"{name}.weight_scale"].device
    has_bias = f"{name}.bias" in tensors
    module = QuantizedLinear(shape[1], shape[0], has_bias, weight_spec, act_spec, dtype, device)
    codes, zeros = decompress_codes(tensors, name, group)
    scales = tensors[f"{name}.weight_scale"].float()
    module.set_quantized(codes, scales, zeros, group_index(shape[1], weight_spec.group_size))
    if has_bias:
        module.bias.data = tensors[f"{name}.bias"].to(dtype)
    if act is not None:
        module.act_quant.enabled = act["enabled"]
        if entry["act_range"] is not None:
            module.act_quant.lo = torch.tensor(entry["act_range"][0])
            module.act_quant.hi = torch.tensor(entry["act_range"][1])
    set_module(model, name, module)


def load(directory: str | Path, *, dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu") -> nn.Module:
    """The model exported to ``directory``, with its `QuantizedLinear` layers and its token pruning installed."""
    directory = Path(directory)
    manifest = read_manifest(directory)  # first: a directory from another qapframe version says so
    cls = _model_class(directory)
    model = cls.from_pretrained(directory, dtype=dtype).to(device).eval()
    groups = json.loads((directory / "config.json").read_text())["quantization_config"]["config_groups"]
    wanted = [f"{n}.{k}" for n in manifest["modules"] for k in
              ("weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "bias")]
    tensors = {k: v.to(device) for k, v in read_tensors(directory, wanted).items()}
    for name, entry in manifest["modules"].items():
        _rebuild(model, name, entry, tensors, _scheme_of(groups, name))
    # The quantization is qapframe's now: transformers' quantizer would otherwise act on a later save.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    setattr(model, QUANT_CONFIG_ATTR, manifest["quantizer"])
    pruning = manifest["pruning"]
    if pruning is not None:
        from qapframe.models.base import adapter_for
        from qapframe.pipeline import Pipeline
        from qapframe.strategies.context import QuantSettings

        parts = Pipeline(scorer=pruning["scorer"], pruner=pruning["pruner"])
        quant = None if pruning["quant"] is None else QuantSettings(**pruning["quant"])
        model = adapter_for(model, pruning["adapter"]).install(model, parts.scorer, parts.pruner, quant=quant,
                                                                 seed=pruning["seed"])
    return model


__all__ = ["load"]
