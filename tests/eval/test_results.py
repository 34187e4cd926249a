"""results.jsonl: stable run keys, atomic appends, torn-line tolerance, resume keys."""

from __future__ import annotations

import json

from qapframe.eval.results import ResultsFile, configuration_id, run_key, write_json_atomically
from qapframe.spec import load_spec


def test_run_key_is_stable_and_ignores_output_dir_and_seed_list():
    a = load_spec({"scorer": {"name": "l2norm"}, "evaluation": {"seeds": [0, 1]}, "output": {"dir": "x"}})
    b = load_spec({"scorer": {"name": "l2norm"}, "evaluation": {"seeds": [5]}, "output": {"dir": "y"}})
    c = load_spec({"scorer": {"name": "l2norm"}, "pruner": {"name": "topk", "retention": 0.5}})
    assert run_key(a, 0) == run_key(b, 0) != run_key(a, 1)
    assert configuration_id(a) == configuration_id(b) != configuration_id(c)
    assert run_key(c, 0) != run_key(a, 0)


def test_append_writes_whole_lines_and_latest_status_wins(tmp_path):
    results = ResultsFile(tmp_path / "sub" / "results.jsonl")
    results.append({"key": "a", "status": "error"})
    results.append({"key": "b", "status": "ok"})
    lines = (tmp_path / "sub" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "b"]
    assert results.completed_keys() == {"b"}  # failed runs are retried on resume
    results.append({"key": "a", "status": "ok"})
    assert results.completed_keys() == {"a", "b"}
    assert results.latest()["a"]["status"] == "ok"


def test_a_torn_last_line_is_skipped_and_sealed(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "a", "status": "ok"}\n{"key": "b", "sta')  # a writer killed mid-line
    results = ResultsFile(path)
    assert [r["key"] for r in results] == ["a"]
    results.append({"key": "c", "status": "ok"})
    assert [r["key"] for r in results] == ["a", "c"]
    assert path.read_text().endswith('{"key": "c", "status": "ok"}\n')


def test_write_json_atomically_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "new" / "rows.json"  # the folder does not exist yet
    write_json_atomically(path, {"rows": [1]})
    write_json_atomically(path, {"rows": [1, 2]})
    assert json.loads(path.read_text()) == {"rows": [1, 2]} and path.read_text().endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["rows.json"]


def test_replace_swaps_every_line_of_a_key_and_keeps_the_rest(tmp_path):
    results = ResultsFile(tmp_path / "results.jsonl")
    results.append({"key": "a", "status": "error", "error": "first try"})
    results.append({"key": "b", "status": "ok"})
    with open(results.path, "a") as f:
        f.write('{"key": "c", "stat')  # torn by a crash: left as it is, still ignored by readers
    results.replace({"key": "a", "status": "ok"})
    assert [(r["key"], r["status"]) for r in results] == [("b", "ok"), ("a", "ok")]
    assert '{"key": "c", "stat' in results.path.read_text() and not list(tmp_path.glob("*.tmp"))
