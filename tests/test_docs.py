"""The generated docs are current: README's supported matrix and docs/spec.md are what docs/generate.py writes
from the registries and the pydantic models today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
generate = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(generate)


def test_readme_matrix_is_generated_from_the_registries():
    text = (ROOT / "README.md").read_text()
    assert generate.readme_with_matrix(text) == text, "README's supported matrix is stale: run python docs/generate.py"


def test_spec_reference_is_generated_from_the_pydantic_models():
    assert (ROOT / "docs" / "spec.md").read_text() == generate.spec_reference(), \
        "docs/spec.md is stale: run python docs/generate.py"


def test_the_matrix_names_every_built_in_strategy_and_the_spec_reference_every_field():
    from qapframe.quantizers.base import QUANTIZERS
    from qapframe.spec import EvaluationSpec, PipelineSpec
    from qapframe.strategies.base import PRUNERS, SCORERS

    matrix, reference = generate.supported_matrix(), generate.spec_reference()
    for registry in (QUANTIZERS, SCORERS, PRUNERS):
        for entry in registry.entries():
            if entry.source == "built-in":
                assert f"`{entry.name}`" in matrix and f"`{entry.name}`" in reference, entry.name
    from qapframe.data.base import DATASETS

    assert all(f"### dataset loader `{e.name}`" in reference for e in DATASETS.entries() if e.source == "built-in")
    assert all(f"## `{section}`" in reference for section in PipelineSpec.model_fields)
    assert all(f"| `{field}` |" in reference for field in EvaluationSpec.model_fields)


def test_check_mode_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "spec.md"
    stale.write_text("old\n")
    monkeypatch.setattr(generate, "SPEC_REFERENCE", stale)
    monkeypatch.setattr(generate, "ROOT", tmp_path)
    monkeypatch.setattr(generate, "README", tmp_path / "README.md")
    (tmp_path / "README.md").write_text(generate.readme_with_matrix((ROOT / "README.md").read_text()))
    assert generate.main(["--check"]) == 1 and "spec.md is stale" in capsys.readouterr().err
    assert stale.read_text() == "old\n"  # --check writes nothing
