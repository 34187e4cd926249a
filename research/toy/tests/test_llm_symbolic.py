"""research/toy/llm_symbolic.py: the ideal scene tokens say exactly what the scene holds, the loss sees
the answer (and, when asked, the question text), and a run is a pure function of its seed."""

import pytest
import torch

from qapframe.data.synthetic import COLOURS, POSITIONS, SHAPES, QUESTION_TYPES, make_record
from research.toy.sequences import split_at_image
from research.toy.model import EOS_ID, build_config, build_tokenizer

import research.toy.llm_symbolic as symbolic
from research.toy.vision_pretrain import cell_labels, patch_cells


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
        logits, labels, prompt_labels = symbolic.batch_logits(llm, scene, tokenizer, records)
    assert logits.shape[:2] == labels.shape == prompt_labels.shape
    for record, row, prompt_row in zip(records, labels, prompt_labels):
        answer = row[row != -100].tolist()
        assert answer[-1] == EOS_ID and tokenizer.decode(answer[:-1]).strip() == record.answer.lower()
        # the prompt labels are the prompt's text after the image slot, and they end where the answer starts
        _, after = split_at_image(tokenizer, symbolic.scene_prompt(record))
        assert prompt_row[prompt_row != -100].tolist() == after
        last_prompt = (prompt_row != -100).nonzero().max().item()
        assert (row != -100).nonzero().min().item() == last_prompt + 1


def test_prompt_loss_weight_changes_the_training_and_a_negative_weight_is_refused():
    (plain,) = symbolic.train_symbolic(0.072, steps=2, eval_every=2, test_size=10)
    (weighted,) = symbolic.train_symbolic(0.072, steps=2, eval_every=2, test_size=10, prompt_loss_weight=1.0)
    assert plain["prompt_loss_weight"] == 0.0 and weighted["prompt_loss_weight"] == 1.0
    assert weighted["loss"] > plain["loss"]  # the question text adds its own (positive) cross-entropy
    with pytest.raises(ValueError, match="--prompt-loss-weight: must be a number >= 0, got -1"):
        symbolic.train_symbolic(0.072, steps=1, eval_every=1, test_size=10, prompt_loss_weight=-1)


def test_frozen_scene_keeps_its_initial_codes_while_the_llm_learns(monkeypatch):
    built = []

    class Recorded(symbolic.SymbolicScene):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.initial = {name: p.detach().clone() for name, p in self.named_parameters()}
            built.append(self)

    monkeypatch.setattr(symbolic, "SymbolicScene", Recorded)
    (frozen,) = symbolic.train_symbolic(0.072, steps=2, eval_every=2, test_size=10, frozen_scene=True)
    (learned,) = symbolic.train_symbolic(0.072, steps=2, eval_every=2, test_size=10)
    assert frozen["frozen_scene"] and not learned["frozen_scene"]
    assert all(torch.equal(p, built[0].initial[name]) for name, p in built[0].named_parameters())
    assert all(not torch.equal(p, built[1].initial[name]) for name, p in built[1].named_parameters())


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
    cell_shared_counts = symbolic.cell_shared_counts
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
    drawn = []
    real = symbolic.make_record

    def counting(seed, split, index, *args):
        if split == "train":
            drawn.append(index)
        return real(seed, split, index, *args)

    monkeypatch.setattr(symbolic, "make_record", counting)  # the toy's training stream
    (row,) = symbolic.train_symbolic(0.072, steps=3, eval_every=3, test_size=10, batch_size=5)
    assert drawn == list(range(15)) and row["batch_size"] == 5  # 3 steps x 5 questions, in stream order
    with pytest.raises(ValueError, match="--batch-size: must be >= 1, got 0"):
        symbolic.train_symbolic(0.072, steps=1, eval_every=1, test_size=10, batch_size=0)


def test_patch_layouts_repeat_each_cells_token_over_its_patches():
    from research.toy.model import NUM_VISION_TOKENS

    torch.manual_seed(0)
    cells = symbolic.SymbolicScene(16)
    record = make_record(0, "test", 3)
    per_cell = cells(record)
    assert per_cell.shape == (len(POSITIONS), 16)
    for side, layout in [(8, patch_cells()), (6, torch.arange(9).view(3, 3).repeat_interleave(2, 0)
                                               .repeat_interleave(2, 1).flatten())]:
        torch.manual_seed(0)
        per_patch = symbolic.SymbolicScene(16, patches_per_side=side)(record)
        assert per_patch.shape == (side * side, 16)
        assert torch.equal(per_patch, per_cell[layout])
    assert symbolic.SymbolicScene(16, patches_per_side=8)(record).shape[0] == NUM_VISION_TOKENS
    with pytest.raises(ValueError, match="--patches-per-side: must be >= 3"):
        symbolic.SymbolicScene(16, patches_per_side=2)
    (row,) = symbolic.train_symbolic(0.072, steps=1, eval_every=1, test_size=10, patches_per_side=6)
    assert row["patches_per_side"] == 6


