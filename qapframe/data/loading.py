"""One entry point from an evaluation spec's ``dataset`` field to a `VQADataset`."""

from __future__ import annotations

from pathlib import Path

from qapframe.data.base import VQADataset, VQARecord
from qapframe.data.jsonl import JsonlVQA
from qapframe.data.synthetic import SyntheticVQA


class Head(VQADataset):
    """The first ``size`` records of another dataset."""

    def __init__(self, dataset: VQADataset, size: int):
        self.dataset = dataset
        self.size = min(size, len(dataset))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> VQARecord:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} records")
        return self.dataset[index]


def load_dataset(name_or_path: str, split: str = "test", image_root: str | None = None,
                 num_samples: int | None = None, seed: int = 0) -> VQADataset:
    """``"synthetic"`` (seeded splits), a ``.jsonl`` file, or a folder holding ``<split>.jsonl``.

    ``num_samples`` keeps the first records (None = all; for ``synthetic`` it sets the split size).
    """
    if num_samples is not None and num_samples < 0:
        raise ValueError(f"num_samples must be >= 0 or None, got {num_samples}")
    if name_or_path == "synthetic":
        return SyntheticVQA(split, size=num_samples, seed=seed)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    elif path.suffix != ".jsonl":
        raise ValueError(
            f"dataset {name_or_path!r} is not known; use 'synthetic', a .jsonl file, or a folder with {split}.jsonl"
        )
    dataset = JsonlVQA(path, image_root)
    return dataset if num_samples is None else Head(dataset, num_samples)


__all__ = ["Head", "load_dataset"]
