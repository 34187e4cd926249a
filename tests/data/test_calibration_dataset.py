"""`evaluation.calibration_dataset`: calibration records from another dataset; unset, exactly today's records."""

from __future__ import annotations

import random

import pytest

from qapframe.data import SyntheticVQA, write_jsonl
from qapframe.errors import QapframeError
from qapframe.eval.inputs import DataCache
from qapframe.spec import EvaluationSpec, parse_spec


def test_unset_calibrates_on_the_evaluation_datasets_calibration_split_as_before():
    evaluation = EvaluationSpec(num_samples=3, calibration_samples=5)
    data = DataCache()
    for seed in (0, 1):
        # the rule the runner always had: a seeded sample of the 256-record synthetic calibration split
        picked = sorted(random.Random(f"qapframe-calibration:{seed}").sample(range(256), 5))
        assert [r.id for r in data.calibration_records(evaluation, seed)] == [
            f"synthetic-0-calibration-{i}" for i in picked]
    assert [r.id for r in data.evaluation_records(evaluation)] == [r.id for r in SyntheticVQA("test", 3)]
    # and the field stays out of the spec's dump, so run keys of existing results.jsonl files do not change
    assert "calibration_dataset" not in parse_spec({}).to_dict()["evaluation"]


def test_calibration_records_come_from_the_named_dataset(tmp_path):
    write_jsonl(SyntheticVQA("train", size=6, seed=4), tmp_path / "calibration.jsonl")
    evaluation = EvaluationSpec(num_samples=2, calibration_samples=3, calibration_dataset=str(tmp_path))
    data = DataCache()
    picked = sorted(random.Random("qapframe-calibration:0").sample(range(6), 3))
    assert [r.id for r in data.calibration_records(evaluation, 0)] == [f"synthetic-4-train-{i}" for i in picked]
    assert [r.id for r in data.evaluation_records(evaluation)] == ["synthetic-0-test-0", "synthetic-0-test-1"]
    seeded = EvaluationSpec(calibration_samples=2, calibration_dataset={"name": "synthetic", "seed": 7})
    assert all(r.id.startswith("synthetic-7-calibration-") for r in data.calibration_records(seeded, 0))
    assert parse_spec({"evaluation": seeded.model_dump()}).to_dict()["evaluation"]["calibration_dataset"] == {
        "name": "synthetic", "seed": 7}


def test_calibration_from_scienceqa_while_evaluating_on_synthetic(scienceqa_dir):
    scienceqa = {"name": "scienceqa", "path": str(scienceqa_dir)}
    evaluation = EvaluationSpec(calibration_samples=8, calibration_dataset=scienceqa)
    records = DataCache().calibration_records(evaluation, 0)
    assert [r.id for r in records] == ["train-0", "train-2"]  # every image row of ScienceQA's train split
    assert [r.answer for r in records] == ["blue", "red"]


def test_a_calibration_dataset_that_cannot_be_opened_names_its_field(tmp_path):
    evaluation = EvaluationSpec(calibration_dataset=str(tmp_path / "missing.jsonl"))
    with pytest.raises(QapframeError, match=r"^evaluation.calibration_dataset \(calibration split\): JsonlVQA: "):
        DataCache().calibration_records(evaluation, 0)
