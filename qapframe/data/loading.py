"""One entry point from an evaluation spec's ``dataset`` field to a `VQADataset`.

The field is a string, as it always was (``synthetic``, a ``.jsonl`` file, or a folder of ``<split>.jsonl``),
or a registered loader with its options, ``{name: <loader>, ...options}`` (`DatasetSpec`, the same
``{name, **params}`` entry the strategies use). A string stands for the entry it always meant:
``{name: synthetic}`` or ``{name: jsonl, path: ..., image_root: ...}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from qapframe.data.base import DATASETS, VQADataset, VQARecord
from qapframe.strategy import StrategySpec


class DatasetSpec(StrategySpec):
    """``{name: <dataset loader>, ...options}``: a loader registered in `DATASETS`; its Config checks the options."""

    registry = DATASETS  # type: ignore[assignment]


DatasetField = str | DatasetSpec  # what the spec's dataset fields hold


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


def dataset_spec(dataset: str | Mapping[str, Any] | DatasetSpec, split: str = "test",
                 image_root: str | None = None, seed: int = 0) -> DatasetSpec:
    """The loader entry ``dataset`` stands for; a string's ``image_root`` (JSONL) and ``seed`` (synthetic)
    are its options, and the structured forms carry their own."""
    if not isinstance(dataset, str):
        if image_root is not None or seed != 0:
            raise ValueError("image_root and seed belong to a dataset named by a string; "
                             "give them as the loader's options ({name: jsonl, image_root: ...})")
        return dataset if isinstance(dataset, DatasetSpec) else DatasetSpec.model_validate(dict(dataset))
    if dataset == "synthetic":
        return DatasetSpec(name="synthetic", seed=seed)
    if not Path(dataset).is_dir() and Path(dataset).suffix != ".jsonl":
        raise ValueError(
            f"dataset {dataset!r} is not known; use 'synthetic', a .jsonl file, or a folder with {split}.jsonl, "
            f"or name a loader: {{name: <loader>, ...options}} (loaders: {', '.join(DATASETS.names())})"
        )
    return DatasetSpec(name="jsonl", path=dataset, image_root=image_root)


def load_dataset(dataset: str | Mapping[str, Any] | DatasetSpec, split: str = "test", image_root: str | None = None,
                 num_samples: int | None = None, seed: int = 0) -> VQADataset:
    """``split`` of ``"synthetic"`` (seeded splits), a ``.jsonl`` file, a folder holding ``<split>.jsonl``, or a
    loader entry ``{name: <loader>, ...options}``.

    ``num_samples`` keeps the first records (None = all; for ``synthetic`` it sets the split size).
    """
    if num_samples is not None and num_samples < 0:
        raise ValueError(f"num_samples must be >= 0 or None, got {num_samples}")
    loaded = dataset_spec(dataset, split, image_root, seed).build().open(split, num_samples)
    return loaded if num_samples is None or len(loaded) <= num_samples else Head(loaded, num_samples)


__all__ = ["DatasetField", "DatasetSpec", "Head", "dataset_spec", "load_dataset"]
