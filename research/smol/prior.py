"""The answer-prior guesser: the best a model can do on the synthetic VQA without looking at the image.

    python -m research.smol.prior [--train 20000] [--test 1000]

It answers each test question with the answer most often correct for the same question text (and, for
multiple choice, among the same options) on the train split, falling back to the most common answer of
the question's type and form. A model answering a blank image should land near it: more means the answers
leak from somewhere other than the image, much less that the model has not learnt the question's prior.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict

from qapframe.data.prompts import is_correct
from qapframe.data.synthetic import SyntheticVQA, make_record


def _keys(record) -> tuple[tuple, tuple]:
    options = tuple(sorted(record.choices)) if record.choices else None
    return (record.question, options), (record.meta["type"], record.meta["form"])


def prior_accuracy(train_size: int, test_size: int, seed: int = 0) -> dict:
    """Test accuracy of the prior guesser fitted on ``train_size`` train records, overall and per type."""
    exact: dict[tuple, Counter] = defaultdict(Counter)
    coarse: dict[tuple, Counter] = defaultdict(Counter)
    for index in range(train_size):
        record = make_record(seed, "train", index)
        key, kind = _keys(record)
        exact[key][record.answer] += 1
        coarse[kind][record.answer] += 1
    correct, by_type = 0, defaultdict(list)
    for record in SyntheticVQA("test", size=test_size, seed=seed):
        key, kind = _keys(record)
        counts = exact.get(key) or coarse[kind]
        guess = counts.most_common(1)[0][0]
        hit = is_correct(guess, record)
        correct += hit
        by_type[record.meta["type"]].append(hit)
    return {"train_records": train_size, "test_records": test_size, "accuracy": correct / test_size,
            "accuracy_by_type": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_type.items())}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--test", type=int, default=1000)
    args = p.parse_args(argv)
    print(json.dumps(prior_accuracy(args.train, args.test), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
