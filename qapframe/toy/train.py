"""Train the toy LLaVA from scratch on the synthetic benchmark: ``python -m qapframe.toy.train --out DIR``.

Stage 0 (`qapframe.toy.vision_pretrain`) pretrains the CLIP vision tower on per-cell colour, shape and
position, standing in for the pretrained CLIP encoder real LLaVA starts from; the tower is then frozen,
as in LLaVA. Stage 0b (``--projector-steps``, `qapframe.toy.projector_pretrain`) teaches the projector alone
to lay each patch out as fixed codes of its cell's place, colour and shape (optionally kept fixed after,
``--freeze-projector``). Stage 0c (``--llm-pretrain-steps``, `qapframe.toy.llm_pretrain`) teaches the LLM
the questions on ideal nine-token scenes made of those codes, where it learns to search and count fast.
Stage 1 trains projector and LLM on the real images, with cross-entropy on the answer tokens and, weighted
by ``--prompt-loss-weight``, on the question text after the image (its words depend on the scene).
With probability ``--caption-prob`` an example is a caption instead of a question: the model lists
every object (colour, shape, grid cell) in reading order. This is LLaVA's stage-1 feature-alignment
task in miniature: every caption token needs the image, so the LLM learns to read vision tokens long
before the sparse question answers alone would teach it (without captions, training sat on the
image-free answer prior for the first 1000 steps). Questions are what the model is evaluated on.
With probability ``--drop-prob`` a question sees only a random, order-preserving subset of 10-100%
of its vision tokens, as LLaVA models tolerate pruning because their tokens overlap in content.
The README says what each choice bought, measured.
Training data are fresh synthetic records (never the test split), so there is no overfitting to a
fixed set; everything is seeded, and the result is saved with ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from qapframe.data.prompts import IMAGE_PLACEHOLDER, build_prompt, is_correct
from qapframe.data.base import VQARecord
from qapframe.data.synthetic import (
    MAX_OBJECTS, MIN_OBJECTS, POSITIONS, QUESTION_TYPES, SyntheticVQA, blank_image, follow_up_questions, make_record,
)
from qapframe.eval.metrics import RecordOutcome, accuracy_by_type
from qapframe.toy import TOY_PATH, load_toy
from qapframe.toy.evaluate import accuracy, answer, prompt_ids, sequence_embeds, split_at_image, vision_tokens
from qapframe.toy.model import (
    CAPTION_PROMPT, EOS_ID, NUM_VISION_TOKENS, PAD_ID, TEXT, build_model, build_processor, build_tokenizer,
    check_llm_heads,
)
from qapframe.toy.llm_pretrain import pretrain_llm
from qapframe.toy.optim import lr_at, toy_adamw
from qapframe.toy.projector_pretrain import pretrain_projector
from qapframe.toy.vision_pretrain import pretrain_vision


# What a fresh model gets where these options are left out (`resolve_recipe_defaults`); README: why each.
FRESH_RECIPE = {"projector_steps": 300, "llm_pretrain_steps": 1000, "llm_init_std": 0.072}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for the model and processor files")
    p.add_argument("--seed", type=int, default=0, help="initialisation, token dropping and data order")
    p.add_argument("--data-seed", type=int, default=0, help="benchmark seed (train records of this seed)")
    p.add_argument("--init-from", default=None,
                   help="continue from a saved toy (a --out directory, or 'toy' for the shipped one) instead of a "
                        "fresh model; its vision tower stays frozen and stage 0 is skipped")
    p.add_argument("--embed-std", type=float, default=None,
                   help="initial standard deviation of the LLM's word embeddings alone (default: --llm-init-std's)")
    p.add_argument("--llm-init-std", type=float, default=None,
                   help=f"initial standard deviation of every LLM weight matrix (default for a fresh model without "
                        f"--embed-std: {FRESH_RECIPE['llm_init_std']}, about 1/sqrt(width); LLaMA's is 0.02)")
    p.add_argument("--llm-heads", type=int, default=None,
                   help=f"attention heads of the LLM at the same width (default: the toy's {TEXT['num_attention_heads']})")
    p.add_argument("--vision-steps", type=int, default=600,
                   help="stage 0: vision-tower pretraining steps (0 trains the tower through the LLM instead)")
    p.add_argument("--vision-patch-labels", action=argparse.BooleanOptionalAction, default=True,
                   help="stage 0: every patch alone must also name its cell's colour and shape")
    p.add_argument("--vision-scene-counts", action=argparse.BooleanOptionalAction, default=False,
                   help="stage 0: every patch must also give the scene's object count per colour and per shape")
    p.add_argument("--vision-shared-counts", action=argparse.BooleanOptionalAction, default=False,
                   help="stage 0: every patch must also give how many objects share its cell's colour and its shape")
    p.add_argument("--vision-batch-size", type=int, default=64)
    p.add_argument("--vision-lr", type=float, default=2e-3)
    p.add_argument("--projector-steps", type=int, default=None,
                   help="stage 0b: projector pretraining steps (batches of --vision-batch-size images), mapping each "
                        "patch onto fixed codes of its cell's place, colour and shape (0: the projector learns "
                        f"through the LLM only; default: {FRESH_RECIPE['projector_steps']} for a fresh model, "
                        "0 with --init-from)")
    p.add_argument("--projector-lr", type=float, default=2e-3)
    p.add_argument("--projector-centre-only", action=argparse.BooleanOptionalAction, default=False,
                   help="stage 0b: only each cell's centre patch carries its object's codes, so an object is one token")
    p.add_argument("--freeze-projector", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the projector fixed in stage 1, so the LLM reads the tokens stage 0b laid out")
    p.add_argument("--llm-pretrain-steps", type=int, default=None,
                   help="stage 0c: LLM steps (questions only, no token dropping) on ideal nine-token scenes made of "
                        f"stage 0b's codes, before stage 1 moves it to the real tokens (0: none; default: "
                        f"{FRESH_RECIPE['llm_pretrain_steps']} where stage 0b runs, else 0)")
    p.add_argument("--steps", type=int, default=1250)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--drop-prob", type=float, default=0.5, help="probability that an example drops vision tokens")
    p.add_argument("--min-keep", type=float, default=0.1, help="smallest kept fraction when dropping")
    p.add_argument("--prompt-loss-weight", type=float, default=1.0,
                   help="weight of a language-model loss on the prompt text after the image (the question "
                        "words), added to the answer loss; 0 trains on answers only")
    p.add_argument("--caption-prob", type=float, default=0.3, help="probability that an example is a caption")
    p.add_argument("--questions-per-image", type=int, default=1,
                   help="question turns per image in a (LLaVA-style multi-turn) question example")
    p.add_argument("--question-weights", default="",
                   help="relative frequency of question types in training, e.g. 'colour=0.5,shape=0.5' "
                        "(unnamed types weigh 1; empty: the benchmark's own mix)")
    p.add_argument("--min-objects", type=int, default=MIN_OBJECTS,
                   help=f"curriculum: training scenes hold this many objects or more (1..{MAX_OBJECTS}; "
                        f"test scenes: {MIN_OBJECTS}-{MAX_OBJECTS}) until --easy-until")
    p.add_argument("--easy-until", type=int, default=None,
                   help="curriculum: the step at which training scenes return to the benchmark's own "
                        "(default: never, so --min-objects alone holds for the whole run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--final-eval-size", type=int, default=1000)
    args = p.parse_args(argv)
    if args.init_from not in (None, "toy") and not (Path(args.init_from) / "model.safetensors").is_file():
        p.error(f"--init-from: {args.init_from} holds no saved model (model.safetensors); give a --out directory "
                "of this script or 'toy'")
    for flag, std in (("--embed-std", args.embed_std), ("--llm-init-std", args.llm_init_std)):
        if std is not None and not std > 0:
            p.error(f"{flag}: must be a number > 0 (or left out for the toy's default), got {std}")
        if std is not None and args.init_from is not None:
            p.error(f"{flag}: only a fresh model is initialised; --init-from continues a trained one")
    if args.projector_steps is not None and args.projector_steps < 0:
        p.error(f"--projector-steps: must be a number of steps >= 0, got {args.projector_steps}")
    if args.projector_steps and args.init_from is not None:
        p.error("--projector-steps: only a fresh model's projector is pretrained; --init-from continues a trained one")
    if args.llm_pretrain_steps is not None and args.llm_pretrain_steps < 0:
        p.error(f"--llm-pretrain-steps: must be a number of steps >= 0, got {args.llm_pretrain_steps}")
    if args.llm_heads is not None and args.init_from is not None:
        p.error("--llm-heads: only a fresh model is built; --init-from continues a trained one")
    if args.llm_heads is not None:
        try:
            check_llm_heads(args.llm_heads)
        except ValueError as error:
            p.error(f"--llm-heads: {error}")
    if not args.prompt_loss_weight >= 0:
        p.error(f"--prompt-loss-weight: must be a number >= 0, got {args.prompt_loss_weight}")
    if args.llm_init_std is not None and args.embed_std is not None:
        p.error("--llm-init-std: redraws the word embeddings too; give it or --embed-std, not both")
    resolve_recipe_defaults(args)
    if args.llm_pretrain_steps and not args.projector_steps:
        p.error("--llm-pretrain-steps: needs --projector-steps > 0 (the scenes are made of stage 0b's codes)")
    if args.freeze_projector and not args.projector_steps:
        p.error("--freeze-projector: needs --projector-steps > 0 (an untrained projector would stay random)")
    if args.projector_centre_only and not args.projector_steps:
        p.error("--projector-centre-only: needs --projector-steps > 0 (it shapes stage 0b's targets)")
    if not 1 <= args.min_objects <= MAX_OBJECTS:
        p.error(f"--min-objects: must be in 1..{MAX_OBJECTS}, got {args.min_objects}")
    if args.easy_until is not None and args.easy_until < 0:
        p.error(f"--easy-until: must be a step >= 0, got {args.easy_until}")
    try:
        question_type_weights(args.question_weights)
    except ValueError as error:
        p.error(f"--question-weights: {error}")
    return args


def resolve_recipe_defaults(args: argparse.Namespace) -> None:
    """Fill the options left out (None) with the toy's recipe for a fresh model, and with "skip" for
    ``--init-from``, whose model went through its stages already. Why not argparse defaults: an option given
    explicitly is checked against ``--init-from`` and ``--embed-std``; a default must not trip those checks."""
    fresh = args.init_from is None
    if args.projector_steps is None:
        args.projector_steps = FRESH_RECIPE["projector_steps"] if fresh else 0
    if args.llm_pretrain_steps is None:
        args.llm_pretrain_steps = FRESH_RECIPE["llm_pretrain_steps"] if args.projector_steps else 0
    if fresh and args.llm_init_std is None and args.embed_std is None:
        args.llm_init_std = FRESH_RECIPE["llm_init_std"]
    if fresh and args.llm_heads is None:
        args.llm_heads = TEXT["num_attention_heads"]


def question_type_weights(text: str) -> dict[str, float]:
    """``'colour=0.5,count=2'`` -> a weight per question type (1 where unnamed)."""
    weights = dict.fromkeys(QUESTION_TYPES, 1.0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in weights:
            raise ValueError(f"unknown question type {name!r}; valid: {', '.join(QUESTION_TYPES)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"{name}: weight must be a number >= 0, got {value!r}") from None
        if not weights[name] >= 0:
            raise ValueError(f"{name}: weight must be a number >= 0, got {value!r}")
    if not any(weights.values()):
        raise ValueError("at least one question type needs a weight > 0")
    return weights


def training_records(data_seed: int, weights: dict[str, float], seed: int, min_objects: int = MIN_OBJECTS,
                     easy_records: int | None = None) -> Iterator[VQARecord]:
    """Train-split records in index order, each kept with probability (its type's weight / the largest).

    Equal weights keep every record, so the stream is the benchmark's own; the acceptance draws use
    their own generator so that they do not shift token dropping or caption choices. The first
    ``easy_records`` records yielded (None: all) draw their scenes from ``min_objects`` objects up (a
    curriculum); counting yielded records, not indices, ends it at the same step whatever the weights.
    """
    top = max(weights.values())
    accept = random.Random(f"qapframe-toy-question-types:{seed}")
    yielded = 0
    for index in itertools.count():
        easy = easy_records is None or yielded < easy_records
        record = make_record(data_seed, "train", index, min_objects if easy else MIN_OBJECTS)
        weight = weights[record.meta["type"]]
        if weight == top or accept.random() < weight / top:
            yielded += 1
            yield record


def caption(record) -> str:
    """``red circle top left . blue square center .``: every object, in reading (grid-cell) order."""
    objects = sorted(record.meta["objects"], key=lambda o: POSITIONS.index(o[2]))
    return " ".join(f"{colour} {shape} {position} ." for colour, shape, position in objects)


def _follow_up_turn(tokenizer, record) -> list[int]:
    """``USER: <question>\nASSISTANT:`` of a later turn (the image comes with the first turn only)."""
    text = build_prompt(record).replace(f"{IMAGE_PLACEHOLDER}\n", "")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


IGNORE, PROMPT, ANSWER = range(3)  # what a token of a training row is, for the loss


def batch_loss(model, processor, records, rng: random.Random, args) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (each closed by ``</s>``) of one batch of conversations.

    With ``args.prompt_loss_weight`` > 0, plus that weight times the mean cross-entropy over the prompt
    tokens after the image. Why: the answers alone are one or two tokens a question, and the words of a
    question carry the image too ("Where is the red ..." is followed by a shape that a red object in this
    scene has), so predicting them is a dense search-by-attribute exercise (README: it is what taught the
    LLM to search on ideal symbolic scenes).
    """
    vision = vision_tokens(model, processor, [r.image for r in records])  # [B, N, D]
    return conversation_loss(model, processor.tokenizer, records, vision, rng, args)


def conversation_loss(model, tokenizer, records, vision: torch.Tensor, rng: random.Random, args) -> torch.Tensor:
    """`batch_loss` on given image tokens ``vision [B, N, D]``, one row per record, put where ``<image>`` is."""
    n = vision.shape[1]
    caption_ids = split_at_image(tokenizer, CAPTION_PROMPT)
    rows, row_kinds, row_ids = [], [], []
    for record, tokens in zip(records, vision):
        if rng.random() < args.caption_prob:
            before, prompt = caption_ids
            turns = [(prompt, caption(record))]
        else:
            if rng.random() < args.drop_prob:
                k = rng.randint(max(1, math.ceil(args.min_keep * n)), n)
                keep = sorted(rng.sample(range(n), k))
                tokens = tokens[keep]  # [K, D]
            before, prompt = prompt_ids(tokenizer, record)
            follow_ups = follow_up_questions(record, args.questions_per_image - 1, args.data_seed)
            turns = [(prompt, record.answer)] + [(_follow_up_turn(tokenizer, q), q.answer) for q in follow_ups]
        after, kinds = [], [IGNORE] * (len(before) + tokens.shape[0])
        for prompt, answer_text in turns:
            target = tokenizer(" " + answer_text, add_special_tokens=False)["input_ids"] + [EOS_ID]
            after += prompt + target
            kinds += [PROMPT] * len(prompt) + [ANSWER] * len(target)
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
    if args.prompt_loss_weight:
        loss = loss + args.prompt_loss_weight * token_loss[targets == PROMPT].mean()
    return loss


def evaluate(model, processor, size: int, data_seed: int) -> dict:
    records = list(SyntheticVQA("test", size=size, seed=data_seed))
    model.eval()
    predictions = answer(model, processor, records)
    blank = accuracy(answer(model, processor, records, images=[blank_image()] * len(records)), records)
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
    if args.init_from is None:
        processor = build_processor(build_tokenizer())
        model = build_model(len(processor.tokenizer), args.seed, args.embed_std, args.llm_init_std, args.llm_heads)
    else:  # the saved model with the processor it was trained with
        model, processor = load_toy(path=TOY_PATH if args.init_from == "toy" else args.init_from)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    print(f"toy LLaVA: {params / 1e6:.2f}M parameters, {args.steps} steps x {args.batch_size}", flush=True)
    start = time.time()
    vision_stats = {}
    if args.init_from is not None:
        model.model.vision_tower.requires_grad_(False)  # pretrained by the run that saved it
    elif args.vision_steps:
        vision_stats = pretrain_vision(model, processor, args.vision_steps, args.vision_batch_size, args.vision_lr,
                                       args.data_seed, patch_labels=args.vision_patch_labels,
                                       patch_scene_counts=args.vision_scene_counts,
                                       patch_shared_counts=args.vision_shared_counts)
        model.model.vision_tower.requires_grad_(False)  # frozen from here on, as in LLaVA's training
    if args.projector_steps:
        vision_stats.update(pretrain_projector(model, processor, args.projector_steps, args.vision_batch_size,
                                               args.projector_lr, args.data_seed, args.seed,
                                               centre_only=args.projector_centre_only))
    if args.llm_pretrain_steps:
        stage_args = argparse.Namespace(**{**vars(args), "caption_prob": 0.0, "drop_prob": 0.0, "questions_per_image": 1})
        stage_rng = random.Random(f"qapframe-toy-llm-pretrain:{args.seed}")  # leaves stage 1's draws as they were
        vision_stats.update(pretrain_llm(
            model, args.llm_pretrain_steps, args.batch_size, args.lr, args.warmup, args.weight_decay, args.data_seed,
            args.seed, lambda records, scenes: conversation_loss(model, processor.tokenizer, records, scenes,
                                                                 stage_rng, stage_args)))
        if args.eval_every:
            print(f"  eval after stage 0c: {evaluate(model, processor, args.eval_size, args.data_seed)}", flush=True)
    if args.freeze_projector:
        model.model.multi_modal_projector.requires_grad_(False)
    optimizer = toy_adamw((p for p in model.parameters() if p.requires_grad), args.lr, args.weight_decay)
    running = None
    easy_records = None if args.easy_until is None else args.easy_until * args.batch_size
    stream = training_records(args.data_seed, question_type_weights(args.question_weights), args.seed,
                              args.min_objects, easy_records)
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        records = list(itertools.islice(stream, args.batch_size))
        loss = batch_loss(model, processor, records, rng, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1:5d}  loss {running:.4f}  lr {lr_at(step, args):.2e}  "
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
        **vision_stats,
        **evaluate(model, processor, args.final_eval_size, args.data_seed),
        "eval_records": args.final_eval_size,
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)
    return summary


if __name__ == "__main__":
    main()
