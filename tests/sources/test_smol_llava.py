"""smol-llava: built from SmolLM2 plus a delta (projector, LoRA factors), a plain LLaVA afterwards."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from qapframe.data.prompts import build_prompt
from qapframe.data.synthetic import make_record
from qapframe.errors import QapframeError
from qapframe.sources import smol_llava


@pytest.fixture(scope="module")
def untrained(smollm2_dir):
    return smol_llava.build_untrained(smollm2_dir, seed=3)


def test_untrained_model_is_smollm2_behind_the_toy_tower(untrained, smollm2_dir):
    from transformers import AutoModelForCausalLM

    from qapframe.toy import load_toy

    model, processor = untrained
    llm = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    image_id = model.config.image_token_index
    assert image_id == llm.config.vocab_size == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied, as SmolLM2
    ids = torch.tensor([[1, 422, 1012, 314, 2]])
    with torch.no_grad():  # the text path is SmolLM2 itself
        torch.testing.assert_close(model(input_ids=ids).logits[..., :image_id], llm(input_ids=ids).logits, rtol=0, atol=0)
    toy, _ = load_toy()
    for (name, a), (_, b) in zip(model.model.vision_tower.state_dict().items(), toy.model.vision_tower.state_dict().items()):
        assert torch.equal(a, b), name
    assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_prompts_use_smollm2s_chat_template_and_expand_the_image(untrained):
    model, processor = untrained
    record = make_record(0, "test", 0)
    prompt = build_prompt(record, processor.tokenizer)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>user\n<image>\n{record.question}" in prompt
    inputs = processor(images=[record.image], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == model.config.image_seq_length == 64
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_delta_merges_lora_exactly_and_restores_the_projector(untrained, smollm2_dir, tmp_path, monkeypatch):
    """``W + s B A`` in the rebuilt Linear equals the LoRA forward ``W x + s B (A x)`` (float64 reference)."""
    model, _ = untrained
    generator = torch.Generator().manual_seed(0)
    name = "model.language_model.layers.3.mlp.down_proj"
    linear = dict(model.named_modules())[name]
    a = torch.randn(4, linear.in_features, generator=generator) * 0.05
    b = torch.randn(linear.out_features, 4, generator=generator) * 0.05
    projector = {k: torch.randn(v.shape, generator=generator) for k, v in model.model.multi_modal_projector.state_dict().items()}
    with torch.no_grad():
        model.model.multi_modal_projector.load_state_dict(projector)
    tensors = smol_llava.delta_tensors(model, {name: (a, b)})
    save_file(tensors, tmp_path / smol_llava.DELTA_FILE)
    (tmp_path / smol_llava.BUILD_FILE).write_text(json.dumps({"seed": 3, "lora_scale": 2.0}))
    out = tmp_path / "built"
    smol_llava.build(out, smollm2_dir, delta_dir=tmp_path)
    from transformers import LlavaForConditionalGeneration

    built = LlavaForConditionalGeneration.from_pretrained(out)
    x = torch.randn(5, linear.in_features, generator=generator, dtype=torch.float64)
    expected = x @ linear.weight.double().T + 2.0 * (x @ a.double().T) @ b.double().T
    got = x @ dict(built.named_modules())[name].weight.double().T
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for key, value in projector.items():
        assert torch.equal(built.model.multi_modal_projector.state_dict()[key], value)
    other = "model.language_model.layers.3.mlp.up_proj"
    assert torch.equal(dict(built.named_modules())[other].weight, dict(model.named_modules())[other].weight)
    from transformers import AutoProcessor

    # Saved, the processor carries SmolLM2's text template too; prompts still take the tokenizer's text form.
    reloaded = AutoProcessor.from_pretrained(out)
    record = make_record(0, "test", 1)
    assert build_prompt(record, reloaded) == build_prompt(record, untrained[1].tokenizer)


def test_source_without_a_shipped_delta_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(smol_llava, "DELTA_DIR", tmp_path)
    with pytest.raises(QapframeError, match=r"smol-llava.*not in this install.*research\.smol\.train"):
        smol_llava.smol_llava()


def test_delta_naming_a_non_linear_is_refused(untrained):
    model, _ = untrained
    tensors = smol_llava.delta_tensors(model, {"model.language_model.norm": (torch.zeros(1, 2), torch.zeros(2, 1))})
    with pytest.raises(QapframeError, match="no Linear"):
        smol_llava.apply_delta(model, tensors, 1.0)


def test_the_shipped_delta_rebuilds_the_trained_model(smollm2_dir):
    """What ships answers as the trained model did: the first test questions' greedy answers that training
    recorded in build.json (answered in one batch of 16, as there)."""
    from safetensors.torch import load_file

    from qapframe.data.synthetic import SyntheticVQA
    from qapframe.eval.evaluation import answer_records

    settings = json.loads((smol_llava.DELTA_DIR / smol_llava.BUILD_FILE).read_text())
    assert settings["lora_scale"] == settings["lora_alpha"] / settings["lora_rank"]
    tensors = load_file(smol_llava.DELTA_DIR / smol_llava.DELTA_FILE)
    model, processor = smol_llava.build_untrained(smollm2_dir, seed=settings["seed"])
    lora = {k for k in tensors if k.startswith(smol_llava.LORA_PREFIX)}
    assert len(lora) == 2 * 30 * len(settings["lora_modules"])  # A and B for every target Linear of 30 layers
    smol_llava.apply_delta(model, tensors, settings["lora_scale"])
    records = list(SyntheticVQA("test", size=16, seed=settings["args"]["data_seed"]))
    answers = answer_records(model, processor, records, batch_size=16, max_new_tokens=6)
    got = [f"{r.question} -> {p!r} ({r.answer})" for r, p in zip(records[:3], answers[:3])]
    assert got == settings["examples"]
