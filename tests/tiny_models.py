"""Tiny, randomly initialised configs of the real transformers multimodal classes, for tests.

Built in code because nothing can be downloaded; saved and re-loaded with ``from_pretrained`` where
a test needs the loading path. Sizes are chosen so a forward pass takes milliseconds.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

IMAGE_TOKEN_ID = 3
PAD_TOKEN_ID = 0
VOCAB_SIZE = 64


def _vision_config(image_size: int = 32, patch_size: int = 8) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )


def _text_config(num_layers: int = 3) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_llava(seed: int = 0, num_layers: int = 3, attn_implementation: str = "sdpa") -> LlavaForConditionalGeneration:
    """LLaVA-1.5 layout: CLIP tower (CLS dropped, layer -2 features), MLP projector, LLaMA LLM; 16 vision tokens."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=_vision_config(),
        text_config=_text_config(num_layers),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config._attn_implementation = attn_implementation
    return LlavaForConditionalGeneration(config).eval()


def tiny_llava_next(seed: int = 0, num_layers: int = 3, attn_implementation: str = "sdpa") -> LlavaNextForConditionalGeneration:
    """LLaVA-NeXT layout: several crops per image (anyres) plus a base crop, newline tokens per row."""
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=_vision_config(),
        text_config=_text_config(num_layers),
        image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config._attn_implementation = attn_implementation
    return LlavaNextForConditionalGeneration(config).eval()


def llava_inputs(batch_size: int = 1, prompt_lengths: list[int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded prompts ``[text..., <image> x 16, text...]`` for `tiny_llava`."""
    generator = torch.Generator().manual_seed(seed)
    lengths = prompt_lengths or [6] * batch_size
    rows = []
    for length in lengths:
        before = torch.randint(4, VOCAB_SIZE, (2,), generator=generator).tolist()
        after = torch.randint(4, VOCAB_SIZE, (length,), generator=generator).tolist()
        rows.append([1] + before + [IMAGE_TOKEN_ID] * 16 + after)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    pixel_values = torch.randn(len(rows), 3, 32, 32, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def llava_next_inputs(
    model: LlavaNextForConditionalGeneration,
    image_sizes: list[tuple[int, int]],
    prompt_lengths: list[int] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Left-padded prompts ``[text..., <image> x N_i, text...]`` for `tiny_llava_next`, one image per row.

    ``image_sizes`` (H, W) pick the anyres grid, so rows get different numbers of image tokens.
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    generator = torch.Generator().manual_seed(seed)
    config = model.config
    crops = [image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size) for s in image_sizes]
    pixel_values = torch.randn(len(image_sizes), max(crops), 3, 32, 32, generator=generator)
    sizes = torch.tensor(image_sizes)
    with torch.no_grad():
        lengths = [f.shape[0] for f in model.model.get_image_features(pixel_values, sizes).pooler_output]
    rows = []
    for n, length in zip(lengths, prompt_lengths or [6] * len(image_sizes)):
        before = torch.randint(4, VOCAB_SIZE, (2,), generator=generator).tolist()
        after = torch.randint(4, VOCAB_SIZE, (length,), generator=generator).tolist()
        rows.append([1] + before + [IMAGE_TOKEN_ID] * n + after)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, "image_sizes": sizes}
