"""The toy's LLM alone, on perfect symbolic scenes: can it learn the questions, and how fast?

    python benchmarks/toy_llm_symbolic.py [--steps 1000] [--init-std 0.02 0.072] [--out benchmarks/results/toy_llm_symbolic.json]

Why: the toy answers "what is at <place>" but not "where is the <colour> <shape>" or "how many ...".
This takes the vision side out of the question. The toy's LLM (same config, optimiser, schedule and
batch as `qapframe.toy.train`, questions only) reads the scene as nine ideal tokens, one per grid cell,
each the sum of learned embeddings of that cell's place, colour and shape (or "empty"), put where the
image's tokens go in the prompt. If the LLM cannot learn the questions from these, no vision tower
will make it; the run per initial weight scale (``--init-std``; LLaMA's default is 0.02) measures how
the LLM's initialisation sets the pace. Accuracy is teacher-forced exact match of the whole answer
(every answer token and the closing ``</s>`` argmax-correct) on test-split questions.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LlamaForCausalLM

from qapframe.data.base import VQARecord
from qapframe.data.prompts import IMAGE_PLACEHOLDER, build_prompt
from qapframe.data.synthetic import COLOURS, MAX_OBJECTS, MIN_OBJECTS, POSITIONS, QUESTION_TYPES, SHAPES, make_record
from qapframe.eval.results import write_json_atomically
from qapframe.toy.evaluate import split_at_image
from qapframe.toy.model import EOS_ID, build_config, build_tokenizer, redraw_llm_weights
from qapframe.toy.train import lr_at, question_type_weights, training_records
from qapframe.toy.vision_pretrain import cell_shared_counts

EMPTY = 0


class SymbolicScene(torch.nn.Module):
    """One token per grid cell: embedding of its place + its object's colour + its object's shape (0: empty).

    ``shared_counts``: each token also adds embeddings of how many objects share its colour and its shape
    (`cell_shared_counts`, the toy's ``--vision-shared-counts`` target), so a count is a lookup.
    """

    def __init__(self, width: int, std: float = 1.0, shared_counts: bool = False):
        super().__init__()
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
        return tokens


def scene_prompt(record: VQARecord, question_first: bool = False) -> str:
    """The toy's prompt; ``question_first`` moves the image after the question (``USER: q\n<image>\nASSISTANT:``),
    so that under causal attention every scene token can read what is asked."""
    prompt = build_prompt(record)
    if not question_first:
        return prompt
    return prompt.replace(f"{IMAGE_PLACEHOLDER}\n", "").replace("\nASSISTANT:", f"\n{IMAGE_PLACEHOLDER}\nASSISTANT:")


def batch_logits(llm, scene: SymbolicScene, tokenizer, records,
                 question_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [B, L-1, V], labels [B, L-1])``: position t predicts token t + 1; labels -100 off the answer."""
    embed = llm.get_input_embeddings()
    rows, labels = [], []
    for record in records:
        before, after = split_at_image(tokenizer, scene_prompt(record, question_first))
        target = tokenizer(" " + record.answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
        tokens = scene(record)
        rows.append(torch.cat([embed(torch.tensor(before)), tokens, embed(torch.tensor(after + target))]))
        labels.append([-100] * (len(before) + tokens.shape[0] + len(after)) + target)
    width = max(len(row) for row in labels)
    x = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -100)
    for i, (row, label) in enumerate(zip(rows, labels)):
        x[i, : len(label)], mask[i, : len(label)], y[i, : len(label)] = row, 1, torch.tensor(label)
    return llm(inputs_embeds=x, attention_mask=mask).logits[:, :-1], y[:, 1:]


@torch.no_grad()
def accuracy_by_type(llm, scene, tokenizer, records, question_first: bool = False) -> dict[str, float]:
    """Teacher-forced exact-answer accuracy: overall ("all") and per question type."""
    llm.eval()
    right: dict[str, list[bool]] = {t: [] for t in QUESTION_TYPES}
    for start in range(0, len(records), 100):
        batch = records[start : start + 100]
        logits, y = batch_logits(llm, scene, tokenizer, batch, question_first)
        correct = ((logits.argmax(-1) == y) | (y == -100)).all(dim=1)
        for record, ok in zip(batch, correct.tolist()):
            right[record.meta["type"]].append(ok)
    llm.train()
    result = {"all": round(sum(map(sum, right.values())) / len(records), 4)}
    result.update({t: round(sum(v) / len(v), 4) for t, v in right.items() if v})
    return result


@torch.enable_grad()
def train_symbolic(init_std: float, steps: int, eval_every: int, test_size: int, seed: int = 0,
                   on_eval=None, lr: float = 1.5e-3, heads: int | None = None, question_first: bool = False,
                   shared_counts: bool = False, min_objects: int = MIN_OBJECTS,
                   easy_until: int | None = None, batch_size: int = 48) -> list[dict]:
    """Train the toy's LLM on symbolic scenes as `qapframe.toy.train` trains it; one row per evaluation.

    ``lr``, ``heads`` (attention heads at the same width; None: the toy's), ``question_first`` (the prompt
    layout, `scene_prompt`) and ``shared_counts`` (`SymbolicScene`) are the knobs varied; ``min_objects``
    draws training scenes from that many objects up (a curriculum of easier scenes) until step ``easy_until``
    (None: the whole run), then the benchmark's own; test scenes are always the benchmark's. ``batch_size``
    (questions per step; the toy's 48) trades questions per update for updates per second.
    """
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = build_config(len(tokenizer)).text_config
    if heads is not None:
        if config.hidden_size % heads:
            raise ValueError(f"--heads: must divide the LLM width {config.hidden_size}, got {heads}")
        config.num_attention_heads = config.num_key_value_heads = heads
        config.head_dim = config.hidden_size // heads
    llm = LlamaForCausalLM(config)
    redraw_llm_weights(llm.model, llm.lm_head, init_std, seed)
    scene = SymbolicScene(llm.config.hidden_size, shared_counts=shared_counts)
    if batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {batch_size}")
    defaults = SimpleNamespace(lr=lr, warmup=100, steps=steps, batch_size=batch_size, weight_decay=0.05)
    params = [*llm.parameters(), *scene.parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": defaults.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=defaults.lr, betas=(0.9, 0.98))
    test = [make_record(0, "test", i) for i in range(test_size)]
    easy_records = None if easy_until is None else easy_until * defaults.batch_size
    stream = training_records(0, question_type_weights(""), seed, min_objects, easy_records)  # the toy's stream
    rows, start, running = [], time.time(), None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, defaults)
        batch = list(itertools.islice(stream, defaults.batch_size))
        logits, y = batch_logits(llm, scene, tokenizer, batch, question_first)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            rows.append({"init_std": init_std, "lr": lr, "heads": config.num_attention_heads,
                         "question_first": question_first, "shared_counts": shared_counts,
                         "min_objects": min_objects, "easy_until": easy_until, "batch_size": batch_size,
                         "step": step + 1, "loss": round(running, 4),
                         "seconds": round(time.time() - start, 1),
                         **accuracy_by_type(llm, scene, tokenizer, test, question_first)})
            if on_eval is not None:
                on_eval(rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--init-std", type=float, nargs="+", default=[0.02, 0.072],
                        help="initial standard deviation of the LLM's weight matrices, one run each")
    parser.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (the toy's 1.5e-3)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads at the same width (the toy's 4)")
    parser.add_argument("--question-first", action="store_true",
                        help="the question before the scene tokens (USER: question <image> ASSISTANT:)")
    parser.add_argument("--shared-counts", action="store_true",
                        help="scene tokens also carry how many objects share their colour and their shape")
    parser.add_argument("--min-objects", type=int, default=MIN_OBJECTS,
                        help="training scenes hold this many objects or more (a curriculum; test scenes: 3-5)")
    parser.add_argument("--easy-until", type=int, default=None,
                        help="step at which training scenes return to the benchmark's 3-5 objects (default: never)")
    parser.add_argument("--batch-size", type=int, default=48, help="questions per step (the toy's 48)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--test", type=int, default=400, help="test-split questions per evaluation")
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
        if args.out:
            write_json_atomically(Path(args.out), {"config": vars(args), "rows": rows})

    for std in args.init_std:
        train_symbolic(std, args.steps, args.eval_every, args.test, on_eval=report, lr=args.lr, heads=args.heads,
                       question_first=args.question_first, shared_counts=args.shared_counts,
                       min_objects=args.min_objects, easy_until=args.easy_until, batch_size=args.batch_size)


if __name__ == "__main__":
    main()
