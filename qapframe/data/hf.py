"""Any Hugging Face `datasets` dataset as VQA records: a ``save_to_disk`` folder, a local data folder or a hub id.

A column mapping says where each record's image, question, answer and (for multiple choice) choices are; the
answer is its text or the index of the correct choice (ScienceQA's ``answer``). Rows without an image (ScienceQA's
text-only questions) are skipped by default (``missing_image: skip``, with a warning giving their count), so
ScienceQA's test split reads as ScienceQA-IMG. Every row is checked when a split is opened, so a bad row fails
early with its split, row and column; images are decoded when a record is read.

``datasets`` is an optional dependency (``pip install 'qapframe[hf]'``), imported when a split is opened.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qapframe.data.base import DATASETS, DatasetLoader, VQADataset, VQARecord
from qapframe.data.synthetic import blank_image
from qapframe.strategy import StrategyConfig

INSTALL = "pip install 'qapframe[hf]'"
_SAVED = ("dataset_dict.json", "state.json")  # what save_to_disk writes for a DatasetDict / a Dataset


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError(f"the hf dataset loader needs the `datasets` package, which is not installed: "
                          f"{INSTALL}") from None
    return datasets


class HFColumns(BaseModel):
    """Which column holds each part of a record; None leaves an optional part out."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field("image", min_length=1, description="a datasets.Image column")
    question: str = Field("question", min_length=1)
    answer: str = Field("answer", min_length=1, description="the answer's text, or the index of the correct choice")
    choices: str | None = Field(None, description="a list-of-strings column (multiple choice); None: short answers")
    context: str | None = Field(None, description="text put before the question as 'Context: ...' when not empty "
                                                  "(ScienceQA's hint)")
    type: str | None = Field(None, description="the question type, record.meta['type'] (per-type accuracy)")
    id: str | None = Field(None, description="unique record ids; None: '<split>-<row>'")


class HFConfig(StrategyConfig):
    path: str = Field(..., min_length=1, description="a save_to_disk folder, a local data folder, or a hub id "
                                                     "(downloaded by datasets into its cache)")
    config_name: str | None = Field(None, description="the dataset's configuration (subset), for load_dataset")
    revision: str | None = Field(None, description="a hub dataset's branch, tag or commit")
    split_map: dict[str, str] = Field(default_factory=dict, description="qapframe split (test, calibration, ...) -> "
                                      "the dataset's split; unmapped names are used as they are")
    columns: HFColumns = Field(default_factory=HFColumns)
    meta_columns: list[str] | None = Field(None, description="columns copied into record.meta; None: every "
                                           "column not mapped above that holds no images")
    missing_image: Literal["skip", "blank", "error"] = Field(
        "skip", description="rows without an image: skipped (logged with their count), shown a blank image, or "
                            "an error")


def _open_split(config: HFConfig, split: str, name: str):
    """The ``datasets.Dataset`` of the dataset's split ``name`` (qapframe's ``split``)."""
    datasets = _datasets()
    local = Path(config.path).expanduser()
    if local.is_dir() and any((local / f).is_file() for f in _SAVED):
        for field in ("config_name", "revision"):
            if getattr(config, field) is not None:
                raise ValueError(f"{field}: applies to load_dataset; {config.path!r} is a save_to_disk folder")
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.Dataset):
            return loaded  # one saved split serves every split, as a single .jsonl file does
    else:
        try:
            loaded = datasets.load_dataset(config.path, config.config_name, revision=config.revision)
        except Exception as exc:  # the library's many error types: name the dataset and keep its message
            raise ValueError(f"datasets.load_dataset({config.path!r}) failed: {type(exc).__name__}: {exc}") from exc
    if name not in loaded:
        mapped = f"mapped by split_map to {name!r}" if name != split else "not in split_map"
        raise ValueError(f"{config.path!r} has no split {name!r} (qapframe's {split!r} split, {mapped}); its splits: "
                         f"{', '.join(loaded)}; map it with split_map: {{{split}: <one of them>}}")
    return loaded[name]


