import json

import numpy as np
import pytest
from PIL import Image

from qapframe.data import JsonlFormatError, JsonlVQA, SyntheticVQA, load_dataset, write_jsonl


def test_round_trip_through_jsonl(tmp_path):
    source = list(SyntheticVQA("calibration", size=12, seed=1))
    path = write_jsonl(source, tmp_path / "set.jsonl")
    loaded = JsonlVQA(path)
    assert len(loaded) == 12
    for a, b in zip(source, loaded):
        assert (a.id, a.question, a.answer, a.choices) == (b.id, b.question, b.answer, b.choices)
        assert b.meta["type"] == a.meta["type"] and b.meta["form"] == a.meta["form"]
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))  # PNG is lossless


def _write(tmp_path, lines, image=True):
    if image:
        Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "img.png")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


GOOD = {"id": "q1", "image": "img.png", "question": "What colour?", "answer": "red"}


def test_image_root_choices_index_and_extra_keys(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("L", (8, 8), 7).save(root / "img.png")
    path = tmp_path / "data.jsonl"
    line = {"id": "q1", "image": "img.png", "question": "Q?", "answer": 1, "choices": ["x", "y"], "subject": "bio"}
    path.write_text(json.dumps(line) + "\n\n")  # blank lines are skipped
    ds = JsonlVQA(path, image_root=root)
    record = ds[0]
    assert len(ds) == 1 and record.answer == "y" and record.choices == ["x", "y"]
    assert record.meta == {"subject": "bio"} and record.image.mode == "RGB"


@pytest.mark.parametrize(
    "line, field, message",
    [
        ({k: v for k, v in GOOD.items() if k != "answer"}, "answer", "missing"),
        ({**GOOD, "question": ""}, "question", "non-empty string"),
        ({**GOOD, "image": "nope.png"}, "image", "no such file"),
        ({**GOOD, "choices": ["red"]}, "choices", "at least 2 strings"),
        ({**GOOD, "choices": ["blue", "green"]}, "answer", "not one of the choices"),
        ({**GOOD, "answer": 5, "choices": ["red", "blue"]}, "answer", "index 5"),
        ({**GOOD, "answer": 5}, "answer", "there are no choices"),
        ({**GOOD, "answer": ["red"]}, "answer", "string or a choice index"),
        ("{not json", None, "not valid JSON"),
        ("[1, 2]", None, "expected a JSON object"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, line, field, message):
    path = _write(tmp_path, [GOOD, line])
    with pytest.raises(JsonlFormatError, match=message) as info:
        JsonlVQA(path)
    assert str(info.value).startswith(f"{path}:2")
    assert info.value.line == 2 and info.value.field == field
    if field:
        assert f"field {field!r}" in str(info.value)


def test_duplicate_ids_and_missing_files(tmp_path):
    path = _write(tmp_path, [GOOD, GOOD])
    with pytest.raises(JsonlFormatError, match="duplicate id 'q1' \\(first on line 1\\)"):
        JsonlVQA(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        JsonlVQA(tmp_path / "missing.jsonl")


def test_load_dataset(tmp_path):
    synthetic = load_dataset("synthetic", "test", num_samples=5, seed=2)
    assert len(synthetic) == 5 and synthetic[0].id == SyntheticVQA("test", seed=2)[0].id
    source = list(SyntheticVQA("test", size=6))
    write_jsonl(source, tmp_path / "test.jsonl")
    by_file = load_dataset(str(tmp_path / "test.jsonl"), num_samples=4)
    by_folder = load_dataset(str(tmp_path), split="test")
    assert len(by_file) == 4 and len(by_folder) == 6
    assert [r.id for r in by_file] == [r.id for r in source[:4]]
    with pytest.raises(IndexError):
        by_file[4]
    with pytest.raises(ValueError, match="use 'synthetic', a .jsonl file"):
        load_dataset("gqa")
