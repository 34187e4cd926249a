"""Spec files: YAML or JSON read into plain data with the file named in every error, and the shipped specs
usable by name (``qapframe run qapruner``). `qapframe.spec` validates what this reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from qapframe.errors import SpecError

BUILTIN_SPECS = Path(__file__).resolve().parent / "specs"  # shipped specs, usable by name: `qapframe run qapruner`


def builtin_spec_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_SPECS.glob("*.yaml"))


def resolve_spec_path(path: str | Path) -> Path:
    """An existing file as given, else a shipped spec named by its stem (``qapruner``, ``smoke``)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent == Path(".") and not path.suffix and (BUILTIN_SPECS / f"{path.name}.yaml").is_file():
        return BUILTIN_SPECS / f"{path.name}.yaml"
    raise SpecError(
        [("(file)", f"no such file, and not a built-in spec name (built-in: {', '.join(builtin_spec_names())})")],
        str(path),
    )


def _pointer(text: str, line: int, column: int) -> str:
    """The 1-based ``line`` of ``text`` with a caret under ``column``, indented under a problem line."""
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return ""
    gutter = f"    {line} | "
    return f"\n{gutter}{lines[line - 1]}\n{' ' * (len(gutter) - 2)}| {' ' * (column - 1)}^"


def _syntax_problem(exc: Exception, text: str) -> str:
    """A YAML/JSON parser error as ``line L, column C: what`` plus the line itself with a caret."""
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno}, column {exc.colno}: {exc.msg}" + _pointer(text, exc.lineno, exc.colno)
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return str(exc).replace("\n", " ")
    line, column = mark.line + 1, mark.column + 1
    message = f"line {line}, column {column}: {exc.problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        message += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return message + _pointer(text, line, column)


def read_spec_file(path: str | Path) -> Any:
    """Parse YAML (or JSON, a YAML subset) into plain data, with the file named in any error."""
    path = resolve_spec_path(path)
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SpecError([("(syntax)", _syntax_problem(exc, text))], str(path)) from None
    if data is None:  # an empty file, or only comments
        from qapframe.spec import SECTIONS  # the spec imports this module

        what = "empty" if not text.strip() else "only comments"
        raise SpecError(
            [("(file)", f"the file is {what}; a spec is a mapping of sections: {', '.join(SECTIONS)}")], str(path)
        )
    return data


__all__ = ["BUILTIN_SPECS", "builtin_spec_names", "read_spec_file", "resolve_spec_path"]
