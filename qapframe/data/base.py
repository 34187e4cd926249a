"""The dataset interface for visual question answering: records of image, question and answer."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterator

from PIL import Image


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
