"""`qapframe run` end to end over the tiny ScienceQA: the shipped toy, quantized with static activation ranges."""

from __future__ import annotations

import json

import yaml

from qapframe.cli import main
from qapframe.eval import inputs
from tests.data.fixtures.scienceqa import SCIENCEQA_COLUMNS


def test_a_scienceqa_spec_runs_end_to_end_on_the_toy(scienceqa_dir, tmp_path, monkeypatch, capsys):
    calibrated = []
    original = inputs.DataCache.calibration_records

    def spy(self, evaluation, seed):
        records = original(self, evaluation, seed)
        calibrated.append([r.id for r in records])
        return records

    monkeypatch.setattr(inputs.DataCache, "calibration_records", spy)
    dataset = {"name": "hf", "path": str(scienceqa_dir), "columns": SCIENCEQA_COLUMNS,
               "split_map": {"test": "test", "calibration": "train"}}
    spec = {"model": {"path": "toy"}, "quantizer": {"name": "rtn", "scheme": "W4A4", "act_dynamic": False},
            "evaluation": {"dataset": dataset, "num_samples": 4, "batch_size": 4, "max_new_tokens": 2,
                           "calibration_samples": 2},
            "output": {"dir": str(tmp_path / "out")}}
    path = tmp_path / "scienceqa.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 0
    assert "failed" not in capsys.readouterr().err
    [row] = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert row["status"] == "ok" and row["metrics"]["num_samples"] == 4
    # the image rows of ScienceQA's test split, in order; rows 1 and 3 have no image
    assert [o["id"] for o in row["outcomes"]] == ["test-0", "test-2", "test-4", "test-5"]
    assert [o["type"] for o in row["outcomes"]] == ["natural science"] * 2 + ["social science", "natural science"]
    assert calibrated == [["train-0", "train-2"]]  # calibrated on the mapped train split's image rows
