"""The generic registry: decorator registration, lookup errors, lazy entry-point discovery."""

import textwrap
import warnings

import pytest

from qapframe.errors import DuplicateNameError, UnknownNameError
from qapframe.registry import BUILTIN, Registry
from qapframe.strategies.base import SCORERS


def make_dist(root, dist_name, group, entries, module_name, module_source):
    """A minimal installed distribution on ``root``: a dist-info with entry points plus its module."""
    info = root / f"{dist_name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}\n")
    (root / f"{module_name}.py").write_text(textwrap.dedent(module_source))


@pytest.fixture
def fresh_scorers():
    SCORERS.reload()
    yield SCORERS
    SCORERS.reload()


def test_decorator_registers_and_names_sort_naturally():
    reg = Registry("widget", "qapframe.test-widgets")

    for name in ["w10", "w2", "a"]:
        reg.register(name)(type(name, (), {}))
    assert reg.names() == ["a", "w2", "w10"]
    assert reg.names("w*") == ["w2", "w10"]
    assert reg.entry("a").source == BUILTIN


def test_unknown_name_lists_known_and_suggests_closest():
    reg = Registry("widget", "qapframe.test-widgets")
    reg.register("visionzip")(type("V", (), {}))
    reg.register("fastv")(type("F", (), {}))
    with pytest.raises(UnknownNameError) as info:
        reg.get("visonzip")
    message = str(info.value)
    assert "fastv, visionzip" in message and "did you mean 'visionzip'" in message


def test_duplicate_name_names_both_sources_unless_override():
    reg = Registry("widget", "qapframe.test-widgets")
    first, second = type("A", (), {}), type("B", (), {})
    reg.add("same", first, "pkg-a 1.0")
    with pytest.raises(DuplicateNameError, match="pkg-a 1.0.*pkg-b 2.0"):
        reg.add("same", second, "pkg-b 2.0")
    reg.add("same", second, "pkg-b 2.0", override=True)
    assert reg.get("same") is second


def test_entry_point_plugin_is_discovered_lazily(tmp_path, monkeypatch, fresh_scorers):
    make_dist(
        tmp_path, "good_plugin", "qapframe.scorers", {"ones": "good_plugin_mod:Ones"}, "good_plugin_mod",
        """
        import torch
        from qapframe import Scorer
        class Ones(Scorer):
            def score(self, context):
                return torch.ones(context.vision_embeds.shape[:2])
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "ones" in fresh_scorers
    assert fresh_scorers.entry("ones").source.startswith("good-plugin 1.0 (good_plugin_mod:Ones)")


def test_broken_plugin_warns_by_name_and_others_keep_working(tmp_path, monkeypatch, fresh_scorers):
    make_dist(
        tmp_path, "broken_plugin", "qapframe.scorers", {"broken": "broken_plugin_mod:Missing"}, "broken_plugin_mod",
        "raise ImportError('needs a library that is not installed')\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fresh_scorers.get("l2norm").__name__ == "L2NormScorer"
    messages = [str(w.message) for w in caught]
    assert any("'broken'" in m and "broken-plugin 1.0" in m and "needs a library" in m for m in messages)
    assert "broken" not in fresh_scorers.names()


def test_plugin_clashing_with_a_builtin_is_an_error_naming_both(tmp_path, monkeypatch, fresh_scorers):
    make_dist(
        tmp_path, "clash_plugin", "qapframe.scorers", {"l2norm": "clash_plugin_mod:Other"}, "clash_plugin_mod",
        "from qapframe.strategies.scorers.baselines import L2NormScorer\nclass Other(L2NormScorer):\n    pass\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DuplicateNameError, match="built-in.*clash-plugin 1.0"):
        fresh_scorers.names()
