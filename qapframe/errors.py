"""Error types: every user mistake surfaces as one of these, never as a bare traceback."""

from __future__ import annotations


class QapframeError(Exception):
    """Base of qapframe's own errors; the CLI prints these without a traceback."""


class UnknownNameError(QapframeError, KeyError):
    """A registry lookup for a name nobody registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DuplicateNameError(QapframeError):
    """Two strategies claim one name and overriding was not asked for."""


class SpecError(QapframeError):
    """A pipeline spec failed validation; carries every problem with its field path."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        lines = [f"{where}{len(problems)} problem(s) in the pipeline spec"]
        lines += [f"  {path}: {message}" for path, message in problems]
        super().__init__("\n".join(lines))
