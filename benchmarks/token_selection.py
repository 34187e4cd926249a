"""Which vision tokens each scorer keeps on the toy, measured against where the objects are.

    python benchmarks/token_selection.py [--spec qapruner] [--samples 200] [--retentions 0.25 0.125]
                                         [--out benchmarks/results/token_selection.json]

Why: an answer about an object needs a token of its grid cell, so where a score's kept tokens lie explains
its accuracy under pruning (docs/results.md, "Which tokens the scores keep"). This asks of each score (every
one ranked by the top-k pruner at the same budget, VisionZip included):

- object AUC: the chance that a token of an occupied cell outscores a token of an empty one (per image,
  then averaged); 0.5 means the score is blind to objects, below 0.5 that it prefers the background;
- object coverage at each retention: the share of the scene's objects that keep at least one token of their cell;
- occupied share: the share of kept tokens that lie in occupied cells (base rate: the share of all tokens);
- shared with [CLS]: the share of kept tokens that the [CLS]-attention score alone also keeps (the hybrid's SP).

The model is prepared as ``qapframe run`` prepares the spec's top-level configuration (same quantizer,
calibration records and seed), so the hybrid simulates the quantizer the tokens will meet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from qapframe.eval.loading import ModelSource
from qapframe.eval.results import write_json_atomically
from qapframe.eval.runner import DataCache, calibration_inputs, model_inputs, seed_everything
from qapframe.pipeline import Pipeline
from qapframe.spec import load_spec
from qapframe.data.synthetic import cell_labels, patch_cells

# label -> scorer spec; each is ranked by the top-k pruner. The first is the reference the others are compared with.
SEMANTIC = "visionzip ([CLS] attention)"
SCORERS: dict[str, dict] = {
    SEMANTIC: {"name": "visionzip"},
    "hybrid (alpha 0.5)": {"name": "hybrid"},
    "hybrid SQ alone (alpha 0)": {"name": "hybrid", "alpha": 0.0},
    "quantization error E alone": {"name": "hybrid", "alpha": 0.0, "outlier_weight": 0.0},
    "outlier range R alone": {"name": "hybrid", "alpha": 0.0, "quant_error_weight": 0.0},
    "l2norm": {"name": "l2norm"},
    "fastv (text attention)": {"name": "fastv"},
    "random": {"name": "random"},
}


TOY_PATCH_SIZE = 8  # the toy's vision tower reads 8x8-pixel patches: 64 tokens an image


def occupied_tokens(records, patch_size: int = TOY_PATCH_SIZE) -> torch.Tensor:
    """``[B, N]`` bool: the token's patch centre lies in a grid cell that holds an object."""
    colour, _ = cell_labels(records)  # [B, 9], 0 = empty
    return (colour != 0)[:, patch_cells(patch_size)]


def object_auc(scores: torch.Tensor, occupied: torch.Tensor) -> float:
    """P(score of an occupied-cell token > score of an empty-cell token), ties half, averaged over images."""
    values = []
    for s, occ in zip(scores, occupied):
        pos, neg = s[occ], s[~occ]
        if pos.numel() == 0 or neg.numel() == 0:
            continue
        diff = pos[:, None] - neg[None, :]
        values.append(float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()))
    return sum(values) / len(values)


def shared(keep: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Mean over images of the share of ``keep`` that ``reference`` (same budget) keeps too."""
    values = [len(set(a.tolist()) & set(b.tolist())) / a.numel() for a, b in zip(keep, reference)]
    return sum(values) / len(values)


def coverage(keep: list[torch.Tensor], records) -> tuple[float, float]:
    """(share of objects with a kept token in their cell, share of kept tokens in occupied cells)."""
    cells = patch_cells(TOY_PATCH_SIZE)
    colour, _ = cell_labels(records)  # [B, 9], 0 = empty
    occupied = (colour != 0)[:, cells]  # [B, N], as `occupied_tokens`
    covered = total = 0
    shares = []
    for i, kept in enumerate(keep):
        kept_cells = set(cells[kept].tolist())
        objects = (colour[i] != 0).nonzero().squeeze(-1).tolist()
        covered += sum(c in kept_cells for c in objects)
        total += len(objects)
        shares.append(float(occupied[i, kept].float().mean()))
    return covered / total, sum(shares) / len(shares)


@torch.no_grad()
def selections(spec, scorer: dict, retention: float, seed: int, source: ModelSource, data: DataCache, records):
    """Per record: (kept token indices [K], scores [N]) under the spec's quantizer with ``scorer`` + top-k."""
    seed_everything(seed)
    model = source.fresh()
    pipeline = Pipeline(spec.quantizer, scorer, {"name": "topk", "retention": retention}, seed=seed)
    calibration = None if pipeline.quantizer is None else calibration_inputs(spec.evaluation, seed, source, data, model)
    model = pipeline.apply(model, calibration)
    keep, scores = [], []
    size = spec.evaluation.batch_size
    for start in range(0, len(records), size):
        inputs = model_inputs(source.processor, records[start : start + size], model)
        model.qapframe_last_selection = None
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        chosen = model.qapframe_last_selection["selections"]  # one per image, in batch order
        keep += [s.keep_index for s in chosen]
        scores += [s.scores for s in chosen]
    return keep, torch.stack(scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="qapruner", help="spec whose model, quantizer, data and seed are used")
    parser.add_argument("--samples", type=int, default=200, help="test records (the spec's first ones)")
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.25, 0.125])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    spec = load_spec(args.spec)
    source, data = ModelSource(spec.model), DataCache()
    records = data.evaluation_records(spec.evaluation)[: args.samples]
    occupied = occupied_tokens(records)
    base_share = float(occupied.float().mean())
    rows, reference = [], {}
    header = ["scorer", "object AUC"] + [f"{what} @{r:g}" for what in ("coverage", "occupied share", "shared with [CLS]")
                                         for r in args.retentions]
    print(f"spec {args.spec}: quantizer {spec.quantizer.name if spec.quantizer else None}, {len(records)} records, "
          f"seed {args.seed}; occupied share of all tokens {base_share:.3f}")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label, scorer in SCORERS.items():
        row = {"scorer": label, "spec": scorer, "coverage": {}, "occupied_share": {}, "shared_with_cls": {}}
        for retention in args.retentions:
            keep, scores = selections(spec, scorer, retention, args.seed, source, data, records)
            if "object_auc" not in row:  # the scores do not depend on the retention
                row["object_auc"] = object_auc(scores, occupied)
            row["coverage"][str(retention)], row["occupied_share"][str(retention)] = coverage(keep, records)
            reference.setdefault(retention, keep)  # the first scorer's (SEMANTIC)
            row["shared_with_cls"][str(retention)] = shared(keep, reference[retention])
        rows.append(row)
        cells = [f"{row['object_auc']:.3f}"] + [f"{row[what][str(r)]:.3f}" for what in
                                                ("coverage", "occupied_share", "shared_with_cls") for r in args.retentions]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        if args.out is not None:  # written as each scorer finishes
            write_json_atomically(args.out, {"spec": args.spec, "samples": len(records), "seed": args.seed,
                                             "occupied_share_of_all_tokens": base_share, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
