"""Massive activations of smol-llava's LLM before and after tuning: ``python -m research.smol.activations``.

    python -m research.smol.activations [--delta-dir qapframe/smol_llava] [--samples 32]
                                        [--out research/smol/results/activations.json]

Why: the experiment needs the LLM's activation statistics to stay those of the real pretrained SmolLM2
(massive activations: a few channels of a few tokens at thousands of times the median, Sun et al. 2024).
"Before" is SmolLM2 exactly as pretrained behind the trained projector (LoRA not merged); "after" is the
shipped model (LoRA merged). Both see the same test prompts and images. Per decoder layer's output: the
largest |h|, the median |h|, where the largest sits (token kind: the first token, a vision token, other text),
and the three channels with the largest |h|.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from qapframe.eval.inputs import model_inputs
from qapframe.data.synthetic import SyntheticVQA
from qapframe.eval.results import write_json_atomically
from qapframe.sources.smol_llava import BUILD_FILE, DELTA_DIR, DELTA_FILE, PROJECTOR_PREFIX, apply_delta, build_untrained
from qapframe.sources.smollm2 import smollm2_135m


@torch.no_grad()
def layer_statistics(model, inputs: dict) -> list[dict]:
    """Per decoder layer: max/median |h| over real tokens, the max's token kind, the top-3 channels."""
    out = model(**inputs, output_hidden_states=True)
    mask = inputs["attention_mask"].bool()  # [B, L]
    ids = inputs["input_ids"]
    vision = ids == model.config.image_token_index
    first = mask & (mask.long().cumsum(-1) == 1)  # each row's first real token
    rows = []
    for layer, hidden in enumerate(out.hidden_states[1:]):  # [B, L, D] after each decoder layer
        magnitude = hidden.abs()
        real = magnitude[mask]  # [T, D]
        peak = magnitude.amax(-1).masked_fill(~mask, -1)  # [B, L]
        b, t = divmod(int(peak.argmax()), peak.shape[1])
        kind = "first token" if first[b, t] else "vision" if vision[b, t] else "text"
        per_channel = real.amax(0)  # [D]
        top = per_channel.topk(3)
        rows.append({"layer": layer, "max_abs": float(real.max()), "median_abs": float(real.median()),
                     "max_token_kind": kind,
                     "vision_max_abs": float(magnitude[vision & mask].max()) if (vision & mask).any() else None,
                     "top_channels": [[int(c), round(float(v), 1)] for v, c in zip(top.values, top.indices)]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delta-dir", type=Path, default=DELTA_DIR)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("research/smol/results/activations.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    settings = json.loads((args.delta_dir / BUILD_FILE).read_text())
    tensors = load_file(args.delta_dir / DELTA_FILE)
    model, processor = build_untrained(smollm2_135m(), seed=settings["seed"])
    records = list(SyntheticVQA("test", size=args.samples, seed=0))
    inputs = model_inputs(processor, records, model)
    projector_only = {k: v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)}
    apply_delta(model, projector_only, settings["lora_scale"])
    before = layer_statistics(model, inputs)
    apply_delta(model, {k: v for k, v in tensors.items() if not k.startswith(PROJECTOR_PREFIX)} | projector_only,
                settings["lora_scale"])
    after = layer_statistics(model, inputs)
    print(f"{'layer':>5} | {'max|h| before':>13} {'after':>9} | {'median before':>13} {'after':>7} | "
          f"{'kind before':>11} {'after':>11} | {'vision max before':>17} {'after':>7} | top channels before -> after")
    for b, a in zip(before, after):
        print(f"{b['layer']:5d} | {b['max_abs']:13.1f} {a['max_abs']:9.1f} | {b['median_abs']:13.3f} "
              f"{a['median_abs']:7.3f} | {b['max_token_kind']:>11} {a['max_token_kind']:>11} | "
              f"{b['vision_max_abs']:17.1f} {a['vision_max_abs']:7.1f} | "
              f"{[c for c, _ in b['top_channels']]} -> {[c for c, _ in a['top_channels']]}")
    write_json_atomically(args.out, {"samples": args.samples, "before": before, "after": after})
    return 0


if __name__ == "__main__":
    sys.exit(main())
