"""Loading the model and processor a spec names, and handing out unmodified copies per configuration.

Quantization rewrites a model in place, so every configuration starts from a fresh copy: an
in-memory deep copy of the pristine model when it lives on one device, a re-load from disk when it
was dispatched with a ``device_map`` (copying a sharded or offloaded model would break its hooks).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import torch

from qapframe.errors import QapframeError
from qapframe.spec import ModelSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model_path(spec: ModelSpec) -> Path | str:
    """``model.path`` as what ``from_pretrained`` takes: a registered model source's directory (``toy``,
    ``smollm2-135m``, plugins'), a local folder, or a hub id (a string, resolved by transformers: the local
    Hugging Face cache, else a download); anything else is refused with `model_path_problem`'s reason."""
    from qapframe.sources import is_hub_id, model_path_problem, resolve_named_model

    named = resolve_named_model(spec.path)
    if named is not None:
        return named
    problem = model_path_problem(spec.path)
    if problem is not None:
        raise QapframeError(f"model.path: {problem}")
    if spec.revision is not None and not is_hub_id(spec.path):
        raise QapframeError(f"model.revision {spec.revision!r} applies to a hub id; {spec.path!r} is a local path")
    return spec.path if is_hub_id(spec.path) else Path(spec.path).expanduser()


def _hub_kwargs(spec: ModelSpec) -> dict[str, Any]:
    return {} if spec.revision is None else {"revision": spec.revision}


def _from_pretrained(load, path: Path | str, spec: ModelSpec, **kwargs):
    """``load(path, ...)``; a hub id that is neither cached nor downloadable becomes one clear line."""
    try:
        return load(path, **_hub_kwargs(spec), **kwargs)
    except OSError as exc:
        if isinstance(path, Path):
            raise
        from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

        revision = f" at revision {spec.revision!r}" if spec.revision else ""
        why = "HF_HUB_OFFLINE=1 is set" if HF_HUB_OFFLINE else "the hub could not be reached or has no such model"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QapframeError(f"model.path {path!r}{revision}: not in the Hugging Face cache ({HF_HUB_CACHE}) and "
                            f"{why} ({first}); download it with `huggingface-cli download {path}` where the hub "
                            "is reachable, or give a local directory") from None


def _model_class(path: Path | str, spec: ModelSpec):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = _from_pretrained(AutoConfig.from_pretrained, path, spec)
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
    model = _from_pretrained(_model_class(path, spec).from_pretrained, path, spec, **kwargs)
    if spec.device_map is None:
        model = model.to(device or spec.device)
    return model.eval()


def load_processor(spec: ModelSpec):
    """The processor of a vision-language model, or the tokenizer of a text-only one.

    transformers builds the Qwen-VL and LLaVA-OneVision processors only with torchvision installed (their
    video processors need it): without it, Qwen-VL gets qapframe's images-only `QwenImageProcessor`, and
    LLaVA-OneVision a clear error."""
    from transformers import AutoConfig, AutoProcessor

    from qapframe.models.qwen_processor import QWEN_VL_MODEL_TYPES, QwenImageProcessor

    path = resolve_model_path(spec)
    config = _from_pretrained(AutoConfig.from_pretrained, path, spec)
    if importlib.util.find_spec("torchvision") is None:
        if config.model_type in QWEN_VL_MODEL_TYPES:
            return QwenImageProcessor.from_pretrained(path, config)
        if config.model_type == "llava_onevision":
            raise QapframeError(
                f"model.path {spec.path!r}: transformers' LLaVA-OneVision processor needs torchvision (for its "
                "video processor): pip install torchvision (the build matching your torch)"
            )
    return _from_pretrained(AutoProcessor.from_pretrained, path, spec)


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
