"""A tiny random LLaVA saved with its processor, loadable through the runner's `model.path`."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from qapframe.data.synthetic import IMAGE_SIZE

PATCH = 16  # 64 px images -> 16 vision tokens


def save_tiny_llava(directory, seed: int = 0) -> None:
    from transformers import AutoProcessor

    from qapframe.toy import TOY_PATH

    tokenizer = AutoProcessor.from_pretrained(TOY_PATH).tokenizer  # the toy's word-level synthetic-VQA tokenizer
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<image>")}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            pad_token_id=special["<pad>"], bos_token_id=special["<s>"], eos_token_id=special["</s>"],
        ),
        image_token_index=special["<image>"],
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=special["<pad>"],
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = special["<s>"], special["</s>"], special["<pad>"]
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llava")
    save_tiny_llava(directory)
    return directory
