"""The README's commands and snippets, run as written: a snippet that stops working fails here.

The python blocks run in order in one namespace (as a reader pastes them), in a folder holding the
README's example spec as ``my.yaml``; the spec block is validated by the CLI; the plugin's TOML block
must be what the example plugin ships; the set-up block must stay two commands.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import torch

from qapframe.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## ``."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else len(README)]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_set_up_is_two_commands_and_the_cpu_index_is_explained():
    text = section("Set up and run")
    (setup,) = blocks(text, "bash")
    commands = [line for line in setup.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert "pip install torch==2.13.0" in commands[0] and commands[0].endswith("qapframe run qapruner")
    assert "pip install -e" in commands[1] and commands[1].endswith("python -m pytest -q")
    assert "--index-url https://download.pytorch.org/whl/cpu" in text and "GPU users keep the default" in text


def _pip_installs(commands: list[str]) -> list[str]:
    """The arguments of each ``pip install`` in ``commands``, with ``-q`` and ``python -m`` left out."""
    installs = []
    for command in commands:
        for part in command.split("&&"):
            words = [w for w in part.split() if w != "-q"]
            if "pip" in words and words[words.index("pip") + 1 : words.index("pip") + 2] == ["install"]:
                installs.append(" ".join(words[words.index("pip") + 2 :]))
    return installs


def test_ci_installs_what_the_readme_test_command_installs_in_the_same_steps():
    (setup,) = blocks(section("Set up and run"), "bash")
    readme = [line for line in setup.splitlines() if line.strip() and not line.startswith("#")][1]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert _pip_installs([readme]) == _pip_installs(ci)
    assert "python -m pytest -q" in ci


def test_plugin_toml_block_is_what_the_example_plugin_declares():
    (block,) = blocks(section("Writing a plugin"), "toml")
    shipped = tomllib.loads((ROOT / "contrib/qapframe-example-plugin/pyproject.toml").read_text())
    declared = tomllib.loads(block)["project"]["entry-points"]["qapframe.scorers"]
    assert declared.items() <= shipped["project"]["entry-points"]["qapframe.scorers"].items()


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    (spec,) = blocks(section("The pipeline spec"), "yaml")
    (tmp_path / "my.yaml").write_text(spec)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_spec_block_validates_with_the_cli_command_shown(readme_folder, capsys):
    commands = blocks(section("The pipeline spec"), "bash")[0]
    assert "qapframe validate my.yaml" in commands
    assert main(["validate", "my.yaml"]) == 0
    assert "9 configurations" in capsys.readouterr().out


def test_library_api_and_plugin_snippets_run_as_written(readme_folder, capsys):
    namespace: dict = {"__name__": "readme"}
    snippets = blocks(section("Library API"), "python") + blocks(section("Writing a plugin"), "python")
    assert len(snippets) == 4
    torch.manual_seed(0)
    with torch.enable_grad():  # as a reader's session is: the snippets must not rely on a caller's no_grad
        for snippet in snippets:
            exec(compile(snippet, "README.md", "exec"), namespace)

    # The toy answered two questions through the quantized, pruned model.
    answers = eval("processor.tokenizer.batch_decode(output[:, inputs['input_ids'].shape[1]:], skip_special_tokens=True)", namespace)
    assert len(answers) == 2 and str(answers) in capsys.readouterr().out
    model = namespace["model"]
    assert model.qapframe_last_selection["selections"][0].num_tokens == 16  # 25 % of the toy's 64 tokens
    assert len(namespace["pipelines"]) == 9
    assert type(namespace["bert"].encoder.layer[0].attention.self.query).__name__ == "QuantizedLinear"

    # The plugin scorer is a working Scorer: [B, N, D] -> [B, N] channel variances.
    from qapframe.strategies.context import ScoringContext

    x = torch.randn(2, 5, 8)
    scores = namespace["ChannelVarianceScorer"]().score(ScoringContext(vision_embeds=x))
    assert torch.allclose(scores, x.var(dim=-1, unbiased=False))
