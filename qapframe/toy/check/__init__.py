"""Deprecated: moved to `research.toy.check` (see `qapframe.toy._moved`)."""

from qapframe.toy._moved import missing


def __getattr__(attribute: str):
    raise missing("check", attribute)
