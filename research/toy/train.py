"""Train the toy LLaVA shipped in qapframe, from scratch: ``python -m research.toy.train --out DIR``.

Run from the repository root; with no other flag this is the recipe that made ``qapframe/toy/weights``
(seed 0, 2 threads: 37 minutes on 2 CPU cores; `docs/toy.md` records how it was found and what else was tried).

- Stage 0 (`research.toy.vision_pretrain`, ``--vision-steps``) pretrains the CLIP vision tower on per-cell
  colour, shape and position, standing in for the pretrained CLIP encoder real LLaVA starts from; the tower
  is then frozen, as in LLaVA.
- Stage 0b (`research.toy.projector_pretrain`, ``--projector-steps``) teaches the projector alone to lay each
  patch out as fixed codes of its cell's place, colour and shape.
- Stage 0c (`research.toy.llm_pretrain`, ``--llm-pretrain-steps``) teaches the LLM the questions on ideal
  nine-token scenes made of those codes, where it learns to search and count fast.
- Stage 1 (``--steps``) trains projector and LLM on the real images, with cross-entropy on the answer tokens
  plus (weight `Recipe.prompt_loss_weight`) on the question text after the image, whose words depend on the
  scene. With probability `Recipe.caption_prob` an example is a caption instead of a question (every object,
  colour, shape and grid cell, in reading order: LLaVA's feature-alignment task in miniature), and with
  probability `Recipe.drop_prob` a question sees only a random, order-preserving 10-100 % of its vision
  tokens (pruning tolerance).

Training data are fresh synthetic train-split records (never the test split); everything is seeded, and the
result is saved with ``save_pretrained`` plus ``training_summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import time
from pathlib import Path

import torch

from qapframe.data.prompts import is_correct
from qapframe.data.synthetic import POSITIONS, SyntheticVQA, blank_image, make_record
from qapframe.eval.evaluation import answer_records
from qapframe.eval.metrics import RecordOutcome, accuracy_by_type
from research.toy.llm_pretrain import pretrain_llm
from research.toy.model import CAPTION_PROMPT, EOS_ID, NUM_VISION_TOKENS, PAD_ID, build_model, build_processor, build_tokenizer
from research.toy.optim import lr_at, toy_adamw
from research.toy.projector_pretrain import pretrain_projector
from research.toy.sequences import prompt_ids, sequence_embeds, split_at_image, vision_tokens
from research.toy.vision_pretrain import pretrain_vision


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The shipped recipe's fixed settings (not flags: nothing else was shipped; docs/toy.md says what was tried)."""

    vision_lr: float = 2e-3
    projector_lr: float = 2e-3
    lr: float = 1.5e-3  # stages 0c and 1
    warmup: int = 100
    weight_decay: float = 0.05
    drop_prob: float = 0.5  # a question drops vision tokens with this probability ...
    min_keep: float = 0.1  # ... keeping at least this fraction
    prompt_loss_weight: float = 1.0  # loss on the question text after the image, beside the answer's
    caption_prob: float = 0.3


