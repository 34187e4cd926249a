"""LLaVA-1.5 (`LlavaForConditionalGeneration`) adapter, and the installation shared by the LLaVA family.

Two pruning points, chosen from the scorer's requirements:
- **pre-LLM** (no ``text_attention_layer``: VisionZip, hybrid, random, l2norm): the prompt is shortened
  before the language model runs. ``model.forward`` gets a pre-hook that, when ``pixel_values`` are
  given, encodes the images, selects tokens and replaces ``input_ids``/``pixel_values`` by the
  shortened ``inputs_embeds`` and ``attention_mask``; the logits then cover the shortened sequence.
  ``model.generate`` is wrapped the same way and delegates with ``inputs_embeds``, so generate's own
  mask, position-id and cache bookkeeping all start from the shortened prompt (exactly as if only
  the kept tokens had been fed); it returns ``[original prompt ids, new tokens]`` like the unwrapped
  model. Position ids passed explicitly to ``forward`` are recomputed from the shortened mask.
- **in-LLM** (FastV): see `qapframe.models.inllm`.

Pruned sequences keep their tokens' order; rows that shrink by different amounts (images with
different token counts) are re-padded on their original padding side. What was kept is exposed as
``model.qapframe_last_selection`` (a dict; ``"selections"`` holds one `ImageSelection` per image).
`remove()` detaches every hook and restores ``generate`` and ``get_image_features``.
"""

from __future__ import annotations

import functools
import inspect

import torch

from qapframe.models.attention import ProjectionCapture, cls_attention_and_keys
from qapframe.models.base import ADAPTERS, ModelAdapter
from qapframe.models.inllm import InLLMPruning
from qapframe.models.pruning import (
    ImageTokens,
    image_spans,
    rebuild_sequences,
    requirements_of,
    select_per_image,
)
from qapframe.strategies.base import Pruner, Scorer
from qapframe.strategies.context import QuantSettings

_ATTR = "qapframe_installation"


def _encoder_layers(model) -> torch.nn.ModuleList:
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers  # v5 CLIPVisionModel has no vision_model level


