"""Which vision tokens each scorer keeps, measured against where the objects and the activation outliers are.

    python benchmarks/token_selection.py [--spec qapruner] [--model DIR] [--samples 200] [--retentions 0.25 0.125]
                                         [--out benchmarks/results/token_selection.json]

``--model`` replaces the spec's model (smol-llava: ``--spec qapruner_smol --model DIR/model``; its vision tower
is the toy's, 64 tokens of 8 x 8 pixels, so the grid measures apply unchanged).

Why: an answer about an object needs a token of its grid cell, so where a score's kept tokens lie explains
its accuracy under pruning (docs/results.md, "Which tokens the scores keep"). This asks of each score (every
one ranked by the top-k pruner at the same budget, VisionZip included):

- object AUC: the chance that a token of an occupied cell outscores a token of an empty one (per image,
  then averaged); 0.5 means the score is blind to objects, below 0.5 that it prefers the background;
- object coverage at each retention: the share of the scene's objects that keep at least one token of their cell;
- occupied share: the share of kept tokens that lie in occupied cells (base rate: the share of all tokens);
- shared with [CLS]: the share of kept tokens that the [CLS]-attention score alone also keeps (the hybrid's SP);
- outlier recall: QAPruner's premise measured directly. Each vision token's *activation peak* is its largest
  |h| over the LLM's decoder layers, in units of that layer's median |h| (the dense fp model, the same
  prompts); an image's outlier tokens are its top 10 % by peak. Recall = the share of them a score keeps
  (random keeps the retention's share); rank correlation = Spearman's rho of the score with the peak, per image.

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
    "cdpruner (text relevance, its DPP)": {"name": "cdpruner"},
    "hybrid over cdpruner (its DPP)": {"name": "hybrid", "semantic": {"name": "cdpruner"}},
    "random": {"name": "random"},
}
PRUNER = {"cdpruner (text relevance, its DPP)": "cdpruner", "hybrid over cdpruner (its DPP)": "cdpruner"}  # else topk


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


OUTLIER_SHARE = 0.1  # an image's outlier tokens: its top 10 % of vision tokens by activation peak


@torch.no_grad()
def activation_peaks(source: ModelSource, records, batch_size: int) -> torch.Tensor:
    """``[B, N]`` per vision token: max over decoder layers of (its max |h| over channels / the layer's median |h|).

    The median is over every real token and channel of the batch's layer output, so a peak of 100 means a
    channel 100 times the typical magnitude (Sun et al.'s massive activations reach thousands)."""
    model = source.fresh()
    image_token = model.config.image_token_id
    peaks = []
    for start in range(0, len(records), batch_size):
        inputs = model_inputs(source.processor, records[start : start + batch_size], model)
        hidden_states = model(**inputs, output_hidden_states=True).hidden_states[1:]  # each [B, L, D]
        real = inputs["attention_mask"].bool()
        vision = inputs["input_ids"] == image_token  # [B, L]
        peak = None
        for hidden in hidden_states:
            magnitude = hidden.abs()
            ratio = magnitude.amax(dim=-1) / magnitude[real].median()  # [B, L]
            peak = ratio if peak is None else torch.maximum(peak, ratio)
        peaks += [peak[i][vision[i]] for i in range(peak.shape[0])]
    return torch.stack(peaks)


def outlier_tokens(peaks: torch.Tensor) -> list[torch.Tensor]:
    """Per image, the indices of its top `OUTLIER_SHARE` vision tokens by activation peak."""
    count = max(1, round(OUTLIER_SHARE * peaks.shape[1]))
    return list(peaks.topk(count, dim=-1).indices)


def rank_correlation(scores: torch.Tensor, peaks: torch.Tensor) -> float:
    """Spearman's rho of ``scores [B, N]`` with ``peaks [B, N]`` per image (ties by order), averaged."""
    def ranks(x):
        return x.double().argsort(dim=-1).argsort(dim=-1).double()

    a, b = ranks(scores), ranks(peaks)
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean())


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
def quantized(spec, seed: int, source: ModelSource, data: DataCache) -> torch.nn.Module:
    """A fresh model with the spec's quantizer applied, as ``qapframe run`` prepares it (calibration of ``seed``)."""
    seed_everything(seed)
    model = source.fresh()
    pipeline = Pipeline(spec.quantizer, seed=seed)
    calibration = None if pipeline.quantizer is None else calibration_inputs(spec.evaluation, seed, source, data, model)
    return pipeline.quantize(model, calibration)


@torch.no_grad()
def selections(spec, scorer: dict, retention: float, seed: int, source: ModelSource, data: DataCache, records,
               pruner: str = "topk", model: torch.nn.Module | None = None):
    """Per record: (kept token indices [K], scores [N]) under the spec's quantizer with ``scorer`` + ``pruner``.

    ``model``: the `quantized` model to prune (pruning is installed and removed again), else one is prepared."""
    model = quantized(spec, seed, source, data) if model is None else model
    seed_everything(seed)
    pipeline = Pipeline(spec.quantizer, scorer, {"name": pruner, "retention": retention},
                        adapter=spec.model.adapter, seed=seed)
    pipeline.install_pruning(model)
    try:
        return _kept_and_scores(model, source, records, spec.evaluation.batch_size)
    finally:
        pipeline.remove_pruning(model)


def _kept_and_scores(model, source: ModelSource, records, size: int):
    keep, scores = [], []
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
    parser.add_argument("--model", default=None, help="a model directory (or source name) instead of the spec's")
    parser.add_argument("--samples", type=int, default=200, help="test records (the spec's first ones)")
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.25, 0.125])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    spec = load_spec(args.spec)
    if args.model is not None:
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"path": args.model})})
    source, data = ModelSource(spec.model), DataCache()
    records = data.evaluation_records(spec.evaluation)[: args.samples]
    occupied = occupied_tokens(records)
    base_share = float(occupied.float().mean())
    peaks = activation_peaks(source, records, spec.evaluation.batch_size)  # [B, N]
    outliers = outlier_tokens(peaks)
    premise = {"peak_median": float(peaks.median()), "peak_max": float(peaks.max()),
               "outlier_peak_median": float(torch.stack([p[o] for p, o in zip(peaks, outliers)]).median()),
               "outlier_share_on_objects": coverage(outliers, records)[1]}
    model = quantized(spec, args.seed, source, data)  # once: every scorer prunes the same quantized model
    rows, reference = [], {}
    measures = ("coverage", "occupied_share", "shared_with_cls", "outlier_recall")
    header = ["scorer", "object AUC", "rho with peak"] + [f"{what} @{r:g}" for what in measures for r in args.retentions]
    print(f"spec {args.spec}, model {spec.model.path}: quantizer {spec.quantizer.name if spec.quantizer else None}, "
          f"{len(records)} records, seed {args.seed}; occupied share of all tokens {base_share:.3f}")
    print(f"vision-token activation peaks (x layer median |h|): median {premise['peak_median']:.1f}, max "
          f"{premise['peak_max']:.1f}; outlier tokens (top {OUTLIER_SHARE:.0%}) median {premise['outlier_peak_median']:.1f}, "
          f"{premise['outlier_share_on_objects']:.3f} of them on objects")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label, scorer in SCORERS.items():
        row = {"scorer": label, "spec": scorer, "pruner": PRUNER.get(label, "topk"), **{m: {} for m in measures}}
        for retention in args.retentions:
            keep, scores = selections(spec, scorer, retention, args.seed, source, data, records, row["pruner"], model)
            if "object_auc" not in row:  # the scores do not depend on the retention
                row["object_auc"] = object_auc(scores, occupied)
                row["rho_with_peak"] = rank_correlation(scores, peaks)
            row["coverage"][str(retention)], row["occupied_share"][str(retention)] = coverage(keep, records)
            reference.setdefault(retention, keep)  # the first scorer's (SEMANTIC)
            row["shared_with_cls"][str(retention)] = shared(keep, reference[retention])
            row["outlier_recall"][str(retention)] = shared(outliers, keep)
        rows.append(row)
        cells = [f"{row['object_auc']:.3f}", f"{row['rho_with_peak']:.3f}"] + [
            f"{row[what][str(r)]:.3f}" for what in measures for r in args.retentions]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        if args.out is not None:  # written as each scorer finishes
            write_json_atomically(args.out, {"spec": args.spec, "model": str(spec.model.path), "samples": len(records),
                                             "seed": args.seed, "occupied_share_of_all_tokens": base_share,
                                             "activation_peaks": premise, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
