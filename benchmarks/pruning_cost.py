"""Selection cost per image of every pruning method, and its share of a LLaVA-1.5-shaped prefill.

    python benchmarks/pruning_cost.py [--repeats 15] [--json benchmarks/results/pruning_cost.json]

For each method (scorer + pruner as a spec names them) and retention, the time of ``scorer.score`` +
``pruner.select`` (pre-LLM methods: + ``Selection.gather``, the tokens handed to the LLM) on one image's
context, 576 tokens (PyramidDrop, SparseVLM: their three stages on the shrinking token sets, SparseVLM's
first two adaptive), median of ``--repeats``, one thread, float32, compared against two prefills:
- ``share_7b``: at D = 4096 (LLaVA-1.5-7B's width), against the LLaVA-1.5-7B prefill (576 vision + 40
  text tokens), *measured* at its real shapes with random weights: the whole CLIP-L/336 tower, the
  projector, one LLaMA-7B decoder layer (times 32: the layers are identical) and the last token's lm_head.
  Its FLOP estimate (`benchmarks/prefill.py`'s count over this CPU's fp32 matmul rate) is printed beside;
- ``share_bench``: at the width of `benchmarks/prefill.py`'s default model (512), against that
  model's measured dense prefill (the model is built and timed here). That model has 4 layers, so a
  method that forms the N x N similarity (CDPruner, DivPrune: N^2 D FLOPs against ~12 N D^2 per layer)
  costs it a share that LLaVA-1.5's 32 layers at 8x the width do not see.
Context tensors are random: only time is measured. In-LLM methods' attention rows and keys are part
of their prefill either way; only their selection is timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from types import SimpleNamespace

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

sys.path.insert(0, os.path.dirname(__file__))
import prefill  # noqa: E402  (the prefill benchmark's model and FLOP count)

from qapframe.models.inllm_state import stage_targets  # noqa: E402
from qapframe.strategies.base import PRUNERS, SCORERS, requirements_of  # noqa: E402
from qapframe.strategies.context import ScoringContext  # noqa: E402

N, TEXT = 576, 40
METHODS = {  # label -> (scorer spec, pruner spec, in-LLM stages)
    "visionzip": ({"name": "visionzip"}, {"name": "visionzip"}, 1),
    "hybrid (top-k)": ({"name": "hybrid"}, {"name": "topk"}, 1),
    "cdpruner": ({"name": "cdpruner"}, {"name": "cdpruner"}, 1),
    "cdpruner + hybrid relevance": ({"name": "hybrid", "semantic": {"name": "cdpruner"}}, {"name": "cdpruner"}, 1),
    "divprune": ({"name": "l2norm"}, {"name": "divprune"}, 1),
    "vispruner": ({"name": "visionzip"}, {"name": "vispruner"}, 1),
    "tome": ({"name": "l2norm"}, {"name": "tome"}, 1),
    "prunevid (image: one frame)": ({"name": "l2norm"}, {"name": "prunevid"}, 1),
    "mustdrop_merge (3x3 windows)": ({"name": "l2norm"}, {"name": "mustdrop_merge"}, 1),
    "fastvid (image: one frame)": ({"name": "visionzip"}, {"name": "fastvid"}, 1),
    "holitom (image: one frame)": ({"name": "visionzip"}, {"name": "holitom"}, 1),
    "fastv (in-LLM)": ({"name": "fastv"}, {"name": "topk"}, 1),
    "dart (in-LLM)": ({"name": "fastv"}, {"name": "dart"}, 1),
    "pyramiddrop (in-LLM, 3 stages)": ({"name": "pyramiddrop"}, {"name": "topk"}, 3),
    "sparsevlm (in-LLM, 3 stages)": ({"name": "sparsevlm"}, {"name": "sparsevlm"}, 3),
    "mustdrop (in-LLM, 4 stages)": ({"name": "mustdrop"}, {"name": "topk"}, 4),
}
RATERS = 20  # text raters per image (SparseVLM's: an assumed half of the TEXT tokens; MustDrop's, all of them, alike)


def pre_llm(label: str) -> bool:
    """Whether the method prunes before the LLM (its scorer and pruner ask for nothing from inside it)."""
    scorer_spec, pruner_spec, _ = METHODS[label]
    return not requirements_of(make(SCORERS, scorer_spec), make(PRUNERS, pruner_spec)).in_llm


def make(registry, spec: dict, **extra):
    return registry.get(spec["name"])(**{k: v for k, v in spec.items() if k != "name"}, **extra)


def context(n: int, d: int, seed: int = 0) -> ScoringContext:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, n, d, generator=g)
    return ScoringContext(
        vision_embeds=embeds,
        cls_attention=torch.rand(1, n, generator=g).softmax(-1),
        vision_keys=torch.randn(1, n, 64, generator=g),
        text_embeds=torch.randn(1, TEXT, d, generator=g),
        text_mask=torch.ones(1, TEXT, dtype=torch.bool),
        text_attention=torch.rand(1, n, generator=g).softmax(-1),
        llm_hidden=embeds,
        llm_keys=torch.randn(1, n, d, generator=g),
        rater_attention=torch.rand(1, RATERS, n, generator=g).softmax(-1),
        rater_mask=torch.ones(1, RATERS, dtype=torch.bool),
    )


def selection_seconds(label: str, retention: float, d: int, repeats: int) -> float:
    scorer_spec, pruner_spec, stages = METHODS[label]
    scorer = make(SCORERS, scorer_spec)
    pruner = make(PRUNERS, pruner_spec, retention=retention)
    final = pruner.budget(N)
    counts = [N] + stage_targets(N, final, stages)  # the in-LLM stages' token counts, as the adapter plans them
    contexts = [context(counts[s], d, seed=s).with_(adaptive_budget=s + 1 < stages) for s in range(stages)]
    stage_pruners = [pruner] if stages == 1 else [make(PRUNERS, pruner_spec, num_tokens=counts[s + 1]) for s in range(stages)]
    before_llm = not requirements_of(scorer, pruner).in_llm

    def run():
        for ctx, p in zip(contexts, stage_pruners):
            selection = p.select(scorer.score(ctx), ctx)
            if before_llm:  # the tokens the LLM receives: merging pruners form their weighted sums here
                selection.gather(ctx.vision_embeds)

    return prefill.timed(run, repeats)  # its warm-up call compiles (or loads) the numba kernels


def matmul_flops_per_s(repeats: int) -> float:
    a, b = torch.randn(1024, 4096), torch.randn(4096, 4096)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * 1024 * 4096 * 4096 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def llava_7b_prefill_flops() -> float:
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32)
    model = SimpleNamespace(config=LlavaConfig(vision_config=vision, text_config=text))
    return prefill.flops(model, N, TEXT, N)


def llava_7b_prefill_seconds(repeats: int) -> dict:
    """Measured LLaVA-1.5-7B prefill parts (one thread): CLIP-L/336, projector, 32 x one decoder layer, lm_head."""
    from transformers import CLIPVisionModel, LlamaModel

    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=336, patch_size=14)).eval()
    projector = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 4096))
    layer = LlamaModel(LlamaConfig(vocab_size=8, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                                   num_attention_heads=32, num_key_value_heads=32)).eval()
    lm_head = torch.nn.Linear(4096, 32000, bias=False)
    pixels, tokens = torch.randn(1, 3, 336, 336), torch.randn(1, N + TEXT, 4096)
    parts = {
        "vision_tower": prefill.timed(lambda: vision(pixel_values=pixels), repeats),
        "projector": prefill.timed(lambda: projector(tokens[:, :N, :1024].contiguous()), repeats),
        "decoder_layer": prefill.timed(lambda: layer(inputs_embeds=tokens, use_cache=False), repeats),
        "lm_head_last_token": prefill.timed(lambda: lm_head(tokens[:, -1]), repeats),
    }
    parts["total"] = parts["vision_tower"] + parts["projector"] + 32 * parts["decoder_layer"] + parts["lm_head_last_token"]
    return parts


def bench_model_prefill_seconds(repeats: int) -> tuple[float, int]:
    args = SimpleNamespace(hidden=512, layers=4, vision_hidden=128, vision_layers=4)
    model = prefill.build(args)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([1, 10, 11]), torch.full((N,), prefill.IMAGE_TOKEN), torch.randint(4, 1000, (TEXT - 3,), generator=g)])
    inputs = {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long),
              "pixel_values": torch.randn(1, 3, 336, 336, generator=g), "logits_to_keep": 1}
    return prefill.timed(lambda: model(**inputs), repeats), args.hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default="benchmarks/results/pruning_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)

    throughput = matmul_flops_per_s(args.repeats)
    estimated_7b_s = llava_7b_prefill_flops() / throughput
    parts_7b = llava_7b_prefill_seconds(min(args.repeats, 3))
    prefill_7b_s = parts_7b["total"]
    bench_s, bench_width = bench_model_prefill_seconds(args.repeats)
    rows = []
    for label in METHODS:
        for retention in (0.5, 0.25, 0.125):
            at_7b = selection_seconds(label, retention, 4096, args.repeats)
            at_bench = selection_seconds(label, retention, bench_width, args.repeats)
            rows.append({"method": label, "pre_llm": pre_llm(label), "retention": retention,
                         "ms_d4096": 1e3 * at_7b, "share_7b": at_7b / prefill_7b_s,
                         f"ms_d{bench_width}": 1e3 * at_bench, "share_bench": at_bench / bench_s})

    print(f"LLaVA-1.5-7B prefill measured {prefill_7b_s:.1f} s (vision {parts_7b['vision_tower']:.1f} s + 32 x "
          f"{parts_7b['decoder_layer']:.2f} s layers; FLOP estimate at {throughput / 1e9:.1f} GFLOP/s: "
          f"{estimated_7b_s:.1f} s); prefill.py model ({bench_width} wide) measured {1e3 * bench_s:.0f} ms")
    print(f"{'method':<32} {'ret':>6} {'ms@4096':>9} {'% 7B':>7} {f'ms@{bench_width}':>8} {'% bench':>8}")
    for r in rows:
        print(f"{r['method']:<32} {r['retention']:>6.3f} {r['ms_d4096']:>9.2f} {100 * r['share_7b']:>7.3f} "
              f"{r[f'ms_d{bench_width}']:>8.2f} {100 * r['share_bench']:>8.2f}")
    worst = max(r["share_7b"] for r in rows if r["pre_llm"])
    print(f"worst pre-LLM share of the 7B prefill: {100 * worst:.3f} % (target < 2 %)")
    worst_bench = max(r["share_bench"] for r in rows if r["pre_llm"])
    print(f"worst pre-LLM share of the {bench_width}-wide bench model's prefill: {100 * worst_bench:.2f} %")
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": 1,
                    "load_avg_1min": os.getloadavg()[0]},
        "matmul_GFLOPs": throughput / 1e9,
        "llava_7b_prefill_s": prefill_7b_s,
        "llava_7b_prefill_parts_s": parts_7b,
        "llava_7b_prefill_s_estimated": estimated_7b_s,
        "bench_model_prefill_ms": 1e3 * bench_s,
        "tokens": N, "text_tokens": TEXT,
        "rows": rows,
    }
    if args.json:
        from qapframe.eval.results import write_json_atomically

        write_json_atomically(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
