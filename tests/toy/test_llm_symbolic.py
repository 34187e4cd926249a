"""benchmarks/toy_llm_symbolic.py: the ideal scene tokens say exactly what the scene holds, the loss sees
only the answer, and a run is a pure function of its seed."""

import importlib.util
from pathlib import Path

import pytest
import torch

from qapframe.data.synthetic import COLOURS, POSITIONS, SHAPES, QUESTION_TYPES, make_record
from qapframe.toy.model import EOS_ID, build_config, build_tokenizer

_SPEC = importlib.util.spec_from_file_location(
    "toy_llm_symbolic", Path(__file__).resolve().parents[2] / "benchmarks" / "toy_llm_symbolic.py"
)
symbolic = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(symbolic)


def test_scene_tokens_are_place_plus_colour_plus_shape_of_each_cell():
    scene = symbolic.SymbolicScene(8)
    record = make_record(0, "test", 3)
    tokens = scene(record)
    occupied = {POSITIONS.index(p): (c, s) for c, s, p in record.meta["objects"]}
    for cell in range(len(POSITIONS)):
        colour, shape = occupied.get(cell, (None, None))
        expected = scene.place.weight[cell] + scene.colour.weight[0 if colour is None else 1 + list(COLOURS).index(colour)] \
            + scene.shape.weight[0 if shape is None else 1 + SHAPES.index(shape)]
        torch.testing.assert_close(tokens[cell], expected, rtol=0, atol=0)
    assert len(occupied) == len(record.meta["objects"]) and sum(1 for c in range(9) if c not in occupied) >= 4


def test_labels_are_the_answer_tokens_and_eos_after_the_scene_in_the_image_slot():
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    llm = LlamaForCausalLM(build_config(len(tokenizer)).text_config).eval()
    scene = symbolic.SymbolicScene(llm.config.hidden_size)
    records = [make_record(0, "test", i) for i in range(6)]
    with torch.no_grad():
        logits, labels = symbolic.batch_logits(llm, scene, tokenizer, records)
    assert logits.shape[:2] == labels.shape
    for record, row in zip(records, labels):
        answer = row[row != -100].tolist()
        assert answer[-1] == EOS_ID and tokenizer.decode(answer[:-1]).strip() == record.answer.lower()


def test_training_run_is_seeded_and_reports_every_question_type():
    first = symbolic.train_symbolic(0.072, steps=2, eval_every=2, test_size=30)
    second = symbolic.train_symbolic(0.072, steps=2, eval_every=2, test_size=30)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in first] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in second]
    (row,) = first
    assert row["step"] == 2 and row["init_std"] == 0.072 and set(QUESTION_TYPES) <= set(row)
    assert 0 <= row["all"] <= 1


def test_heads_and_learning_rate_are_applied_and_a_bad_head_count_is_refused():
    (row,) = symbolic.train_symbolic(0.072, steps=1, eval_every=1, test_size=10, lr=3e-3, heads=12)
    assert row["heads"] == 12 and row["lr"] == 3e-3
    with pytest.raises(ValueError, match="--heads: must divide the LLM width 192"):
        symbolic.train_symbolic(0.072, steps=1, eval_every=1, test_size=10, heads=5)


def test_question_first_moves_only_the_image_after_the_question():
    from qapframe.data.prompts import build_prompt

    tokenizer = build_tokenizer()
    for record in (make_record(0, "test", i) for i in range(10)):
        moved = symbolic.scene_prompt(record, question_first=True)
        assert symbolic.scene_prompt(record) == build_prompt(record)
        assert moved.startswith("USER: " + record.question) and moved.endswith("\n<image>\nASSISTANT:")
        # the same words, one image placeholder, in another order
        assert sorted(moved.split()) == sorted(build_prompt(record).split()) and moved.count("<image>") == 1
        before, after = symbolic.split_at_image(tokenizer, moved)
        assert tokenizer.decode(after).split() == ["assistant", ":"]  # the tokenizer lower-cases
    (row,) = symbolic.train_symbolic(0.072, steps=1, eval_every=1, test_size=10, question_first=True)
    assert row["question_first"] is True


def test_shared_count_tokens_add_the_counts_sharing_each_cells_colour_and_shape():
    from qapframe.toy.vision_pretrain import cell_shared_counts

    torch.manual_seed(0)
    plain = symbolic.SymbolicScene(8)
    torch.manual_seed(0)
    scene = symbolic.SymbolicScene(8, shared_counts=True)
    torch.testing.assert_close(scene.place.weight, plain.place.weight, rtol=0, atol=0)  # same draws up to there
    record = make_record(0, "test", 5)
    same_colour, same_shape = cell_shared_counts([record])
    tokens = scene(record)
    for cell in range(len(POSITIONS)):
        expected = plain(record)[cell] + scene.same_colour.weight[same_colour[0, cell]] \
            + scene.same_shape.weight[same_shape[0, cell]]
        torch.testing.assert_close(tokens[cell], expected, rtol=0, atol=0)
    (row,) = symbolic.train_symbolic(0.072, steps=1, eval_every=1, test_size=10, shared_counts=True)
    assert row["shared_counts"] is True


def test_easy_scene_curriculum_changes_only_the_steps_it_covers():
    def run(**curriculum):
        (row,) = symbolic.train_symbolic(0.072, steps=2, eval_every=2, test_size=10, **curriculum)
        return {k: v for k, v in row.items() if k not in ("seconds", "min_objects", "easy_until")}

    plain = run()
    assert run(min_objects=1, easy_until=0) == plain  # a curriculum that ends before step 1 is the plain run
    easy = symbolic.train_symbolic(0.072, steps=2, eval_every=2, test_size=10, min_objects=1)[0]
    assert easy["min_objects"] == 1 and easy["easy_until"] is None
    assert easy["loss"] != plain["loss"]  # trained on other (simpler) scenes


def test_batch_size_sets_the_questions_each_step_draws(monkeypatch):
    import qapframe.toy.train as train

    drawn = []
    real = train.make_record

    def counting(seed, split, index, *args):
        if split == "train":
            drawn.append(index)
        return real(seed, split, index, *args)

    monkeypatch.setattr(train, "make_record", counting)  # the toy's training stream, shared
    (row,) = symbolic.train_symbolic(0.072, steps=3, eval_every=3, test_size=10, batch_size=5)
    assert drawn == list(range(15)) and row["batch_size"] == 5  # 3 steps x 5 questions, in stream order
    with pytest.raises(ValueError, match="--batch-size: must be >= 1, got 0"):
        symbolic.train_symbolic(0.072, steps=1, eval_every=1, test_size=10, batch_size=0)
