"""The dataset interface for visual question answering: records of image, question and answer, and the
registry of loaders that open a named dataset's splits."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterator

from PIL import Image

from qapframe.registry import Registry
from qapframe.strategy import Strategy


@dataclass
class VQARecord:
    """One question about one image; ``choices`` is set for multiple-choice questions."""

    id: str
    image: Image.Image
    question: str
    answer: str  # for multiple choice: the text of the correct choice
    choices: list[str] | None = None
    meta: dict = field(default_factory=dict)  # e.g. question type, for per-type accuracy


class VQADataset(abc.ABC):
    """A finite, indexable split of VQA records; implementations must be deterministic."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> VQARecord: ...

    def __iter__(self) -> Iterator[VQARecord]:
        for i in range(len(self)):
            yield self[i]


class DatasetLoader(Strategy, abc.ABC):
    """Opens one split of a dataset as a `VQADataset`; its options are its pydantic ``Config``.

    A spec names one as ``dataset: {name: <loader>, ...options}``; plugins register through the
    entry-point group ``qapframe.datasets``.
    """

    @abc.abstractmethod
    def open(self, split: str, num_samples: int | None = None) -> VQADataset:
        """The records of ``split`` (``test``, ``calibration``, ...); ``num_samples`` is a hint that only the
        first ``num_samples`` are read (the caller keeps only those either way)."""


DATASETS: Registry[type[DatasetLoader]] = Registry(
    "dataset loader", "qapframe.datasets",
    ("qapframe.data.synthetic", "qapframe.data.jsonl", "qapframe.data.hf", "qapframe.data.scienceqa"),
)
