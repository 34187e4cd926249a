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


def left_padded(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Token rows of different lengths -> ``input_ids`` and ``attention_mask`` ``[B, L]``, padded on the left."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def llava_inputs(batch_size: int = 1, prompt_lengths: list[int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded prompts ``[text..., <image> x 16, text...]`` for `tiny_llava`."""
    generator = torch.Generator().manual_seed(seed)
    lengths = prompt_lengths or [6] * batch_size
    rows = []
    for length in lengths:
        before = torch.randint(4, VOCAB_SIZE, (2,), generator=generator).tolist()
        after = torch.randint(4, VOCAB_SIZE, (length,), generator=generator).tolist()
        rows.append([1] + before + [IMAGE_TOKEN_ID] * 16 + after)
    pixel_values = torch.randn(len(rows), 3, 32, 32, generator=generator)
    return {**left_padded(rows), "pixel_values": pixel_values}


def _anyres_images(model, image_sizes: list[tuple[int, int]], generator):
    """Random 32-px crops for LLaVA-NeXT/OneVision's anyres packing of images of ``image_sizes`` (H, W):
    ``pixel_values [B, max crops, 3, 32, 32]``, ``image_sizes [B, 2]`` and each image's packed token count."""
    from qapframe.transformers_internals import image_size_to_num_patches

    config = model.config
    crops = [image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size) for s in image_sizes]
    pixel_values = torch.randn(len(image_sizes), max(crops), 3, 32, 32, generator=generator)
    sizes = torch.tensor(image_sizes)
    with torch.no_grad():
        counts = [f.shape[0] for f in model.model.get_image_features(pixel_values, sizes).pooler_output]
    return pixel_values, sizes, counts


def llava_next_inputs(
    model: LlavaNextForConditionalGeneration,
    image_sizes: list[tuple[int, int]],
    prompt_lengths: list[int] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Left-padded prompts ``[text..., <image> x N_i, text...]`` for `tiny_llava_next`, one image per row.

    ``image_sizes`` (H, W) pick the anyres grid, so rows get different numbers of image tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    pixel_values, sizes, lengths = _anyres_images(model, image_sizes, generator)
    rows = []
    for n, length in zip(lengths, prompt_lengths or [6] * len(image_sizes)):
        before = torch.randint(4, VOCAB_SIZE, (2,), generator=generator).tolist()
        after = torch.randint(4, VOCAB_SIZE, (length,), generator=generator).tolist()
        rows.append([1] + before + [IMAGE_TOKEN_ID] * n + after)
    return {**left_padded(rows), "pixel_values": pixel_values, "image_sizes": sizes}


VIDEO_TOKEN_ID = 4  # LLaVA-OneVision's video placeholder; its prompts draw text tokens from 5 upwards


def tiny_llava_onevision(seed: int = 0, num_layers: int = 3, attn_implementation: str = "sdpa"):
    """LLaVA-OneVision layout: SigLIP tower (no [CLS], last-layer features, strategy "full"), Qwen2 LLM.

    32 px crops of 16 tokens; ``anyres_max_2`` shrinks a 2 x 2 crop grid (64 x 64 images) bilinearly, so
    both packing paths run. The q/k/v biases (zero when fresh) are randomised so that they matter. The
    placeholder ids get zero logits, so greedy decoding never emits them (some other logit is positive)
    and generated tokens fed back as ``input_ids`` are never taken for vision tokens.
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    torch.manual_seed(seed)
    text = Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         image_size=32, patch_size=8, vision_use_head=False),
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        vision_aspect_ratio="anyres_max_2",
    )
    config._attn_implementation = attn_implementation
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                p.normal_(0.0, 0.5)
        model.lm_head.weight[[IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]] = 0.0
    return model


def _placeholder_prompts(counts: list[int], token_id: int, prompt_lengths: list[int], generator) -> dict[str, torch.Tensor]:
    """Left-padded rows ``[bos, text x 2, placeholder x N_i, text x length_i]`` (text ids >= 5)."""
    rows = []
    for n, length in zip(counts, prompt_lengths):
        before = torch.randint(5, VOCAB_SIZE, (2,), generator=generator).tolist()
        after = torch.randint(5, VOCAB_SIZE, (length,), generator=generator).tolist()
        rows.append([1] + before + [token_id] * n + after)
    return left_padded(rows)


def llava_onevision_inputs(model, image_sizes: list[tuple[int, int]], prompt_lengths: list[int] | None = None,
                           seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded prompts with one image each for `tiny_llava_onevision`; sizes (H, W) pick the crop grid."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values, sizes, counts = _anyres_images(model, image_sizes, generator)
    prompts = _placeholder_prompts(counts, IMAGE_TOKEN_ID, prompt_lengths or [6] * len(image_sizes), generator)
    return {**prompts, "pixel_values": pixel_values, "image_sizes": sizes}


def llava_onevision_video_inputs(model, num_frames: int = 2, prompt_lengths: list[int] | None = None,
                                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded prompts with one ``num_frames``-frame clip each for `tiny_llava_onevision`."""
    generator = torch.Generator().manual_seed(seed)
    lengths = prompt_lengths or [6]
    videos = torch.randn(len(lengths), num_frames, 3, 32, 32, generator=generator)
    with torch.no_grad():
        count = model.model.get_video_features(videos).pooler_output.shape[1]
    prompts = _placeholder_prompts([count] * len(lengths), VIDEO_TOKEN_ID, lengths, generator)
    return {**prompts, "pixel_values_videos": videos}


# -- Qwen-VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) ----------------------------------------------------------------
QWEN_IMAGE_ID, QWEN_VIDEO_ID, QWEN_START_ID, QWEN_END_ID = 3, 4, 5, 6  # Qwen prompts draw text tokens from 7 up
QWEN_PATCH, QWEN_TEMPORAL = 4, 2  # pixel rows are 3 * 2 * 4 * 4 = 96 values; 2 x 2 patches merge into one token


def _qwen_text(num_layers: int) -> dict:
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2,
    )


