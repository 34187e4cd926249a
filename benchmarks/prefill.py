"""Prefill time, dense vs pruned, on a LLaVA-1.5- or Qwen2.5-VL-shaped model (576 vision tokens), shallow and narrow.

Prints a table (retention, prefill ms, speedup, FLOP-ideal speedup, ratio, scoring overhead share)
and writes it as JSON with ``--out``. Weights are random: only time is measured. ``--model qwen2_5_vl``
feeds one 672 x 672 image (48 x 48 patches of 14 px, merged 2 x 2 into 576 tokens) through a windowed
vision tower whose last block attends fully, as Qwen2.5-VL's does.

    python benchmarks/prefill.py --out benchmarks/results/prefill.json
    python benchmarks/prefill.py --model qwen2_5_vl --out benchmarks/results/prefill_qwen2_5_vl.json
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
VISION_TOKENS = 576
QWEN_GRID = (1, 48, 48)  # patches of one 672 x 672 image; 2 x 2 of them merge into one of 576 tokens


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


def build_qwen2_5_vl(args):
    """Qwen2.5-VL's layout at the benchmark's sizes: windowed vision blocks, the last one full, Qwen2 LLM."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(depth=args.vision_layers, hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                  num_heads=4, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                  out_hidden_size=args.hidden, fullatt_block_indexes=[args.vision_layers - 1])
    head_dim = 64
    text = dict(vocab_size=1000, hidden_size=args.hidden, intermediate_size=int(2.6875 * args.hidden),
                num_hidden_layers=args.layers, num_attention_heads=args.hidden // head_dim,
                num_key_value_heads=args.hidden // head_dim, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, video_token_id=4,
                              vision_start_token_id=5, vision_end_token_id=6)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _llm_flops(t, s: int) -> float:
    """LLaMA/Qwen2-style decoder prefill FLOPs for ``s`` tokens (causal attention)."""
    head_dim = t.hidden_size // t.num_attention_heads
    attn_width = (t.num_attention_heads + 2 * t.num_key_value_heads) * head_dim + t.num_attention_heads * head_dim
    per_token = 2 * (t.hidden_size * attn_width + 3 * t.hidden_size * t.intermediate_size)
    attention = 2 * 2 * (s * (s + 1) / 2) * t.num_attention_heads * head_dim  # causal: QK^T and PV
    return t.num_hidden_layers * (s * per_token + attention)


def flops(model, vision_tokens: int, text_tokens: int, kept: int) -> float:
    """Forward FLOPs (2 per multiply-add) of the vision tower + projector + LLM prefill with ``kept`` vision tokens."""
    v, t = model.config.vision_config, model.config.text_config
    s_v = vision_tokens + 1
    vision = v.num_hidden_layers * s_v * (2 * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) + 4 * s_v * v.hidden_size)
    projector = vision_tokens * 2 * (v.hidden_size * t.hidden_size + t.hidden_size**2)
    return vision + projector + _llm_flops(t, kept + text_tokens)


def qwen_flops(model, vision_tokens: int, text_tokens: int, kept: int) -> float:
    """The same for `build_qwen2_5_vl`: patch embedding, vision blocks (SwiGLU MLP; window or full attention), merger."""
    v, t = model.config.vision_config, model.config.text_config
    unit = v.spatial_merge_size**2
    patches, h = vision_tokens * unit, v.hidden_size
    embed = patches * 2 * (3 * v.temporal_patch_size * v.patch_size**2) * h
    window = (v.window_size // v.patch_size) ** 2  # patches per attention window
    blocks = 0.0
    for i in range(v.depth):
        span = patches if i in v.fullatt_block_indexes else window
        blocks += patches * (2 * (4 * h * h + 3 * h * v.intermediate_size) + 4 * span * h)
    merger = vision_tokens * 2 * ((unit * h) ** 2 + unit * h * v.out_hidden_size)
    return embed + blocks + merger + _llm_flops(t, kept + text_tokens)


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
    parser.add_argument("--model", choices=["llava", "qwen2_5_vl"], default="llava", help="the model's layout")
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

    qwen = args.model == "qwen2_5_vl"
    model = build_qwen2_5_vl(args) if qwen else build(args)
    count_flops = qwen_flops if qwen else flops
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([1, 10, 11]), torch.full((VISION_TOKENS,), IMAGE_TOKEN),
                     torch.randint(7 if qwen else 4, 1000, (args.text_tokens - 3,), generator=g)])
    inputs = {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long), "logits_to_keep": 1}
    if qwen:
        grid = torch.tensor([QWEN_GRID])
        inputs.update(pixel_values=torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, generator=g), image_grid_thw=grid,
                      mm_token_type_ids=(inputs["input_ids"] == IMAGE_TOKEN).int())
    else:
        inputs["pixel_values"] = torch.randn(1, 3, 336, 336, generator=g)
    dense_s = timed(lambda: model(**inputs), args.repeats)
    dense_flops = count_flops(model, VISION_TOKENS, args.text_tokens, VISION_TOKENS)
    rows = [{"retention": 1.0, "kept_tokens": VISION_TOKENS, "prefill_ms": dense_s * 1e3, "speedup": 1.0, "ideal_speedup": 1.0,
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
        kept = round(VISION_TOKENS * retention)
        ideal = dense_flops / count_flops(model, VISION_TOKENS, args.text_tokens, kept)
        speedup = dense_s / pruned_s
        rows.append({"retention": retention, "kept_tokens": kept, "prefill_ms": pruned_s * 1e3, "speedup": speedup,
                     "ideal_speedup": ideal, "ratio_to_ideal": speedup / ideal,
                     "scoring_share": scoring_s / pruned_s, "scoring_ms": scoring_s * 1e3})
    shape, tower = ("Qwen2.5-VL", "ViT") if qwen else ("LLaVA-1.5", "CLIP")
    print(f"{shape}-shaped: {VISION_TOKENS} vision + {args.text_tokens} text tokens, LLM {args.layers}x{args.hidden}, "
          f"{tower} {args.vision_layers}x{args.vision_hidden}, scorer {args.scorer}, threads {args.threads}")
    print(f"{'retention':>9} {'kept':>5} {'prefill ms':>10} {'speedup':>8} {'ideal':>6} {'ratio':>6} {'scoring %':>9}")
    for r in rows:
        print(f"{r['retention']:>9.3f} {r['kept_tokens']:>5d} {r['prefill_ms']:>10.1f} {r['speedup']:>8.2f} "
              f"{r['ideal_speedup']:>6.2f} {r['ratio_to_ideal']:>6.2f} {100 * r['scoring_share']:>9.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
