"""One quantization shared by the runs of a sweep that differ only in their token pruning.

Calibration and quantization depend on the model, the quantizer, the seed and the calibration records, never on
the scorer or pruner: pruning is installed after quantizing, and calibration runs dense. A sweep of ten pruning
methods under one quantizer used to calibrate ten times (GPTQ on smol-llava: 66 s of a 180 s run). The runner
now orders its runs by `quantization_key` and quantizes once per group: each run of the group installs its
pruning on the group's quantized model and removes it afterwards (`ModelAdapter.remove`), with the random state
restored to what it was right after quantizing. So a run computes exactly what a fresh quantization would give
it (`tests/eval/test_reuse.py` compares every answer), and memory holds one quantized model, as before.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from qapframe.spec import PipelineSpec

Run = tuple[PipelineSpec, int]  # (configuration, seed)


def quantization_key(spec: PipelineSpec, seed: int) -> str | None:
    """What a run's quantized model depends on, as a digest; None when there is nothing to share: no quantizer,
    or a model dispatched by ``device_map`` (each of its runs re-loads it; see `ModelSource.fresh`)."""
    if spec.quantizer is None or spec.model.device_map is not None:
        return None
    ev = spec.to_dict()["evaluation"]
    calibration = {k: ev.get(k) for k in ("dataset", "calibration_dataset", "image_root", "calibration_samples")}
    data = {"model": spec.model.model_dump(mode="json"), "quantizer": spec.quantizer.model_dump(mode="json"),
            "seed": seed, "calibration": calibration}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def order_by_quantization(runs: Sequence[Run]) -> list[Run]:
    """``runs`` with those sharing a quantization next to each other: groups in the order their first run
    appears, runs within a group in spec order; runs with nothing to share keep their place among the groups."""
    groups: dict[Any, list[Run]] = {}
    for index, (spec, seed) in enumerate(runs):
        key = quantization_key(spec, seed)
        groups.setdefault(("run", index) if key is None else key, []).append((spec, seed))
    return [run for group in groups.values() for run in group]


@dataclass
class RandomState:
    """Python's, NumPy's and torch's global generators (CUDA's too once initialised)."""

    python: Any
    numpy: Any
    torch: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> "RandomState":
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@dataclass
class QuantizedModel:
    """A quantized model without pruning installed, and what its quantization left behind."""

    key: str
    model: torch.nn.Module
    random_state: RandomState  # right after quantizing: what the group's first run continued from
    calibration_peak_mib: float  # peak memory from the run's start through quantization
    quantize_s: float


class QuantizedModelSlot:
    """Holds at most one `QuantizedModel` between runs (a second would double the memory a run needs)."""

    def __init__(self) -> None:
        self._held: QuantizedModel | None = None

    def take(self, key: str | None) -> QuantizedModel | None:
        """The held model if it was quantized under ``key``; otherwise None, and the held one is released."""
        held, self._held = self._held, None
        return held if held is not None and key is not None and held.key == key else None

    def keep(self, quantized: QuantizedModel) -> None:
        self._held = quantized


__all__ = ["QuantizedModel", "QuantizedModelSlot", "RandomState", "order_by_quantization", "quantization_key"]
