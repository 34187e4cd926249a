"""The toy's LLM alone, on perfect symbolic scenes: can it learn the questions, and how fast?

    python -m research.toy.llm_symbolic [--steps 1000] [--init-std 0.02 0.072] [--out research/toy/results/toy_llm_symbolic.json]

Why: the toy answers "what is at <place>" but not "where is the <colour> <shape>" or "how many ...".
This takes the vision side out of the question. The toy's LLM (same config, optimiser, schedule and
batch as `research.toy.train`, questions only) reads the scene as nine ideal tokens, one per grid cell,
each the sum of learned embeddings of that cell's place, colour and shape (or "empty"), put where the
image's tokens go in the prompt. If the LLM cannot learn the questions from these, no vision tower
will make it; the run per initial weight scale (``--init-std``; LLaMA's default is 0.02) measures how
the LLM's initialisation sets the pace. Accuracy is teacher-forced exact match of the whole answer
(every answer token and the closing ``</s>`` argmax-correct) on test-split questions; the last row also
classes the position answers (`position_answers`). ``--prompt-loss-weight`` trains on the question text
too, ``--patches-per-side`` lays the scene out as the toy's patch tokens instead of one token a cell
(``--centre-only``: an object on its cell's centre patch alone), ``--frozen-scene`` keeps the scene
embeddings at their random start (fixed codes, as the toy's stage 0b emits), ``--nine-token-steps`` first
trains on one token a cell and then moves to the patch layout (the toy's stage 0c, then stage 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LlamaForCausalLM

from qapframe.data.base import VQARecord
from qapframe.data.prompts import IMAGE_PLACEHOLDER, build_prompt
from qapframe.data.synthetic import (
    COLOURS, IMAGE_SIZE, MAX_OBJECTS, MIN_OBJECTS, POSITIONS, QUESTION_TYPES, SHAPES, make_record,
)
from qapframe.eval.results import write_json_atomically
from research.toy.sequences import split_at_image
from research.toy.model import EOS_ID, PATCH_SIZE, build_config, build_tokenizer, check_llm_heads, redraw_llm_weights
from research.toy.optim import lr_at, toy_adamw
from research.toy.vision_pretrain import patch_cells

EMPTY = 0


# -- scene layouts and training streams of this benchmark's options (the shipped toy uses none of them) --------


def cell_centre_patches(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """``[9]`` per grid cell, the patch whose centre lies nearest the cell's centre (ties: the first, row-major)."""
    side = image_size // patch_size

    def distance(patch: int, cell: int) -> float:  # along one axis, between the two centres
        return abs((patch + 0.5) * patch_size - (cell + 0.5) * image_size / 3)

    nearest = [min(range(side), key=lambda patch: distance(patch, cell)) for cell in range(3)]
    return torch.tensor([nearest[row] * side + nearest[col] for row in range(3) for col in range(3)])


