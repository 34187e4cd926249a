"""LLaVA-1.5 (`LlavaForConditionalGeneration`) adapter: one CLIP crop per image, a fixed token count per image.

The pruning machinery (pre-LLM hooks, wrapped ``generate``, in-LLM pruning) is shared by every adapter
and lives in `qapframe.models.installation`; this module only says where LLaVA's vision tokens and
[CLS] attention are. [CLS] attention and keys come from the CLIP layer that produced the selected
features (``vision_feature_layer``), recomputed from its hooked q/k projections.
"""

from __future__ import annotations

import torch

from qapframe.models.attention import cls_attention_and_keys
from qapframe.models.base import ADAPTERS
from qapframe.models.installation import ATTR as _ATTR  # noqa: F401  (kept importable from here)
from qapframe.models.installation import HookingAdapter, Installation
from qapframe.models.pruning import ImageTokens

_Installation = Installation  # the former name, kept for imports of it


def _encoder_layers(model) -> torch.nn.ModuleList:
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers  # v5 CLIPVisionModel has no vision_model level


@ADAPTERS.register("llava")
class LlavaAdapter(HookingAdapter):
    """LLaVA-1.5: one CLIP crop per image, a fixed number of projected tokens per image."""

    vision_keys = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        # Imported here: importing transformers costs seconds, and `qapframe list` lists adapters without it.
        from transformers import LlavaForConditionalGeneration

        return isinstance(model, LlavaForConditionalGeneration)

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
