"""Deprecated: moved to `research.toy.train` (see `qapframe.toy._moved`)."""

from qapframe.toy._moved import missing


def __getattr__(attribute: str):
    raise missing("train", attribute)