class _Installation:
    """Everything one `install` attached to a model, so that `remove` can take it all off again."""

    def __init__(self, adapter: "LlavaAdapter", model, scorer: Scorer, pruner: Pruner, quant, seed: int):
        self.adapter, self.model = adapter, model
        self.scorer, self.pruner, self.quant, self.seed = scorer, pruner, quant, seed
        self.requirements = requirements_of(scorer, pruner)
        base = model.model
        self.latest_images: list[ImageTokens] | None = None
        self.vision_capture = None
        if self.requirements.cls_attention or self.requirements.vision_keys:
            self.vision_capture = ProjectionCapture(adapter.feature_attention(model))
        self._original_features = base.get_image_features
        base.get_image_features = self._wrap_features(base.get_image_features)
        self._handles = []
        self.inllm: InLLMPruning | None = None
        self._original_generate = None
        if self.requirements.text_attention_layer is not None:
            self.inllm = InLLMPruning(
                base.language_model,
                self.requirements.text_attention_layer,
                images=self._current_images,
                select=self._select,
                on_selection=self._record,
            )
            self._handles.append(model.register_forward_pre_hook(self._fastv_pre_hook, with_kwargs=True))
        else:
            self._handles.append(model.register_forward_pre_hook(self._prellm_pre_hook, with_kwargs=True))
            self._original_generate = model.generate
            model.generate = self._wrap_generate(model.generate)
        self._forward_signature = inspect.signature(type(model).forward)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self.inllm is not None:
            self.inllm.remove()
        if self.vision_capture is not None:
            self.vision_capture.remove()
        # The wrappers were set as instance attributes; deleting them re-exposes the class methods.
        del self.model.model.get_image_features
        if self._original_generate is not None:
            del self.model.generate

    # -- shared pieces ------------------------------------------------------------------------------
    def _wrap_features(self, original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            if self.vision_capture is not None:
                self.vision_capture.enabled = True
            try:
                out = original(*args, **kwargs)
            finally:
                if self.vision_capture is not None:
                    self.vision_capture.enabled = False
            bound = signature.bind(*args, **kwargs).arguments
            self.latest_images = self.adapter.describe_images(self.model, out.pooler_output, self.vision_capture, bound)
            if self.vision_capture is not None:
                self.vision_capture.clear()
            return out

        return get_image_features

    def _current_images(self) -> list[ImageTokens]:
        if self.latest_images is None:
            raise RuntimeError("no image features were computed for this prompt")
        return self.latest_images

    def _select(self, images, text_attention=None):
        return select_per_image(self.scorer, self.pruner, images, self.quant, self.seed, text_attention)

    def _record(self, info: dict) -> None:
        self.model.qapframe_last_selection = info

    def _bind(self, args, kwargs) -> dict:
        """The forward call's arguments by name (positional ones included), without ``self``."""
        arguments = dict(self._forward_signature.bind_partial(self.model, *args, **kwargs).arguments)
        arguments.pop("self", None)
        return {**arguments, **arguments.pop("kwargs", {})}

    # -- in-LLM (FastV) ---------------------------------------------------------------------------
    def _fastv_pre_hook(self, module, args, kwargs):
        bound = self._bind(args, kwargs)
        has_images = bound.get("pixel_values") is not None or bound.get("mm_encoder_outputs")
        if not has_images:
            return None
        input_ids = bound.get("input_ids")
        if input_ids is None:
            raise ValueError("vision-token pruning needs `input_ids` to locate the image tokens")
        if bound.get("pixel_values") is not None:
            self.latest_images = None  # computed inside this forward
        self.inllm.pending_vision_mask = input_ids == self.model.config.image_token_id
        return None

    # -- pre-LLM ----------------------------------------------------------------------------------
    def prune_inputs(self, input_ids, pixel_values, attention_mask=None, **vision_kwargs) -> dict:
        """Encode the images, select tokens and build the shortened LLM input (`inputs_embeds`, mask)."""
        base = self.model.model
        vision_kwargs = {k: v for k, v in vision_kwargs.items() if v is not None}
        base.get_image_features(pixel_values=pixel_values, return_dict=True, **vision_kwargs)
        images = self._current_images()
        selections = self._select(images)
        embed = self.model.get_input_embeddings()
        text_embeds = embed(input_ids)  # [B, L, D]
        spans = image_spans(input_ids == self.model.config.image_token_id, [im.num_tokens for im in images])
        tokens = [sel.tokens(im.features) for sel, im in zip(selections, images)]
        pad_id = getattr(self.model.config.text_config, "pad_token_id", None) or 0
        pad = embed(torch.tensor(pad_id, device=input_ids.device))
        inputs_embeds, mask = rebuild_sequences(text_embeds, attention_mask, spans, tokens, pad)
        self._record({"selections": selections, "spans": spans, "attention_mask": mask})
        return {"inputs_embeds": inputs_embeds, "attention_mask": mask}

    def _vision_kwargs(self, bound: dict) -> dict:
        return {k: bound.get(k) for k in ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")}

    def _prellm_pre_hook(self, module, args, kwargs):
        bound = self._bind(args, kwargs)
        if bound.get("pixel_values") is None:
            return None
        if bound.get("input_ids") is None:
            raise ValueError("vision-token pruning needs `input_ids` to locate the image tokens")
        pruned = self.prune_inputs(
            bound["input_ids"], bound["pixel_values"], bound.get("attention_mask"), **self._vision_kwargs(bound)
        )
        new = dict(bound)
        for key in ("input_ids", "pixel_values", "image_sizes"):
            new.pop(key, None)
        new.update(pruned)
        if new.get("position_ids") is not None:
            mask = pruned["attention_mask"]
            new["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        return (), new

    def _wrap_generate(self, original):
        @functools.wraps(original)
        def generate(inputs=None, *args, **kwargs):
            input_ids = kwargs.pop("input_ids", inputs)
            if kwargs.get("pixel_values") is None or input_ids is None:
                return original(input_ids, *args, **kwargs)
            pixel_values = kwargs.pop("pixel_values")
            vision = {k: kwargs.pop(k, None) for k in ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")}
            # generate itself runs under no_grad; the pruning done before it must too, or a model used
            # outside `torch.no_grad()` (as in the README) hands the scorers tensors that require grad.
            with torch.no_grad():
                pruned = self.prune_inputs(input_ids, pixel_values, kwargs.pop("attention_mask", None), **vision)
            out = original(*args, **pruned, **kwargs)
            # With inputs_embeds only, generate returns just the new tokens; prepend the prompt ids
            # so callers see the same layout as from the unwrapped model.
            if isinstance(out, torch.Tensor):
                return torch.cat([input_ids, out], dim=1)
            out.sequences = torch.cat([input_ids, out.sequences], dim=1)
            return out

        return generate


@ADAPTERS.register("llava")
class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5: one CLIP crop per image, a fixed number of projected tokens per image."""

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        # Imported here: importing transformers costs seconds, and `qapframe list` lists adapters without it.
        from transformers import LlavaForConditionalGeneration

        return isinstance(model, LlavaForConditionalGeneration)

    def install(self, model, scorer: Scorer, pruner: Pruner, quant: QuantSettings | None = None, seed: int = 0):
        if getattr(model, _ATTR, None) is not None:
            raise ValueError("token pruning is already installed on this model; call remove() first")
        setattr(model, _ATTR, _Installation(self, model, scorer, pruner, quant, seed))
        model.qapframe_last_selection = None
        return model

    def remove(self, model):
        installation = getattr(model, _ATTR, None)
        if installation is not None:
            installation.remove()
            delattr(model, _ATTR)
            del model.qapframe_last_selection
        return model

    # -- architecture knowledge -----------------------------------------------------------------
    @staticmethod
    def feature_layer(model) -> int:
        """Index into the vision encoder's layers whose attention produced the selected features."""
        layer = model.config.vision_feature_layer
        layer = layer[-1] if isinstance(layer, (list, tuple)) else layer  # several layers: use the last
        num_layers = len(_encoder_layers(model))
        hidden_index = layer % (num_layers + 1)  # hidden_states[0] is the embedding output
        if hidden_index == 0:
            raise ValueError("vision_feature_layer selects the patch embeddings; there is no attention to score with")
        return hidden_index - 1

    def feature_attention(self, model) -> torch.nn.Module:
        return _encoder_layers(model)[self.feature_layer(model)].self_attn

    @staticmethod
    def _drop_cls(model, bound: dict) -> bool:
        strategy = bound.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy
        return strategy == "default"

    def describe_images(self, model, features, capture, bound: dict) -> list[ImageTokens]:
        """Per image ``features [N, D]`` (+ CLS attention ``[N]`` and keys ``[N, Dk]`` when captured)."""
        cls, keys = (None, None)
        if capture is not None:
            cls, keys = cls_attention_and_keys(capture)  # [I, S], [I, S, Dk]
            if self._drop_cls(model, bound):
                cls, keys = cls[:, 1:], keys[:, 1:]
        out = []
        for i, f in enumerate(features):
            prunable = torch.ones(f.shape[0], dtype=torch.bool, device=f.device)
            out.append(ImageTokens(f, prunable, None if cls is None else cls[i], None if keys is None else keys[i]))
        return out
