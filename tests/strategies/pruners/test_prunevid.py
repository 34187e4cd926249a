"""PruneVid's scenes, static tokens and budgeted merging, against direct computations of each step."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qapframe.strategies.base import PRUNERS
from qapframe.strategies.context import ScoringContext
from qapframe.strategies.pruners.clips import shares
from qapframe.strategies.pruners.prunevid import PruneVidConfig, prunevid_groups, scenes, static_scores


def noisy_scenes(pattern: list[int], per_frame: int, dim: int, seed: int, noise: float = 0.02) -> torch.Tensor:
    """Frames ``[F, P, D]`` drawn from the scenes ``pattern`` names (frame t shows scene pattern[t])."""
    g = torch.Generator().manual_seed(seed)
    looks = torch.randn(max(pattern) + 1, per_frame, dim, generator=g, dtype=torch.float64)
    return torch.stack([looks[s] + noise * torch.randn(per_frame, dim, generator=g, dtype=torch.float64) for s in pattern])


def test_scenes_split_where_the_content_changes_and_a_returning_scene_joins_its_neighbour():
    clip = noisy_scenes([0, 0, 0, 0, 1, 1, 1, 1], 6, 8, seed=0)
    assert scenes(clip.mean(dim=1), 0.25, 7) == [(0, 4), (4, 8)]
    # A A B B A A with two clusters: A's longest run is its first; the second joins its only neighbour, B.
    clip = noisy_scenes([0, 0, 0, 1, 1, 0, 0], 6, 8, seed=1)
    assert scenes(clip.mean(dim=1), 2 / 7, 7) == [(0, 3), (3, 7)]
    assert scenes(clip[:1].mean(dim=1), 0.25, 7) == [(0, 1)]


def test_static_score_is_the_mean_pairwise_cosine():
    clip = torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    unit = torch.nn.functional.normalize(clip, dim=-1)
    pairs = list(itertools.permutations(range(5), 2))
    expected = torch.stack([sum((unit[a, p] @ unit[b, p]) for a, b in pairs) / len(pairs) for p in range(7)])
    assert torch.allclose(static_scores(clip), expected, atol=1e-12)


def test_shares_are_proportional_and_sum_to_the_total():
    assert shares([10, 30, 60], 10) == [1, 3, 6]
    assert shares([1, 1, 1], 2) == [1, 1, 0]  # equal remainders: earlier groups first
    assert shares([5, 2, 9], 7) == [2, 1, 4]


def test_a_still_clip_becomes_its_first_frame_with_each_token_the_mean_over_time():
    frame = torch.randn(1, 9, 6, generator=torch.Generator().manual_seed(3))
    clip = frame.expand(4, 9, 6).reshape(1, 36, 6)
    pruner = PRUNERS.get("prunevid")(num_tokens=9, segment_ratio=0.25)
    selection = pruner.select(torch.zeros(1, 36), ScoringContext(clip, token_grid=(4, 3, 3)))
    assert selection.keep_index[0].tolist() == list(range(9))
    for p in range(9):  # position p over the four frames, 1/4 each
        expected = torch.zeros(36)
        expected[[p, 9 + p, 18 + p, 27 + p]] = 0.25
        assert torch.equal(selection.kept_weights[0, p], expected)
    assert torch.allclose(selection.gather(clip), frame, atol=1e-6)


def test_too_few_dynamic_tokens_make_the_least_static_positions_dynamic_again():
    g = torch.Generator().manual_seed(4)
    frame = torch.randn(9, 6, generator=g, dtype=torch.float64)
    clip = frame.expand(4, 9, 6).clone()
    clip[:, 5] += 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)  # position 5 moves a little
    config = PruneVidConfig(segment_ratio=0.25, static_threshold=0.5)
    groups = prunevid_groups(clip.reshape(36, 6), (4, 3, 3), 9 + 3, config)  # all static leaves 9: 3 short
    assert len(groups) == 12
    assert sorted(map(sorted, groups)) == sorted([[p, 9 + p, 18 + p, 27 + p] for p in range(9) if p != 5]
                                                  + [[9 * t + 5] for t in range(4)])


@settings(max_examples=30, deadline=None)
@given(
    pattern=st.lists(st.integers(0, 2), min_size=1, max_size=8), rows=st.integers(1, 3), cols=st.integers(1, 3),
    fraction=st.floats(0.0, 1.0), threshold=st.floats(0.0, 0.99), seed=st.integers(0, 2**16),
)
def test_any_budget_is_met_with_disjoint_groups_that_stay_in_one_scene(pattern, rows, cols, fraction, threshold, seed):
    per_frame = rows * cols
    frames = torch.stack([noisy_scenes(pattern, per_frame, 5, seed + i, noise=0.3) for i in range(2)])
    n = len(pattern) * per_frame
    budget = max(1, min(n - 1, round(fraction * n))) if n > 1 else 1
    if budget >= n:
        return
    clips = frames.reshape(2, n, 5).float()
    grid = (len(pattern), rows, cols)
    pruner = PRUNERS.get("prunevid")(num_tokens=budget, static_threshold=threshold)
    selection = pruner.select(torch.zeros(2, n), ScoringContext(clips, token_grid=grid))
    assert selection.keep_index.shape == (2, budget) and selection.kept_weights.shape == (2, budget, n)
    for b in range(2):
        w = selection.kept_weights[b]
        assert ((w > 0).sum(dim=0) <= 1).all()  # every token in at most one merged token
        assert torch.allclose(w.sum(dim=-1), torch.ones(budget))
        members = [row.nonzero().squeeze(-1) for row in w]
        assert selection.keep_index[b].tolist() == sorted(int(m.min()) for m in members)
        spans = scenes(clips[b].double().view(*grid[:1], per_frame, 5).mean(dim=1), 0.25, 7)
        scene_of = [s for s, (start, stop) in enumerate(spans) for _ in range((stop - start) * per_frame)]
        for m, row in zip(members, w):
            assert len({scene_of[i] for i in m.tolist()}) == 1
            assert torch.allclose(row[m], torch.full((len(m),), 1.0 / len(m)))


def test_full_retention_keeps_everything_and_a_wrong_layout_is_refused():
    clip = torch.randn(1, 12, 4)
    assert PRUNERS.get("prunevid")(retention=1.0).select(torch.zeros(1, 12), ScoringContext(clip)).kept_weights is None
    with pytest.raises(ValueError, match=r"token_grid \(2, 2, 2\) does not hold 12 tokens"):
        PRUNERS.get("prunevid")(retention=0.5).select(torch.zeros(1, 12), ScoringContext(clip, token_grid=(2, 2, 2)))


def test_an_in_llm_scorer_is_refused():
    from qapframe.strategies.base import SCORERS, requirements_of

    with pytest.raises(ValueError, match="pruner 'prunevid' works only before the LLM"):
        requirements_of(SCORERS.get("fastv")(), PRUNERS.get("prunevid")())