def test_centre_only_layout_puts_each_object_on_its_cells_centre_patch_alone():
    cell_centre_patches = symbolic.cell_centre_patches
    record = make_record(0, "test", 3)
    torch.manual_seed(0)
    scene = symbolic.SymbolicScene(16, patches_per_side=8, centre_only=True)
    tokens, cells, centres = scene(record), patch_cells(), cell_centre_patches()
    per_cell = scene.place.weight + scene.colour(scene.labels(record)[0]) + scene.shape(scene.labels(record)[1])
    empty = scene.place.weight + scene.colour.weight[0] + scene.shape.weight[0]  # place and "empty"
    for patch, cell in enumerate(cells.tolist()):
        expected = per_cell[cell] if patch == centres[cell].item() else empty[cell]
        torch.testing.assert_close(tokens[patch], expected)
    (row,) = symbolic.train_symbolic(0.072, steps=1, eval_every=1, test_size=10, patches_per_side=8, centre_only=True)
    assert row["centre_only"]


def test_position_answers_class_every_short_answer_position_question():
    from transformers import LlamaForCausalLM

    from qapframe.data.base import VQARecord

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    llm = LlamaForCausalLM(build_config(len(tokenizer)).text_config).eval()
    scene = symbolic.SymbolicScene(llm.config.hidden_size)
    records = [make_record(0, "test", i) for i in range(80)]
    asked = [r for r in records if r.meta["type"] == "position" and not r.choices]
    kinds = symbolic.position_answers(llm, scene, tokenizer, records)
    assert asked and sum(kinds.values()) == len(asked) and set(kinds) == set(symbolic.ANSWER_KINDS)

    objects = [("red", "circle", "top left"), ("red", "square", "center"), ("blue", "circle", "bottom"),
               ("green", "triangle", "right")]
    record = VQARecord(id="x", image=None, question="Where is the red circle?", answer="top left", choices=None,
                       meta={"type": "position", "form": "short_answer", "objects": objects})
    expected = {"top left": "correct", "center": "same colour", "bottom": "same shape", "right": "other object",
                "left": "empty cell"}
    assert {place: symbolic.position_answer_kind(record, place) for place in expected} == expected


def test_nine_token_phase_trains_one_token_a_cell_on_the_shared_tables_then_the_asked_layout(monkeypatch):
    seen = []
    real = symbolic.batch_logits

    def recording(llm, scene, tokenizer, records, question_first=False):
        seen.append((torch.is_grad_enabled(), scene(records[0]).shape[0]))
        return real(llm, scene, tokenizer, records, question_first)

    monkeypatch.setattr(symbolic, "batch_logits", recording)
    rows = symbolic.train_symbolic(0.072, steps=2, eval_every=2, test_size=4, patches_per_side=8,
                                   nine_token_steps=3, position_test=0)
    training = [tokens for grad, tokens in seen if grad]
    assert training == [9, 9, 9, 64, 64]  # three steps on nine tokens, then two on the 64 patches
    assert {tokens for grad, tokens in seen if not grad} == {64}  # every evaluation reads the asked layout
    assert [(r["step"], r["trained_on"]) for r in rows] == [
        (2, "nine tokens"), (3, "nine tokens"), (4, "layout"), (5, "layout")]  # every 2 steps and at each phase's end
    assert all(r["nine_token_steps"] == 3 for r in rows)


def test_each_cells_centre_patch_is_the_patch_nearest_its_centre():
    from research.toy.model import NUM_VISION_TOKENS

    cell_centre_patches, off_centre_patches = symbolic.cell_centre_patches, symbolic.off_centre_patches

    assert cell_centre_patches(48, 16).tolist() == list(range(9))  # one patch a cell
    # 64 px in 8-px patches: cell centres at 10.7, 32 and 53.3 px; nearest patch columns 1, 3 (tie 3/4: first), 6
    assert cell_centre_patches(64, 8).tolist() == [r * 8 + c for r in (1, 3, 6) for c in (1, 3, 6)]
    centres = cell_centre_patches()
    assert patch_cells()[centres].tolist() == list(range(9))  # each lies in its own cell
    off_centre = off_centre_patches()
    assert off_centre.sum().item() == NUM_VISION_TOKENS - 9 and not off_centre[centres].any()


