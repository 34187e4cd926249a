"""The `qapframe` command: list, validate, help; user mistakes exit non-zero without a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qapframe.cli import main


def test_list_json_shows_every_kind_with_sources_and_parameter_defaults(capsys):
    assert main(["list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert set(listing) == {"quantizer", "rotation", "observer", "scorer", "pruner", "model", "source", "dataset"}
    assert {"hadamard", "orthogonal"} <= {row["name"] for row in listing["rotation"]}
    assert {"minmax", "percentile", "mse"} <= {row["name"] for row in listing["observer"]}
    assert {"toy", "smollm2-135m"} <= {row["name"] for row in listing["source"]}
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
    assert len(out) == 1 and "valid" in out[0] and "4 runs = 2 configurations x 2 seeds" in out[0]


def test_validate_summary_describes_the_whole_sweep(capsys):
    assert main(["validate", "qapruner"]) == 0
    out = capsys.readouterr().out
    assert "84 runs = 28 configurations x 3 seeds" in out
    assert "quantizers fp, rtn (2 variants), gptq" in out
    assert "scorers dense, visionzip, hybrid (4 variants), fastv (2 variants)" in out
    assert "pruners visionzip, topk" in out and "retention dense, 50%, 25%, 12.5%" in out


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_missing_model_path_is_an_invalid_spec_for_validate_and_run(tmp_path, capsys, command):
    spec = tmp_path / "missing.yaml"
    spec.write_text(f"model: {{path: {tmp_path / 'nowhere'}}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    assert main([command, str(spec)]) == 2
    err = capsys.readouterr().err
    assert "model.path" in err and "does not exist" in err and "a named model (" in err
    assert not (tmp_path / "out").exists()  # `run` refused before running anything


def test_validate_checks_hub_ids_are_well_formed(tmp_path, capsys):
    spec = tmp_path / "hub.yaml"
    spec.write_text("sweep: {model.path: ['bad id!', 'llava-hf/llava-1.5-7b-hf']}\n")
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "'bad id!' is neither a local directory nor a well-formed hub id" in err
    assert "llava-1.5-7b-hf" not in err  # a well-formed hub id is valid: from_pretrained resolves it


def test_version_is_the_package_version(capsys):
    import importlib.metadata

    import qapframe

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"qapframe {qapframe.__version__}"
    assert qapframe.__version__ == importlib.metadata.version("qapframe")


def test_version_is_written_once():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "qapframe.__version__"}


def test_list_imports_no_transformers_numba_or_matplotlib():
    code = (
        "import sys, io, contextlib\n"
        "from qapframe.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['list'])\n"
        "print(sorted(m for m in ('transformers', 'numba', 'matplotlib', 'entrypoints') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


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
