"""An images-only Qwen-VL processor, for machines without torchvision.

transformers cannot build `Qwen2_5_VLProcessor` and its siblings without torchvision (their video processor
needs it), and installing torchvision switches other image processors to their torchvision backends, which
moves their pixels. This one does for text and images exactly what the real processor does: each image
placeholder becomes the image's merged-token count of placeholder tokens, and ``mm_token_type_ids`` marks
them for M-RoPE. Videos need the real processor.
"""

from __future__ import annotations

import re
from pathlib import Path

QWEN_VL_MODEL_TYPES = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}  # config.model_type


class QwenImageProcessor:
    """Qwen-VL's processor for text and images only. Transformers' own cannot even be built without torchvision
    (its video processor needs it); this one expands each image placeholder to the image's merged-token count
    and returns what that processor returns for images: ids, mask, ``pixel_values [P, C*T*p*p]``,
    ``image_grid_thw [I, 3]`` and ``mm_token_type_ids`` (1 at image tokens, for M-RoPE)."""

    def __init__(self, image_processor, tokenizer, image_token_id: int):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.image_token_id = image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)

    @classmethod
    def from_pretrained(cls, path: Path, config) -> "QwenImageProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        return cls(AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path), config.image_token_id)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding=False, **kwargs):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        vision: dict = {}
        if images is not None:
            vision = dict(self.image_processor(images=images, return_tensors=return_tensors))
            merge = self.image_processor.merge_size
            counts = iter((vision["image_grid_thw"].prod(-1) // merge**2).tolist())
            token = re.escape(self.image_token)
            texts = [re.sub(token, lambda _: self.image_token * next(counts), t) for t in texts]
        encoded = dict(self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kwargs))
        encoded["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).int()
        return BatchFeature({**encoded, **vision})


__all__ = ["QWEN_VL_MODEL_TYPES", "QwenImageProcessor"]
