"""The random scorer: one generator per run, so batches differ and batching does not change the draws."""

import torch

from qapframe.strategies.base import SCORERS
from qapframe.strategies.context import ScoringContext


def ctx(b, seed=7):
    return ScoringContext(vision_embeds=torch.zeros(b, 9, 4), seed=seed)


def test_random_scores_are_independent_of_batch_size():
    batched = SCORERS.get("random")().score(ctx(3))
    single = SCORERS.get("random")()
    singles = torch.cat([single.score(ctx(1)) for _ in range(3)])
    assert torch.equal(batched, singles)


def test_random_draws_new_positions_for_each_batch_and_reseeds_per_run():
    scorer = SCORERS.get("random")()
    first, second = scorer.score(ctx(2)), scorer.score(ctx(2))
    assert not torch.equal(first, second)  # the old scorer re-seeded per call: every batch got the same ranks
    assert torch.equal(SCORERS.get("random")().score(ctx(2)), first)  # a new run (scorer) starts over
    assert not torch.equal(SCORERS.get("random")().score(ctx(2, seed=8)), first)
