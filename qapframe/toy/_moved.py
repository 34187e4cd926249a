"""The toy's research scripts left the package for ``research/toy/`` in a source checkout; their old module
paths stay as pointers (``python -m qapframe.toy.train`` says where the script went and exits with status 2)."""

from __future__ import annotations

import sys

MOVED = {
    "train": "python -m research.toy.train --out DIR",
    "check": "python -m research.toy.check",
}


def message(name: str) -> str:
    return (f"qapframe.toy.{name} moved out of the installed package: from a source checkout of qapframe, run "
            f"`{MOVED[name]}` in the repository root (docs/toy.md)")


def exit_moved(name: str) -> None:
    print(message(name), file=sys.stderr)
    raise SystemExit(2)


def missing(name: str, attribute: str) -> AttributeError:
    return AttributeError(f"qapframe.toy.{name}.{attribute}: {message(name)}")
