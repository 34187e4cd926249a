"""The results line of a run: every rank's part merged into one ``ok`` record, or an ``error`` record."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Sequence

from qapframe import distributed as dist
from qapframe.eval.labels import describe
from qapframe.eval.metrics import record_metrics
from qapframe.eval.results import configuration_dict, configuration_id, run_key
from qapframe.spec import PipelineSpec


def merge_parts(spec: PipelineSpec, seed: int, parts: list[dict[str, Any]], elapsed: float,
                varied: Sequence[str]) -> dict[str, Any]:
    """Rank 0: one results line from every rank's part of a run (`evaluate_run`'s return values)."""
    outcomes = [o for p in parts for o in p["outcomes"]]
    metrics = record_metrics(outcomes)
    samples = sum(p["samples"] for p in parts)
    metrics["prefill_ms_per_sample"] = 1000 * sum(p["prefill_s"] for p in parts) / samples if samples else None
    metrics["peak_memory_mib"] = max(p["peak_memory_mib"] for p in parts)
    metrics["peak_memory_kind"] = parts[0]["memory_kind"]
    dense = next((p["dense_tokens"] for p in parts if p["dense_tokens"]), None)
    metrics["dense_tokens"] = dense
    info = describe(spec, varied)
    if spec.pruner is not None and info["retention"] is None and dense:
        info["retention"] = metrics["retained_tokens"] / dense
    return {
        **_identity(spec, seed, info),
        "status": "ok",
        "metrics": metrics,
        "outcomes": [o.to_dict() for o in sorted(outcomes, key=lambda o: o.index)],
        "elapsed_s": elapsed,
        "quantization": _quantization(parts),
    }


def _quantization(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``{"seconds", "reused"}``: how long calibrating and quantizing took (the slowest rank), and whether this
    run took the model a previous run quantized (its ``elapsed_s`` then leaves those seconds out); None: fp."""
    done = [p.get("quantization") for p in parts]
    if any(q is None for q in done):
        return None
    return {"seconds": max(q["seconds"] for q in done), "reused": done[0]["reused"]}


def _identity(spec: PipelineSpec, seed: int, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": run_key(spec, seed),
        "configuration_id": configuration_id(spec),
        "seed": seed,
        **info,
        "spec": configuration_dict(spec),
        "world_size": dist.world_size(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def error_record(spec: PipelineSpec, seed: int, errors: list, elapsed: float, varied: Sequence[str]) -> dict[str, Any]:
    """Rank 0: the results line of a failed run; ``errors`` holds ``(message, traceback)`` or None per rank."""
    rank_, (message, trace) = next((r, e) for r, e in enumerate(errors) if e)
    return {
        **_identity(spec, seed, describe(spec, varied)),
        "status": "error",
        "error": message + (f" (rank {rank_})" if len(errors) > 1 else ""),
        "traceback": trace[-4000:],
        "elapsed_s": elapsed,
    }


__all__ = ["error_record", "merge_parts"]
