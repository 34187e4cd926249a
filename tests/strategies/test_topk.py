"""Top-k selection, the `Selection` gather, and the baseline and fused scorers."""

import torch

import pytest

from qapframe.strategies.base import Selection, gather_rows, keep_top_k
from qapframe.strategies.context import ScoringContext
from qapframe.strategies.normalization import minmax
from qapframe.strategies.pruners.topk import TopKPruner
from qapframe.strategies.scorers.baselines import L2NormScorer, RandomScorer
from qapframe.strategies.scorers.fused import FusedScorer


def test_keep_top_k_returns_the_largest_in_original_order_with_stable_ties():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.2], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert keep_top_k(scores, 3).tolist() == [[1, 2, 3], [0, 1, 2]]
    tied = torch.zeros(1, 6)
    assert keep_top_k(tied, 2).tolist() == [[0, 1]]  # earliest tokens win ties


def test_gather_rows_equals_per_row_indexing_and_shares_a_batch_one_source():
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, 10, 2, 4, generator=generator)  # trailing dims beyond one are carried along
    index = torch.randint(0, 10, (3, 6), generator=generator)
    expected = torch.stack([tokens[b, index[b]] for b in range(3)])
    assert torch.equal(gather_rows(tokens, index), expected)
    shared = gather_rows(tokens[:1], index)  # rotary tables: one row for the whole batch
    assert torch.equal(shared, torch.stack([tokens[0, index[b]] for b in range(3)]))
    with pytest.raises(ValueError, match="2 token rows for 3 index rows"):
        gather_rows(tokens[:2], index)


def test_topk_pruner_matches_a_brute_force_selection():
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(4, 40, 8, generator=generator)
    scores = torch.randn(4, 40, generator=generator)
    selection = TopKPruner(retention=0.25).select(scores, ScoringContext(vision_embeds=embeds))
    assert selection.keep_index.shape == (4, 10)
    for b in range(4):
        expected = sorted(range(40), key=lambda i: -scores[b, i].item())[:10]
        assert selection.keep_index[b].tolist() == sorted(expected)
    gathered = selection.gather(embeds)
    assert torch.equal(gathered[2], embeds[2, selection.keep_index[2]])


def test_selection_appends_extra_tokens_after_kept_ones():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    extra = torch.full((2, 1, 3), -1.0)
    out = Selection(keep_index=torch.tensor([[0, 4], [1, 2]]), extra_tokens=extra).gather(tokens)
    assert out.shape == (2, 3, 3)
    assert torch.equal(out[1, :2], tokens[1, [1, 2]]) and torch.equal(out[:, 2], extra[:, 0])


def test_random_scorer_is_seeded_and_l2norm_is_the_float64_norm():
    embeds = torch.randn(2, 9, 16)
    a = RandomScorer().score(ScoringContext(vision_embeds=embeds, seed=3))
    b = RandomScorer().score(ScoringContext(vision_embeds=embeds, seed=3))
    c = RandomScorer().score(ScoringContext(vision_embeds=embeds, seed=4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(
        L2NormScorer().score(ScoringContext(vision_embeds=embeds)).double(), embeds.double().norm(dim=-1),
        rtol=1e-6, atol=1e-6,  # a float32 norm against the float64 one
    )


def test_fused_scorer_is_the_weighted_sum_of_normalized_member_scores():
    embeds = torch.randn(3, 12, 16)
    context = ScoringContext(vision_embeds=embeds, seed=1)
    fused = FusedScorer(scorers=[{"scorer": {"name": "l2norm"}, "weight": 0.7}, {"scorer": {"name": "random"}, "weight": 0.3}])
    expected = 0.7 * minmax(L2NormScorer().score(context).double()) + 0.3 * minmax(RandomScorer().score(context).double())
    torch.testing.assert_close(fused.score(context).double(), expected, atol=1e-6, rtol=0)
