"""`qapframe run SPEC`: every configuration of a spec (sweep expanded) times every seed, evaluated and recorded.

Each (configuration, seed) run starts from a fresh copy of the model, calibrates and quantizes it,
installs token pruning, answers the evaluation set with greedy ``generate``, and appends one line to
``results.jsonl``. Runs already recorded as ``ok`` are skipped (resume); a failing run is recorded
with its error and the others go on; a rerun retries it, and its new row replaces the error row. Under ``torchrun`` / ``accelerate launch`` the evaluation and
calibration batches are sharded over ranks and rank 0 gathers and writes everything.
"""

from __future__ import annotations

import gc
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from qapframe import distributed as dist
from qapframe.data.base import VQADataset, VQARecord
from qapframe.errors import QapframeError
from qapframe.eval.loading import ModelSource
from qapframe.eval.metrics import PeakMemory, PrefillTimer, RecordOutcome, record_metrics
from qapframe.eval.report import write_reports
from qapframe.eval.results import RESULTS_FILE, ResultsFile, configuration_dict, configuration_id, run_key
from qapframe.pipeline import Pipeline
from qapframe.spec import EvaluationSpec, PipelineSpec, StrategySpec, load_spec

SpecLike = Union[str, Path, dict, PipelineSpec]


@dataclass
class RunSummary:
    """What `run_spec` did; ``records`` holds the latest record of each of the spec's runs, in spec order."""

    output_dir: Path
    results_path: Path
    summary_path: Path | None
    plot_path: Path | None
    ran: int = 0
    skipped: int = 0
    failed: int = 0
    total: int = 0  # runs the spec describes (configurations x seeds)
    records: list[dict[str, Any]] = field(default_factory=list)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run_spec`: ``recorded`` of ``total`` runs are in ``results.jsonl``, intact; the run in
    progress is dropped, and running the spec again resumes after the recorded ones."""

    def __init__(self, recorded: int, total: int, results_path: Path):
        super().__init__(f"interrupted after {recorded} of {total} runs")
        self.recorded, self.total, self.results_path = recorded, total, results_path


# -- labels ------------------------------------------------------------------------------------


def strategy_label(spec: StrategySpec | None, none: str, skip: Sequence[str] = ()) -> str:
    """``name`` plus the fewest parameters that reproduce its config, e.g. ``rtn(scheme=W4A4)``
    (fields derived from others, like a scheme's bit widths, and defaults are left out)."""
    if spec is None:
        return none
    config_cls = spec.strategy_class.Config
    full = spec.config.model_dump(mode="json")
    given = dict(full)
    for name in list(full):  # drop every field the rest already implies
        trial = {k: v for k, v in given.items() if k != name}
        try:
            implied = config_cls.model_validate(trial).model_dump(mode="json") == full
        except ValueError:
            implied = False
        if implied:
            given = trial
    params = ", ".join(f"{k}={v}" for k, v in given.items() if k not in skip)
    return f"{spec.name}({params})" if params else spec.name


def _retention(spec: PipelineSpec) -> float | None:
    if spec.pruner is None:
        return None
    config = spec.pruner.config
    if getattr(config, "num_tokens", None) is not None:
        return None  # an absolute budget; filled in from the measured token counts
    return getattr(config, "retention", None)


def _dotted(data: dict, path: str) -> Any:
    for key in path.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def describe(spec: PipelineSpec, varied: Sequence[str] = ()) -> dict[str, Any]:
    """Quantizer, scorer and retention of a configuration, and a label naming them (plus ``varied``:
    dotted sweep paths outside the strategy sections, e.g. ``evaluation.max_new_tokens``)."""
    quantizer = strategy_label(spec.quantizer, "fp")
    scorer = strategy_label(spec.scorer, "dense")
    pruner = strategy_label(spec.pruner, "", skip=("retention", "num_tokens"))  # "" when dense
    retention = _retention(spec)
    if spec.pruner is None:
        budget = "dense"
    else:
        budget = f"{100 * retention:g}%" if retention else f"{spec.pruner.config.num_tokens} tokens"
    pruned_by = f" + {pruner} pruner" if pruner not in ("", "topk") else ""  # the default pruner goes unnamed
    label = f"{quantizer} / {scorer}{pruned_by} / {budget}"
    if varied:
        data = spec.to_dict()
        label += " [" + ", ".join(f"{path}={_dotted(data, path)}" for path in varied) + "]"
    return {"quantizer": quantizer, "scorer": scorer, "pruner": pruner, "retention": retention, "label": label}


def _varied_fields(spec: PipelineSpec) -> list[str]:
    strategies = ("quantizer", "scorer", "pruner")
    paths = [p for grid in spec.sweep for p in grid if p.split(".")[0] not in strategies]
    return list(dict.fromkeys(paths))


# -- data --------------------------------------------------------------------------------------


def _open_dataset(evaluation: EvaluationSpec, split: str) -> VQADataset:
    from qapframe.data import load_dataset

    try:
        return load_dataset(evaluation.dataset, split, image_root=evaluation.image_root)
    except (OSError, ValueError) as exc:
        raise QapframeError(f"evaluation.dataset ({split} split): {exc}") from exc


class DataCache:
    """Evaluation records are fixed per spec; calibration records are a seeded subset per run seed."""

    def __init__(self) -> None:
        self._datasets: dict[tuple, VQADataset] = {}

    def dataset(self, evaluation: EvaluationSpec, split: str) -> VQADataset:
        key = (evaluation.dataset, evaluation.image_root, split)
        if key not in self._datasets:
            self._datasets[key] = _open_dataset(evaluation, split)
        return self._datasets[key]

    def evaluation_records(self, evaluation: EvaluationSpec) -> list[VQARecord]:
        dataset = self.dataset(evaluation, evaluation.split)
        n = len(dataset) if evaluation.num_samples is None else min(evaluation.num_samples, len(dataset))
        return [dataset[i] for i in range(n)]

    def calibration_records(self, evaluation: EvaluationSpec, seed: int) -> list[VQARecord]:
        if evaluation.calibration_samples == 0:
            return []
        dataset = self.dataset(evaluation, "calibration")
        n = min(evaluation.calibration_samples, len(dataset))
        # Which records calibrate is part of what a seed varies (the spread over seeds includes it).
        indices = sorted(random.Random(f"qapframe-calibration:{seed}").sample(range(len(dataset)), n))
        return [dataset[i] for i in indices]


def _batches(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def model_inputs(processor, records: Sequence[VQARecord], model: torch.nn.Module, with_answer: bool = False):
    """The keyword arguments of one batch for ``model``; ``with_answer`` appends each answer (calibration text)."""
    from qapframe.data.prompts import build_prompt

    texts = [build_prompt(r) + (f" {r.answer}" if with_answer else "") for r in records]
    inputs = processor(images=[r.image for r in records], text=texts, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return dict(inputs)


# -- one run -----------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _image_token_id(model: torch.nn.Module) -> int:
    config = model.config
    value = getattr(config, "image_token_id", None)
    return getattr(config, "image_token_index", None) if value is None else value


def _retained_tokens(model: torch.nn.Module, input_ids: torch.Tensor) -> list[float]:
    """Vision tokens the LLM received per sample ``[B]``: from the adapter's record of its selection
    (``model.qapframe_last_selection``) when pruning is installed, else the image tokens in the prompt."""
    dense = (input_ids == _image_token_id(model)).sum(dim=1)  # [B]
    info = getattr(model, "qapframe_last_selection", None)
    if not info:
        return [float(v) for v in dense.tolist()]
    counts = [0.0] * input_ids.shape[0]
    for selection, (row, _) in zip(info["selections"], info["spans"]):
        counts[row] += float(selection.num_tokens)
    return counts


def _weights_fingerprint(model: torch.nn.Module) -> tuple[float, int]:
    """(sum of finite values, count of non-finite ones) over parameters and buffers: equal on every
    rank iff the ranks quantized alike (up to a vanishing chance of collision)."""
    total, nonfinite = 0.0, 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        t = tensor.detach()
        if not t.is_floating_point():
            t = t.double() if t.numel() else t
            total += float(t.sum()) if t.numel() else 0.0
            continue
        finite = torch.isfinite(t)
        nonfinite += int((~finite).sum())
        total += float(torch.where(finite, t, torch.zeros((), dtype=t.dtype, device=t.device)).double().sum())
    return total, nonfinite


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


def evaluate_run(
    spec: PipelineSpec, seed: int, source: ModelSource, data: DataCache, progress: bool = False
) -> dict[str, Any]:
    """Quantize, prune and evaluate one (configuration, seed) on this rank's share; gathered by the caller.

    Returns this rank's outcomes, prefill seconds and sample count, and peak memory.
    """
    ev = spec.evaluation
    seed_everything(seed)
    gc.collect()  # the previous run's model, before this run's peak is measured from the current level
    memory = PeakMemory(torch.device(source.device or spec.model.device))
    memory.start()  # before the copy: a run's peak includes its own fresh model
    model = source.fresh()
    pipeline = Pipeline(spec.quantizer, spec.scorer, spec.pruner, adapter=spec.model.adapter, seed=seed)

    calibration = None if pipeline.quantizer is None else calibration_inputs(ev, seed, source, data, model)
    with torch.no_grad():
        model = pipeline.apply(model, calibration)
    if dist.is_distributed() and pipeline.quantizer is not None:
        prints = dist.all_gather_objects(_weights_fingerprint(model))
        if len(set(prints)) > 1:
            raise RuntimeError(
                f"ranks quantized differently (weight checksums {prints}); quantizer {spec.quantizer.name!r} "
                "must reduce its calibration statistics with qapframe.distributed.all_reduce_"
            )

    records = data.evaluation_records(ev)
    # Whole batches are sharded (not single records) so every batch, and so every logit, is the same
    # as in one process: padding and BLAS blocking depend on a batch's composition.
    indexed = list(enumerate(_batches(list(enumerate(records)), ev.batch_size)))
    mine = dist.shard(indexed)
    timer = PrefillTimer(model)
    outcomes: list[RecordOutcome] = []
    try:
        from qapframe.data.prompts import is_correct

        bar = _progress(mine, progress, desc="  batches", leave=False)
        for _, batch in bar:
            batch_records = [r for _, r in batch]
            inputs = model_inputs(source.processor, batch_records, model)
            if hasattr(model, "qapframe_last_selection"):
                model.qapframe_last_selection = None  # so a stale selection is never counted
            timer.arm()
            with torch.no_grad():
                generated = model.generate(**inputs, max_new_tokens=ev.max_new_tokens, do_sample=False)
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]  # [B, T_new]
            texts = source.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            retained = _retained_tokens(model, inputs["input_ids"])
            for (index, record), text, kept in zip(batch, texts, retained):
                text = text.strip()
                outcomes.append(
                    RecordOutcome(index, record.id, str(record.meta.get("type", "")), text, is_correct(text, record), kept)
                )
    finally:
        timer.remove()
    dense_tokens = float((inputs["input_ids"][0] == _image_token_id(model)).sum()) if mine else None
    return {
        "outcomes": outcomes,
        "prefill_s": sum(timer.seconds),
        "samples": len(outcomes),
        "peak_memory_mib": memory.peak_mib(),
        "memory_kind": memory.kind,
        "dense_tokens": dense_tokens,
    }


def _progress(items, enabled: bool, **kwargs):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, **kwargs)


# -- the whole spec ----------------------------------------------------------------------------


def _device_for_rank(spec: PipelineSpec) -> str:
    device = spec.model.device
    if dist.is_distributed() and device.startswith("cuda") and spec.model.device_map is None:
        return f"cuda:{dist.local_rank()}"  # one GPU per process
    return device


def _combine(spec: PipelineSpec, seed: int, parts: list[dict[str, Any]], elapsed: float, varied: Sequence[str]) -> dict[str, Any]:
    """Rank 0: one results line from every rank's part of a run."""
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
    }


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


def _error_record(spec: PipelineSpec, seed: int, errors: list, elapsed: float, varied: Sequence[str]) -> dict[str, Any]:
    """Rank 0: the results line of a failed run; ``errors`` holds ``(message, traceback)`` or None per rank."""
    rank_, (message, trace) = next((r, e) for r, e in enumerate(errors) if e)
    return {
        **_identity(spec, seed, describe(spec, varied)),
        "status": "error",
        "error": message + (f" (rank {rank_})" if len(errors) > 1 else ""),
        "traceback": trace[-4000:],
        "elapsed_s": elapsed,
    }


def run_spec(spec_or_path: SpecLike, output_dir: str | Path | None = None, *, progress: bool | None = None) -> RunSummary:
    """Run every (configuration, seed) of a spec, resuming from ``results.jsonl``; write summary.md and the plot.

    ``output_dir`` overrides ``output.dir``. ``progress`` defaults to progress bars when stderr is a TTY
    (on rank 0 only). Returns a `RunSummary` on every rank; files are written by rank 0.
    """
    spec = load_spec(spec_or_path)
    out = Path(output_dir if output_dir is not None else spec.output.dir)
    started_group = not dist.is_distributed() and dist.init_from_env(spec.model.device)
    main = dist.is_main_process()
    show = (sys.stderr.isatty() if progress is None else progress) and main
    results = ResultsFile(out / RESULTS_FILE)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    done = dist.broadcast_object(results.completed_keys() if main else None)

    runs = [(cfg, seed) for cfg in spec.expand() for seed in cfg.evaluation.seeds]
    varied = _varied_fields(spec)
    summary = RunSummary(out, results.path, None, None, total=len(runs))
    recorded = dist.broadcast_object(set(results.latest()) if main else None)  # keys with any row, ok or error
    if main:
        _announce_resume(runs, done, recorded, results.path)
    try:
        _run_all(runs, done, recorded, varied, results, summary, show, main)
        dist.barrier()
        latest = results.latest() if main else {}
        summary.records = [latest[k] for k in dict.fromkeys(run_key(c, s) for c, s in runs) if k in latest]
        if main:
            summary.summary_path, summary.plot_path = write_reports(summary.records, out)
        dist.barrier()
    except KeyboardInterrupt:
        # Every finished run is already on disk (appended or replaced atomically): report how far it got.
        raise RunInterrupted(summary.skipped + summary.ran + summary.failed, len(runs), results.path) from None
    finally:
        if started_group:
            dist.destroy()
    return summary


def _announce_resume(runs: list, done: set[str], recorded: set[str], results_path: Path) -> None:
    """One line on stderr when results.jsonl already holds some of the runs: what is skipped, what retried."""
    keys = [run_key(c, s) for c, s in runs]
    skipped = sum(k in done for k in keys)
    retried = sum(k in recorded and k not in done for k in keys)
    if not skipped and not retried:
        return
    line = f"resuming from {results_path}: skipping {skipped} of {len(runs)} runs already finished"
    if retried:
        line += f"; retrying {retried} failed run(s), whose new rows replace their error rows"
    print(line, file=sys.stderr, flush=True)


def _run_all(runs: list, done: set[str], recorded: set[str], varied: Sequence[str], results: ResultsFile,
             summary: RunSummary, show: bool, main: bool) -> None:
    """The loop of `run_spec`: every run not in ``done``, each recorded as it finishes (by rank 0)."""
    sources: dict[tuple, ModelSource] = {}
    data = DataCache()
    for number, (cfg, seed) in enumerate(_progress(runs, show, desc="runs"), start=1):
        if run_key(cfg, seed) in done:
            summary.skipped += 1
            continue
        source = ModelSource(cfg.model, _device_for_rank(cfg))
        source = sources.setdefault(source.key(), source)
        start = time.perf_counter()
        try:
            part, error = evaluate_run(cfg, seed, source, data, progress=show), None
        except Exception as exc:  # recorded and reported; the other configurations still run
            part, error = None, (f"{type(exc).__name__}: {exc}", traceback.format_exc())
        parts = dist.all_gather_objects((part, error))
        elapsed = time.perf_counter() - start
        errors = [e for _, e in parts]
        if any(errors):
            record = _error_record(cfg, seed, errors, elapsed, varied)
            summary.failed += 1
        else:
            record = _combine(cfg, seed, [p for p, _ in parts], elapsed, varied)
            summary.ran += 1
        if main:
            if record["key"] in recorded:
                results.replace(record)  # a retried run: its old error row goes, so reruns do not pile them up
            else:
                results.append(record)
            _log(number, len(runs), record, show)


def _log(number: int, total: int, record: dict[str, Any], bars: bool) -> None:
    if record["status"] == "ok":
        m = record["metrics"]
        what = f"accuracy {100 * m['accuracy']:.1f}%, {m['retained_tokens']:.1f} tokens"
    else:
        what = f"ERROR {record['error']}"
    line = f"[{number}/{total}] {record['label']} seed={record['seed']}: {what} ({record['elapsed_s']:.1f} s)"
    if bars:
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stderr)  # above the bars instead of through them
    else:
        print(line, file=sys.stderr, flush=True)


__all__ = ["DataCache", "RunInterrupted", "RunSummary", "calibration_inputs", "describe", "evaluate_run", "model_inputs", "run_spec",
           "seed_everything", "strategy_label"]
