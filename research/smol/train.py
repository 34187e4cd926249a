"""Train smol-llava (qapframe.sources.smol_llava): ``python -m research.smol.train --out DIR``.

Run from the repository root. LLaVA's two stages on qapframe's synthetic VQA, with the toy's frozen vision tower
and SmolLM2-135M-Instruct as the LLM:

- Stage 1, feature alignment (``--align-steps``): only the projector trains, on captions ("Describe the
  image." -> every object, colour, shape and grid cell in reading order), the LLM frozen.
- Stage 2, instruction tuning (``--tune-steps``): the projector plus LoRA adapters (rank ``--rank``, scale
  alpha/rank, on every attention and MLP Linear of the LLM) train on the questions, with `Recipe.caption_prob`
  captions mixed in; with probability `Recipe.drop_prob` a question sees only a random, order-preserving
  10-100 % of its vision tokens (the toy's pruning tolerance, docs/toy.md).

The loss is the cross-entropy of the assistant turn (answer, then ``<|im_end|>``); only those positions go
through the LM head (49k-word vocabulary). Every ``--checkpoint-every`` steps the trainable tensors, optimiser
and random states are written atomically to ``DIR/checkpoint.pt``; the same command resumes a stopped run.
The result is the delta from SmolLM2 (`qapframe.sources.smol_llava.delta_tensors`) plus ``build.json``;
copy both into ``qapframe/smol_llava/`` to ship them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import time
from pathlib import Path

import torch

from qapframe.data.prompts import IMAGE_PLACEHOLDER, build_prompt, is_correct
from qapframe.data.synthetic import SyntheticVQA, blank_image, make_record
from qapframe.eval.evaluation import answer_records
from qapframe.eval.metrics import RecordOutcome, accuracy_by_type
from qapframe.sources.smol_llava import BUILD_FILE, DELTA_FILE, build_untrained, delta_tensors
from qapframe.sources.smollm2 import smollm2_135m
from research.toy.sequences import sequence_embeds, vision_tokens
from research.toy.train import caption

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CAPTION_REQUEST = "Describe the image."


@dataclasses.dataclass(frozen=True)
class Recipe:
    align_lr: float = 1e-3
    tune_lr: float = 8e-4
    warmup: int = 20
    weight_decay: float = 0.0
    caption_prob: float = 0.15  # stage 2
    drop_prob: float = 0.5
    min_keep: float = 0.1
    lora_alpha: float = 16.0


RECIPE = Recipe()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for checkpoint, delta and build.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--align-steps", type=int, default=100)
    p.add_argument("--tune-steps", type=int, default=380)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=100, help="stage-2 steps between evaluations (0: none)")
    p.add_argument("--eval-size", type=int, default=100)
    p.add_argument("--final-eval-size", type=int, default=1000)
    args = p.parse_args(argv)
    for flag in ("align_steps", "tune_steps", "eval_every"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')}: must be >= 0, got {getattr(args, flag)}")
    for flag in ("batch_size", "rank", "threads", "checkpoint_every", "eval_size", "final_eval_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    return args


class LoRA:
    """LoRA adapters as forward hooks on the LLM's Linears: ``y = W x + scale * B (A x)``.

    A [r, in] starts Kaiming-uniform, B [out, r] at zero (so training starts at SmolLM2 itself).
    """

    def __init__(self, model: torch.nn.Module, rank: int, alpha: float, seed: int):
        self.scale = alpha / rank
        self.factors: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        self.handles = []
        generator = torch.Generator().manual_seed(seed + 7)
        for name, module in model.model.language_model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_MODULES:
                bound = 1 / math.sqrt(module.in_features)
                a = torch.nn.Parameter((torch.rand(rank, module.in_features, generator=generator) * 2 - 1) * bound)
                b = torch.nn.Parameter(torch.zeros(module.out_features, rank))
                self.factors[f"model.language_model.{name}"] = (a, b)
                self.handles.append(module.register_forward_hook(self._hook(a, b)))

    def _hook(self, a, b):
        def hook(module, inputs, output):
            return output + self.scale * torch.nn.functional.linear(torch.nn.functional.linear(inputs[0], a), b)
        return hook

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for pair in self.factors.values() for p in pair]


def training_records(data_seed: int, start: int):
    return (make_record(data_seed, "train", index) for index in itertools.count(start))


def split_ids(tokenizer, text: str) -> tuple[list[int], list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = ids.index(tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))
    return ids[:cut], ids[cut + 1:]


def batch_loss(model, processor, records, rng: random.Random, caption_prob: float, drop_prob: float) -> torch.Tensor:
    """Mean cross-entropy over the assistant-turn tokens of one batch (captions with ``caption_prob``)."""
    tokenizer = processor.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    vision = vision_tokens(model, processor, [r.image for r in records])  # [B, N, D]
    n = vision.shape[1]
    caption_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{CAPTION_REQUEST}"}], tokenize=False, add_generation_prompt=True)
    rows, targets = [], []
    for record, tokens in zip(records, vision):
        if rng.random() < caption_prob:
            before, after = split_ids(tokenizer, caption_text)
            answer = caption(record)
        else:
            if rng.random() < drop_prob:
                k = rng.randint(max(1, math.ceil(RECIPE.min_keep * n)), n)
                tokens = tokens[sorted(rng.sample(range(n), k))]
            before, after = split_ids(tokenizer, build_prompt(record, tokenizer))
            answer = record.answer
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        rows.append((before, tokens, after + target))
        start = len(before) + tokens.shape[0] + len(after)  # first target position
        targets.append((start, target))
    embeds, mask = sequence_embeds(model, rows, pad_left=False)  # [B, L, D], [B, L]
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    rows_idx, pos_idx, labels = [], [], []
    for i, (start, target) in enumerate(targets):
        for j, token in enumerate(target):
            rows_idx.append(i)
            pos_idx.append(start + j - 1)  # position t predicts token t + 1
            labels.append(token)
    logits = model.lm_head(hidden[torch.tensor(rows_idx), torch.tensor(pos_idx)])  # [T, V]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(labels))


def evaluate(model, processor, size: int, data_seed: int, blank: bool = True) -> dict:
    records = list(SyntheticVQA("test", size=size, seed=data_seed))
    predictions = answer_records(model, processor, records, batch_size=16, max_new_tokens=6)
    outcomes = [RecordOutcome(i, r.id, r.meta["type"], p, is_correct(p, r), 64)
                for i, (p, r) in enumerate(zip(predictions, records))]
    result = {"test_accuracy": sum(o.correct for o in outcomes) / len(outcomes),
              "test_accuracy_by_type": {k: round(v, 3) for k, v in accuracy_by_type(outcomes).items()},
              "examples": [f"{r.question} -> {p!r} ({r.answer})" for r, p in zip(records[:3], predictions[:3])]}
    if blank:
        blanks = [dataclasses.replace(r, image=blank_image()) for r in records]
        answers = answer_records(model, processor, blanks, batch_size=16, max_new_tokens=6)
        result["blank_image_accuracy"] = sum(is_correct(p, r) for p, r in zip(answers, records)) / len(records)
    return result


def log_evaluation(label: str, model, processor, args, state: dict) -> None:
    """A quick evaluation (``--eval-size`` questions, no blank images) printed and kept in the run's log."""
    model.eval()
    with torch.no_grad():
        line = f"  {label}: {evaluate(model, processor, args.eval_size, args.data_seed, blank=False)}"
    model.train()
    state["log"].append(line)
    print(line, flush=True)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.enable_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_untrained(smollm2_135m(), seed=args.seed)
    model.requires_grad_(False)
    model.train()
    lora = LoRA(model, args.rank, RECIPE.lora_alpha, args.seed)
    projector = list(model.model.multi_modal_projector.parameters())
    for p in projector + lora.parameters():
        p.requires_grad_(True)
    stages = [("align", args.align_steps, projector, RECIPE.align_lr, 1.0, 0.0),
              ("tune", args.tune_steps, projector + lora.parameters(), RECIPE.tune_lr, RECIPE.caption_prob,
               RECIPE.drop_prob)]
    state = {"stage": 0, "step": 0, "elapsed": 0.0, "log": [], "record_index": 0}
    checkpoint_path = out / "checkpoint.pt"
    optimizer_state = None
    rng = random.Random(args.seed)
    if checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, weights_only=False)
        with torch.no_grad():
            for p, v in zip(projector + lora.parameters(), saved["trainable"]):
                p.copy_(v)
        state, optimizer_state = saved["state"], saved["optimizer"]
        rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        print(f"resuming stage {stages[state['stage']][0]} at step {state['step']}", flush=True)
    print(f"smol-llava: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{sum(p.numel() for p in projector + lora.parameters()) / 1e6:.2f}M trainable", flush=True)
    start = time.time() - state["elapsed"]
    while state["stage"] < len(stages):
        name, steps, params, lr, caption_prob, drop_prob = stages[state["stage"]]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=RECIPE.weight_decay, betas=(0.9, 0.98))
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
            optimizer_state = None
        stream = training_records(args.data_seed, state["record_index"])
        running = None
        while state["step"] < steps:
            step = state["step"]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr, RECIPE.warmup)
            records = list(itertools.islice(stream, args.batch_size))
            state["record_index"] += args.batch_size
            loss = batch_loss(model, processor, records, rng, caption_prob, drop_prob)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            state["step"] += 1
            state["elapsed"] = time.time() - start
            if state["step"] % 10 == 0:
                line = f"{name} step {state['step']:4d}/{steps}  loss {running:.4f}  {state['elapsed']:6.0f}s"
                state["log"].append(line)
                print(line, flush=True)
            if args.eval_every and name == "tune" and state["step"] % args.eval_every == 0 and state["step"] < steps:
                log_evaluation(f"eval@{name}{state['step']}", model, processor, args, state)
            if state["step"] % args.checkpoint_every == 0 or state["step"] == steps:
                save_atomic({"trainable": [p.detach().clone() for p in projector + lora.parameters()],
                             "optimizer": optimizer.state_dict(), "state": state, "rng": rng.getstate(),
                             "torch_rng": torch.get_rng_state()}, checkpoint_path)
        if name == "align":
            log_evaluation("eval after alignment", model, processor, args, state)
        state["stage"] += 1
        state["step"] = 0
    train_seconds = state["elapsed"]
    from safetensors.torch import save_file

    save_file(delta_tensors(model, {k: (a, b) for k, (a, b) in lora.factors.items()}), out / DELTA_FILE)
    model.eval()
    with torch.no_grad():
        final = evaluate(model, processor, args.final_eval_size, args.data_seed)
    build = {"seed": args.seed, "lora_rank": args.rank, "lora_alpha": RECIPE.lora_alpha,
             "lora_scale": RECIPE.lora_alpha / args.rank, "lora_modules": list(TARGET_MODULES),
             "train_seconds": round(train_seconds, 1), "threads": args.threads, "args": vars(args),
             "recipe": dataclasses.asdict(RECIPE), "eval_records": args.final_eval_size, **final,
             "log": state["log"]}
    (out / BUILD_FILE).write_text(json.dumps(build, indent=2) + "\n")
    print(json.dumps({k: v for k, v in build.items() if k != "log"}, indent=2), flush=True)
    return build


if __name__ == "__main__":
    main()
