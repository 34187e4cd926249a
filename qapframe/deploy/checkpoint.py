"""`export`: a qapframe-quantized model as a Hugging Face directory in the compressed-tensors format.

The directory holds ``config.json`` (with ``quantization_config``: ``quant_method: compressed-tensors``),
safetensors shards (+ index), the generation config, processor/tokenizer files and ``qapframe_pipeline.json``.
Plain ``transformers.AutoModel*.from_pretrained(dir)`` and vLLM read it; `qapframe.load` also reinstalls the
token pruning. Tensors are produced one module at a time and written shard by shard, so the export holds at
most one shard beyond the model itself.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qapframe.deploy.manifest import build_manifest, write_manifest
from qapframe.deploy.scheme import PACKED, ExportError, ModuleScheme, module_scheme, module_tensors
from qapframe.deploy.writer import ShardWriter, atomic_directory
from qapframe.quantizers.fake_quant import QuantizedLinear
from qapframe.quantizers.layerwise import QUANT_CONFIG_ATTR

# Files of a processor or tokenizer that travel with a model (copied from the source directory when no
# processor object is given).
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "preprocessor_config.json", "processor_config.json",
    "chat_template.json", "chat_template.jinja", "video_preprocessor_config.json",
)
DEFAULT_SHARD_BYTES = 5 * 1024**3


def _act_order(quant_config: dict | None) -> str:
    """GPTQ's act_order from the quantizer config recorded on the model (``off`` for other quantizers)."""
    if not quant_config:
        return "off"
    if quant_config.get("name") == "gptq":
        return str(quant_config.get("act_order", "off"))
    if quant_config.get("weight_quantizer") == "gptq":
        return str((quant_config.get("gptq") or {}).get("act_order", "off"))
    return "off"


def quantization_config(schemes: dict[str, ModuleScheme], fp_linears: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json``: one config group per distinct scheme."""
    groups: dict[ModuleScheme, list[str]] = {}
    for name, scheme in schemes.items():
        groups.setdefault(scheme, []).append(name)
    single = len(groups) == 1
    config_groups = {
        # One scheme: every Linear not ignored. Several: each group lists its modules by name.
        f"group_{i}": scheme.config_group(["Linear"] if single else names)
        for i, (scheme, names) in enumerate(groups.items())
    }
    formats = {scheme.format for scheme in groups}
    config: dict[str, Any] = {}
    packed_zero_points = [s for s in groups if s.format == PACKED and not json.loads(s.weights)["symmetric"]]
    if packed_zero_points:
        # transformers 5 + compressed-tensors 0.20 build the compressed layout on the meta device, where the
        # packed zero point keeps its unpacked shape [O, G]: loading the (correctly packed) checkpoint then
        # fails. Dequantizing while loading reads the tensors as written. vLLM ignores this key.
        if any(s.input_activations is not None for s in groups):
            raise ExportError(
                "export: asymmetric sub-8-bit weights with quantized activations cannot be loaded by "
                "transformers' compressed-tensors integration (packed zero points fail to load compressed, and "
                "dequantizing at load drops the activation quantization). Exportable: symmetric: true, or "
                "weight-only (act_bits: 16)"
            )
        if len(groups) > 1:
            # ... and transformers' dequantizing loader applies the first config group to every layer.
            raise ExportError(
                "export: asymmetric sub-8-bit weights need more than one compressed-tensors scheme here (layers "
                "narrower than group_size become per-channel), which transformers cannot load with asymmetric zero "
                "points. Exportable: symmetric: true, or a group_size no larger than the narrowest quantized layer "
                "that divides every quantized layer's input width, or group_size: -1"
            )
        config["dequantize"] = True
    return {**config,
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "config_groups": config_groups,
        "ignore": fp_linears,
        "quantization_status": "compressed",
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _check_exportable(model: nn.Module) -> tuple[dict[str, QuantizedLinear], dict[str, ModuleScheme], list[str]]:
    modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not modules:
        raise ExportError(
            "export: the model has no quantized Linear layers; quantize it first (qapframe.quantize(model, "
            "{'name': 'rtn', 'scheme': 'W4A16'}) or a spec with a quantizer section)"
        )
    act_order = _act_order(getattr(model, QUANT_CONFIG_ATTR, None))
    schemes = {name: module_scheme(name, m, act_order) for name, m in modules.items()}
    fp_linears = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if getattr(m, "input_transform", None) is not None:
                raise ExportError(
                    f"export: module {name!r} applies an online transform to its input (the rotation's online "
                    "Hadamard) and is not quantized; transformers cannot reproduce it. Exportable: rotation "
                    "{name: hadamard, online_down_proj: false}"
                )
            fp_linears.append(name)
    return modules, schemes, fp_linears


def _module_state(model: nn.Module, modules: dict[str, QuantizedLinear], schemes: dict[str, ModuleScheme]):
    """Yield each module's checkpoint tensors, in module order; shared (tied) tensors once."""
    seen: set[int] = set()
    inside_quantized = tuple(f"{n}." for n in modules)
    for name, module in model.named_modules():
        if name in modules:
            yield module_tensors(name, module, schemes[name])
            continue
        if name.startswith(inside_quantized):  # an ActQuantizer's range, an online transform: not checkpoint state
            continue
        prefix = f"{name}." if name else ""
        tensors = {}
        local = list(module._parameters.items()) + [
            (k, v) for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set
        ]
        for key, value in local:
            if value is None or value.data_ptr() in seen and value.numel():
                continue
            seen.add(value.data_ptr())
            tensors[prefix + key] = value.detach()
        if tensors:
            yield tensors


def _copy_processor_files(source: Path, directory: Path) -> list[str]:
    copied = []
    for name in PROCESSOR_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)
            copied.append(name)
    return copied


