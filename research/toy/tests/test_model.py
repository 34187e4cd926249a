"""The toy's builders: tokenizer, processor and model agree with each other and with LLaVA's layout."""

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from qapframe.data.prompts import build_prompt
from qapframe.data.synthetic import SyntheticVQA
from research.toy.model import (
    IMAGE_ID,
    NUM_VISION_TOKENS,
    UNK_ID,
    build_model,
    build_processor,
    build_tokenizer,
)


def test_vocabulary_covers_every_synthetic_prompt_and_answer():
    tokenizer = build_tokenizer()
    for record in SyntheticVQA("test", size=300, seed=5):
        ids = tokenizer(build_prompt(record) + " " + record.answer)["input_ids"]
        assert UNK_ID not in ids
        assert ids[0] == tokenizer.bos_token_id and ids.count(IMAGE_ID) == 1
    decoded = tokenizer.decode(tokenizer("Top LEFT", add_special_tokens=False)["input_ids"])
    assert decoded == "top left"


def test_processor_expands_image_to_vision_token_count_and_reloads(tmp_path):
    processor = build_processor()
    model = build_model(len(processor.tokenizer), seed=0).eval()
    records = list(SyntheticVQA("test", size=3))
    inputs = processor(images=[r.image for r in records], text=[build_prompt(r) for r in records],
                       return_tensors="pt", padding=True)
    assert ((inputs["input_ids"] == IMAGE_ID).sum(dim=1) == NUM_VISION_TOKENS).all()
    # left padding: the last position of every row is real text
    assert (inputs["attention_mask"][:, -1] == 1).all() and (inputs["attention_mask"][:, 0] == 0).any()
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-2,
                                               vision_feature_select_strategy="default").pooler_output
        assert torch.stack(list(feats)).shape[1] == NUM_VISION_TOKENS
        logits = model(**inputs).logits
    model.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    reprocessor = AutoProcessor.from_pretrained(tmp_path)
    again = reprocessor(images=[r.image for r in records], text=[build_prompt(r) for r in records],
                        return_tensors="pt", padding=True)
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    with torch.no_grad():
        assert torch.equal(reloaded(**again).logits, logits)
    assert (tmp_path / "model.safetensors").is_file()


def test_config_follows_llava_1_5_layout():
    config = build_model(100, seed=0).config
    assert config.vision_feature_select_strategy == "default" and config.vision_feature_layer == -2
    assert config.vision_config.model_type == "clip_vision_model" and config.text_config.model_type == "llama"
    assert config.image_seq_length == NUM_VISION_TOKENS


def test_every_llm_matrix_starts_at_the_recipes_scale_and_nothing_else_is_redrawn():
    """The LLM's Linears, word embeddings and LM head start at `LLM_INIT_STD` (pad row zero); norms, projector
    and vision tower keep what ``seed`` gives them (LLaMA's own initialisation), and the draw is seeded."""
    from research.toy.model import LLM_INIT_STD, TEXT, build_config

    torch.manual_seed(3)
    plain = dict(LlavaForConditionalGeneration(build_config(100, TEXT["num_attention_heads"])).named_parameters())
    redrawn = dict(build_model(100, seed=3).named_parameters())
    matrices = [n for n, p in plain.items() if n == "lm_head.weight" or (n.startswith("model.language_model.")
                                                                       and p.dim() == 2)]
    assert len(matrices) == 1 + 4 * 7 + 1  # embeddings, 7 Linears per layer, LM head
    for name, weight in redrawn.items():
        if name in matrices:
            rows = weight[1:] if name.endswith("embed_tokens.weight") else weight
            assert abs(rows.std().item() - LLM_INIT_STD) < 0.005, name
        else:
            assert torch.equal(weight, plain[name]), name
    assert not redrawn["model.language_model.embed_tokens.weight"][0].any()
    again = dict(build_model(100, seed=3).named_parameters())
    assert all(torch.equal(again[n], redrawn[n]) for n in matrices)


def test_llm_heads_split_the_same_width_into_more_heads():
    """``llm_heads`` changes only how the LLM's width is split: same parameter shapes, heads of width / heads."""
    import pytest

    from research.toy.model import TEXT, build_config

    config = build_config(100, llm_heads=12).text_config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (12, 12, 16)
    assert config.hidden_size == TEXT["hidden_size"]
    plain = {n: p.shape for n, p in LlavaForConditionalGeneration(build_config(100, 4)).named_parameters()}
    assert {n: p.shape for n, p in build_model(100, seed=0).named_parameters()} == plain
    assert build_model(100, seed=0).config.text_config.num_attention_heads == TEXT["num_attention_heads"]
    with pytest.raises(ValueError, match="llm_heads: must divide the LLM width 192, got 5"):
        build_config(100, llm_heads=5)
