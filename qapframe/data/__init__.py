"""VQA datasets: the interface, local JSONL data, and qapframe's own synthetic benchmark."""

from qapframe.data.base import VQADataset, VQARecord

__all__ = ["VQADataset", "VQARecord"]
