"""Save a quantized model (codes, scales, zeros, folded weights) and load it back exactly.

qapframe's own format (for a directory other tools read, see `qapframe.export`). A directory holds
``model.safetensors`` (the state dict: packed integer codes and quantization parameters of each
`QuantizedLinear`, every other tensor as is) and ``quantization.json`` (the quantizer's config and each
quantized module's layout). Loading rebuilds the same modules on a freshly built fp model of the same
architecture; weights are dequantized from the codes, so the round trip is bit-exact. Format 1 (one code
per byte, qapframe <= 0.1.0 before packing) is still read: its codes are packed on load.

A rotated model (``quantizer.rotation``) saves as well: its rotated weights and unit norms are in the state dict,
the manifest names each Linear's online Hadamard (``input_transform``: size and seed, rebuilt on load) and says
whether ``lm_head`` is tied to the embeddings (the rotation unties them where the final norm was folded in).
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
from qapframe.quantizers.rotations.hadamard import HadamardLinear, OnlineHadamard
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


def _input_transforms(model: nn.Module) -> dict[str, dict]:
    """``{module name: {kind, n, seed}}`` for every Linear with an online transform on its input."""
    out = {}
    for name, module in model.named_modules():
        transform = getattr(module, "input_transform", None)
        if transform is None:
            continue
        if not isinstance(transform, OnlineHadamard):
            raise ValueError(f"save_quantized: module {name!r} has an input transform of type "
                             f"{type(transform).__name__}; qapframe's format can rebuild only OnlineHadamard")
        out[name] = {"kind": "hadamard", "n": transform.n, "seed": transform.seed}
    return out


def _embeddings_tied(model: nn.Module) -> bool | None:
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return None
    embed, head = get_in(), get_out()
    if embed is None or head is None:
        return None
    return head.weight is embed.weight


def save_quantized(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (quantized with qapframe) to ``directory``; returns the directory."""
    directory = Path(directory)
    modules = {name: _describe(m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not modules:
        raise ValueError("save_quantized: the model has no QuantizedLinear modules; quantize it first")
    transforms = _input_transforms(model)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT_VERSION, "quantizer": getattr(model, QUANT_CONFIG_ATTR, None), "modules": modules,
                "input_transforms": transforms, "tied_embeddings": _embeddings_tied(model)}
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
    if manifest.get("tied_embeddings") is False and _embeddings_tied(model):
        _untie_output_embeddings(model)  # the rotation untied them: lm_head has weights of its own on disk
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
    _restore_input_transforms(model, manifest.get("input_transforms", {}), directory)
    state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    if version == 1:
        state = _pack_format_1(state, manifest["modules"])
    _load_state(model, state, directory / WEIGHTS_FILE)
    setattr(model, QUANT_CONFIG_ATTR, manifest["quantizer"])
    return model


def _untie_output_embeddings(model: nn.Module) -> None:
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    config = getattr(model, "config", None)
    for cfg in (config, config.get_text_config() if hasattr(config, "get_text_config") else None):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def _restore_input_transforms(model: nn.Module, transforms: dict[str, dict], directory: Path) -> None:
    """Rebuild each saved online Hadamard on its module (a plain Linear becomes a `HadamardLinear`)."""
    modules = dict(model.named_modules())
    for name, meta in transforms.items():
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, QuantizedLinear)) or meta.get("kind") != "hadamard":
            raise ValueError(f"{directory / MANIFEST_FILE}: input transform {meta} of {name!r} cannot be rebuilt "
                             "on this model (no such Linear, or an unknown kind; known: hadamard)")
        weight = getattr(module, "weight", None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        transform = OnlineHadamard(meta["n"], meta["seed"], dtype, next(model.parameters()).device)
        if isinstance(module, QuantizedLinear):
            module.input_transform = transform
        else:
            set_module(model, name, HadamardLinear(module, transform))


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
