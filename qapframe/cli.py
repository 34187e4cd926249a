"""The `qapframe` command line: list strategies, validate a spec, run a pipeline, export its model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from qapframe import __version__
from qapframe.errors import QapframeError

# `qapframe list` and `validate` import neither transformers, numba nor matplotlib (seconds each): the
# model adapters, the scoring kernels and the plot import them when they first run.

EPILOG = """\
examples:
  qapframe list                      every quantizer, scorer, pruner and model adapter, with parameters
  qapframe validate specs/smoke.yaml check a spec without running it
  qapframe run specs/qapruner.yaml   compress the embedded toy LLaVA and evaluate it (the paper's experiment)
  qapframe report runs/qapruner      re-render a run directory's summary.md and plot from results.jsonl
  qapframe export SPEC --out DIR     write the spec's compressed model as a compressed-tensors checkpoint

A spec is YAML or JSON with sections model, quantizer, scorer, pruner, evaluation, output (and an
optional sweep); see the README."""


# Every registry `qapframe list` shows (named model sources as "source", dataset loaders as "dataset"); kept
# literal so that building the parser imports nothing.
KINDS = ("quantizer", "rotation", "observer", "scorer", "pruner", "model", "source", "dataset")


def _registries() -> dict[str, Any]:
    from qapframe.data.base import DATASETS
    from qapframe.models.base import ADAPTERS
    from qapframe.quantizers.base import QUANTIZERS
    from qapframe.quantizers.observers import OBSERVERS
    from qapframe.quantizers.rotations.base import ROTATIONS
    from qapframe.sources import MODEL_SOURCES
    from qapframe.strategies.base import PRUNERS, SCORERS

    return {"quantizer": QUANTIZERS, "rotation": ROTATIONS, "observer": OBSERVERS, "scorer": SCORERS,
            "pruner": PRUNERS, "model": ADAPTERS, "source": MODEL_SOURCES, "dataset": DATASETS}


def _listing(kinds: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    registries = _registries()
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        rows = []
        for entry in registries[kind].entries():
            params = entry.obj.parameters() if hasattr(entry.obj, "parameters") else {}
            doc = (entry.obj.__doc__ or "").strip().splitlines()
            rows.append({"name": entry.name, "source": entry.source, "summary": doc[0] if doc else "", "parameters": params})
        out[kind] = rows
    return out


def cmd_list(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(KINDS)
    listing = _listing(kinds)
    if args.json:
        print(json.dumps(listing, indent=2, default=str))
        return 0
    for kind, rows in listing.items():
        print(f"{kind}s:")
        for row in rows:
            print(f"  {row['name']:<14} [{row['source']}] {row['summary']}")
            for name, default in row["parameters"].items():
                print(f"      {name} = {json.dumps(default, default=str)}")
        print()
    return 0


def _names(labels: Sequence[str]) -> str:
    """``["rtn(scheme=W4A4)", "rtn(scheme=W8A8)", "gptq"]`` -> ``"rtn (2 variants), gptq"``."""
    variants: dict[str, set[str]] = {}
    for label in labels:
        variants.setdefault(label.split("(", 1)[0], set()).add(label)
    return ", ".join(f"{n} ({len(v)} variants)" if len(v) > 1 else n for n, v in variants.items())


def _describe(spec) -> str:
    """``84 runs = 28 configurations x 3 seeds; model toy; quantizers fp, rtn (2 variants), gptq; ...``."""
    from qapframe.eval.labels import describe  # labels only: imports no model code

    configurations = spec.expand()
    infos = [describe(cfg) for cfg in configurations]
    seeds = sorted({len(cfg.evaluation.seeds) for cfg in configurations})
    runs = sum(len(cfg.evaluation.seeds) for cfg in configurations)
    per = f"{seeds[0]} seed{'s' if seeds[0] > 1 else ''}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]} seeds each"
    retentions = []
    for info, cfg in zip(infos, configurations):
        if cfg.pruner is None:
            retentions.append("dense")
        elif info["retention"] is not None:
            retentions.append(f"{100 * info['retention']:g}%")
        else:
            retentions.append(f"{cfg.pruner.config.num_tokens} tokens")
    parts = [
        f"{runs} run{'s' if runs != 1 else ''} = {len(configurations)} configuration"
        f"{'s' if len(configurations) != 1 else ''} x {per}",
        f"model {', '.join(dict.fromkeys(cfg.model.path for cfg in configurations))}",
        f"quantizers {_names([i['quantizer'] for i in infos])}",
        f"scorers {_names([i['scorer'] for i in infos])}",
    ]
    pruners = [i["pruner"] for i in infos if i["pruner"]]
    if pruners:
        parts.append(f"pruners {_names(pruners)}")
    parts.append(f"retention {', '.join(dict.fromkeys(retentions))}")
    return "; ".join(parts)


def _checked_spec(path: str):
    """The validated spec at ``path``, its model paths checked too (what `run` would fail on)."""
    from qapframe.errors import SpecError
    from qapframe.spec import load_spec, model_path_problems

    spec = load_spec(path)
    problems = model_path_problems(spec)
    if problems:
        raise SpecError(problems, path)
    return spec


def cmd_validate(args: argparse.Namespace) -> int:
    spec = _checked_spec(args.spec)
    print(f"{args.spec}: valid: {_describe(spec)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from qapframe.eval.runner import RunInterrupted, run_spec

    spec = _checked_spec(args.spec)
    try:
        summary = run_spec(spec, output_dir=args.output)
    except RunInterrupted as stop:
        print(f"qapframe: interrupted after {stop.recorded} of {stop.total} runs; rerun the same command to resume",
              file=sys.stderr)
        return 130
    _print_outcome(summary.records, summary.results_path, summary.summary_path, summary.plot_path)
    if summary.failed:
        print(
            f"qapframe: {summary.failed} of {summary.total} runs failed; their errors are in {summary.results_path} "
            f'(rows with "status": "error") and in the errors column of {summary.summary_path}',
            file=sys.stderr,
        )
        return 1
    return 0


def _print_outcome(records, results_path, summary_path, plot_path) -> None:
    """A short table (accuracy and vision tokens, mean +/- std over seeds, per configuration) and where
    the results went."""
    from qapframe.eval.report import group_runs, short_table

    rows = group_runs(records or [])
    if rows:
        print(short_table(rows))
    written = [f"results {results_path}"] + [f"{what} {path}" for what, path in
                                             (("summary", summary_path), ("plot", plot_path)) if path is not None]
    print("qapframe: " + ", ".join(written))


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qapframe.eval.report import write_reports
    from qapframe.eval.results import RESULTS_FILE, ResultsFile

    results = ResultsFile(Path(args.run_dir) / RESULTS_FILE)
    if not results.path.is_file():
        raise QapframeError(f"{args.run_dir}: no {RESULTS_FILE} here; give the output directory of a `qapframe run`")
    records = list(results.latest().values())
    if not records:
        raise QapframeError(f"{results.path}: no run records in it yet")
    summary_path, plot_path = write_reports(records, args.run_dir)
    _print_outcome(records, results.path, summary_path, plot_path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from qapframe.deploy.command import export_spec

    out = export_spec(args.spec, args.out, key=args.key, overwrite=args.overwrite,
                      max_shard_bytes=int(args.max_shard_gb * 1024**3), dtype=args.dtype)
    print(f"{args.spec}: exported to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qapframe",
        description="Quantization-aware vision-token pruning + post-training quantization for LLaVA-family models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qapframe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    p = commands.add_parser("list", help="list registered strategies and their parameters",
                            description="List every registered quantizer, scorer, pruner and model adapter, "
                            "with its source (built-in or the plugin's distribution) and parameters with defaults.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--kind", choices=KINDS, help="only this kind")
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("validate", help="check a spec file without running it",
                            description="Validate a YAML/JSON pipeline spec, and that its model paths exist: exit 0 "
                            "with a one-line summary of the runs, or exit 2 listing every problem with its field path.")
    p.add_argument("spec", help="path to a .yaml/.yml/.json pipeline spec")
    p.set_defaults(func=cmd_validate)

    p = commands.add_parser("run", help="run a pipeline spec (compress + evaluate)",
                            description="Run every configuration of a spec (sweeps and seeds expanded), appending "
                            "results.jsonl as each finishes, then write summary.md and a plot. Re-running resumes "
                            "(finished runs are skipped, failed ones retried). Exit status: 0 every run succeeded, "
                            "1 some failed, 2 the spec is invalid, 130 interrupted (Ctrl-C).")
    p.add_argument("spec", help="path to a .yaml/.yml/.json pipeline spec")
    p.add_argument("--output", "-o", metavar="DIR", help="output directory (default: the spec's output.dir)")
    p.set_defaults(func=cmd_run)

    p = commands.add_parser("report", help="re-render summary.md and the plot of a run directory",
                            description="Rebuild summary.md and the accuracy-vs-retention plot from a run "
                            "directory's results.jsonl (the latest row of each run), and print the short table.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="an output directory of `qapframe run`")
    p.set_defaults(func=cmd_report)

    p = commands.add_parser("export", help="quantize a spec's model and write a compressed-tensors checkpoint",
                            description="Load the spec's model, quantize it (calibrating as `run` would, first seed), "
                            "install its token pruning, and write a Hugging Face directory in the compressed-tensors "
                            "format (transformers and vLLM load it; `qapframe.load` reinstalls the pruning). Exit "
                            "status: 0 written, 2 a mistake (spec, unexportable setting, non-empty --out).")
    p.add_argument("spec", metavar="SPEC_OR_RUN",
                   help="a .yaml/.yml/.json spec with one configuration, or a `qapframe run` output directory")
    p.add_argument("--key", help="with a run directory: the run (its results.jsonl key, or a prefix) to export")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new one is complete")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, GiB (default 5)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="write every floating tensor (vision tower, projector, lm_head, scales) in this dtype "
                        "(default: as the model is)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QapframeError as exc:  # a user mistake: say what and where, no traceback
        print(f"qapframe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any run started (loading, validating): nothing to resume yet
        print("qapframe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
