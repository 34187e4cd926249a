"""Evaluation metrics: accuracy (overall and per question type), retained vision tokens, prefill latency, memory.

Metrics are computed from per-record outcomes in dataset order, so a run sharded over several
processes and gathered gives exactly the numbers of a single process.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch


@dataclass
class RecordOutcome:
    """What happened to one evaluation record."""

    index: int  # position in the evaluation set: the gather order
    id: str
    type: str  # question type, for per-type accuracy ("" when the dataset has none)
    prediction: str
    correct: bool
    retained_tokens: float  # vision tokens the LLM received for this record's image(s)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def accuracy(outcomes: Sequence[RecordOutcome]) -> float:
    return sum(o.correct for o in outcomes) / len(outcomes) if outcomes else float("nan")


def accuracy_by_type(outcomes: Sequence[RecordOutcome]) -> dict[str, float]:
    by_type: dict[str, list[RecordOutcome]] = {}
    for o in outcomes:
        by_type.setdefault(o.type or "all", []).append(o)
    return {t: accuracy(group) for t, group in sorted(by_type.items())}


def record_metrics(outcomes: Sequence[RecordOutcome]) -> dict[str, Any]:
    """The deterministic metrics of one run (identical for any sharding of the records)."""
    ordered = sorted(outcomes, key=lambda o: o.index)
    return {
        "num_samples": len(ordered),
        "accuracy": accuracy(ordered),
        "accuracy_by_type": accuracy_by_type(ordered),
        "retained_tokens": statistics.fmean(o.retained_tokens for o in ordered) if ordered else float("nan"),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN mean for no values."""
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


class PrefillTimer:
    """Times each ``generate`` call's prefill: from `arm` (just before the call) to the end of its first
    forward, so vision encoding and token selection count whether they run inside the forward (dense,
    in-LLM pruning) or before it (pre-LLM pruning wraps ``generate``). Decoding steps are not counted.
    """

    def __init__(self, model: torch.nn.Module):
        self.seconds: list[float] = []
        self._start: float | None = None
        self._handle = model.register_forward_hook(self._post)

    @staticmethod
    def _sync() -> None:
        # CUDA kernels run asynchronously: wait for them so the time covers the work, not its launch.
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def arm(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _post(self, module, args, output) -> None:
        if self._start is not None:
            self._sync()
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None

    def remove(self) -> None:
        self._handle.remove()


def _reset_rss_peak() -> bool:
    """Reset this process's resident-set high-water mark (Linux >= 4.0: ``5`` into /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_peak_kib() is not None
    except OSError:
        return False


def _rss_peak_kib() -> int | None:
    """``VmHWM`` of /proc/self/status: the resident-set peak since the last reset, in KiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# What each `PeakMemory.kind` measures, as summary.md states it.
MEMORY_KINDS = {
    "cuda_max_allocated": "CUDA memory allocated by torch, peak over the run (counters reset per run)",
    "cpu_peak_rss_per_run": "peak resident memory of the process during the run (its high-water mark reset at "
    "the start of each run, so it includes the unmodified model copy kept for the next run)",
    "cpu_peak_rss_process": "peak resident memory of the process since it started (this system cannot reset "
    "it, so it only grows across runs)",
}


class PeakMemory:
    """Peak memory of one run in MiB; `start` resets the counters, `kind` says what was measured.

    On CUDA: ``torch.cuda.max_memory_allocated`` since `start` (all visible devices). On Linux CPU: the
    process's resident-set high-water mark (``VmHWM``), reset by `start` through /proc/self/clear_refs
    (tracemalloc does not see torch's allocator). Elsewhere the lifetime peak from ``getrusage``, which
    cannot be reset, and says so in its kind.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_peak_rss_process"

    def start(self) -> None:
        if self.cuda:
            for d in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(d)
        elif _reset_rss_peak():
            self.kind = "cpu_peak_rss_per_run"

    def peak_mib(self) -> float:
        if self.cuda:
            return sum(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / 2**20
        if self.kind == "cpu_peak_rss_per_run":
            return _rss_peak_kib() / 2**10
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


__all__ = [
    "MEMORY_KINDS",
    "PeakMemory",
    "PrefillTimer",
    "RecordOutcome",
    "accuracy",
    "accuracy_by_type",
    "mean_std",
    "record_metrics",
]
