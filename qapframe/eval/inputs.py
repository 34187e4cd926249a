"""The records a run uses and the model inputs built from them: evaluation batches and calibration inputs.

Evaluation records are fixed per spec; calibration records are a seeded subset of a calibration split per run
seed (``evaluation.calibration_dataset``'s, else the evaluation dataset's), and each becomes one input dict
(prompt plus answer, no padding).
"""

from __future__ import annotations

import json
import random
from typing import Sequence

import torch

from qapframe import distributed as dist
from qapframe.data.base import VQADataset, VQARecord
from qapframe.data.loading import DatasetField
from qapframe.errors import QapframeError
from qapframe.eval.loading import ModelSource
from qapframe.spec import EvaluationSpec


def _open_dataset(dataset: DatasetField, image_root: str | None, split: str, field: str) -> VQADataset:
    from qapframe.data import load_dataset

    try:
        return load_dataset(dataset, split, image_root=image_root)
    except (ImportError, OSError, ValueError) as exc:
        raise QapframeError(f"evaluation.{field} ({split} split): {exc}") from exc


class DataCache:
    """Evaluation records are fixed per spec; calibration records are a seeded subset per run seed."""

    def __init__(self) -> None:
        self._datasets: dict[tuple, VQADataset] = {}

    def dataset(self, evaluation: EvaluationSpec, split: str) -> VQADataset:
        """``split`` of the evaluation dataset."""
        return self._open(evaluation.dataset, evaluation.image_root, split, "dataset")

    def calibration_dataset(self, evaluation: EvaluationSpec) -> VQADataset:
        """The calibration split of ``evaluation.calibration_dataset``, or of the evaluation dataset when unset."""
        if evaluation.calibration_dataset is None:
            return self.dataset(evaluation, "calibration")
        return self._open(evaluation.calibration_dataset, None, "calibration", "calibration_dataset")

    def _open(self, dataset: DatasetField, image_root: str | None, split: str, field: str) -> VQADataset:
        named = dataset if isinstance(dataset, str) else json.dumps(dataset.model_dump(mode="json"), sort_keys=True)
        key = (named, image_root, split)
        if key not in self._datasets:
            self._datasets[key] = _open_dataset(dataset, image_root, split, field)
        return self._datasets[key]

    def evaluation_records(self, evaluation: EvaluationSpec) -> list[VQARecord]:
        dataset = self.dataset(evaluation, evaluation.split)
        n = len(dataset) if evaluation.num_samples is None else min(evaluation.num_samples, len(dataset))
        return [dataset[i] for i in range(n)]

    def calibration_records(self, evaluation: EvaluationSpec, seed: int) -> list[VQARecord]:
        if evaluation.calibration_samples == 0:
            return []
        dataset = self.calibration_dataset(evaluation)
        n = min(evaluation.calibration_samples, len(dataset))
        # Which records calibrate is part of what a seed varies (the spread over seeds includes it).
        indices = sorted(random.Random(f"qapframe-calibration:{seed}").sample(range(len(dataset)), n))
        return [dataset[i] for i in indices]


def batches(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def model_inputs(processor, records: Sequence[VQARecord], model: torch.nn.Module, with_answer: bool = False):
    """The keyword arguments of one batch for ``model``; ``with_answer`` appends each answer (calibration text)."""
    from qapframe.data.prompts import build_prompt, uses_chat_template

    eos = processor.tokenizer.eos_token
    # A chat model's answer is its assistant turn: the text right after the turn opens, then the turn's end.
    answer = (lambda r: f"{r.answer}{eos}") if uses_chat_template(processor) else (lambda r: f" {r.answer}")
    texts = [build_prompt(r, processor) + (answer(r) if with_answer else "") for r in records]
    return processor_inputs(processor, texts, [r.image for r in records], model)


def processor_inputs(processor, texts: Sequence[str], images: Sequence, model: torch.nn.Module) -> dict:
    """``processor``'s tensors for prompt ``texts`` (one image each), left-padded, on ``model``'s device and dtype."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # greedy generation of a batch needs left padding
    try:
        inputs = processor(images=list(images), text=list(texts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return dict(inputs)


def calibration_inputs(
    evaluation: EvaluationSpec, seed: int, source: ModelSource, data: DataCache, model: torch.nn.Module
) -> list[dict]:
    """This rank's calibration batches: one input dict per record (prompt and answer, no padding).

    Rank r calibrates on records r::world and the quantizers all-reduce their statistics.
    """
    everything = data.calibration_records(evaluation, seed)
    if dist.is_distributed() and 0 < len(everything) < dist.world_size():
        raise ValueError(
            f"evaluation.calibration_samples: {len(everything)} calibration records cannot be shared by "
            f"{dist.world_size()} processes; use at least one per process (or 0 for none)"
        )
    return [model_inputs(source.processor, [r], model, with_answer=True) for r in dist.shard(everything)]


__all__ = ["DataCache", "batches", "calibration_inputs", "model_inputs", "processor_inputs"]