class HFVQA(VQADataset):
    """Records from one split of a ``datasets.Dataset``; text columns are read and checked when it is opened."""

    def __init__(self, table, config: HFConfig, split: str = "test"):
        datasets = _datasets()
        from datasets.features.features import require_decoding

        self.config, self.split = config, split
        self.where = f"hf dataset {config.path!r} split {split!r}"
        columns = config.columns
        mapped = {field: column for field, column in columns.model_dump().items() if column is not None}
        for field, column in mapped.items():
            self._need_column(table, f"columns.{field}", column)
        image_feature = table.features[columns.image]
        if not isinstance(image_feature, datasets.Image):
            raise ValueError(f"{self.where}: columns.image: column {columns.image!r} holds {image_feature}, not images "
                             "(a datasets.Image column)")
        if config.meta_columns is None:
            unused = [c for c in table.column_names if c not in mapped.values()]
            meta = [c for c in unused if not require_decoding(table.features[c])]
        else:
            meta = config.meta_columns
            for column in meta:
                self._need_column(table, "meta_columns", column)
                if require_decoding(table.features[column]):
                    raise ValueError(f"{self.where}: meta_columns: column {column!r} holds {table.features[column]}; "
                                     "only plain values go into record.meta")
        self._meta = meta
        # Which rows have an image, from the Arrow null mask: no image is read or decoded to decide.
        missing = table.select_columns([columns.image]).with_format("arrow")[:][columns.image].is_null().to_pylist()
        text = list(dict.fromkeys([*(v for k, v in mapped.items() if k != "image"), *meta]))
        values = table.select_columns(text).with_format(None)[:]  # column -> list of python values
        self._rows: list[dict[str, Any]] = []
        seen: dict[str, int] = {}
        for row, absent in enumerate(missing):
            if absent and config.missing_image == "skip":
                continue
            if absent and config.missing_image == "error":
                raise ValueError(f"{self.where}: row {row}: columns.image ({columns.image!r}) is empty; set "
                                 "missing_image: skip (leave such rows out) or blank (show a blank image)")
            parsed = self._parse(row, {c: values[c][row] for c in text})
            if parsed["id"] in seen:
                raise ValueError(f"{self.where}: row {row}: columns.id: duplicate id {parsed['id']!r} "
                                 f"(first in row {seen[parsed['id']]})")
            seen[parsed["id"]] = row
            self._rows.append({**parsed, "row": row, "image": not absent})
        skipped = sum(missing) if config.missing_image == "skip" else 0
        if skipped:
            logging.getLogger("qapframe.data").warning(
                "qapframe: %s: skipped %d of %d rows that have no image (missing_image: skip)", self.where, skipped,
                len(missing))
        self._images = table.select_columns([columns.image])

    def _need_column(self, table, field: str, column: str) -> None:
        if column not in table.column_names:
            raise ValueError(f"{self.where}: {field}: no column {column!r}; its columns: "
                             f"{', '.join(table.column_names)}")

    def _parse(self, row: int, value: dict[str, Any]) -> dict[str, Any]:
        """One row's id, question, answer, choices and meta, checked as the JSONL reader checks a line."""
        columns = self.config.columns

        def bad(field: str, message: str) -> ValueError:
            return ValueError(f"{self.where}: row {row}: columns.{field} ({getattr(columns, field)!r}): {message}")

        question = value[columns.question]
        if not isinstance(question, str) or not question.strip():
            raise bad("question", f"must be a non-empty string, got {question!r}")
        if columns.context is not None:
            context = value[columns.context]
            if context is not None and not isinstance(context, str):
                raise bad("context", f"must be a string, got {context!r}")
            if context and context.strip():
                question = f"Context: {context.strip()}\n{question}"
        choices = value[columns.choices] if columns.choices is not None else None
        if columns.choices is not None:
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise bad("choices", f"must be a list of at least 2 strings, got {choices!r}")
        answer = value[columns.answer]
        if isinstance(answer, int) and not isinstance(answer, bool):
            if choices is None or not 0 <= answer < len(choices):
                valid = (f"0..{len(choices) - 1}" if choices
                         else "a string (there is no choices column; set columns.choices)")
                raise bad("answer", f"index {answer} is not valid; expected {valid}")
            answer = choices[answer]
        elif not isinstance(answer, str) or not answer:
            raise bad("answer", f"must be a non-empty string or a choice index, got {answer!r}")
        elif choices is not None and answer not in choices:
            raise bad("answer", f"{answer!r} is not one of the choices {choices}")
        record_id = f"{self.split}-{row}" if columns.id is None else str(value[columns.id])
        meta = {c: value[c] for c in self._meta}
        if columns.type is not None:
            meta["type"] = str(value[columns.type])
        return {"id": record_id, "question": question, "answer": answer, "choices": choices, "meta": meta}

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> VQARecord:
        row = self._rows[index]
        if row["image"]:
            image = self._images[row["row"]][self.config.columns.image].convert("RGB")
        else:
            image = blank_image()  # missing_image: blank
        return VQARecord(id=row["id"], image=image, question=row["question"], answer=row["answer"],
                         choices=list(row["choices"]) if row["choices"] else None, meta=dict(row["meta"]))

    def __repr__(self) -> str:
        return f"HFVQA({self.config.path!r}, split={self.split!r}, {len(self)} records)"


@DATASETS.register("hf")
class HFLoader(DatasetLoader):
    """A Hugging Face `datasets` dataset (save_to_disk folder, local data folder or hub id) with a column mapping."""

    Config = HFConfig

    def open(self, split: str, num_samples: int | None = None) -> HFVQA:
        name = self.config.split_map.get(split, split)
        return HFVQA(_open_split(self.config, split, name), self.config, name)


__all__ = ["INSTALL", "HFColumns", "HFConfig", "HFLoader", "HFVQA"]
