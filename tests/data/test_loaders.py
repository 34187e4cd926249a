"""The registry of dataset loaders and the spec's `dataset` field: today's strings unchanged, `{name, ...}` entries."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml
from pydantic import Field

from qapframe.cli import main
from qapframe.data import DATASETS, DatasetLoader, SyntheticVQA, VQARecord, dataset_spec, load_dataset, write_jsonl
from qapframe.data.base import VQADataset
from qapframe.errors import QapframeError, SpecError
from qapframe.registry import BUILTIN
from qapframe.spec import parse_spec
from qapframe.strategy import StrategyConfig


def _same(a: VQADataset, b: VQADataset) -> bool:
    return len(a) == len(b) and all(
        (x.id, x.question, x.answer, x.choices, x.meta) == (y.id, y.question, y.answer, y.choices, y.meta)
        and np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))


def test_the_built_in_loaders_are_registered_with_their_options():
    builtin = [e.name for e in DATASETS.entries() if e.source == BUILTIN]
    assert builtin == ["hf", "jsonl", "scienceqa", "synthetic"]
    assert all(issubclass(DATASETS.get(name), DatasetLoader) for name in builtin)
    assert DATASETS.get("jsonl").parameters() == {"path": "<required>", "image_root": None}
    assert DATASETS.get("scienceqa").parameters()["split_map"] == {"calibration": "train"}


def test_strings_mean_what_they_always_meant(tmp_path):
    write_jsonl(SyntheticVQA("test", size=5, seed=3), tmp_path / "test.jsonl")
    write_jsonl(SyntheticVQA("calibration", size=4, seed=3), tmp_path / "calibration.jsonl")
    assert dataset_spec("synthetic", seed=2).model_dump() == {"name": "synthetic", "seed": 2}
    assert dataset_spec(str(tmp_path), image_root="imgs").model_dump() == {
        "name": "jsonl", "path": str(tmp_path), "image_root": "imgs"}
    # the string form and its entry give identical records, split by split
    assert _same(load_dataset("synthetic", "calibration", num_samples=6), SyntheticVQA("calibration", size=6))
    assert _same(load_dataset("synthetic", "test"), load_dataset({"name": "synthetic"}, "test"))
    assert len(load_dataset("synthetic", "calibration")) == 256  # the split's default size, as before
    for split, size in (("test", 5), ("calibration", 4)):
        by_string = load_dataset(str(tmp_path), split)
        assert len(by_string) == size
        assert _same(by_string, load_dataset({"name": "jsonl", "path": str(tmp_path)}, split))
    one_file = {"name": "jsonl", "path": str(tmp_path / "test.jsonl")}
    assert _same(load_dataset(one_file, "calibration"), load_dataset(str(tmp_path / "test.jsonl"), "calibration"))


def test_unknown_strings_and_mixed_options_are_clear_errors():
    with pytest.raises(ValueError, match=r"'gqa' is not known; use 'synthetic', .* or name a loader: \{name: "
                                         r"<loader>, \.\.\.options\} \(loaders: hf, jsonl, scienceqa, synthetic"):
        load_dataset("gqa")
    with pytest.raises(ValueError, match="image_root and seed belong to a dataset named by a string"):
        load_dataset({"name": "synthetic"}, image_root="x")


class _CountingConfig(StrategyConfig):
    size: int = Field(3, ge=1)


class _Counting(DatasetLoader):
    """A plugin-style loader: questions about the number of each record."""

    Config = _CountingConfig

    def open(self, split, num_samples=None):
        records = [VQARecord(f"{split}-{i}", SyntheticVQA("test", 1)[0].image, f"{i}?", str(i))
                   for i in range(self.config.size)]

        class _List(VQADataset):
            def __len__(self):
                return len(records)

            def __getitem__(self, index):
                return records[index]

        return _List()


@pytest.fixture
def counting():
    DATASETS.add("counting", _Counting, "tests (test_loaders)")
    yield
    DATASETS.reload()  # drops every entry that is not built in


def test_a_registered_loader_is_usable_from_a_spec(counting):
    spec = parse_spec({"evaluation": {"dataset": {"name": "counting", "size": 4}}})
    assert [r.answer for r in load_dataset(spec.evaluation.dataset, "test")] == ["0", "1", "2", "3"]
    assert [r.id for r in load_dataset(spec.evaluation.dataset, "test", num_samples=2)] == ["test-0", "test-1"]
    with pytest.raises(SpecError, match=r"evaluation.dataset.size: Input should be greater than or equal to 1"):
        parse_spec({"evaluation": {"dataset": {"name": "counting", "size": 0}}})


@pytest.mark.parametrize(
    "evaluation, path, message",
    [
        ({"dataset": {"name": "hff", "path": "x"}}, "evaluation.dataset.name",
         "unknown dataset loader 'hff'; known dataset loaders: hf, jsonl, scienceqa, synthetic; did you mean 'hf'?"),
        ({"dataset": {"path": "x"}}, "evaluation.dataset", "a dataset loader entry needs `name`, one of: hf, jsonl"),
        ({"dataset": {"name": "hf"}}, "evaluation.dataset.path", "Field required"),
        ({"dataset": {"name": "hf", "path": "x", "colums": {}}}, "evaluation.dataset.colums",
         "unknown field 'colums' of dataset loader 'hf' (did you mean 'columns'?); valid fields: name, path"),
        ({"dataset": {"name": "hf", "path": "x", "columns": {"imag": "x"}}}, "evaluation.dataset.columns.imag",
         "unknown field 'imag' of columns (did you mean 'image'?); valid fields: image, question, answer"),
        ({"dataset": {"name": "scienceqa", "missing_image": "drop"}}, "evaluation.dataset.missing_image",
         "Input should be 'skip', 'blank' or 'error'"),
        ({"dataset": 3}, "evaluation.dataset", "must be a string ('synthetic', a .jsonl file, or a folder"),
        ({"dataset": {"name": "jsonl", "path": "a.jsonl"}, "image_root": "imgs"}, "evaluation.image_root",
         "applies to a dataset given as a string; a {name: ...} dataset takes its own options"),
        ({"calibration_dataset": {"name": "synthetic", "seed": "a"}}, "evaluation.calibration_dataset.seed",
         "Input should be a valid integer"),
    ],
)
def test_bad_dataset_entries_are_field_errors(evaluation, path, message):
    with pytest.raises(SpecError) as info:
        parse_spec({"evaluation": evaluation})
    assert len(info.value.problems) == 1
    where, what = info.value.problems[0]
    assert where == path and message in what


def test_validate_reports_a_bad_dataset_as_a_field_error_without_importing_datasets(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"evaluation": {"dataset": {"name": "hf", "path": "x", "split": "test"}}}))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: 1 problem(s)" in err
    assert "evaluation.dataset.split: unknown field 'split' of dataset loader 'hf'" in err
    assert "did you mean 'split_map'?" in err and "Traceback" not in err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"evaluation": {"dataset": {"name": "scienceqa", "path": str(tmp_path)}}}))
    code = ("import sys, io, contextlib\nfrom qapframe.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()): assert main(['validate', {str(good)!r}]) == 0\n"
            "print('datasets' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"  # the optional dependency is imported when a split is opened


def test_without_datasets_the_hf_loader_names_the_extra(tmp_path, monkeypatch):
    from qapframe.eval.inputs import DataCache
    from qapframe.spec import EvaluationSpec

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError, installed or not
    spec = {"name": "hf", "path": str(tmp_path)}
    with pytest.raises(ImportError, match=r"needs the `datasets` package, which is not installed: "
                                          r"pip install 'qapframe\[hf\]'"):
        load_dataset(spec, "test")
    with pytest.raises(QapframeError, match=r"^evaluation.dataset \(test split\): the hf dataset loader needs"):
        DataCache().evaluation_records(EvaluationSpec(dataset=spec))
