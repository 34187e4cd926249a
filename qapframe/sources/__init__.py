"""Named models: ``model: {path: <name>}`` resolves through one registry of model sources.

A source is a callable returning a local directory that ``from_pretrained`` loads (config, weights,
processor or tokenizer files); it may build that directory on first use (a conversion, a download a
plugin performs) and cache it. Built-ins register with ``@MODEL_SOURCES.register(name)``; plugins
through the entry-point group ``qapframe.model_sources``. Anything that is not a registered name is a
path (or, elsewhere, a hub id).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from qapframe.cache import cache_dir  # re-exported: the sources cache converted models there
from qapframe.registry import Registry

ModelSourceFn = Callable[[], Path]  # () -> directory loadable with from_pretrained

MODEL_SOURCES: Registry[ModelSourceFn] = Registry(
    "model source", "qapframe.model_sources",
    ("qapframe.sources.toy", "qapframe.sources.smollm2", "qapframe.sources.smol_llava"),
)
PROVENANCE_FILE = "qapframe_source.json"  # what a cached directory was built from


def build_once(target: Path, provenance: dict, build: Callable[[Path], None], message: str) -> Path:
    """``target``, rebuilt by ``build(directory)`` unless it was built from exactly ``provenance``.

    Built beside the target and renamed into place: an interrupted build leaves no directory that looks
    complete, and two processes building at once both end with a whole one.
    """
    marker = target / PROVENANCE_FILE
    if marker.is_file() and json.loads(marker.read_text()) == provenance:
        return target
    logging.getLogger("qapframe.sources").warning("qapframe: %s in %s", message, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / PROVENANCE_FILE).is_file():  # another process did not win the race either
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_named_model(name: str) -> Path | None:
    """The directory of the registered model ``name``, or None when ``name`` is not a registered source."""
    if name not in MODEL_SOURCES:
        return None
    return Path(MODEL_SOURCES.get(name)())


# A Hugging Face hub id: an optional namespace and a name, each up to 96 of [A-Za-z0-9_.-], not starting
# with '-' or '.', and without '--' or '..' (the hub's own rules).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}$")


def is_hub_id(path: str) -> bool:
    """Whether ``path`` is a well-formed Hugging Face hub id (``namespace/name``) that is no local path."""
    local = Path(path).expanduser()
    return (not local.exists() and not path.startswith(("/", ".", "~")) and path.count("/") == 1
            and bool(_HUB_ID.match(path)) and "--" not in path and ".." not in path)


def model_path_problem(path: str) -> str | None:
    """Why ``model.path`` cannot be loaded, or None: it must name a registered model, be a local folder
    with a ``config.json``, or a well-formed hub id. Nothing is loaded or downloaded to decide."""
    named = MODEL_SOURCES.names()
    if path in named:
        return None
    valid = (f"valid: a named model ({', '.join(named)}), a local directory saved with save_pretrained "
             "(config.json, weights, processor files), or a hub id namespace/name")
    local = Path(path).expanduser()
    if local.is_dir():
        return None if (local / "config.json").is_file() else f"{path!r} has no config.json; {valid}"
    if local.exists():
        return f"{path!r} is a file, not a model directory; {valid}"
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path:
        return f"{path!r} does not exist; {valid}"
    if is_hub_id(path):
        return None  # from_pretrained resolves it: the local Hugging Face cache, else a download
    return (f"{path!r} is neither a local directory nor a well-formed hub id (namespace/name: letters, "
            f"digits, '-', '_', '.'); {valid}")


__all__ = ["MODEL_SOURCES", "PROVENANCE_FILE", "ModelSourceFn", "build_once", "cache_dir", "is_hub_id", "model_path_problem",
           "resolve_named_model"]