def _qwen_ids() -> dict:
    return dict(image_token_id=QWEN_IMAGE_ID, video_token_id=QWEN_VIDEO_ID, vision_start_token_id=QWEN_START_ID,
                vision_end_token_id=QWEN_END_ID)


def _randomise_biases(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh q/k/v (and fused qkv) biases are zero; random ones make the bias paths matter in tests."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "qkv.bias")):
                p.normal_(0.0, 0.02)  # larger ones make every position attend alike (one repeated token)
    return model


def tiny_qwen2_5_vl(seed: int = 0, num_layers: int = 4, attn_implementation: str = "sdpa"):
    """Qwen2.5-VL layout: 3 vision blocks (block 1 full attention, 0 and 2 in 2 x 2-token windows), Qwen2 LLM."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=QWEN_PATCH,
                  temporal_patch_size=QWEN_TEMPORAL, spatial_merge_size=2, window_size=16, out_hidden_size=64,
                  fullatt_block_indexes=[1], tokens_per_second=2)
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=_qwen_text(num_layers), **_qwen_ids())
    config._attn_implementation = attn_implementation
    return _randomise_biases(Qwen2_5_VLForConditionalGeneration(config).eval())


def tiny_qwen2_vl(seed: int = 0, num_layers: int = 4, attn_implementation: str = "sdpa"):
    """Qwen2-VL layout: 2 full-attention vision blocks, Qwen2 LLM."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=QWEN_PATCH,
                  temporal_patch_size=QWEN_TEMPORAL, spatial_merge_size=2)
    config = Qwen2VLConfig(vision_config=vision, text_config=_qwen_text(num_layers), **_qwen_ids())
    config._attn_implementation = attn_implementation
    return _randomise_biases(Qwen2VLForConditionalGeneration(config).eval())


def tiny_qwen3_vl(seed: int = 0, num_layers: int = 4, attn_implementation: str = "sdpa", deepstack: tuple = (0,)):
    """Qwen3-VL layout: 2 vision blocks, deepstack from blocks ``deepstack`` into the first LLM layers, Qwen3 LLM."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=QWEN_PATCH,
                  temporal_patch_size=QWEN_TEMPORAL, spatial_merge_size=2, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=list(deepstack))
    text = {**_qwen_text(num_layers), "head_dim": 16}
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
    config = Qwen3VLConfig(vision_config=vision, text_config=text, **_qwen_ids())
    config._attn_implementation = attn_implementation
    return _randomise_biases(Qwen3VLForConditionalGeneration(config).eval())


def qwen_vl_inputs(
    grids: list[tuple[int, int, int]],
    prompt_lengths: list[int] | None = None,
    seed: int = 0,
    video: bool = False,
) -> dict[str, torch.Tensor]:
    """Left-padded rows ``[bos, text x 2, <start>, placeholder x N_i, <end>, text x length_i]``, one image
    (or, ``video``, one clip) per row; ``grids`` are (t, h, w) in patches, N_i = t * h * w / 4."""
    generator = torch.Generator().manual_seed(seed)
    token = QWEN_VIDEO_ID if video else QWEN_IMAGE_ID
    rows = []
    for (t, h, w), length in zip(grids, prompt_lengths or [6] * len(grids)):
        before = torch.randint(7, VOCAB_SIZE, (2,), generator=generator).tolist()
        after = torch.randint(7, VOCAB_SIZE, (length,), generator=generator).tolist()
        rows.append([1] + before + [QWEN_START_ID] + [token] * (t * h * w // 4) + [QWEN_END_ID] + after)
    prompts = left_padded(rows)
    input_ids, attention_mask = prompts["input_ids"], prompts["attention_mask"]
    types = torch.zeros_like(input_ids, dtype=torch.int)
    types[input_ids == QWEN_IMAGE_ID], types[input_ids == QWEN_VIDEO_ID] = 1, 2
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * QWEN_TEMPORAL * QWEN_PATCH**2, generator=generator)
    key = "video" if video else "image"
    pixel_key = "pixel_values_videos" if video else "pixel_values"
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": types,
            pixel_key: pixels, f"{key}_grid_thw": grid}
