"""The import graph runs one way: the spec composes the strategies, so nothing below it imports `qapframe.spec`.

Each module is imported in a subprocess with ``qapframe/__init__.py`` bypassed (it imports the spec for the
public API), and with every ``qapframe.*`` module dropped between imports, so a module is charged only with
what it imports itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qapframe"
# Below the spec: the strategy families, the kernels they call, the models and data they run on.
BELOW_SPEC = ("strategy.py", "registry.py", "errors.py", "quant_grid.py", "strategies", "kernels", "models", "data", "sources", "quantizers")

_PROBE = r"""
import importlib, json, sys, types
package, names = sys.argv[1], json.loads(sys.argv[2])
result = {}
for name in names:
    for loaded in [m for m in sys.modules if m == "qapframe" or m.startswith("qapframe.")]:
        del sys.modules[loaded]
    stub = types.ModuleType("qapframe")
    stub.__path__ = [package]
    sys.modules["qapframe"] = stub
    importlib.import_module(name)
    result[name] = sorted(m for m in sys.modules if m == "qapframe.spec" or m.startswith(("qapframe.toy", "qapframe.sources.")))
print(json.dumps(result))
"""


def _modules(part: str) -> list[str]:
    path = PACKAGE / part
    files = [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))
    names = []
    for file in files:
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.fixture(scope="module")
def imported() -> dict[str, list[str]]:
    """Module -> the spec, toy and model-source modules importing it loads."""
    names = [name for part in (*BELOW_SPEC, "eval") for name in _modules(part)]
    out = subprocess.run([sys.executable, "-c", _PROBE, str(PACKAGE), json.dumps(names)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("part", [p for p in BELOW_SPEC if p != "quantizers"])
def test_nothing_below_the_spec_imports_it(imported, part):
    offenders = [name for name in _modules(part) if "qapframe.spec" in imported[name]]
    assert not offenders, f"these modules import qapframe.spec, which sits above them: {offenders}"


def test_the_quantizers_do_not_import_the_spec(imported):
    offenders = [name for name in _modules("quantizers") if "qapframe.spec" in imported[name]]
    assert not offenders, f"these modules import qapframe.spec, which sits above them: {offenders}"


def test_evaluation_imports_no_model_package(imported):
    """`eval/` reaches named models only through the `qapframe.sources` registry, when a spec names one."""
    offenders = {name: found for name in _modules("eval") if (found := [m for m in imported[name] if m != "qapframe.spec"])}
    assert not offenders


def test_the_spec_re_exports_the_strategy_entries_it_composes():
    from qapframe import spec, strategy
    from qapframe.strategies import specs

    assert spec.StrategySpec is strategy.StrategySpec
    assert (spec.ScorerSpec, spec.PrunerSpec) == (specs.ScorerSpec, specs.PrunerSpec)
    assert spec.PipelineSpec.model_validate({"scorer": {"name": "hybrid"}}).scorer.config.semantic.name == "visionzip"
