"""Does one configuration beat another by more than noise? Paired over the same questions and seeds.

    python benchmarks/paired_difference.py RESULTS.jsonl --pair CANDIDATE BASELINE [--pair ...]
                                           [--resamples 10000] [--out benchmarks/results/paired.json]

CANDIDATE and BASELINE each pick one configuration of ``results.jsonl`` (written by ``qapframe run``) by a
substring of its label, as summary.md prints it; a substring matching several configurations is refused with
their labels. Why paired: two configurations answer the same questions, so most of the sampling noise of
either accuracy cancels in their difference; the spread over seeds alone (summary.md's ±) does not see it,
because a seed moves only the calibration records. For each pair this prints:

- the accuracy difference in points, averaged over the seeds both ran, and its standard deviation over seeds;
- a 95 % interval from a paired bootstrap over questions (the same resampled questions for every seed);
- the discordant answers pooled over seeds: how often only the candidate was right, and only the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qapframe.eval.results import write_json_atomically  # noqa: E402


def correctness(records: list[dict]) -> dict[int, dict[int, bool]]:
    """``{seed: {question index: correct}}`` of one configuration's ``ok`` records."""
    return {r["seed"]: {o["index"]: bool(o["correct"]) for o in r["outcomes"]} for r in records}


def paired_difference(candidate: dict[int, dict[int, bool]], baseline: dict[int, dict[int, bool]],
                      resamples: int = 10_000, seed: int = 0) -> dict:
    """Candidate minus baseline accuracy (points) on the seeds and questions both answered.

    ``mean``: over seeds of each seed's difference; ``std_over_seeds``: their sample standard deviation;
    ``interval_95``: percentiles of ``mean`` when the questions are resampled with replacement (one draw of
    questions shared by all seeds, so a question's answers stay paired across configurations and seeds).
    """
    seeds = sorted(set(candidate) & set(baseline))
    if not seeds:
        raise ValueError("the two configurations share no seed")
    questions = sorted(set.intersection(*(set(candidate[s]) & set(baseline[s]) for s in seeds)))
    if not questions:
        raise ValueError("the two configurations share no question")
    a = np.array([[candidate[s][q] for q in questions] for s in seeds], dtype=np.float64)  # [S, Q]
    b = np.array([[baseline[s][q] for q in questions] for s in seeds], dtype=np.float64)
    per_question = (a - b).mean(axis=0)  # [Q]: the seed-averaged difference on each question
    per_seed = 100 * (a - b).mean(axis=1)  # [S]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(questions), size=(resamples, len(questions)))
    boot = 100 * per_question[draws].mean(axis=1)
    return {
        "seeds": seeds,
        "questions": len(questions),
        "candidate_accuracy": 100 * a.mean(),
        "baseline_accuracy": 100 * b.mean(),
        "mean": float(per_seed.mean()),
        "std_over_seeds": float(per_seed.std(ddof=1)) if len(seeds) > 1 else 0.0,
        "interval_95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "only_candidate_right": int(((a == 1) & (b == 0)).sum()),
        "only_baseline_right": int(((a == 0) & (b == 1)).sum()),
    }


def pick(configurations: dict[str, list[dict]], needle: str) -> str:
    """The one configuration label containing ``needle``."""
    found = [label for label in configurations if needle in label]
    if len(found) != 1:
        what = "no configuration" if not found else f"{len(found)} configurations"
        labels = "\n  ".join(found or configurations)
        raise SystemExit(f"--pair {needle!r}: {what} match; labels:\n  {labels}")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar=("CANDIDATE", "BASELINE"))
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    configurations: dict[str, list[dict]] = {}
    for line in args.results.read_text().splitlines():
        record = json.loads(line)
        if record.get("status") == "ok":
            configurations.setdefault(record["label"], []).append(record)
    rows = []
    width = max(len(n) for pair in args.pair for n in pair)
    print(f"{'candidate':<{width}}  {'baseline':<{width}}  {'difference':>10} {'± seeds':>8} {'95 % interval':>16} "
          f"{'only c / b':>11}")
    for needle_c, needle_b in args.pair:
        c, b = pick(configurations, needle_c), pick(configurations, needle_b)
        result = paired_difference(correctness(configurations[c]), correctness(configurations[b]), args.resamples)
        rows.append({"candidate": c, "baseline": b, **result})
        low, high = result["interval_95"]
        print(f"{needle_c:<{width}}  {needle_b:<{width}}  {result['mean']:>+10.1f} {result['std_over_seeds']:>8.1f} "
              f"{f'[{low:+.1f}, {high:+.1f}]':>16} {result['only_candidate_right']:>5} / {result['only_baseline_right']}")
    if args.out:
        write_json_atomically(args.out, {"results": str(args.results), "resamples": args.resamples, "pairs": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
