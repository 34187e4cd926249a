"""qapframe's cache root on disk (converted models, compiled kernels); imports nothing heavy."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$QAPFRAME_CACHE``, else ``$XDG_CACHE_HOME/qapframe``, else ``~/.cache/qapframe``."""
    if os.environ.get("QAPFRAME_CACHE"):
        return Path(os.environ["QAPFRAME_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qapframe"


__all__ = ["cache_dir"]