EXPORT_DTYPES = ("float16", "bfloat16", "float32")


def _export_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")  # a torch dtype or its name
    if name in EXPORT_DTYPES:
        return getattr(torch, name)
    raise ExportError(f"export: dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)} (or None: as the model is)")


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors in ``dtype`` (integer codes, zero points and shapes as they are)."""
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def export(model: nn.Module, out: str | Path, *, processor: Any = None, source: str | Path | None = None,
           overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
           dtype: str | torch.dtype | None = None) -> Path:
    """Write ``model`` (quantized by qapframe) to ``out`` as a compressed-tensors checkpoint; returns ``out``.

    ``dtype`` (``float16``, ``bfloat16``, ``float32``) is what every floating tensor is written in, and what
    ``config.json`` tells loaders to build: the unquantized modules (vision tower, projector, ``lm_head``,
    embeddings, norms) and the quantization scales; None writes each tensor in the dtype it has.

    ``processor`` (anything with ``save_pretrained``) is saved beside it; without one, processor and tokenizer
    files are copied from ``source`` or the directory the model was loaded from. Refuses (`ExportError`) an
    unquantized model, a setting the format cannot express, or a non-empty ``out`` unless ``overwrite``.
    """
    modules, schemes, fp_linears = _check_exportable(model)  # every refusal before anything is written
    cast = _export_dtype(dtype)
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.quantization_config = quantization_config(schemes, fp_linears)
        if cast is not None:
            for part in (config, *(getattr(config, f"{k}_config", None) for k in ("text", "vision"))):
                if part is not None:
                    part.dtype = str(cast).removeprefix("torch.")
        config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        writer = ShardWriter(tmp, max_shard_bytes)
        for tensors in _module_state(model, modules, schemes):
            writer.add(_cast(tensors, cast))
        writer.close()
        if processor is not None:
            processor.save_pretrained(tmp)
        else:
            origin = Path(source) if source is not None else Path(str(getattr(model, "name_or_path", "") or ""))
            if str(origin) and origin.is_dir():
                _copy_processor_files(origin, tmp)
        write_manifest(tmp, build_manifest(model, modules))
    return out


__all__ = ["DEFAULT_SHARD_BYTES", "EXPORT_DTYPES", "PROCESSOR_FILES", "export", "quantization_config"]
