"""Named models: ``model: {path: <name>}`` resolves through one registry of model sources.

A source is a callable returning a local directory that ``from_pretrained`` loads (config, weights,
processor or tokenizer files); it may build that directory on first use (a conversion, a download a
plugin performs) and cache it. Built-ins register with ``@MODEL_SOURCES.register(name)``; plugins
through the entry-point group ``qapframe.model_sources``. Anything that is not a registered name is a
path (or, elsewhere, a hub id).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from qapframe.registry import Registry

ModelSourceFn = Callable[[], Path]  # () -> directory loadable with from_pretrained

MODEL_SOURCES: Registry[ModelSourceFn] = Registry(
    "model source", "qapframe.model_sources", ("qapframe.sources.toy", "qapframe.sources.smollm2")
)


def cache_dir() -> Path:
    """qapframe's cache root: ``$QAPFRAME_CACHE``, else ``$XDG_CACHE_HOME/qapframe``, else ``~/.cache/qapframe``."""
    if os.environ.get("QAPFRAME_CACHE"):
        return Path(os.environ["QAPFRAME_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qapframe"


def resolve_named_model(name: str) -> Path | None:
    """The directory of the registered model ``name``, or None when ``name`` is not a registered source."""
    if name not in MODEL_SOURCES:
        return None
    return Path(MODEL_SOURCES.get(name)())


__all__ = ["MODEL_SOURCES", "ModelSourceFn", "cache_dir", "resolve_named_model"]
