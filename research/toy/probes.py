"""Linear probes on the toy LLaVA's projected vision tokens: what the LLM could read, and from where.

    python -m research.toy.probes [--model toy] [--train 1500] [--test 500] [--out research/toy/results/toy_probes.json]

Why: a toy that solves "what is at <place>" but not "where is the <colour> <shape>" or "how many
<colour>" fails either in its vision features or in its LLM; the probes separate the two. A search by
attributes needs every single token to say what occupies its cell (the attention key of one token); a
count can be read from the mean of the tokens (what uniform attention returns), or from any one token
if the tower spreads the scene's counts over its patches. Each probe is a linear softmax classifier
fitted on tokens of fresh train-split images and scored on other images; the prior is the most common
training label's share of the test labels, so a probe near its prior finds nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qapframe.data.synthetic import COLOURS, SHAPES, make_record
from qapframe.eval.results import write_json_atomically
from qapframe.toy import TOY_PATH, load_toy
from research.toy.sequences import vision_tokens
from research.toy.vision_pretrain import cell_labels, patch_cells

# Probe images come from their own index range of the train split, apart from both training stages.
RECORD_OFFSET = 20_000_000


def scene_counts(records) -> torch.Tensor:
    """``[B, C + S]`` how many objects of each colour, then of each shape, each scene holds."""
    rows = []
    for record in records:
        objects = record.meta["objects"]
        rows.append([sum(o[0] == c for o in objects) for c in COLOURS] + [sum(o[1] == s for o in objects) for s in SHAPES])
    return torch.tensor(rows)


def token_table(model, processor, start: int, count: int) -> dict[str, torch.Tensor]:
    """Projected tokens ``[B, N, D]`` and, per token or per image, the labels the probes predict."""
    records = [make_record(0, "train", RECORD_OFFSET + start + i) for i in range(count)]
    with torch.no_grad():
        tokens = torch.cat([vision_tokens(model, processor, [r.image for r in records[i : i + 100]])
                            for i in range(0, count, 100)])
    cells = patch_cells()
    colour, shape = cell_labels(records)
    counts = scene_counts(records)  # [B, C + S]
    return {"tokens": tokens, "cell": cells.expand(count, -1), "colour": colour[:, cells], "shape": shape[:, cells],
            "colour_counts": counts[:, : len(COLOURS)], "shape_counts": counts[:, len(COLOURS):]}


def fit_probe(x_train, y_train, x_test, y_test, seed: int, steps: int = 300) -> tuple[float, float]:
    """(test accuracy of a linear classifier fitted by full-batch Adam, the majority-label prior)."""
    torch.manual_seed(seed)
    classes = int(max(y_train.max(), y_test.max())) + 1
    probe = torch.nn.Linear(x_train.shape[-1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(probe(x_train), y_train)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (probe(x_test).argmax(-1) == y_test).float().mean().item()
    prior = (y_test == y_train.mode().values).float().mean().item()
    return accuracy, prior


def additive_r2(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor]) -> float:
    """Share of the test tokens' variance that a least-squares sum of per-cell, per-colour and per-shape
    vectors (fitted on the train tokens) reproduces: 1 for ideal symbolic tokens, low when most of each token
    is detail of its patch that no question asks about."""
    def design(table):
        parts = [(table["cell"], 9), (table["colour"], 1 + len(COLOURS)), (table["shape"], 1 + len(SHAPES))]
        return torch.cat([torch.nn.functional.one_hot(x.reshape(-1), n) for x, n in parts], dim=1).double()

    width = train["tokens"].shape[-1]
    y_train, y_test = train["tokens"].reshape(-1, width).double(), test["tokens"].reshape(-1, width).double()
    solution = torch.linalg.lstsq(design(train), y_train, driver="gelsd").solution
    residual = y_test - design(test) @ solution
    return 1 - (residual.pow(2).sum() / (y_test - y_test.mean(0)).pow(2).sum()).item()


def run_probes(model, processor, n_train: int, n_test: int, seed: int = 0) -> list[dict]:
    train, test = token_table(model, processor, 0, n_train), token_table(model, processor, n_train, n_test)
    width = train["tokens"].shape[-1]
    tokens_train, tokens_test = train["tokens"].reshape(-1, width), test["tokens"].reshape(-1, width)
    occupied_train, occupied_test = train["shape"].reshape(-1) > 0, test["shape"].reshape(-1) > 0
    rows = []

    def add(name, x_train, y_train, x_test, y_test):
        accuracy, prior = fit_probe(x_train, y_train, x_test, y_test, seed)
        rows.append({"probe": name, "accuracy": round(accuracy, 4), "prior": round(prior, 4)})

    for label in ("cell", "colour", "shape"):
        add(f"one token -> its cell's {label}" if label != "cell" else "one token -> its cell",
            tokens_train, train[label].reshape(-1), tokens_test, test[label].reshape(-1))
    add("one token of an occupied cell -> the object's shape", tokens_train[occupied_train],
        train["shape"].reshape(-1)[occupied_train], tokens_test[occupied_test], test["shape"].reshape(-1)[occupied_test])
    mean_train, mean_test = train["tokens"].mean(1), test["tokens"].mean(1)
    n = train["tokens"].shape[1]
    counts = [(f"{colour} objects", "colour_counts", i) for i, colour in enumerate(COLOURS)] + \
             [(f"{shape}s", "shape_counts", i) for i, shape in enumerate(SHAPES)]
    for what, key, i in counts:
        add(f"mean token -> number of {what}", mean_train, train[key][:, i], mean_test, test[key][:, i])
    for what, key, i in counts:  # every token labelled with its image's count: can one token alone say it?
        add(f"one token -> number of {what}", tokens_train, train[key][:, i].repeat_interleave(n),
            tokens_test, test[key][:, i].repeat_interleave(n))
    rows.append({"probe": "token variance explained by place + colour + shape",
                 "r2": round(additive_r2(train, test), 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="'toy' (the shipped weights) or a directory saved by the training script")
    parser.add_argument("--train", type=int, default=1500, help="images whose tokens fit the probes")
    parser.add_argument("--test", type=int, default=500, help="other images the probes are scored on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_toy(path=TOY_PATH if args.model == "toy" else args.model)
    rows = run_probes(model, processor, args.train, args.test)
    print(f"{'probe':<56} {'accuracy':>9} {'prior':>7}")
    for row in rows:
        if "r2" in row:
            print(f"{row['probe']:<56} {100 * row['r2']:8.1f}% (R^2)")
        else:
            print(f"{row['probe']:<56} {100 * row['accuracy']:8.1f}% {100 * row['prior']:6.1f}%")
    if args.out:
        write_json_atomically(Path(args.out), {"config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
