"""Local VQA data: one JSON object per line plus a folder of images (ScienceQA-IMG, GQA, your own set).

Each line: ``{"id": str, "image": path, "question": str, "answer": str | int, "choices": [str, ...]?}``.
``image`` is relative to ``image_root`` (default: the JSONL file's folder). For multiple choice the
answer is a choice's text or its 0-based index. Other keys are kept in ``record.meta``. Every line is
validated when the dataset is opened, so a bad line fails early with its file, line number and field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from PIL import Image
from pydantic import Field

from qapframe.data.base import DATASETS, DatasetLoader, VQADataset, VQARecord
from qapframe.strategy import StrategyConfig

REQUIRED = ("id", "image", "question", "answer")


class JsonlFormatError(ValueError):
    """A JSONL line that is not a valid VQA record."""

    def __init__(self, path: Path, line: int, field: str | None, message: str):
        where = f"{path}:{line}" + (f": field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.field = path, line, field


def _parse_line(path: Path, line_no: int, text: str, root: Path) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JsonlFormatError(path, line_no, None, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise JsonlFormatError(path, line_no, None, f"expected a JSON object, got {type(obj).__name__}")
    for key in REQUIRED:
        if key not in obj:
            raise JsonlFormatError(path, line_no, key, f"missing; every line needs {', '.join(REQUIRED)}")
    for key in ("id", "image", "question"):
        if not isinstance(obj[key], str) or not obj[key]:
            raise JsonlFormatError(path, line_no, key, f"must be a non-empty string, got {obj[key]!r}")
    choices = obj.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise JsonlFormatError(path, line_no, "choices", f"must be a list of at least 2 strings, got {choices!r}")
    answer = obj["answer"]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if choices is None or not 0 <= answer < len(choices):
            valid = f"0..{len(choices) - 1}" if choices else "a string (there are no choices)"
            raise JsonlFormatError(path, line_no, "answer", f"index {answer} is not valid; expected {valid}")
        answer = choices[answer]
    elif not isinstance(answer, str):
        raise JsonlFormatError(path, line_no, "answer", f"must be a string or a choice index, got {answer!r}")
    elif choices is not None and answer not in choices:
        raise JsonlFormatError(path, line_no, "answer", f"{answer!r} is not one of the choices {choices}")
    image = root / obj["image"]
    if not image.is_file():
        raise JsonlFormatError(path, line_no, "image", f"no such file: {image}")
    meta = {k: v for k, v in obj.items() if k not in (*REQUIRED, "choices", "meta")}
    meta.update(obj.get("meta") or {})
    return {"id": obj["id"], "image": image, "question": obj["question"], "answer": answer,
            "choices": choices, "meta": meta}


class JsonlVQA(VQADataset):
    """Records from a JSONL file; images are opened (as RGB) when a record is read."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"JsonlVQA: no such file: {self.path}")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"JsonlVQA: image_root is not a folder: {self.image_root}")
        self._rows: list[dict] = []
        seen: dict[str, int] = {}
        with self.path.open(encoding="utf-8") as handle:
            for line_no, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                row = _parse_line(self.path, line_no, text, self.image_root)
                if row["id"] in seen:
                    raise JsonlFormatError(self.path, line_no, "id",
                                           f"duplicate id {row['id']!r} (first on line {seen[row['id']]})")
                seen[row["id"]] = line_no
                self._rows.append(row)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> VQARecord:
        row = self._rows[index]
        with Image.open(row["image"]) as img:
            image = img.convert("RGB")
        return VQARecord(id=row["id"], image=image, question=row["question"], answer=row["answer"],
                         choices=list(row["choices"]) if row["choices"] else None, meta=dict(row["meta"]))

    def __repr__(self) -> str:
        return f"JsonlVQA({str(self.path)!r}, {len(self)} records)"


def write_jsonl(records: Iterable[VQARecord], path: str | Path, image_dir: str = "images") -> Path:
    """Write records as JSONL plus PNG images under ``<folder of path>/<image_dir>``; returns ``path``."""
    path = Path(path)
    images = path.parent / image_dir
    images.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            name = f"{image_dir}/{record.id}.png"
            record.image.save(path.parent / name)
            line = {"id": record.id, "image": name, "question": record.question, "answer": record.answer}
            if record.choices:
                line["choices"] = record.choices
            if record.meta:
                line["meta"] = record.meta
            handle.write(json.dumps(line) + "\n")
    return path


class JsonlConfig(StrategyConfig):
    path: str = Field(..., min_length=1, description="a .jsonl file (used for every split) or a folder holding "
                                                     "<split>.jsonl (test.jsonl, calibration.jsonl, ...)")
    image_root: str | None = Field(None, description="folder the image paths are relative to; None: the file's folder")


@DATASETS.register("jsonl")
class JsonlLoader(DatasetLoader):
    """Local records: one JSON object per line plus a folder of images."""

    Config = JsonlConfig

    def open(self, split: str, num_samples: int | None = None) -> JsonlVQA:
        path = Path(self.config.path)
        return JsonlVQA(path / f"{split}.jsonl" if path.is_dir() else path, self.config.image_root)


__all__ = ["JsonlConfig", "JsonlFormatError", "JsonlLoader", "JsonlVQA", "write_jsonl"]
