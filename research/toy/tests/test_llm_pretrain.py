"""Stage 0c of the toy's training: the LLM learns the questions on ideal nine-token scenes of stage 0b's codes."""

import dataclasses
import json
import random

import torch

from qapframe.data.synthetic import COLOURS, POSITIONS, SHAPES, make_record
from research.toy.llm_pretrain import RECORD_OFFSET, code_scenes, pretrain_llm
from research.toy.model import build_model, build_processor
from research.toy.projector_pretrain import symbolic_codes
from research.toy.train import RECIPE, conversation_loss, main


def test_a_code_scene_is_one_token_a_cell_summing_its_place_colour_and_shape_codes():
    codes = symbolic_codes(16, seed=0)
    records = [make_record(0, "train", i) for i in range(3)]
    scenes = code_scenes(records, codes)
    assert scenes.shape == (3, len(POSITIONS), 16)
    for record, scene in zip(records, scenes):  # reference: walk the scene's objects
        occupant = {POSITIONS.index(p): (c, s) for c, s, p in record.meta["objects"]}
        for cell in range(len(POSITIONS)):
            colour, shape = occupant.get(cell, (None, None))
            expected = (codes["place"][cell] + codes["colour"][0 if colour is None else 1 + list(COLOURS).index(colour)]
                        + codes["shape"][0 if shape is None else 1 + SHAPES.index(shape)])
            torch.testing.assert_close(scene[cell], expected)


def _question_loss(model, tokenizer, records, codes, args) -> float:
    """Stage 1's loss on ``records`` seen as code scenes, questions only (an independent evaluation)."""
    with torch.no_grad():
        return conversation_loss(model, tokenizer, records, code_scenes(records, codes), random.Random(0), args).item()


def test_pretraining_changes_only_the_llm_and_lowers_its_loss_on_held_out_code_scenes():
    processor = build_processor()
    model = build_model(len(processor.tokenizer), seed=0)
    args = dataclasses.replace(RECIPE, caption_prob=0.0, drop_prob=0.0, prompt_loss_weight=1.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    codes = symbolic_codes(model.config.text_config.hidden_size, seed=0)
    held_out = [make_record(0, "train", RECORD_OFFSET - 1 - i) for i in range(16)]  # never a stage-0c record
    loss_before = _question_loss(model, processor.tokenizer, held_out, codes, args)
    rng = random.Random(0)
    stats = pretrain_llm(model, steps=40, batch_size=8, lr=3e-3, warmup=5, weight_decay=0.0, data_seed=0, seed=0,
                         loss_fn=lambda records, scenes: conversation_loss(model, processor.tokenizer, records,
                                                                           scenes, rng, args),
                         log_every=40)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if name.startswith(("model.language_model.", "lm_head."))}
    assert _question_loss(model, processor.tokenizer, held_out, codes, args) < 0.6 * loss_before
    assert stats["llm_pretrain_loss"] > 0 and stats["llm_pretrain_seconds"] >= 0


def test_a_run_with_stage_0c_records_it_and_is_reproducible(tmp_path):
    tiny = ["--vision-steps", "1", "--vision-batch-size", "2", "--projector-steps", "2", "--llm-pretrain-steps", "3",
            "--eval-every", "0", "--final-eval-size", "2", "--batch-size", "2", "--steps", "1", "--threads", "1"]
    first = main(["--out", str(tmp_path / "a"), *tiny])
    second = main(["--out", str(tmp_path / "b"), *tiny])
    assert first["args"]["llm_pretrain_steps"] == 3 and first["llm_pretrain_loss"] == second["llm_pretrain_loss"]
    saved = json.loads((tmp_path / "a" / "training_summary.json").read_text())
    assert saved["llm_pretrain_loss"] == first["llm_pretrain_loss"]
