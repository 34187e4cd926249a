"""The toy's training script: its defaults are the shipped recipe, and its batches are laid out as the model is
later prompted."""

import dataclasses
import itertools
import json
import random

import pytest
import torch

from qapframe.data.synthetic import POSITIONS, make_record
from qapframe.toy import TOY_PATH
from research.toy.model import CAPTION_PROMPT, EOS_ID, LLM_INIT_STD, TEXT, UNK_ID, build_model, build_processor, build_tokenizer
from research.toy.train import RECIPE, batch_loss, caption, parse_args, training_records

# Options of the training script at the time of the shipped run that belonged to recipes not shipped, at the
# values the shipped run had; the script no longer has them (docs/toy.md records what each tried).
RETIRED_OPTIONS = {
    "init_from": None, "embed_std": None, "vision_patch_labels": True, "vision_scene_counts": False,
    "vision_shared_counts": False, "projector_centre_only": False, "freeze_projector": False, "questions_per_image": 1,
    "question_weights": "", "min_objects": 3, "easy_until": None,
}


def test_defaults_are_the_recipe_that_made_the_shipped_toy_within_45_minutes():
    """``python -m research.toy.train --out DIR`` with no other flag is the recipe of ``qapframe/toy/weights``."""
    summary = json.loads((TOY_PATH / "training_summary.json").read_text())
    shipped = dict(summary["args"])
    defaults = {**vars(parse_args(["--out", shipped["out"]])), **dataclasses.asdict(RECIPE),
                "llm_init_std": LLM_INIT_STD, "llm_heads": TEXT["num_attention_heads"], **RETIRED_OPTIONS}
    assert defaults == shipped
    assert summary["threads"] == 2 and summary["train_seconds"] < 45 * 60
    assert summary["eval_records"] == 1000 and summary["test_accuracy"] >= 0.9  # the toy's target, as measured


def test_stage_one_reads_the_benchmarks_own_train_stream():
    assert [r.id for r in itertools.islice(training_records(0), 40)] == [make_record(0, "train", i).id for i in range(40)]


@pytest.mark.parametrize("flags, expected", [
    (["--steps", "-1"], "--steps: must be a number of steps >= 0, got -1"),
    (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["--llm-pretrain-steps", "10", "--projector-steps", "0"], "--llm-pretrain-steps: needs --projector-steps > 0"),
])
def test_bad_flags_are_refused_naming_the_flag(capsys, flags, expected):
    with pytest.raises(SystemExit):
        parse_args(["--out", "unused", *flags])
    assert expected in capsys.readouterr().err


def test_the_retired_recipes_flags_are_gone(capsys):
    for flag in ("--init-from", "--embed-std", "--question-weights", "--vision-scene-counts", "--min-objects"):
        with pytest.raises(SystemExit):
            parse_args(["--out", "unused", flag, "1"])
        assert "unrecognized arguments" in capsys.readouterr().err


def test_caption_lists_every_object_in_reading_order_with_known_words():
    tokenizer = build_tokenizer()
    for index in range(50):
        record = make_record(0, "train", index)
        text = caption(record)
        parts = [p.strip() for p in text.split(".") if p.strip()]
        objects = record.meta["objects"]
        assert len(parts) == len(objects)
        cells = [POSITIONS.index(" ".join(p.split()[2:])) for p in parts]
        assert cells == sorted(cells)
        assert {tuple(p.split()[:2]) for p in parts} == {(c, s) for c, s, _ in objects}
        ids = tokenizer(CAPTION_PROMPT + " " + text)["input_ids"]
        assert UNK_ID not in ids


def test_batch_loss_is_the_answer_token_cross_entropy():
    """With no captions and no dropping, the loss equals cross-entropy of answer + </s> through the processor path."""
    torch.manual_seed(0)
    processor = build_processor()
    model = build_model(len(processor.tokenizer), seed=0).eval()
    record = make_record(0, "train", 7)
    recipe = dataclasses.replace(RECIPE, caption_prob=0.0, drop_prob=0.0, prompt_loss_weight=0.0)
    with torch.no_grad():
        loss = batch_loss(model, processor, [record], random.Random(0), recipe)
        from qapframe.data.prompts import build_prompt

        inputs = processor(images=[record.image], text=[build_prompt(record)], return_tensors="pt")
        target = processor.tokenizer(" " + record.answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
        ids = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
        t = len(target)
        expected = torch.nn.functional.cross_entropy(logits[-t - 1 : -1], torch.tensor(target))
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_prompt_loss_adds_the_weighted_cross_entropy_of_the_question_text():
    """Weight w: answer-token CE plus w times the mean CE over the prompt tokens after the image, as computed
    through the processor path; weight 0 is the answer loss alone."""
    from qapframe.data.prompts import build_prompt

    torch.manual_seed(0)
    processor = build_processor()
    model = build_model(len(processor.tokenizer), seed=0).eval()
    record = make_record(0, "train", 7)
    questions = dataclasses.replace(RECIPE, caption_prob=0.0, drop_prob=0.0)
    with torch.no_grad():
        answer_only = batch_loss(model, processor, [record], random.Random(0),
                                 dataclasses.replace(questions, prompt_loss_weight=0.0))
        weighted = batch_loss(model, processor, [record], random.Random(0),
                              dataclasses.replace(questions, prompt_loss_weight=0.5))
        inputs = processor(images=[record.image], text=[build_prompt(record)], return_tensors="pt")
        target = processor.tokenizer(" " + record.answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
        ids = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)[0]
        logits = model(input_ids=ids[None], pixel_values=inputs["pixel_values"]).logits[0]
    image_positions = (ids == processor.tokenizer.convert_tokens_to_ids("<image>")).nonzero().flatten()
    first_text, first_answer = image_positions[-1].item() + 1, len(ids) - len(target)
    assert first_answer - first_text > 5  # the question and its hints
    ce = torch.nn.functional.cross_entropy
    expected_answer = ce(logits[first_answer - 1 : -1], ids[first_answer:])
    expected_prompt = ce(logits[first_text - 1 : first_answer - 1], ids[first_text:first_answer])
    torch.testing.assert_close(answer_only, expected_answer, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weighted, expected_answer + 0.5 * expected_prompt, rtol=1e-4, atol=1e-5)
