"""LLaVA-1.5 (`LlavaForConditionalGeneration`) adapter, and the installation shared by the LLaVA family.

Two pruning points, chosen from the scorer's requirements:
- **pre-LLM** (no in-LLM requirement: VisionZip, hybrid, CDPruner, DivPrune, VisPruner, random, l2norm):
  the prompt is shortened before the language model runs. ``model.forward`` gets a pre-hook that, when ``pixel_values`` are
  given, encodes the images, selects tokens and replaces ``input_ids``/``pixel_values`` by the
  shortened ``inputs_embeds`` and ``attention_mask``; the logits then cover the shortened sequence.
  ``model.generate`` is wrapped the same way and delegates with ``inputs_embeds``, so generate's own
  mask, position-id and cache bookkeeping all start from the shortened prompt (exactly as if only
  the kept tokens had been fed); it returns ``[original prompt ids, new tokens]`` like the unwrapped
  model. Position ids passed explicitly to ``forward`` are recomputed from the shortened mask.
- **in-LLM** (FastV, DART, PyramidDrop): see `qapframe.models.inllm`.

Beyond the vision features, the installation adds what only the model can compute when a strategy asks
for it: the prompt's LLM input embeddings per image (CDPruner's relevance) and the error of the first
activation quantizer on each vision token (the hybrid's ``e_mode: pipeline``).

Pruned sequences keep their tokens' order; rows that shrink by different amounts (images with
different token counts) are re-padded on their original padding side. What was kept is exposed as
``model.qapframe_last_selection`` (a dict; ``"selections"`` holds one `ImageSelection` per image).
`remove()` detaches every hook and restores ``generate`` and ``get_image_features``.
"""

from __future__ import annotations

import dataclasses
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
        # Resolved before anything is attached, so that a bad setting leaves the model untouched.
        ranking_layers = adapter.ranking_layers(model, self.requirements) if self.requirements.in_llm else None
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
        self._prompt: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (input_ids, mask) being pruned
        if self.requirements.in_llm:
            self.inllm = InLLMPruning(
                base.language_model,
                ranking_layers,
                images=self._current_images,
                select=self._select,
                on_selection=self._record,
                final_budget=pruner.budget,
                need_hidden=self.requirements.llm_hidden,
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

    def _select(self, images, text_attention=None, targets=None):
        images = self._with_context(images)
        return select_per_image(self.scorer, self.pruner, images, self.quant, self.seed, text_attention, targets)

    def _with_context(self, images: list[ImageTokens]) -> list[ImageTokens]:
        """Add what only the model can compute: prompt text embeddings, the activation quantizer's error."""
        if self.requirements.text_embeds:
            if self._prompt is None:
                raise RuntimeError("no prompt ids were recorded for this forward")
            texts = self.adapter.prompt_text_embeds(self.model, *self._prompt, [im.num_tokens for im in images])
            images = [dataclasses.replace(im, text_embeds=t) for im, t in zip(images, texts)]
        if self.requirements.activation_error:
            images = [
                dataclasses.replace(im, activation_error=self.adapter.activation_error(self.model, im.features))
                for im in images
            ]
        return images

    def _record(self, info: dict) -> None:
        self.model.qapframe_last_selection = info

    def _bind(self, args, kwargs) -> dict:
        """The forward call's arguments by name (positional ones included), without ``self``."""
        arguments = dict(self._forward_signature.bind_partial(self.model, *args, **kwargs).arguments)
        arguments.pop("self", None)
        return {**arguments, **arguments.pop("kwargs", {})}

    # -- in-LLM (FastV, DART, PyramidDrop) ------------------------------------------------------------------------
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
        self._prompt = (input_ids, bound.get("attention_mask"))
        self.inllm.pending_vision_mask = input_ids == self.model.config.image_token_id
        return None

    # -- pre-LLM ----------------------------------------------------------------------------------
    def prune_inputs(self, input_ids, pixel_values, attention_mask=None, **vision_kwargs) -> dict:
        """Encode the images, select tokens and build the shortened LLM input (`inputs_embeds`, mask)."""
        base = self.model.model
        vision_kwargs = {k: v for k, v in vision_kwargs.items() if v is not None}
        base.get_image_features(pixel_values=pixel_values, return_dict=True, **vision_kwargs)
        images = self._current_images()
        self._prompt = (input_ids, attention_mask)
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

    @staticmethod
    def ranking_layers(model, requirements) -> list[int]:
        """Decoder layers whose outputs are pruned: FastV/DART's K - 1, or one per PyramidDrop stage."""
        depth = len(model.model.language_model.layers)
        if not requirements.stage_fractions:
            layer = requirements.text_attention_layer
            if not 0 <= layer < depth - 1:
                raise ValueError(
                    f"in-LLM pruning ranks at layer {layer} (K = {layer + 1}), but this {depth}-layer LLM needs "
                    f"K in [1, {depth - 1}] so that some layer sees only the kept tokens"
                )
            return [layer]
        layers = [round(f * depth) - 1 for f in requirements.stage_fractions]
        if any(not 0 <= r < depth - 1 for r in layers) or len(set(layers)) != len(layers):
            raise ValueError(
                f"stages {list(requirements.stage_fractions)} resolve to ranking layers {layers} on this "
                f"{depth}-layer LLM; each stage needs its own layer in [0, {depth - 2}] (use fewer stages)"
            )
        return layers

    @staticmethod
    def prompt_text_embeds(model, input_ids, attention_mask, lengths: list[int]) -> list[torch.Tensor]:
        """Per image ``[T, D]``: LLM input embeddings of its row's real text tokens (CDPruner's text side)."""
        image = input_ids == model.config.image_token_id
        real = torch.ones_like(image) if attention_mask is None else attention_mask.bool()
        spans = image_spans(image, lengths)
        embed = model.get_input_embeddings()
        rows = {}
        for row, _ in spans:
            if row not in rows:
                rows[row] = embed(input_ids[row][real[row] & ~image[row]])
        return [rows[row] for row, _ in spans]

    @staticmethod
    def activation_error(model, features: torch.Tensor) -> torch.Tensor | None:
        """``features [N, D]`` -> ``[N]`` L2 error of the first activation quantizer the tokens reach.

        For LLaMA-style LLMs that is layer 0's ``q_proj`` input (after the input norm), quantized exactly as
        the quantized Linear does it (rotation, smoothing, then its static or dynamic act quantizer).
        """
        layer = model.model.language_model.layers[0]
        linear = layer.self_attn.q_proj
        act = getattr(linear, "act_quant", None)
        if act is None or not getattr(act, "enabled", True):
            return None
        x = layer.input_layernorm(features)
        if getattr(linear, "input_transform", None) is not None:
            x = linear.input_transform(x)
        if getattr(linear, "smooth", None) is not None:
            x = (x.float() / linear.smooth).to(x.dtype)
        return (x.float() - act(x).float()).norm(dim=-1)

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
