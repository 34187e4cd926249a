"""The example plugin in contrib/ (installed by .ci/run) is visible to `qapframe list` and usable in a spec."""

import importlib.metadata
import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def plugin_installed():
    try:
        importlib.metadata.distribution("qapframe-example-plugin")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("install the example plugin first: pip install ./contrib/qapframe-example-plugin (.ci/run does)")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qapframe", *args], capture_output=True, text=True)


def test_qapframe_list_shows_plugin_strategies_with_their_distribution(plugin_installed):
    result = run_cli("list", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    scorer = next(r for r in listing["scorer"] if r["name"] == "channel-variance")
    quantizer = next(r for r in listing["quantizer"] if r["name"] == "fp8-weights")
    assert scorer["source"].startswith("qapframe-example-plugin 0.1.0")
    assert scorer["parameters"] == {"unbiased": False}
    assert quantizer["source"].startswith("qapframe-example-plugin 0.1.0")


def test_a_spec_can_use_plugin_strategies(plugin_installed, tmp_path):
    spec = tmp_path / "plugin.yaml"
    spec.write_text(
        "quantizer: {name: fp8-weights}\n"
        "scorer:\n  name: fused\n  scorers:\n"
        "    - {scorer: {name: channel-variance}, weight: 0.5}\n"
        "    - {scorer: {name: l2norm}, weight: 0.5}\n"
    )
    result = run_cli("validate", str(spec))
    assert result.returncode == 0, result.stderr
    assert "quantizers fp8-weights; scorers fused" in result.stdout
    spec.write_text("scorer: {name: channel-variance, unbiased: maybe}\n")
    result = run_cli("validate", str(spec))
    assert result.returncode == 2 and "scorer.unbiased" in result.stderr