RECIPE = Recipe()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for the model and processor files")
    p.add_argument("--seed", type=int, default=0, help="initialisation, token dropping and data order")
    p.add_argument("--data-seed", type=int, default=0, help="benchmark seed (train records of this seed)")
    p.add_argument("--vision-steps", type=int, default=600, help="stage 0: vision-tower pretraining steps")
    p.add_argument("--vision-batch-size", type=int, default=64, help="images per step of stages 0 and 0b")
    p.add_argument("--projector-steps", type=int, default=300, help="stage 0b: projector pretraining steps")
    p.add_argument("--llm-pretrain-steps", type=int, default=1000,
                   help="stage 0c: LLM steps on ideal nine-token scenes of stage 0b's codes (0: none)")
    p.add_argument("--steps", type=int, default=1250, help="stage 1: steps on real images")
    p.add_argument("--batch-size", type=int, default=48, help="examples per step of stages 0c and 1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=250, help="stage-1 steps between test evaluations (0: none)")
    p.add_argument("--eval-size", type=int, default=200, help="test questions of each evaluation during training")
    p.add_argument("--final-eval-size", type=int, default=1000, help="test questions of the final evaluation")
    args = p.parse_args(argv)
    for flag in ("vision_steps", "projector_steps", "llm_pretrain_steps", "steps"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')}: must be a number of steps >= 0, got {getattr(args, flag)}")
    for flag in ("vision_batch_size", "batch_size", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    if args.llm_pretrain_steps and not args.projector_steps:
        p.error("--llm-pretrain-steps: needs --projector-steps > 0 (the scenes are made of stage 0b's codes)")
    return args


def training_records(data_seed: int):
    """The benchmark's train-split records in index order: stage 1's data stream."""
    return (make_record(data_seed, "train", index) for index in itertools.count())


def caption(record) -> str:
    """``red circle top left . blue square center .``: every object, in reading (grid-cell) order."""
    objects = sorted(record.meta["objects"], key=lambda o: POSITIONS.index(o[2]))
    return " ".join(f"{colour} {shape} {position} ." for colour, shape, position in objects)


IGNORE, PROMPT, ANSWER = range(3)  # what a token of a training row is, for the loss


def batch_loss(model, processor, records, rng: random.Random, recipe: Recipe = RECIPE) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (each closed by ``</s>``) of one batch of examples.

    With ``recipe.prompt_loss_weight`` > 0, plus that weight times the mean cross-entropy over the prompt
    tokens after the image. Why: the answers alone are one or two tokens a question, and the words of a
    question carry the image too ("Where is the red ..." is followed by a shape that a red object in this
    scene has), so predicting them is a dense search-by-attribute exercise.
    """
    vision = vision_tokens(model, processor, [r.image for r in records])  # [B, N, D]
    return conversation_loss(model, processor.tokenizer, records, vision, rng, recipe)


def conversation_loss(model, tokenizer, records, vision: torch.Tensor, rng: random.Random,
                      recipe: Recipe = RECIPE) -> torch.Tensor:
    """`batch_loss` on given image tokens ``vision [B, N, D]``, one row per record, put where ``<image>`` is."""
    n = vision.shape[1]
    caption_ids = split_at_image(tokenizer, CAPTION_PROMPT)
    rows, row_kinds, row_ids = [], [], []
    for record, tokens in zip(records, vision):
        if rng.random() < recipe.caption_prob:
            before, prompt = caption_ids
            answer_text = caption(record)
        else:
            if rng.random() < recipe.drop_prob:
                k = rng.randint(max(1, math.ceil(recipe.min_keep * n)), n)
                keep = sorted(rng.sample(range(n), k))
                tokens = tokens[keep]  # [K, D]
            before, prompt = prompt_ids(tokenizer, record)
            answer_text = record.answer
        target = tokenizer(" " + answer_text, add_special_tokens=False)["input_ids"] + [EOS_ID]
        after = prompt + target
        kinds = [IGNORE] * (len(before) + tokens.shape[0]) + [PROMPT] * len(prompt) + [ANSWER] * len(target)
        rows.append((before, tokens, after))
        row_kinds.append(kinds)
        row_ids.append(before + [PAD_ID] * tokens.shape[0] + after)  # vision positions are never targets
    embeds, mask = sequence_embeds(model, rows, pad_left=False)  # [B, L, D], [B, L]
    ids = torch.full(mask.shape, PAD_ID, dtype=torch.long)
    kind = torch.full(mask.shape, IGNORE, dtype=torch.long)
    for i, (row, kinds) in enumerate(zip(row_ids, row_kinds)):
        ids[i, : len(row)], kind[i, : len(row)] = torch.tensor(row), torch.tensor(kinds)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden[:, :-1])  # position t predicts token t + 1
    token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, L-1]
    targets = kind[:, 1:]
    loss = token_loss[targets == ANSWER].mean()
    if recipe.prompt_loss_weight:
        loss = loss + recipe.prompt_loss_weight * token_loss[targets == PROMPT].mean()
    return loss


def accuracy(predictions, records) -> float:
    return sum(is_correct(p, r) for p, r in zip(predictions, records)) / max(1, len(records))


def evaluate(model, processor, size: int, data_seed: int) -> dict:
    """Test accuracy (overall, per question type) and blank-image accuracy, answered as `qapframe run` answers."""
    records = list(SyntheticVQA("test", size=size, seed=data_seed))
    blanks = [dataclasses.replace(r, image=blank_image()) for r in records]
    model.eval()
    predictions = answer_records(model, processor, records, batch_size=32, max_new_tokens=6)
    blank = accuracy(answer_records(model, processor, blanks, batch_size=32, max_new_tokens=6), records)
    model.train()
    outcomes = [RecordOutcome(i, r.id, r.meta["type"], p, is_correct(p, r), NUM_VISION_TOKENS)
                for i, (p, r) in enumerate(zip(predictions, records))]
    by_type = {qtype: round(value, 3) for qtype, value in accuracy_by_type(outcomes).items()}
    return {"test_accuracy": accuracy(predictions, records), "blank_image_accuracy": blank,
            "test_accuracy_by_type": by_type}


@torch.enable_grad()
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    processor = build_processor(build_tokenizer())
    model = build_model(len(processor.tokenizer), args.seed)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    print(f"toy LLaVA: {params / 1e6:.2f}M parameters, {args.steps} steps x {args.batch_size}", flush=True)
    start = time.time()
    stats = {}
    if args.vision_steps:  # else the tower learns through the LLM
        stats = pretrain_vision(model, processor, args.vision_steps, args.vision_batch_size, RECIPE.vision_lr,
                                args.data_seed)
        model.model.vision_tower.requires_grad_(False)  # frozen from here on, as in LLaVA's training
    if args.projector_steps:
        stats.update(pretrain_projector(model, processor, args.projector_steps, args.vision_batch_size,
                                        RECIPE.projector_lr, args.data_seed, args.seed))
    if args.llm_pretrain_steps:
        questions_only = dataclasses.replace(RECIPE, caption_prob=0.0, drop_prob=0.0)
        stage_rng = random.Random(f"qapframe-toy-llm-pretrain:{args.seed}")  # leaves stage 1's draws as they were
        stats.update(pretrain_llm(
            model, args.llm_pretrain_steps, args.batch_size, RECIPE.lr, RECIPE.warmup, RECIPE.weight_decay,
            args.data_seed, args.seed,
            lambda records, scenes: conversation_loss(model, processor.tokenizer, records, scenes, stage_rng,
                                                      questions_only)))
        if args.eval_every:
            print(f"  eval after stage 0c: {evaluate(model, processor, args.eval_size, args.data_seed)}", flush=True)
    optimizer = toy_adamw((p for p in model.parameters() if p.requires_grad), RECIPE.lr, RECIPE.weight_decay)
    schedule = argparse.Namespace(lr=RECIPE.lr, warmup=RECIPE.warmup, steps=args.steps)
    running = None
    stream = training_records(args.data_seed)
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        records = list(itertools.islice(stream, args.batch_size))
        loss = batch_loss(model, processor, records, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1:5d}  loss {running:.4f}  lr {lr_at(step, schedule):.2e}  "
                  f"{time.time() - start:6.0f}s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            print(f"  eval@{step + 1}: {evaluate(model, processor, args.eval_size, args.data_seed)}", flush=True)
    train_seconds = time.time() - start
    model.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    summary = {
        "parameters": params,
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads,
        "args": vars(args),
        "recipe": dataclasses.asdict(RECIPE),
        **stats,
        **evaluate(model, processor, args.final_eval_size, args.data_seed),
        "eval_records": args.final_eval_size,
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)
    return summary


if __name__ == "__main__":
    main()
