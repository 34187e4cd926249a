"""Prefill time, dense vs pruned, on a LLaVA-1.5-shaped model (576 vision tokens), shallow and narrow.

Prints a table (retention, prefill ms, speedup, FLOP-ideal speedup, ratio, scoring overhead share)
and writes it as JSON with ``--out``. Weights are random: only time is measured.

    python benchmarks/prefill.py --out benchmarks/results/prefill.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from qapframe.models import adapter_for
from qapframe.strategies.base import PRUNERS, SCORERS

IMAGE_TOKEN = 3


def build(args) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden, num_hidden_layers=args.vision_layers,
        num_attention_heads=4, image_size=336, patch_size=14,
    )
    text = LlamaConfig(
        vocab_size=1000, hidden_size=args.hidden, intermediate_size=int(2.6875 * args.hidden),
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=2048,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=576)
    return LlavaForConditionalGeneration(config).eval()


def flops(model, vision_tokens: int, text_tokens: int, kept: int) -> float:
    """Forward FLOPs (2 per multiply-add) of the vision tower + projector + LLM prefill with ``kept`` vision tokens."""
    v, t = model.config.vision_config, model.config.text_config
    s_v = vision_tokens + 1
    vision = v.num_hidden_layers * s_v * (2 * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) + 4 * s_v * v.hidden_size)
    projector = vision_tokens * 2 * (v.hidden_size * t.hidden_size + t.hidden_size**2)
    s = kept + text_tokens
    head_dim = t.hidden_size // t.num_attention_heads
    attn_width = (t.num_attention_heads + 2 * t.num_key_value_heads) * head_dim + t.num_attention_heads * head_dim
    per_token = 2 * (t.hidden_size * attn_width + 3 * t.hidden_size * t.intermediate_size)
    attention = 2 * 2 * (s * (s + 1) / 2) * t.num_attention_heads * head_dim  # causal: QK^T and PV
    return vision + projector + t.num_hidden_layers * (s * per_token + attention)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vision-hidden", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=40)
    parser.add_argument("--scorer", default="hybrid")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    model = build(args)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([1, 10, 11]), torch.full((576,), IMAGE_TOKEN), torch.randint(4, 1000, (args.text_tokens - 3,), generator=g)])
    inputs = {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long),
              "pixel_values": torch.randn(1, 3, 336, 336, generator=g), "logits_to_keep": 1}
    dense_s = timed(lambda: model(**inputs), args.repeats)
    dense_flops = flops(model, 576, args.text_tokens, 576)
    rows = [{"retention": 1.0, "kept_tokens": 576, "prefill_ms": dense_s * 1e3, "speedup": 1.0, "ideal_speedup": 1.0,
             "ratio_to_ideal": 1.0, "scoring_share": 0.0}]
    for retention in (0.5, 0.25, 0.125):
        adapter = adapter_for(model)
        adapter.install(model, SCORERS.get(args.scorer)(), PRUNERS.get("topk")(retention=retention))
        installation = model.qapframe_installation
        pruned_s = timed(lambda: model(**inputs), args.repeats)
        # Scoring = scorer + pruner on the captured context (CLS rows are recomputed inside the
        # hooked vision forward and are part of the pruned prefill time either way).
        images = installation.latest_images
        scoring_s = timed(lambda: installation._select(images), args.repeats)
        adapter.remove(model)
        kept = round(576 * retention)
        ideal = dense_flops / flops(model, 576, args.text_tokens, kept)
        speedup = dense_s / pruned_s
        rows.append({"retention": retention, "kept_tokens": kept, "prefill_ms": pruned_s * 1e3, "speedup": speedup,
                     "ideal_speedup": ideal, "ratio_to_ideal": speedup / ideal,
                     "scoring_share": scoring_s / pruned_s, "scoring_ms": scoring_s * 1e3})
    print(f"LLaVA-1.5-shaped: 576 vision + {args.text_tokens} text tokens, LLM {args.layers}x{args.hidden}, "
          f"CLIP {args.vision_layers}x{args.vision_hidden}, scorer {args.scorer}, threads {args.threads}")
    print(f"{'retention':>9} {'kept':>5} {'prefill ms':>10} {'speedup':>8} {'ideal':>6} {'ratio':>6} {'scoring %':>9}")
    for r in rows:
        print(f"{r['retention']:>9.3f} {r['kept_tokens']:>5d} {r['prefill_ms']:>10.1f} {r['speedup']:>8.2f} "
              f"{r['ideal_speedup']:>6.2f} {r['ratio_to_ideal']:>6.2f} {100 * r['scoring_share']:>9.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
