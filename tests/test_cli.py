"""The `qapframe` command: list, validate, help; user mistakes exit non-zero without a traceback."""

import json
import subprocess
import sys

import pytest

from qapframe.cli import main


def test_list_json_shows_every_kind_with_sources_and_parameter_defaults(capsys):
    assert main(["list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert set(listing) == {"quantizer", "scorer", "pruner", "model"}
    topk = next(row for row in listing["pruner"] if row["name"] == "topk")
    assert topk["source"] == "built-in"
    assert topk["parameters"] == {"retention": 0.125, "num_tokens": None}


def test_list_human_readable_filters_by_kind(capsys):
    assert main(["list", "--kind", "scorer"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("scorers:") and "l2norm" in out and "pruners:" not in out


def test_validate_ok_prints_one_line_summary(tmp_path, capsys):
    spec = tmp_path / "ok.yaml"
    spec.write_text("scorer: {name: random}\nsweep:\n  pruner.retention: [0.5, 0.25]\nevaluation: {seeds: [0, 1]}\n")
    assert main(["validate", str(spec)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "valid" in out[0] and "2 configuration(s) x 2 seed(s) = 4 run(s)" in out[0]


def test_validate_bad_spec_exits_2_with_paths_and_file(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text("scorer: {name: l2nrm}\npruner: {name: topk, retention: 3}\n")
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert str(spec) in err and "scorer.name" in err and "did you mean 'l2norm'" in err and "pruner.retention" in err
    assert "Traceback" not in err


def test_help_is_useful_and_python_dash_m_is_the_same_command():
    result = subprocess.run([sys.executable, "-m", "qapframe", "--help"], capture_output=True, text=True, check=True)
    for word in ("list", "validate", "run", "examples:"):
        assert word in result.stdout
    result = subprocess.run([sys.executable, "-m", "qapframe", "run", "--help"], capture_output=True, text=True, check=True)
    assert "--output" in result.stdout and "resumes" in result.stdout


def test_unknown_command_is_an_argparse_error():
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