def off_centre_patches(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """``[N]`` bool, row-major: True for every patch that is not its cell's centre patch (`cell_centre_patches`)."""
    off_centre = torch.ones((image_size // patch_size) ** 2, dtype=torch.bool)
    off_centre[cell_centre_patches(image_size, patch_size)] = False
    return off_centre


def cell_shared_counts(records) -> tuple[torch.Tensor, torch.Tensor]:
    """``(same_colour [B, 9], same_shape [B, 9])``: how many objects share the cell's colour / shape (0: empty)."""
    same_colour = torch.zeros((len(records), len(POSITIONS)), dtype=torch.long)
    same_shape = torch.zeros_like(same_colour)
    for i, record in enumerate(records):
        objects = record.meta["objects"]
        for c, s, position in objects:
            cell = POSITIONS.index(position)
            same_colour[i, cell] = sum(o[0] == c for o in objects)
            same_shape[i, cell] = sum(o[1] == s for o in objects)
    return same_colour, same_shape


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

    Equal weights and ``min_objects == MIN_OBJECTS`` give the toy's own stage-1 stream
    (`research.toy.train.training_records`). The first ``easy_records`` records yielded (None: all) draw their
    scenes from ``min_objects`` objects up (a curriculum).
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

class SymbolicScene(torch.nn.Module):
    """One token per grid cell: embedding of its place + its object's colour + its object's shape (0: empty).

    ``shared_counts``: each token also adds embeddings of how many objects share its colour and its shape
    (`cell_shared_counts`, the toy's ``--vision-shared-counts`` target), so a count is a lookup.
    ``patches_per_side``: one token per image patch instead of per cell, each its cell's token (what a perfect
    vision tower would hand the LLM): 8 is the toy's 64 patches, cells of 4, 6 or 9 of them; 6 gives 36
    patches, 4 a cell; 3 (the default) one token a cell. ``centre_only``: in a patch layout only each cell's
    centre patch carries its object, the others its place and "empty", so that an object is one token.
    """

    def __init__(self, width: int, std: float = 1.0, shared_counts: bool = False, patches_per_side: int = 3,
                 centre_only: bool = False):
        super().__init__()
        if patches_per_side < 3:
            raise ValueError(f"--patches-per-side: must be >= 3 (one token a cell), got {patches_per_side}")
        layout = patch_cells(image_size=patches_per_side * PATCH_SIZE)  # the grid cell under each patch
        self.register_buffer("layout", layout, persistent=False)
        off_centre = off_centre_patches(image_size=patches_per_side * PATCH_SIZE) & centre_only  # place and "empty"
        self.register_buffer("off_centre", off_centre, persistent=False)
        self.place = torch.nn.Embedding(len(POSITIONS), width)
        self.colour = torch.nn.Embedding(1 + len(COLOURS), width)
        self.shape = torch.nn.Embedding(1 + len(SHAPES), width)
        for table in (self.place, self.colour, self.shape):
            torch.nn.init.normal_(table.weight, std=std)  # summed: RMS ~1.7, near the toy's vision tokens (~3)
        self.shared_counts = shared_counts
        if shared_counts:  # built only when used, so plain runs draw the same random numbers as before
            self.same_colour = torch.nn.Embedding(MAX_OBJECTS + 1, width)
            self.same_shape = torch.nn.Embedding(MAX_OBJECTS + 1, width)
            for table in (self.same_colour, self.same_shape):
                torch.nn.init.normal_(table.weight, std=std)

    @staticmethod
    def labels(record: VQARecord) -> tuple[torch.Tensor, torch.Tensor]:
        """``(colour [9], shape [9])`` class ids per cell of ``record``'s scene."""
        colour = torch.full((len(POSITIONS),), EMPTY, dtype=torch.long)
        shape = torch.full_like(colour, EMPTY)
        for c, s, position in record.meta["objects"]:
            cell = POSITIONS.index(position)
            colour[cell], shape[cell] = 1 + list(COLOURS).index(c), 1 + SHAPES.index(s)
        return colour, shape

    def forward(self, record: VQARecord) -> torch.Tensor:
        colour, shape = self.labels(record)
        tokens = self.place.weight + self.colour(colour) + self.shape(shape)  # [9, D]
        if self.shared_counts:
            same_colour, same_shape = cell_shared_counts([record])
            tokens = tokens + self.same_colour(same_colour[0]) + self.same_shape(same_shape[0])
        empty = self.place.weight + self.colour.weight[EMPTY] + self.shape.weight[EMPTY]  # [9, D]
        return torch.where(self.off_centre[:, None], empty[self.layout], tokens[self.layout])


def scene_prompt(record: VQARecord, question_first: bool = False) -> str:
    """The toy's prompt; ``question_first`` moves the image after the question (``USER: q\n<image>\nASSISTANT:``),
    so that under causal attention every scene token can read what is asked."""
    prompt = build_prompt(record)
    if not question_first:
        return prompt
    return prompt.replace(f"{IMAGE_PLACEHOLDER}\n", "").replace("\nASSISTANT:", f"\n{IMAGE_PLACEHOLDER}\nASSISTANT:")


def batch_logits(llm, scene: SymbolicScene, tokenizer, records,
                 question_first: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits [B, L-1, V], labels [B, L-1], prompt_labels [B, L-1])``: position t predicts token t + 1;
    ``labels`` is -100 off the answer, ``prompt_labels`` -100 off the prompt text after the scene."""
    embed = llm.get_input_embeddings()
    rows, labels, prompt_labels = [], [], []
    for record in records:
        before, after = split_at_image(tokenizer, scene_prompt(record, question_first))
        target = tokenizer(" " + record.answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
        tokens = scene(record)
        rows.append(torch.cat([embed(torch.tensor(before)), tokens, embed(torch.tensor(after + target))]))
        ignored = [-100] * (len(before) + tokens.shape[0])
        labels.append(ignored + [-100] * len(after) + target)
        prompt_labels.append(ignored + after + [-100] * len(target))
    width = max(len(row) for row in labels)
    x = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -100)
    prompt_y = torch.full_like(y, -100)
    for i, (row, label, prompt_label) in enumerate(zip(rows, labels, prompt_labels)):
        x[i, : len(label)], mask[i, : len(label)] = row, 1
        y[i, : len(label)], prompt_y[i, : len(label)] = torch.tensor(label), torch.tensor(prompt_label)
    return llm(inputs_embeds=x, attention_mask=mask).logits[:, :-1], y[:, 1:], prompt_y[:, 1:]


@torch.no_grad()
def accuracy_by_type(llm, scene, tokenizer, records, question_first: bool = False) -> dict[str, float]:
    """Teacher-forced exact-answer accuracy: overall ("all") and per question type."""
    llm.eval()
    right: dict[str, list[bool]] = {t: [] for t in QUESTION_TYPES}
    for start in range(0, len(records), 100):
        batch = records[start : start + 100]
        logits, y, _ = batch_logits(llm, scene, tokenizer, batch, question_first)
        correct = ((logits.argmax(-1) == y) | (y == -100)).all(dim=1)
        for record, ok in zip(batch, correct.tolist()):
            right[record.meta["type"]].append(ok)
    llm.train()
    result = {"all": round(sum(map(sum, right.values())) / len(records), 4)}
    result.update({t: round(sum(v) / len(v), 4) for t, v in right.items() if v})
    return result


ANSWER_KINDS = ("correct", "same colour", "same shape", "other object", "empty cell")


def position_answer_kind(record: VQARecord, place: str) -> str:
    """What ``place`` is as an answer to ``record``'s "Where is the <colour> <shape>?": the answer, or
    the place of an object sharing the asked colour, of one sharing the asked shape, of another object, or
    of nothing. Why: it tells a model that searches by one attribute from one that does not search at all.
    """
    if place == record.answer:
        return "correct"
    colour, shape = record.question.removesuffix("?").split()[-2:]
    there = [o for o in record.meta["objects"] if o[2] == place]
    if not there:
        return "empty cell"
    return "same colour" if there[0][0] == colour else "same shape" if there[0][1] == shape else "other object"


@torch.no_grad()
def position_answers(llm, scene, tokenizer, records, question_first: bool = False) -> dict[str, int]:
    """`position_answer_kind` counts over the short-answer position questions among ``records``; each answer is
    the place whose whole answer (words and ``</s>``) is most likely."""
    llm.eval()
    kinds = dict.fromkeys(ANSWER_KINDS, 0)
    for record in (r for r in records if r.meta["type"] == "position" and not r.choices):
        candidates = [dataclasses.replace(record, answer=place) for place in POSITIONS]
        logits, y, _ = batch_logits(llm, scene, tokenizer, candidates, question_first)
        log_probs = logits.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
        best = POSITIONS[int(log_probs.where(y != -100, 0.0).sum(dim=1).argmax())]
        kinds[position_answer_kind(record, best)] += 1
    llm.train()
    return kinds


@torch.enable_grad()
def train_symbolic(init_std: float, steps: int, eval_every: int, test_size: int, seed: int = 0,
                   on_eval=None, lr: float = 1.5e-3, heads: int | None = None, question_first: bool = False,
                   shared_counts: bool = False, min_objects: int = MIN_OBJECTS,
                   easy_until: int | None = None, batch_size: int = 48,
                   prompt_loss_weight: float = 0.0, patches_per_side: int = 3, position_test: int = 0,
                   frozen_scene: bool = False, centre_only: bool = False, nine_token_steps: int = 0) -> list[dict]:
    """Train the toy's LLM on symbolic scenes as `research.toy.train` trains it; one row per evaluation.

    ``lr``, ``heads`` (attention heads at the same width; None: the toy's), ``question_first`` (the prompt
    layout, `scene_prompt`) and ``shared_counts`` (`SymbolicScene`) are the knobs varied; ``min_objects``
    draws training scenes from that many objects up (a curriculum of easier scenes) until step ``easy_until``
    (None: the whole run), then the benchmark's own; test scenes are always the benchmark's. ``batch_size``
    (questions per step; the toy's 48) trades questions per update for updates per second.
    ``prompt_loss_weight`` adds that weight times the cross-entropy of the question text after the scene
    (the toy's ``--prompt-loss-weight``) to the answer loss. ``patches_per_side``: the scene's token layout
    (`SymbolicScene`). ``position_test`` > 0 adds `position_answers` on that many test records to the
    last row. ``frozen_scene`` keeps the scene's embeddings at their random initial values, as fixed codes (what
    the toy's stage 0b makes its projector emit), instead of learning them with the LLM. ``centre_only``: in a
    patch layout only each cell's centre patch carries its object (the toy's ``--projector-centre-only``).
    ``nine_token_steps`` > 0 first trains that many steps on the same scene tables laid out one token a cell,
    then ``steps`` on the layout asked for, each phase with its own optimiser and schedule; every evaluation,
    in either phase, reads the layout asked for (so the first phase's rows measure how the skills transfer).
    """
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    if heads is not None:
        try:
            check_llm_heads(heads)
        except ValueError as error:
            raise ValueError(f"--heads: {error}") from None
    config = build_config(len(tokenizer), heads).text_config
    llm = LlamaForCausalLM(config)
    redraw_llm_weights(llm.model, llm.lm_head, init_std, seed)
    scene = SymbolicScene(llm.config.hidden_size, shared_counts=shared_counts,
                          patches_per_side=patches_per_side, centre_only=centre_only)
    if batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {batch_size}")
    if not prompt_loss_weight >= 0:
        raise ValueError(f"--prompt-loss-weight: must be a number >= 0, got {prompt_loss_weight}")
    scene.requires_grad_(not frozen_scene)
    params = [*llm.parameters(), *(() if frozen_scene else scene.parameters())]
    test = [make_record(0, "test", i) for i in range(test_size)]
    easy_records = None if easy_until is None else easy_until * batch_size
    stream = training_records(0, question_type_weights(""), seed, min_objects, easy_records)  # the toy's stream
    rows, start = [], time.time()
    phases = [(scene, steps)]
    if nine_token_steps:  # the same tables laid out one token a cell, trained first
        nine = SymbolicScene(llm.config.hidden_size, shared_counts=shared_counts)
        for name in ("place", "colour", "shape", "same_colour", "same_shape"):
            if hasattr(scene, name):
                setattr(nine, name, getattr(scene, name))
        phases.insert(0, (nine, nine_token_steps))
    for phase, (train_scene, phase_steps) in enumerate(phases):
        # each phase its own optimiser and warm-up + cosine schedule, as separate training stages have
        defaults = SimpleNamespace(lr=lr, warmup=100, steps=phase_steps, batch_size=batch_size, weight_decay=0.05)
        optimizer = toy_adamw(params, defaults.lr, defaults.weight_decay)
        running = None
        done = sum(n for _, n in phases[:phase])
        for step in range(phase_steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, defaults)
            batch = list(itertools.islice(stream, defaults.batch_size))
            logits, y, prompt_y = batch_logits(llm, train_scene, tokenizer, batch, question_first)
            flat = logits.reshape(-1, logits.shape[-1])
            loss = torch.nn.functional.cross_entropy(flat, y.reshape(-1))
            if prompt_loss_weight:
                loss = loss + prompt_loss_weight * torch.nn.functional.cross_entropy(flat, prompt_y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            last = phase + 1 == len(phases) and step + 1 == phase_steps
            if (done + step + 1) % eval_every == 0 or step + 1 == phase_steps:  # and at the end of each phase
                rows.append({"init_std": init_std, "lr": lr, "heads": config.num_attention_heads,
                             "question_first": question_first, "shared_counts": shared_counts,
                             "min_objects": min_objects, "easy_until": easy_until, "batch_size": batch_size,
                             "prompt_loss_weight": prompt_loss_weight, "patches_per_side": patches_per_side,
                             "frozen_scene": frozen_scene, "centre_only": centre_only,
                             "nine_token_steps": nine_token_steps, "trained_on": "nine tokens"
                             if train_scene is not scene else "layout",
                             "step": done + step + 1, "loss": round(running, 4),
                             "seconds": round(time.time() - start, 1),
                             **accuracy_by_type(llm, scene, tokenizer, test, question_first)})
                if last and position_test:
                    position_records = [make_record(0, "test", i) for i in range(position_test)]
                    rows[-1]["position_answers"] = position_answers(llm, scene, tokenizer, position_records,
                                                                    question_first)
                if on_eval is not None:
                    on_eval(rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--init-std", type=float, nargs="+", default=[0.02, 0.072],
                        help="initial standard deviation of the LLM's weight matrices, one run each")
    parser.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (the toy's 1.5e-3)")
    parser.add_argument("--heads", type=int, default=4,
                        help="attention heads at the same width (4: the toy's LLM when this benchmark was written; "
                             "the shipped toy now has 12)")
    parser.add_argument("--question-first", action="store_true",
                        help="the question before the scene tokens (USER: question <image> ASSISTANT:)")
    parser.add_argument("--shared-counts", action="store_true",
                        help="scene tokens also carry how many objects share their colour and their shape")
    parser.add_argument("--min-objects", type=int, default=MIN_OBJECTS,
                        help="training scenes hold this many objects or more (a curriculum; test scenes: 3-5)")
    parser.add_argument("--easy-until", type=int, default=None,
                        help="step at which training scenes return to the benchmark's 3-5 objects (default: never)")
    parser.add_argument("--batch-size", type=int, default=48, help="questions per step (the toy's 48)")
    parser.add_argument("--prompt-loss-weight", type=float, default=0.0,
                        help="weight of a loss on the question text after the scene, added to the answer loss")
    parser.add_argument("--patches-per-side", type=int, default=3,
                        help="scene tokens per image side, each its cell's token (3: one a cell; 8: the toy's 64)")
    parser.add_argument("--frozen-scene", action="store_true",
                        help="scene embeddings stay fixed random codes instead of being learned with the LLM")
    parser.add_argument("--centre-only", action="store_true",
                        help="with --patches-per-side > 3, only each cell's centre patch carries its object")
    parser.add_argument("--nine-token-steps", type=int, default=0,
                        help="first train this many steps on one token a cell, then --steps on the asked layout")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--test", type=int, default=400, help="test-split questions per evaluation")
    parser.add_argument("--position-test", type=int, default=1000,
                        help="test records whose short-answer position questions are classed at the end (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the rows as JSON here (after every evaluation)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    columns = ["init_std", "lr", "heads", "step", "loss", "all", *QUESTION_TYPES]
    print(" ".join(f"{c:>10}" for c in columns))

    def report(row: dict) -> None:
        rows.append(row)
        print(" ".join(f"{row[c]:>10}" for c in columns), flush=True)
        if "position_answers" in row:
            print("position answers:", row["position_answers"], flush=True)
        if args.out:
            write_json_atomically(Path(args.out), {"config": vars(args), "rows": rows})

    for std in args.init_std:
        train_symbolic(std, args.steps, args.eval_every, args.test, on_eval=report, lr=args.lr, heads=args.heads,
                       question_first=args.question_first, shared_counts=args.shared_counts,
                       min_objects=args.min_objects, easy_until=args.easy_until, batch_size=args.batch_size,
                       prompt_loss_weight=args.prompt_loss_weight, patches_per_side=args.patches_per_side,
                       position_test=args.position_test, frozen_scene=args.frozen_scene,
                       centre_only=args.centre_only, nine_token_steps=args.nine_token_steps)


if __name__ == "__main__":
    main()
