"""Writing a model directory atomically, and safetensors shards one module's tensors at a time.

Everything is written into a temporary directory beside the destination and renamed into place at the end:
an interrupted or failed export (disk full, Ctrl-C) leaves no directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from qapframe.deploy.scheme import ExportError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def check_destination(out: str | Path, overwrite: bool = False) -> Path:
    """``out`` as a Path, or `ExportError` when it is a file, or a non-empty directory and not ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"export: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"export: {out} exists and is not empty; choose another --out or pass --overwrite")
    return out


def _publishable(tmp: Path) -> None:
    """mkdtemp and safetensors create private (0700/0600) entries: give them the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for path in tmp.iterdir():
        os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out``, on failure it is removed.

    An existing non-empty ``out`` is refused unless ``overwrite``; it is replaced only once the new one is complete.
    """
    out = check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _publishable(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardWriter:
    """Collects tensors and writes a shard whenever ``max_shard_bytes`` is reached; `close` writes the index.

    A single shard is named ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``, the layout ``from_pretrained`` and vLLM read.
    """

    def __init__(self, directory: Path, max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata or {"format": "pt"}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add one module's tensors (kept together in one shard)."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        for key, value in tensors.items():
            if key in self._pending:
                raise ExportError(f"export: tensor {key!r} written twice")
            self._pending[key] = value.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        index = len(self._shards)
        save_file(self._pending, str(self.directory / f"shard-{index}.tmp"), metadata=self.metadata)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard (and the index when there are several); returns the file names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.directory / "shard-0.tmp", self.directory / SINGLE_FILE)
            return [SINGLE_FILE]
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, (name, keys) in enumerate(zip(names, self._shards)):
            os.replace(self.directory / f"shard-{i}.tmp", self.directory / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return names + [INDEX_FILE]


def read_tensors(directory: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a (sharded or single-file) safetensors checkpoint; only ``keys`` when given."""
    from safetensors import safe_open

    index = directory / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ExportError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; not a model directory")
    wanted = None if keys is None else set(keys)
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as f:
            for key in f.keys():
                if wanted is None or key in wanted:
                    out[key] = f.get_tensor(key)
    return out


__all__ = ["INDEX_FILE", "SINGLE_FILE", "ShardWriter", "atomic_directory", "check_destination", "read_tensors"]
