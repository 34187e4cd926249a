"""VQA datasets: the interface, local JSONL data, and qapframe's own synthetic benchmark."""

from qapframe.data.base import VQADataset, VQARecord
from qapframe.data.jsonl import JsonlFormatError, JsonlVQA, write_jsonl
from qapframe.data.loading import Head, load_dataset
from qapframe.data.prompts import build_prompt, is_correct, normalize_answer
from qapframe.data.synthetic import SyntheticVQA, blank_image

__all__ = [
    "Head",
    "JsonlFormatError",
    "JsonlVQA",
    "SyntheticVQA",
    "VQADataset",
    "VQARecord",
    "blank_image",
    "build_prompt",
    "is_correct",
    "load_dataset",
    "normalize_answer",
    "write_jsonl",
]
