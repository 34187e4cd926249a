"""Loading the model and processor a spec names, and handing out unmodified copies per configuration.

Quantization rewrites a model in place, so every configuration starts from a fresh copy: an
in-memory deep copy of the pristine model when it lives on one device, a re-load from disk when it
was dispatched with a ``device_map`` (copying a sharded or offloaded model would break its hooks).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from qapframe.errors import QapframeError
from qapframe.spec import ModelSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model_path(spec: ModelSpec) -> Path:
    """``model.path`` as a directory: a registered model source (``toy``, ``smollm2-135m``, plugins') or a
    local folder; anything else is refused with `model_path_problem`'s reason (the check `validate` runs)."""
    from qapframe.sources import model_path_problem, resolve_named_model

    named = resolve_named_model(spec.path)
    if named is not None:
        return named
    problem = model_path_problem(spec.path)
    if problem is not None:
        raise QapframeError(f"model.path: {problem}")
    return Path(spec.path).expanduser()


def _model_class(path: Path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    if config.model_type == "llava":
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration
    if config.model_type == "llava_next":
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration
    if getattr(config, "vision_config", None) is None:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM  # a text-only LLM (e.g. smollm2-135m): quantization and perplexity
    return AutoModelForImageTextToText  # other image-text-to-text families; an adapter must support them


def load_model(spec: ModelSpec, device: str | None = None) -> torch.nn.Module:
    """The model at ``model.path`` in ``model.dtype``, on ``device`` (default ``model.device``) or dispatched
    by ``model.device_map`` (e.g. ``auto``: accelerate's big-model loading over GPUs and CPU offload)."""
    path = resolve_model_path(spec)
    kwargs: dict[str, Any] = {"dtype": _DTYPES[spec.dtype]}
    if spec.device_map is not None:
        kwargs["device_map"] = spec.device_map
    model = _model_class(path).from_pretrained(path, **kwargs)
    if spec.device_map is None:
        model = model.to(device or spec.device)
    return model.eval()


def load_processor(spec: ModelSpec):
    """The processor of a vision-language model, or the tokenizer of a text-only one."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(resolve_model_path(spec))


class ModelSource:
    """Loads a model once and returns an unmodified copy for each configuration."""

    def __init__(self, spec: ModelSpec, device: str | None = None):
        self.spec = spec
        self.device = device
        self._pristine: torch.nn.Module | None = None
        self._processor = None

    def key(self) -> tuple:
        return (self.spec.model_dump_json(), self.device)

    @property
    def processor(self):
        if self._processor is None:
            self._processor = load_processor(self.spec)
        return self._processor

    def fresh(self) -> torch.nn.Module:
        if self.spec.device_map is not None:
            return load_model(self.spec, self.device)
        if self._pristine is None:
            self._pristine = load_model(self.spec, self.device)
        return copy.deepcopy(self._pristine)


__all__ = ["ModelSource", "load_model", "load_processor", "resolve_model_path"]
