"""Named models: ``model: {path: <name>}`` resolves through one registry of model sources.

A source is a callable returning a local directory that ``from_pretrained`` loads (config, weights,
processor or tokenizer files); it may build that directory on first use (a conversion, a download a
plugin performs) and cache it. Built-ins register with ``@MODEL_SOURCES.register(name)``; plugins
through the entry-point group ``qapframe.model_sources``. Anything that is not a registered name is a
path (or, elsewhere, a hub id).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from qapframe.cache import cache_dir  # re-exported: the sources cache converted models there
from qapframe.registry import Registry

ModelSourceFn = Callable[[], Path]  # () -> directory loadable with from_pretrained

MODEL_SOURCES: Registry[ModelSourceFn] = Registry(
    "model source", "qapframe.model_sources", ("qapframe.sources.toy", "qapframe.sources.smollm2")
)


def resolve_named_model(name: str) -> Path | None:
    """The directory of the registered model ``name``, or None when ``name`` is not a registered source."""
    if name not in MODEL_SOURCES:
        return None
    return Path(MODEL_SOURCES.get(name)())


# A Hugging Face hub id: an optional namespace and a name, each up to 96 of [A-Za-z0-9_.-], not starting
# with '-' or '.', and without '--' or '..' (the hub's own rules).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}$")


def model_path_problem(path: str) -> str | None:
    """Why ``model.path`` cannot be loaded, or None: it must name a registered model, or be a local
    folder with a ``config.json``. Nothing is loaded or downloaded to decide."""
    named = MODEL_SOURCES.names()
    if path in named:
        return None
    valid = (f"valid: a named model ({', '.join(named)}) or a local directory saved with save_pretrained "
             "(config.json, weights, processor files)")
    local = Path(path).expanduser()
    if local.is_dir():
        return None if (local / "config.json").is_file() else f"{path!r} has no config.json; {valid}"
    if local.exists():
        return f"{path!r} is a file, not a model directory; {valid}"
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path:
        return f"{path!r} does not exist; {valid}"
    if _HUB_ID.match(path) and "--" not in path and ".." not in path:
        return (f"{path!r} is no local directory; as a hub id it is well-formed, but qapframe downloads "
                f"nothing: fetch it first (`huggingface-cli download {path} --local-dir DIR`) and give DIR; {valid}")
    return (f"{path!r} is neither a local directory nor a well-formed hub id (namespace/name: letters, "
            f"digits, '-', '_', '.'); {valid}")


__all__ = ["MODEL_SOURCES", "ModelSourceFn", "cache_dir", "model_path_problem", "resolve_named_model"]
