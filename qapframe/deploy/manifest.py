"""``qapframe_pipeline.json``: what an exported directory holds beyond the checkpoint.

The quantizer's config, each quantized module's qapframe settings (so `qapframe.load` rebuilds exactly the
`QuantizedLinear` that was exported, static activation range included), the token-pruning part of the
pipeline (adapter, scorer, pruner, their configs, seed) and the qapframe version that wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from qapframe.deploy.scheme import ExportError
from qapframe.quantizers.fake_quant import QuantizedLinear
from qapframe.quantizers.layerwise import QUANT_CONFIG_ATTR

PIPELINE_FILE = "qapframe_pipeline.json"
PIPELINE_FORMAT = 1  # bump when a reader of the previous format could misread the new one
INSTALLATION_ATTR = "qapframe_installation"  # where the model adapters keep what `install` attached


def _strategy(obj) -> dict[str, Any]:
    return {"name": obj.name, **obj.config.model_dump(mode="json")}


def pruning_of(model: nn.Module) -> dict[str, Any] | None:
    """The installed token pruning of ``model`` as ``{adapter, scorer, pruner, seed, quant}``, or None."""
    inst = getattr(model, INSTALLATION_ATTR, None)
    if inst is None:
        return None
    quant = inst.quant
    return {
        "adapter": type(inst.adapter).name or None,
        "scorer": _strategy(inst.scorer),
        "pruner": _strategy(inst.pruner),
        "seed": inst.seed,
        "quant": None if quant is None else {"bits": quant.bits, "group_size": quant.group_size, "symmetric": quant.symmetric},
    }


def _module_entry(module: QuantizedLinear) -> dict[str, Any]:
    act = module.act_quant
    entry: dict[str, Any] = {"weight": vars(module.weight_spec), "act": None, "act_range": None}
    if act is not None:
        entry["act"] = {**vars(act.spec), "enabled": act.enabled}
        if not act.spec.dynamic:
            entry["act_range"] = [float(act.lo), float(act.hi)]
    return entry


def build_manifest(model: nn.Module, modules: dict[str, QuantizedLinear]) -> dict[str, Any]:
    from qapframe import __version__

    return {
        "format": PIPELINE_FORMAT,
        "qapframe_version": __version__,
        "quantizer": getattr(model, QUANT_CONFIG_ATTR, None),
        "modules": {name: _module_entry(m) for name, m in modules.items()},
        "pruning": pruning_of(model),
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / PIPELINE_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of an exported directory; an unreadable one names the qapframe version that wrote it."""
    from qapframe import __version__

    path = directory / PIPELINE_FILE
    if not path.is_file():
        raise ExportError(
            f"{directory}: no {PIPELINE_FILE}; not written by `qapframe export` (load a plain compressed-tensors "
            "checkpoint with transformers' from_pretrained instead)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from None
    version = manifest.get("format")
    if version != PIPELINE_FORMAT:
        raise ExportError(
            f"{path}: written by qapframe {manifest.get('qapframe_version', '(unknown version)')} in pipeline format "
            f"{version!r}; qapframe {__version__} reads format {PIPELINE_FORMAT}: use that qapframe version to load it"
        )
    for field in ("modules", "quantizer", "pruning"):
        if field not in manifest:
            raise ExportError(f"{path}: field {field!r} is missing")
    return manifest


__all__ = ["PIPELINE_FILE", "PIPELINE_FORMAT", "build_manifest", "pruning_of", "read_manifest", "write_manifest"]
