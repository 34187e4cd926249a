"""The `qapframe` command line: list strategies, validate a spec, run a pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from qapframe.errors import QapframeError

EPILOG = """\
examples:
  qapframe list                      every quantizer, scorer, pruner and model adapter, with parameters
  qapframe validate specs/smoke.yaml check a spec without running it
  qapframe run specs/qapruner.yaml   compress the embedded toy LLaVA and evaluate it (the paper's experiment)

A spec is YAML or JSON with sections model, quantizer, scorer, pruner, evaluation, output (and an
optional sweep); see the README."""


def _registries() -> dict[str, Any]:
    from qapframe.models.base import ADAPTERS
    from qapframe.quantizers.base import QUANTIZERS
    from qapframe.strategies.base import PRUNERS, SCORERS

    return {"quantizer": QUANTIZERS, "scorer": SCORERS, "pruner": PRUNERS, "model": ADAPTERS}


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
    kinds = [args.kind] if args.kind else ["quantizer", "scorer", "pruner", "model"]
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


def _describe(spec) -> str:
    parts = [f"model={spec.model.path}"]
    parts.append(f"quantizer={spec.quantizer.name if spec.quantizer else 'none'}")
    parts.append(f"scorer={spec.scorer.name if spec.scorer else 'none'}")
    if spec.pruner is not None:
        parts.append(f"pruner={spec.pruner.name}")
    configurations = len(spec.expand())
    runs = configurations * len(spec.evaluation.seeds)
    return f"{', '.join(parts)}; {configurations} configuration(s) x {len(spec.evaluation.seeds)} seed(s) = {runs} run(s)"


def cmd_validate(args: argparse.Namespace) -> int:
    from qapframe.spec import load_spec

    spec = load_spec(args.spec)
    print(f"{args.spec}: valid ({_describe(spec)})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from qapframe.eval.runner import run_spec

    run_spec(args.spec, output_dir=args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qapframe",
        description="Quantization-aware vision-token pruning + post-training quantization for LLaVA-family models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    p = commands.add_parser("list", help="list registered strategies and their parameters",
                            description="List every registered quantizer, scorer, pruner and model adapter, "
                            "with its source (built-in or the plugin's distribution) and parameters with defaults.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--kind", choices=["quantizer", "scorer", "pruner", "model"], help="only this kind")
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("validate", help="check a spec file without running it",
                            description="Validate a YAML/JSON pipeline spec: exit 0 with a one-line summary, "
                            "or exit 2 listing every problem with its field path.")
    p.add_argument("spec", help="path to a .yaml/.yml/.json pipeline spec")
    p.set_defaults(func=cmd_validate)

    p = commands.add_parser("run", help="run a pipeline spec (compress + evaluate)",
                            description="Run every configuration of a spec (sweeps and seeds expanded), appending "
                            "results.jsonl as each finishes, then write summary.md and a plot. Re-running resumes.")
    p.add_argument("spec", help="path to a .yaml/.yml/.json pipeline spec")
    p.add_argument("--output", "-o", metavar="DIR", help="output directory (default: the spec's output.dir)")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QapframeError as exc:  # a user mistake: say what and where, no traceback
        print(f"qapframe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
