"""Degeneracy check of a toy model: does it exercise both axes of the experiment (quantization and pruning)?

    python -m research.toy.check [--path DIR] [--size 200] [--threads 2]

Reports test accuracy for fp dense, blank images, W4A4 RTN dense (the `rtn` quantizer's ``W4A4`` preset:
4-bit weights in groups of 128, 4-bit per-token inputs of every LLM Linear) and random / L2-norm top-k
vision-token retention at 25 % and 12.5 %, every configuration built with `qapframe.Pipeline` from the
registered quantizers, scorers and pruners and answered as ``qapframe run`` answers (`answer_records`).

When W4A4 costs no accuracy it also says why: how many answers W4A4 changes (per question type, with the
correct counts before and after) and how heavy-tailed the inputs of the LLM's Linears are.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch

import qapframe
from qapframe.data import load_dataset
from qapframe.data.prompts import is_correct
from qapframe.data.synthetic import SyntheticVQA, blank_image
from qapframe.eval.evaluation import answer_records
from qapframe.eval.inputs import model_inputs
from qapframe.toy import TOY_PATH, load_toy

W4A4_RTN = {"name": "rtn", "scheme": "W4A4"}


def outlier_stats(x: torch.Tensor) -> dict[str, float]:
    """Heavy tails of activations ``[..., C]``: kurtosis of all entries (3 for a Gaussian) and the largest
    channel's peak |x| over the median channel's peak (per-token 4-bit grids are set by the peak)."""
    x = x.reshape(-1, x.shape[-1]).double()
    z = (x - x.mean()) / x.std(correction=0)
    peaks = x.abs().amax(dim=0)  # [C]
    return {"kurtosis": z.pow(4).mean().item(), "channel_peak_ratio": (peaks.max() / peaks.quantile(0.5)).item()}


@torch.no_grad()
def linear_input_outliers(model, inputs: dict) -> dict[str, dict[str, float]]:
    """`outlier_stats` of the input of every LLM Linear (the ones W4A4 quantizes) for one forward pass."""
    stats: dict[str, dict[str, float]] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: stats.__setitem__(name, outlier_stats(args[0])))
        for name, module in model.model.language_model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def answer_changes(before: list[str], after: list[str], records) -> dict[str, dict[str, int]]:
    """Per question type: questions, answers that changed, and correct answers before and after."""
    table: dict[str, dict[str, int]] = {}
    for old, new, record in zip(before, after, records):
        row = table.setdefault(record.meta["type"], {"questions": 0, "changed": 0, "correct_before": 0, "correct_after": 0})
        row["questions"] += 1
        row["changed"] += old.strip() != new.strip()
        row["correct_before"] += is_correct(old, record)
        row["correct_after"] += is_correct(new, record)
    return table


def prepared(model, processor, quantizer=None, scorer=None, retention=None, seed: int = 0, calibration_size: int = 32):
    """A copy of ``model`` through `qapframe.Pipeline` (calibrated on the dataset's calibration split, with
    answers, as ``qapframe run`` calibrates)."""
    pipeline = qapframe.Pipeline(quantizer=quantizer, scorer=scorer,
                                 pruner=None if scorer is None else {"name": "topk", "retention": retention}, seed=seed)
    calibration = None
    if quantizer is not None:
        records = load_dataset("synthetic", "calibration", num_samples=calibration_size)
        calibration = [model_inputs(processor, [r], model, with_answer=True) for r in records]
    with torch.no_grad():
        return pipeline.apply(copy.deepcopy(model), calibration)


def run_check(model, processor, size: int = 200, seed: int = 0, batch_size: int = 50) -> dict[str, float]:
    records = list(SyntheticVQA("test", size=size, seed=seed))
    results: dict[str, float] = {}

    def answers(candidate, items=records) -> list[str]:
        return answer_records(candidate, processor, items, batch_size=batch_size)

    def record(name: str, predictions: list[str]) -> None:
        results[name] = round(sum(is_correct(p, r) for p, r in zip(predictions, records)) / max(1, len(records)), 4)
        print(f"{name:28s} {results[name]:.3f}", flush=True)

    dense = answers(model)
    record("fp_dense", dense)
    record("fp_blank_image", answers(model, [dataclasses.replace(r, image=blank_image()) for r in records]))
    dense_w4a4 = answers(prepared(model, processor, quantizer=W4A4_RTN, seed=seed))
    record("w4a4_rtn_dense", dense_w4a4)
    changes = answer_changes(dense, dense_w4a4, records)
    results["w4a4_rtn_changed_answers"] = sum(row["changed"] for row in changes.values())
    print(f"{'w4a4_rtn_changed_answers':28s} {results['w4a4_rtn_changed_answers']} of {len(records)}:", changes)
    outliers = linear_input_outliers(model, model_inputs(processor, records[:batch_size], model))
    for kind in sorted({name.rsplit(".", 1)[-1] for name in outliers}):
        rows = [v for name, v in outliers.items() if name.endswith("." + kind)]
        results[f"max_kurtosis_{kind}"] = round(max(r["kurtosis"] for r in rows), 1)
        results[f"max_channel_peak_ratio_{kind}"] = round(max(r["channel_peak_ratio"] for r in rows), 1)
    print("LLM Linear inputs, worst layer per kind:",
          {k: v for k, v in results.items() if k.startswith("max_")}, flush=True)
    for retention in (0.25, 0.125):
        pct = f"{retention * 100:g}%"
        for scorer in ("random", "l2norm"):
            pruned = prepared(model, processor, scorer={"name": scorer}, retention=retention, seed=seed)
            record(f"fp_{scorer}_{pct}", answers(pruned))
    both = prepared(model, processor, quantizer=W4A4_RTN, scorer={"name": "l2norm"}, retention=0.125, seed=seed)
    record("w4a4_rtn_l2norm_12.5%", answers(both))
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", default=str(TOY_PATH))
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load_toy(path=args.path)
    start = time.time()
    results = run_check(model, processor, args.size)
    print(json.dumps(results), f"({time.time() - start:.0f}s)")
    return results


if __name__ == "__main__":
    main()
