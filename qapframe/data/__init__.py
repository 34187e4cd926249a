"""VQA datasets: the interface, the registry of dataset loaders (synthetic, JSONL, Hugging Face `datasets`,
ScienceQA, plugins'), and qapframe's own synthetic benchmark."""

from qapframe.data.base import DATASETS, DatasetLoader, VQADataset, VQARecord
from qapframe.data.jsonl import JsonlFormatError, JsonlVQA, write_jsonl
from qapframe.data.loading import DatasetSpec, Head, dataset_spec, load_dataset
from qapframe.data.prompts import build_prompt, is_correct, normalize_answer
from qapframe.data.synthetic import SyntheticVQA, blank_image

__all__ = [
    "DATASETS",
    "DatasetLoader",
    "DatasetSpec",
    "Head",
    "JsonlFormatError",
    "JsonlVQA",
    "SyntheticVQA",
    "VQADataset",
    "VQARecord",
    "blank_image",
    "build_prompt",
    "dataset_spec",
    "is_correct",
    "load_dataset",
    "normalize_answer",
    "write_jsonl",
]
