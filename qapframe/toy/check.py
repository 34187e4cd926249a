"""Degeneracy check of a toy model: does it exercise both axes (quantization and pruning)?

``python -m qapframe.toy.check [--path DIR]`` reports test accuracy for fp dense, blank images,
a simulated W4A4 RTN LLM (weights: symmetric 4-bit, groups of 128 input channels per output row;
inputs of every LLM Linear: asymmetric 4-bit per token), and random / L2-norm top-k vision-token
retention at 25% and 12.5%. The simulation uses `fake_quantize_groups`, the project's one
quantize-dequantize convention; the real quantizers live in `qapframe.quantizers`.

When W4A4 costs no accuracy it also says why: how many answers W4A4 changes (per question type,
with the correct counts before and after) and how heavy-tailed the inputs of the LLM's Linears are.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from qapframe.data.prompts import is_correct
from qapframe.data.synthetic import SyntheticVQA, blank_image
from qapframe.kernels.reference import fake_quantize_groups
from qapframe.toy.evaluate import (
    accuracy,
    answer,
    answer_with_tokens,
    l2norm_selector,
    processor_inputs,
    random_selector,
)


def simulate_w4a4_rtn(model, bits: int = 4, group_size: int = 128):
    """A copy of ``model`` whose LLM Linears (not vision tower, projector or lm_head) are fake W4A4."""
    model = copy.deepcopy(model)
    for module in model.model.language_model.modules():
        if isinstance(module, torch.nn.Linear):
            with torch.no_grad():
                # weight [out, in]: groups run along the input dim, one scale per (row, group)
                module.weight.copy_(fake_quantize_groups(module.weight, bits, group_size, True).to(module.weight.dtype))
            module.register_forward_pre_hook(
                lambda _m, args: (fake_quantize_groups(args[0], bits, -1, False).to(args[0].dtype), *args[1:])
            )
    return model


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


def run_check(model, processor, size: int = 200, seed: int = 0, batch_size: int = 50) -> dict[str, float]:
    records = list(SyntheticVQA("test", size=size, seed=seed))
    results: dict[str, float] = {}

    def record(name: str, predictions: list[str]) -> None:
        results[name] = round(accuracy(predictions, records), 4)
        print(f"{name:28s} {results[name]:.3f}", flush=True)

    dense = answer(model, processor, records, batch_size)
    record("fp_dense", dense)
    record("fp_blank_image", answer(model, processor, records, batch_size, images=[blank_image()] * len(records)))
    quantized = simulate_w4a4_rtn(model)
    dense_w4a4 = answer(quantized, processor, records, batch_size)
    record("w4a4_rtn_dense", dense_w4a4)
    changes = answer_changes(dense, dense_w4a4, records)
    results["w4a4_rtn_changed_answers"] = sum(row["changed"] for row in changes.values())
    print(f"{'w4a4_rtn_changed_answers':28s} {results['w4a4_rtn_changed_answers']} of {len(records)}:", changes)
    outliers = linear_input_outliers(model, dict(processor_inputs(processor, records[:batch_size])))
    for kind in sorted({name.rsplit(".", 1)[-1] for name in outliers}):
        rows = [v for name, v in outliers.items() if name.endswith("." + kind)]
        results[f"max_kurtosis_{kind}"] = round(max(r["kurtosis"] for r in rows), 1)
        results[f"max_channel_peak_ratio_{kind}"] = round(max(r["channel_peak_ratio"] for r in rows), 1)
    print("LLM Linear inputs, worst layer per kind:",
          {k: v for k, v in results.items() if k.startswith("max_")}, flush=True)
    for retention in (0.25, 0.125):
        pct = f"{retention * 100:g}%"
        record(f"fp_random_{pct}", answer_with_tokens(model, processor, records, random_selector(retention, seed), batch_size))
        record(f"fp_l2norm_{pct}", answer_with_tokens(model, processor, records, l2norm_selector(retention), batch_size))
    record("w4a4_rtn_l2norm_12.5%", answer_with_tokens(quantized, processor, records, l2norm_selector(0.125), batch_size))
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from qapframe.toy import TOY_PATH

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", default=str(TOY_PATH))
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(args.path).eval()
    processor = AutoProcessor.from_pretrained(args.path)
    start = time.time()
    results = run_check(model, processor, args.size)
    print(json.dumps(results), f"({time.time() - start:.0f}s)")
    return results


if __name__ == "__main__":
    main()