def test_shared_counts_are_the_objects_sharing_each_occupied_cells_colour_and_shape():
    records = [make_record(0, "train", i) for i in range(30)]
    same_colour, same_shape = symbolic.cell_shared_counts(records)
    colour, shape = cell_labels(records)
    for i in range(len(records)):
        for cell in range(len(POSITIONS)):
            if colour[i, cell] == 0:  # empty: nothing shares it
                assert same_colour[i, cell] == same_shape[i, cell] == 0
            else:  # counted from the label grid, an independent route to the same numbers
                assert same_colour[i, cell] == (colour[i] == colour[i, cell]).sum()
                assert same_shape[i, cell] == (shape[i] == shape[i, cell]).sum()


def test_equal_question_weights_keep_the_benchmarks_own_record_stream():
    import itertools

    question_type_weights, training_records = symbolic.question_type_weights, symbolic.training_records

    stream = training_records(0, question_type_weights(""), seed=0)
    assert [r.id for r in itertools.islice(stream, 40)] == [make_record(0, "train", i).id for i in range(40)]


def test_curriculum_draws_easy_scenes_for_the_first_records_only():
    import itertools

    question_type_weights, training_records = symbolic.question_type_weights, symbolic.training_records

    stream = training_records(0, question_type_weights(""), seed=0, min_objects=1, easy_records=200)
    records = list(itertools.islice(stream, 240))
    assert [r.id for r in records[:200]] == [make_record(0, "train", i, min_objects=1).id for i in range(200)]
    assert [r.id for r in records[200:]] == [make_record(0, "train", i).id for i in range(200, 240)]
    assert min(len(r.meta["objects"]) for r in records[:200]) == 1
    assert min(len(r.meta["objects"]) for r in records[200:]) == 3
    whole_run = training_records(0, question_type_weights(""), seed=0, min_objects=1)  # no end: every record
    assert all(r.id.endswith("-min1") for r in itertools.islice(whole_run, 50))
    # with question weights the curriculum still covers the first easy_records records *kept*
    weighted = training_records(0, question_type_weights("colour=0.1"), seed=0, min_objects=1, easy_records=30)
    kept = list(itertools.islice(weighted, 40))
    assert [r.id.endswith("-min1") for r in kept] == [True] * 30 + [False] * 10


def test_question_weights_set_the_training_mix_of_question_types():
    import collections
    import itertools

    from qapframe.data.synthetic import QUESTION_TYPES
    question_type_weights, training_records = symbolic.question_type_weights, symbolic.training_records

    def mix(text):
        records = list(itertools.islice(training_records(0, question_type_weights(text), seed=0), 1500))
        counts = collections.Counter(r.meta["type"] for r in records)
        return {t: counts[t] / len(records) for t in QUESTION_TYPES}

    own, reweighted = mix(""), mix("colour=0.5,shape=0.5")
    # expected share of type t: own[t] * w[t] / sum_u own[u] * w[u]
    norm = sum(own[t] * (0.5 if t in ("colour", "shape") else 1.0) for t in QUESTION_TYPES)
    for t in QUESTION_TYPES:
        expected = own[t] * (0.5 if t in ("colour", "shape") else 1.0) / norm
        assert abs(reweighted[t] - expected) < 0.035, (t, reweighted[t], expected)
    assert mix("count=0")["count"] == 0.0
    # seeded: the same arguments give the same stream
    first = [r.id for r in itertools.islice(training_records(0, question_type_weights("count=0.3"), seed=1), 30)]
    again = [r.id for r in itertools.islice(training_records(0, question_type_weights("count=0.3"), seed=1), 30)]
    assert first == again


def test_bad_question_weights_are_refused_naming_the_valid_types():
    for bad, expected in [("size=2", "colour, shape, position, count, comparison"), ("count=x", "count: weight must be"),
                          ("count=-1", "count: weight must be"),
                          ("colour=0,shape=0,position=0,count=0,comparison=0", "at least one")]:
        with pytest.raises(ValueError, match=expected):
            symbolic.question_type_weights(bad)
