"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`) adapter: SigLIP crops, anyres packing, video clips.

What a vision token is here:
- **image**: a position of the image's *packed* sequence (``pack_image_features``: the base crop's
  tokens, then the unpadded high-resolution grid row by row, each row ending in ``image_newline``; when
  the grid exceeds ``vision_aspect_ratio``'s ``anyres_max_N`` crops it is first shrunk bilinearly). A
  prompt with several images (``batch_num_images > 1``) gets each image's base crop plus one newline.
- **video**: a position of the clip's sequence (``get_video_features``: every frame's tokens pooled 2x2
  bilinearly, frames one after another, then one ``image_newline`` for the whole clip). A clip is pruned
  as one unit: one budget over all of its frames' tokens.
Newline tokens carry the layout, are never pruned and do not count against the budget.

SigLIP has no [CLS] token, so the scorers' "[CLS] attention" (VisionZip, the hybrid, VisPruner) is a
stand-in: the mean attention each token *receives*, averaged over heads and over every query token of
its own crop (or frame), in the vision layer that produced the features (``vision_feature_layer``;
OneVision uses the last layer, strategy ``full``). It is recomputed from the hooked q/k projections, so
sdpa stays on (`qapframe.models.attention.received_attention_and_keys`). Like a [CLS] row it sums to 1
per crop, and it favours the tokens the encoder itself attends to. These scores and the keys go through
the model's own packing (images) or pooling (videos), so they line up with the features: a token made by
interpolation gets the interpolated score and key.
"""

from __future__ import annotations

import math

import torch

from qapframe.models.attention import received_attention_and_keys
from qapframe.models.base import ADAPTERS
from qapframe.models.llava import LlavaAdapter
from qapframe.models.pruning import ImageTokens, anyres_layout, image_spans


@ADAPTERS.register("llava_onevision")
class LlavaOnevisionAdapter(LlavaAdapter):
    """LLaVA-OneVision: pruning within each image's packed sequence and each video clip's frames."""

    feature_methods = ("get_image_features", "get_video_features")
    pixel_keys = ("pixel_values", "pixel_values_videos")
    # Consumed by the pre-LLM pruning (the forward ignores `vision_aspect_ratio` too: the config's is used).
    vision_keys = (
        "pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos", "image_sizes_videos",
        "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio",
    )

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        from transformers import LlavaOnevisionForConditionalGeneration  # lazily, as in `LlavaAdapter.matches`

        return isinstance(model, LlavaOnevisionForConditionalGeneration)

    # -- where the tokens are -----------------------------------------------------------------------
    @staticmethod
    def vision_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == model.config.image_token_id) | (input_ids == model.config.video_token_id)

    @staticmethod
    def order_images(model, images: list[ImageTokens], prompt) -> list[ImageTokens]:
        """Images come before clips from the feature calls; a prompt with both needs them by position."""
        if prompt is None or len({t.modality for t in images}) < 2:
            return list(images)
        keyed = []
        for modality, token_id in (("image", model.config.image_token_id), ("video", model.config.video_token_id)):
            group = [t for t in images if t.modality == modality]
            spans = image_spans(prompt[0] == token_id, [t.num_tokens for t in group])
            keyed += [((row, int(positions[0])), t) for (row, positions), t in zip(spans, group)]
        return [t for _, t in sorted(keyed, key=lambda pair: pair[0])]

    def encode_images(self, model, vision_inputs: dict) -> None:
        """Images, then videos, with the arguments the model's own forward passes to each."""
        names = ("vision_feature_layer", "vision_feature_select_strategy")
        layers = {k: vision_inputs[k] for k in names if k in vision_inputs}
        if "pixel_values" in vision_inputs:
            model.model.get_image_features(
                vision_inputs["pixel_values"], vision_inputs.get("image_sizes"),
                batch_num_images=vision_inputs.get("batch_num_images"), return_dict=True, **layers,
            )
        if "pixel_values_videos" in vision_inputs:
            model.model.get_video_features(vision_inputs["pixel_values_videos"], return_dict=True, **layers)

    def describe_features(self, model, output, capture, bound: dict, method: str) -> list[ImageTokens]:
        if method == "get_video_features":
            return self.describe_videos(model, output.pooler_output, capture, bound)
        return self.describe_images(model, output.pooler_output, capture, bound)

    def _token_side_channels(self, model, capture, bound: dict, crops: int, device) -> torch.Tensor:
        """Per crop (or frame) and token ``[C, S, 1 (+ 1 + Dk)]``: stand-in score and keys, then a 1 marker."""
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        first = 1 if self._drop_cls(model, bound) else 0  # "default" drops the first token, as the model does
        parts = []
        if capture is not None:
            received, keys = received_attention_and_keys(capture)  # [C, S], [C, S, Dk]
            parts = [received[:, first:, None], keys[:, first:]]
        marker = torch.ones(crops, side * side - first, 1, device=device)
        return torch.cat([p.to(marker) for p in parts] + [marker], dim=-1)

    @staticmethod
    def _unit(features: torch.Tensor, channels: torch.Tensor, capture, modality: str, grid=None,
              base_tokens: int | None = None) -> ImageTokens:
        """A packed ``features [N, D]`` and its side channels ``[N, c]`` -> one image's or clip's `ImageTokens`.

        ``base_tokens``: an image's tokens per crop, to recover its anyres layout (`anyres_layout`)."""
        if channels.shape[0] != features.shape[0]:
            raise RuntimeError(f"packed scores ({channels.shape[0]}) and features ({features.shape[0]}) disagree")
        prunable = channels[:, -1] > 0.5  # newlines carry marker 0; interpolated tokens stay at 1
        layout = None if base_tokens is None else anyres_layout(prunable, base_tokens)
        if capture is None:
            return ImageTokens(features, prunable, modality=modality, grid=grid, layout=layout)
        return ImageTokens(
            features, prunable, channels[:, 0].float(), channels[:, 1:-1].float(), modality=modality, grid=grid,
            layout=layout,
        )

    def describe_images(self, model, features, capture, bound: dict) -> list[ImageTokens]:
        """Packed per-image ``features [N_i, D]`` plus the packed stand-in scores / keys and newline mask."""
        from qapframe.transformers_internals import image_size_to_num_patches

        config = model.config
        image_sizes, per_sample = bound["image_sizes"], bound.get("batch_num_images")
        # As in get_image_features: a sample with several images gets one crop (the base view) per image.
        patched = [True] * len(image_sizes) if per_sample is None else [n == 1 for n in per_sample for _ in range(n)]
        crops = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) if p else 1
            for size, p in zip(image_sizes, patched)
        ]
        channels = self._token_side_channels(model, capture, bound, sum(crops), features[0].device)
        packed, _ = model.model.pack_image_features(
            list(torch.split(channels, crops, dim=0)),
            image_sizes,
            image_newline=channels.new_zeros(channels.shape[-1]),  # newline: marker 0, zero score and keys
            vision_aspect_ratio=bound.get("vision_aspect_ratio") or config.vision_aspect_ratio,
        )
        per_crop = channels.shape[1]  # tokens of one crop, as the model keeps them
        return [self._unit(f, c, capture, "image", base_tokens=per_crop) for f, c in zip(features, packed)]

    def describe_videos(self, model, features: torch.Tensor, capture, bound: dict) -> list[ImageTokens]:
        """``features [V, F * P + 1, D]`` (pooled frames, then the newline) -> one ``modality="video"`` unit each."""
        videos, frames = bound["pixel_values_videos"].shape[:2]
        channels = self._token_side_channels(model, capture, bound, videos * frames, features.device)
        pooled = model.model.apply_pooling(channels)  # [V * F, P, c], the model's own 2x2 bilinear pooling
        side = math.isqrt(pooled.shape[1])  # apply_pooling keeps frames square
        if side * side != pooled.shape[1]:
            raise RuntimeError(f"pooled frames of {pooled.shape[1]} tokens are not square")
        pooled = pooled.reshape(videos, -1, pooled.shape[-1])
        packed = torch.cat([pooled, pooled.new_zeros(videos, 1, pooled.shape[-1])], dim=1)  # the clip's newline
        return [self._unit(f, c, capture, "video", (frames, side, side)) for f, c in zip(features, packed)]
