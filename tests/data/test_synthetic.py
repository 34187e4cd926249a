import collections

import numpy as np
import pytest

from qapframe.data.synthetic import (
    COLOURS,
    FORMS,
    POSITIONS,
    QUESTION_TYPES,
    SHAPES,
    SceneObject,
    SyntheticVQA,
    _ask,
    make_record,
    render_scene,
)
import random


def _pixels(record):
    return np.asarray(record.image)


def test_records_are_a_pure_function_of_seed_split_index():
    a = SyntheticVQA("test", size=20, seed=3)
    b = SyntheticVQA("test", size=20, seed=3)
    # Read in different orders: each record must not depend on what was read before.
    for i in reversed(range(20)):
        ra, rb = a[i], b[i]
        assert (ra.id, ra.question, ra.answer, ra.choices, ra.meta) == (rb.id, rb.question, rb.answer, rb.choices, rb.meta)
        assert np.array_equal(_pixels(ra), _pixels(rb))
    other_seed = SyntheticVQA("test", size=20, seed=4)
    assert sum(other_seed[i].meta["objects"] == a[i].meta["objects"] for i in range(20)) < 3


def test_splits_are_disjoint():
    keys = {}
    for split in ("train", "calibration", "test"):
        ds = SyntheticVQA(split, size=150, seed=0)
        keys[split] = {(r.question, _pixels(r).tobytes()) for r in ds}
        assert len({r.id for r in ds}) == 150
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["calibration"]
    assert not keys["calibration"] & keys["test"]


def test_default_sizes_and_bad_arguments():
    assert len(SyntheticVQA("calibration")) == 256 and len(SyntheticVQA("test")) == 1000
    with pytest.raises(ValueError, match="valid splits: train, calibration, test"):
        SyntheticVQA("val")
    with pytest.raises(IndexError):
        SyntheticVQA("test", size=3)[3]
    assert SyntheticVQA("test", size=3)[-1].id == SyntheticVQA("test", size=3)[2].id


def test_all_types_and_forms_appear_with_consistent_answers():
    records = list(SyntheticVQA("test", size=400, seed=0))
    counts = collections.Counter((r.meta["type"], r.meta["form"]) for r in records)
    assert set(counts) == {(t, f) for t in QUESTION_TYPES for f in FORMS}
    for r in records:
        objects = r.meta["objects"]
        assert 3 <= len(objects) <= 5 and len({o[2] for o in objects}) == len(objects)
        if r.meta["form"] == "multiple_choice":
            assert r.answer in r.choices and len(set(r.choices)) == len(r.choices) >= 2
        else:
            assert r.choices is None
        # Recompute every answer from the scene description, independently of the generator.
        q = r.question
        if r.meta["type"] == "colour":
            pos = q.split("at the ")[1].rstrip("?")
            assert r.answer == next(c for c, s, p in objects if p == pos)
        elif r.meta["type"] == "shape":
            pos = q.split("at the ")[1].rstrip("?")
            assert r.answer == next(s for c, s, p in objects if p == pos)
        elif r.meta["type"] == "position":
            colour, shape = q[len("Where is the "):-1].split()
            assert [p for c, s, p in objects if (c, s) == (colour, shape)] == [r.answer]
        elif r.meta["type"] == "count":
            word = q.split()[2]
            n = sum(word in (c, s + "s") for c, s, p in objects)
            assert r.answer == str(n)
        else:
            words = q.rstrip("?").split()
            a, b = words[3], words[6] if words[4] == "objects" else words[5]
            count = lambda v: sum(v in (c, s + "s") for c, s, p in objects)  # noqa: E731
            assert r.answer == ("yes" if count(a) > count(b) else "no")


def test_answers_are_balanced_enough_that_the_image_is_needed():
    records = list(SyntheticVQA("train", size=600, seed=0))
    by_type = collections.defaultdict(collections.Counter)
    for r in records:
        by_type[r.meta["type"]][r.answer] += 1
    for qtype, answers in by_type.items():
        top = answers.most_common(1)[0][1] / sum(answers.values())
        assert top < 0.6, (qtype, answers)  # no answer guessable from the question type alone


def test_same_question_different_images_different_answers():
    # The same template about the same cell: the answer follows the drawn scene.
    rng = random.Random(0)
    scenes = [
        [SceneObject("red", "circle", 0), SceneObject("blue", "square", 4), SceneObject("green", "triangle", 8)],
        [SceneObject("white", "triangle", 0), SceneObject("blue", "square", 4), SceneObject("green", "triangle", 8)],
    ]
    answers = []
    for scene in scenes:
        while True:
            q, a, _ = _ask(rng, scene, "colour")
            if q.endswith("top left?"):
                break
        answers.append(a)
    assert answers == ["red", "white"]
    images = [np.asarray(render_scene(s, random.Random(1))) for s in scenes]
    assert not np.array_equal(images[0], images[1])
    # The top-left cell of the first image holds red pixels, of the second white ones.
    tl = [img[:21, :21].reshape(-1, 3) for img in images]
    assert (tl[0] == COLOURS["red"]).all(axis=1).any() and (tl[1] == COLOURS["white"]).all(axis=1).any()


def test_objects_are_drawn_in_their_cells():
    scene = [SceneObject(c, s, cell) for (c, s), cell in zip(zip(COLOURS, SHAPES * 2), (0, 2, 4, 6, 8))]
    img = np.asarray(render_scene(scene, random.Random(0))).astype(int)
    for obj in scene:
        row, col = divmod(obj.cell, 3)
        cell = img[row * 21 : (row + 1) * 21, col * 21 : (col + 1) * 21].reshape(-1, 3)
        assert (cell == COLOURS[obj.colour]).all(axis=1).sum() > 20
    assert len(POSITIONS) == 9


def test_min_objects_draws_simpler_scenes_and_the_default_keeps_the_benchmark():
    from qapframe.data.synthetic import MAX_OBJECTS, MIN_OBJECTS

    for i in range(30):  # the default is the benchmark itself: same id, scene and question
        plain, default = make_record(0, "train", i), make_record(0, "train", i, min_objects=MIN_OBJECTS)
        assert (plain.id, plain.question, plain.meta) == (default.id, default.question, default.meta)
    sizes = collections.Counter(len(make_record(0, "train", i, min_objects=1).meta["objects"]) for i in range(300))
    assert set(sizes) == set(range(1, MAX_OBJECTS + 1))  # every size from one object up
    easy = make_record(0, "train", 5, min_objects=1)
    assert easy.id.endswith("-min1") and easy.id != make_record(0, "train", 5).id  # ids stay unique
    for bad in (0, MAX_OBJECTS + 1):
        with pytest.raises(ValueError, match=f"min_objects: must be in 1..{MAX_OBJECTS}, got {bad}"):
            make_record(0, "train", 0, min_objects=bad)
