"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`) adapter: anyres crops, one newline token per row.

What a vision token is here: a position of the image's *packed* feature sequence (after
``pack_image_features``: the base crop's tokens, then the unpadded high-resolution grid row by row,
each row ending in the learned ``image_newline``). Patch tokens of every crop are scored and pruned
together, so scores are normalized per image over all of its crops; the newline tokens carry the
2-D layout, are never pruned and do not count against the budget. [CLS] attention and keys are
computed per crop and sent through the model's own packing, so they line up with the features.
"""

from __future__ import annotations

import torch

from qapframe.models.attention import cls_attention_and_keys
from qapframe.models.base import ADAPTERS
from qapframe.models.llava import LlavaAdapter
from qapframe.models.pruning import ImageTokens, anyres_layout


@ADAPTERS.register("llava_next")
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: pruning within each image's packed multi-crop token sequence."""

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        from transformers import LlavaNextForConditionalGeneration  # lazily, as in `LlavaAdapter.matches`

        return isinstance(model, LlavaNextForConditionalGeneration)

    def describe_images(self, model, features, capture, bound: dict) -> list[ImageTokens]:
        """Packed per-image ``features [N_i, D]`` plus packed CLS attention / keys and the newline mask."""
        from qapframe.transformers_internals import image_size_to_num_patches

        base = model.model
        image_sizes = bound["image_sizes"]
        crops = [
            image_size_to_num_patches(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
            for size in image_sizes
        ]
        parts = []
        if capture is not None:
            cls, keys = cls_attention_and_keys(capture)  # [C, S], [C, S, Dk] over all crops
            if self._drop_cls(model, bound):
                cls, keys = cls[:, 1:], keys[:, 1:]
            parts = [cls.unsqueeze(-1).float(), keys.float()]
        per_crop = self._tokens_per_crop(model, bound)
        tokens = torch.ones(sum(crops), per_crop, 1, device=features[0].device)  # 1 = patch
        aux = torch.cat([p.to(tokens) for p in parts] + [tokens], dim=-1)  # [C, P, 1 (+ 1 + Dk)]
        newline = aux.new_zeros(aux.shape[-1])  # newline tokens get marker 0 and zero score / keys
        packed, _ = base.pack_image_features(
            list(torch.split(aux, crops, dim=0)),
            image_sizes,
            vision_feature_select_strategy=bound.get("vision_feature_select_strategy")
            or model.config.vision_feature_select_strategy,
            image_newline=newline,
        )
        out = []
        for f, a in zip(features, packed):
            if a.shape[0] != f.shape[0]:
                raise RuntimeError(f"packed scores ({a.shape[0]}) and features ({f.shape[0]}) disagree")
            prunable = a[:, -1] > 0.5
            cls_i = a[:, 0].float() if parts else None
            keys_i = a[:, 1:-1].float() if parts else None
            out.append(ImageTokens(f, prunable, cls_i, keys_i, layout=anyres_layout(prunable, per_crop)))
        return out

    def _tokens_per_crop(self, model, bound: dict) -> int:
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        return side * side + (0 if self._drop_cls(model, bound) else 1)
