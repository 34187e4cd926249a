"""`qapframe run SPEC`: every configuration of a spec (sweep expanded) times every seed, evaluated and recorded.

Each (configuration, seed) run starts from a fresh copy of the model, calibrates and quantizes it,
installs token pruning, answers the evaluation set with greedy ``generate`` (`qapframe.eval.evaluation`),
and appends one line to ``results.jsonl`` (`qapframe.eval.records`). Runs that differ only in their pruning
run one after another and share one quantization (`qapframe.eval.reuse`), with the same results. Runs already
recorded as ``ok`` are skipped (resume); a failing run is recorded with its error and the others go on; a rerun
retries it, and its new row replaces the error row. Under ``torchrun`` / ``accelerate launch`` the evaluation and
calibration batches are sharded over ranks and rank 0 gathers and writes everything.

The pieces live by concern: labels (`qapframe.eval.labels`), records and model inputs
(`qapframe.eval.inputs`), the evaluation loop (`qapframe.eval.evaluation`), rank merging and run records
(`qapframe.eval.records`); they are re-exported here, where they used to live.
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

from qapframe import distributed as dist
from qapframe.eval.evaluation import answer_records, evaluate_run, generate_answers, progress_bar, seed_everything
from qapframe.eval.inputs import DataCache, calibration_inputs, model_inputs
from qapframe.eval.labels import describe, strategy_label, varied_fields
from qapframe.eval.loading import ModelSource
from qapframe.eval.records import error_record, merge_parts
from qapframe.eval.report import write_reports
from qapframe.eval.results import RESULTS_FILE, ResultsFile, run_key
from qapframe.eval.reuse import QuantizedModelSlot, order_by_quantization
from qapframe.spec import PipelineSpec, load_spec

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


# -- the whole spec ----------------------------------------------------------------------------


def _device_for_rank(spec: PipelineSpec) -> str:
    device = spec.model.device
    if dist.is_distributed() and device.startswith("cuda") and spec.model.device_map is None:
        return f"cuda:{dist.local_rank()}"  # one GPU per process
    return device


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
    varied = varied_fields(spec)
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
    quantized = QuantizedModelSlot()  # runs sharing a quantization run one after another and quantize once
    pending = order_by_quantization([run for run in runs if run_key(*run) not in done])
    summary.skipped += len(runs) - len(pending)
    for number, (cfg, seed) in enumerate(progress_bar(pending, show, desc="runs"), start=summary.skipped + 1):
        source = ModelSource(cfg.model, _device_for_rank(cfg))
        source = sources.setdefault(source.key(), source)
        start = time.perf_counter()
        try:
            part, error = evaluate_run(cfg, seed, source, data, progress=show, reuse=quantized), None
        except Exception as exc:  # recorded and reported; the other configurations still run
            part, error = None, (f"{type(exc).__name__}: {exc}", traceback.format_exc())
        parts = dist.all_gather_objects((part, error))
        elapsed = time.perf_counter() - start
        errors = [e for _, e in parts]
        if any(errors):
            record = error_record(cfg, seed, errors, elapsed, varied)
            summary.failed += 1
        else:
            record = merge_parts(cfg, seed, [p for p, _ in parts], elapsed, varied)
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


__all__ = ["DataCache", "RunInterrupted", "RunSummary", "answer_records", "calibration_inputs", "describe",
           "evaluate_run", "generate_answers", "model_inputs", "run_spec", "seed_everything", "strategy_label"]
