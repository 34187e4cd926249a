"""``results.jsonl``: one JSON line per (configuration, seed), appended atomically as each run finishes.

A run is identified by a stable key, a hash of its concrete spec (without the output section, which
does not change results) and its seed; re-running a spec skips every key already recorded as ``ok``
and retries the others, whose new line replaces the old error line (`ResultsFile.replace`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from qapframe.spec import PipelineSpec

RESULTS_FILE = "results.jsonl"


def configuration_dict(spec: PipelineSpec) -> dict[str, Any]:
    """The parts of a concrete spec that determine its results (output dir and seed list left out)."""
    data = spec.to_dict()
    data.pop("output", None)
    data.pop("sweep", None)
    data["evaluation"] = {k: v for k, v in data["evaluation"].items() if k != "seeds"}
    return data


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def configuration_id(spec: PipelineSpec) -> str:
    """Same for every seed of one configuration: the row a run belongs to in summary.md."""
    return _digest(configuration_dict(spec))


def run_key(spec: PipelineSpec, seed: int) -> str:
    """The resume key of one (configuration, seed) run."""
    return _digest({"configuration": configuration_dict(spec), "seed": seed})


def write_json_atomically(path: str | Path, payload: Any) -> None:
    """Replace ``path`` with ``payload`` as indented JSON; a reader or a crash never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(f.name, path)


class ResultsFile:
    """Append-only JSONL of run records; readers tolerate a torn last line left by a killed writer."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line with a single ``write`` on an O_APPEND descriptor, then fsync.

        POSIX appends of one write land contiguously, so a concurrent reader or a crash never sees
        half of one record glued to another.
        """
        line = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if self._ends_torn(fd):
                line = b"\n" + line  # seal a line torn by a crash so this record stays parseable
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace(self, record: dict[str, Any]) -> None:
        """Write ``record`` in place of every line with its key (a retried run's error row), atomically:
        the file is rewritten beside itself and renamed over, so a crash leaves the old or the new file."""
        key = record["key"]
        kept = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    same = json.loads(line).get("key") == key
                except (json.JSONDecodeError, AttributeError):
                    same = False  # a torn or foreign line stays as it is
                if line.strip() and not same:
                    kept.append(line)
        kept.append(json.dumps(record, sort_keys=True, allow_nan=False))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp", encoding="utf-8") as f:
            f.write("\n".join(kept) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, self.path)

    def _ends_torn(self, fd: int) -> bool:
        size = os.fstat(fd).st_size
        if size == 0:
            return False
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            return f.read(1) != b"\n"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line from an interrupted run; that run is simply redone
                if isinstance(record, dict) and "key" in record:
                    yield record

    def records(self) -> list[dict[str, Any]]:
        return list(self)

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last record of every key (an ``ok`` line written by a resumed run replaces an old error)."""
        out: dict[str, dict[str, Any]] = {}
        for record in self:
            out[record["key"]] = record
        return out

    def completed_keys(self) -> set[str]:
        """Keys with an ``ok`` record: these are skipped on resume; failed runs are tried again."""
        return {key for key, record in self.latest().items() if record.get("status") == "ok"}


__all__ = ["RESULTS_FILE", "ResultsFile", "configuration_dict", "configuration_id", "run_key", "write_json_atomically"]
