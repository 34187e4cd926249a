"""The `hf` loader (and its `scienceqa` preset) on a tiny ScienceQA saved with `datasets`."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from qapframe.data import load_dataset
from qapframe.data.synthetic import blank_image
from tests.data.fixtures.scienceqa import SCIENCEQA_COLUMNS, features, scienceqa_rows

datasets = pytest.importorskip("datasets", reason="the hf dataset loader's tests need `pip install qapframe[hf]`")


def hf(path, **options) -> dict:
    return {"name": "hf", "path": str(path), "columns": SCIENCEQA_COLUMNS, **options}


def test_scienceqa_mapping_gives_multiple_choice_records_without_the_image_less_rows(scienceqa_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="qapframe.data"):
        records = list(load_dataset(hf(scienceqa_dir), "test"))
    rows = scienceqa_rows()["test"]
    assert [r.id for r in records] == ["test-0", "test-2", "test-4", "test-5"]
    for record, row in zip(records, [rows[i] for i in (0, 2, 4, 5)]):
        assert record.choices == row["choices"] and record.answer == row["choices"][row["answer"]]
        assert record.meta["type"] == row["subject"] and record.meta["grade"] == row["grade"]
        # every column the mapping leaves unused; the image, the hint (context) and subject (type) are used
        assert set(record.meta) == {"type", "task", "grade", "topic", "category", "skill", "lecture", "solution"}
        assert record.image.mode == "RGB" and record.image.size == row["image"].size
    assert records[0].question == "Which colour is this square?"  # an empty hint adds nothing
    assert records[1].question == "Context: The map shows a forest.\nWhat does the map show?"
    assert records[1].answer == "a forest"
    assert np.asarray(records[0].image)[0, 0].tolist() == [220, 40, 40]
    assert "skipped 2 of 6 rows that have no image (missing_image: skip)" in caplog.text


def test_scienceqa_preset_is_the_hf_loader_with_scienceqa_columns(scienceqa_dir):
    def ids_and_answers(dataset, split):
        return [(r.id, r.question, r.answer, r.choices, r.meta) for r in load_dataset(dataset, split)]

    preset = {"name": "scienceqa", "path": str(scienceqa_dir)}
    assert ids_and_answers(preset, "test") == ids_and_answers(hf(scienceqa_dir), "test")
    # ScienceQA has no calibration split; the preset calibrates on training questions.
    assert [r.id for r in load_dataset(preset, "calibration")] == ["train-0", "train-2"]


def test_split_map_and_num_samples(scienceqa_dir):
    mapped = load_dataset(hf(scienceqa_dir, split_map={"calibration": "validation"}), "calibration")
    assert [r.id for r in mapped] == ["validation-0"] and mapped[0].answer == "yes"
    assert [r.id for r in load_dataset(hf(scienceqa_dir), "test", num_samples=3)] == ["test-0", "test-2", "test-4"]
    with pytest.raises(ValueError, match=r"no split 'calibration' .*splits: test, train, validation; map it with "
                                         r"split_map: \{calibration: <one of them>\}"):
        load_dataset(hf(scienceqa_dir), "calibration")


def test_missing_image_blank_keeps_every_row_and_error_names_the_row(scienceqa_dir):
    blank = list(load_dataset(hf(scienceqa_dir, missing_image="blank"), "test"))
    assert [r.id for r in blank] == [f"test-{i}" for i in range(6)]
    assert np.array_equal(np.asarray(blank[1].image), np.asarray(blank_image()))
    assert blank[1].answer == "dog"
    with pytest.raises(ValueError, match=r"split 'test': row 1: columns.image \('image'\) is empty; set missing_image"):
        load_dataset(hf(scienceqa_dir, missing_image="error"), "test")


def _save(tmp_path, columns: dict, feature_types: dict | None = None):
    """One saved Dataset (not a DatasetDict): it serves every split, as a single .jsonl file does."""
    table = datasets.Dataset.from_dict(columns, features=datasets.Features(feature_types) if feature_types else None)
    table.save_to_disk(str(tmp_path / "set"))
    return tmp_path / "set"


def test_short_answers_ids_and_chosen_meta_columns(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (8, 8), (1, 2, 3))
    path = _save(tmp_path, {"img": [image, image], "q": ["What colour?", "How many?"], "a": ["red", "2"],
                            "qid": [17, 18], "kind": ["colour", "count"], "note": ["x", "y"]},
                 {"img": datasets.Image(), "q": datasets.Value("string"), "a": datasets.Value("string"),
                  "qid": datasets.Value("int64"), "kind": datasets.Value("string"), "note": datasets.Value("string")})
    spec = {"name": "hf", "path": str(path), "meta_columns": ["note"],
            "columns": {"image": "img", "question": "q", "answer": "a", "id": "qid", "type": "kind"}}
    for split in ("test", "calibration"):
        records = list(load_dataset(spec, split))
        assert [(r.id, r.question, r.answer, r.choices) for r in records] == [
            ("17", "What colour?", "red", None), ("18", "How many?", "2", None)]
        assert records[1].meta == {"note": "y", "type": "count"}


def _scienceqa_like(tmp_path, **changes):
    rows = scienceqa_rows()["test"][:1]
    columns = {c: [r[c] for r in rows] for c in rows[0]}
    columns.update(changes)
    types = features()
    if "answer" in changes and isinstance(changes["answer"][0], str):
        types["answer"] = datasets.Value("string")
    return _save(tmp_path, columns, types)


@pytest.mark.parametrize(
    "changes, column, message",
    [
        ({"answer": [2]}, "columns.answer", r"index 2 is not valid; expected 0..1"),
        ({"answer": ["green"]}, "columns.answer", r"'green' is not one of the choices \['red', 'blue'\]"),
        ({"choices": [["red"]]}, "columns.choices", r"must be a list of at least 2 strings"),
        ({"question": [""]}, "columns.question", r"must be a non-empty string"),
    ],
)
def test_bad_rows_name_the_split_row_and_column(tmp_path, changes, column, message):
    path = _scienceqa_like(tmp_path, **changes)
    with pytest.raises(ValueError, match=rf"split 'test': row 0: {column} \('\w+'\): {message}"):
        load_dataset(hf(path), "test")


def test_missing_columns_and_non_image_columns_are_named(tmp_path, scienceqa_dir):
    with pytest.raises(ValueError, match=r"columns.context: no column 'context'; its columns: image, question"):
        load_dataset(hf(scienceqa_dir, columns={**SCIENCEQA_COLUMNS, "context": "context"}), "test")
    with pytest.raises(ValueError, match=r"columns.image: column 'hint' holds Value\('string'\), not images"):
        load_dataset(hf(scienceqa_dir, columns={**SCIENCEQA_COLUMNS, "image": "hint"}), "test")
    with pytest.raises(ValueError, match=r"revision: applies to load_dataset; .* is a save_to_disk folder"):
        load_dataset(hf(scienceqa_dir, revision="main"), "test")


def test_a_local_data_folder_goes_through_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # nothing written to ~/.cache
    rows = scienceqa_rows()["test"]
    folder = tmp_path / "parquet"
    folder.mkdir()
    table = datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in rows[0]}, features=features())
    table.to_parquet(str(folder / "test.parquet"))  # the features (an Image column) travel in the parquet schema
    records = list(load_dataset(hf(folder), "test"))
    assert [r.id for r in records] == ["test-0", "test-2", "test-4", "test-5"] and records[3].answer == "yes"

