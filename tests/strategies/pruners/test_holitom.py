"""HoliTom's segmentation against every partition, and its merges against the rules they follow."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qapframe.strategies.base import PRUNERS, SCORERS, requirements_of
from qapframe.strategies.context import ScoringContext
from qapframe.strategies.pruners.holitom import still_segments


def scenes(pattern: list[int], per_frame: int, dim: int, seed: int, noise: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    looks = torch.randn(max(pattern) + 1, per_frame, dim, generator=g, dtype=torch.float64)
    noisy = [looks[s] + noise * torch.randn(per_frame, dim, generator=g, dtype=torch.float64) for s in pattern]
    return torch.stack(noisy)


def removed(clip: torch.Tensor, spans, threshold: float) -> int:
    """Tokens that merging the still positions of ``spans`` removes, by direct pairwise checks."""
    unit = torch.nn.functional.normalize(clip, dim=-1)
    total = 0
    for s, e in spans:
        for q in range(clip.shape[1]):
            if e - s >= 2 and all(float(unit[t, q] @ unit[t + 1, q]) > threshold for t in range(s, e - 1)):
                total += e - s - 1
    return total


@settings(max_examples=40, deadline=None)
@given(pattern=st.lists(st.integers(0, 2), min_size=1, max_size=6), per_frame=st.integers(1, 5),
       threshold=st.floats(0.0, 0.95), longest=st.one_of(st.none(), st.integers(1, 4)), seed=st.integers(0, 2**16))
def test_segments_remove_the_most_of_any_partition(pattern, per_frame, threshold, longest, seed):
    clip = scenes(pattern, per_frame, 4, seed, noise=0.4)
    spans, _ = still_segments(clip, threshold, longest)
    f = len(pattern)
    assert spans[0][0] == 0 and spans[-1][1] == f and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert longest is None or all(e - s <= longest for s, e in spans)
    best = 0
    for cuts in itertools.product([False, True], repeat=f - 1):  # every partition into contiguous segments
        bounds = [0] + [t + 1 for t, c in enumerate(cuts) if c] + [f]
        partition = list(zip(bounds[:-1], bounds[1:]))
        if longest is None or all(e - s <= longest for s, e in partition):
            best = max(best, removed(clip, partition, threshold))
    assert removed(clip, spans, threshold) == best


def test_a_still_clip_becomes_one_frame_of_means():
    frame = torch.randn(1, 9, 6, generator=torch.Generator().manual_seed(3))
    clip = frame.expand(4, 9, 6).reshape(1, 36, 6)
    context = ScoringContext(clip, token_grid=(4, 3, 3))
    selection = PRUNERS.get("holitom")(num_tokens=9).select(torch.rand(1, 36), context)
    assert selection.keep_index[0].tolist() == list(range(9))
    assert torch.allclose(selection.gather(clip), frame, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(pattern=st.lists(st.integers(0, 1), min_size=1, max_size=6), rows=st.integers(1, 3), cols=st.integers(1, 3),
       fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_budget_met_moving_tokens_by_score_and_merges_within_a_segment(pattern, rows, cols, fraction, seed):
    per_frame, frames = rows * cols, len(pattern)
    n = frames * per_frame
    if n < 2:
        return
    budget = min(n - 1, max(1, round(fraction * n)))
    x = scenes(pattern, per_frame, 5, seed, noise=0.1).reshape(1, n, 5)
    scores = torch.rand(1, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    context = ScoringContext(x, token_grid=(frames, rows, cols))
    selection = PRUNERS.get("holitom")(num_tokens=budget).select(scores, context)
    assert selection.keep_index.shape == (1, budget) and (selection.keep_index.diff() > 0).all()
    spans, _ = still_segments(x[0].view(frames, per_frame, 5), 0.8, None)
    segment_of = [s for s, (a, b) in enumerate(spans) for _ in range((b - a) * per_frame)]
    for token, row in zip(selection.keep_index[0].tolist(), selection.kept_weights[0]):
        assert float(row.sum()) == pytest.approx(1.0)
        members = row.nonzero().squeeze(-1).tolist()
        assert len({segment_of[m] for m in members}) == 1 and token in members
        if members == [token]:  # a moving token, passed whole
            continue
        # a still token: the same position in every frame of its segment (itself, or the centre it merged)
        s, e = spans[segment_of[token]]
        assert token // per_frame == s and all(token + t * per_frame in members for t in range(e - s))


def test_an_image_is_the_top_k_by_score_and_an_in_llm_scorer_is_refused():
    x = torch.randn(1, 16, 4)
    scores = torch.rand(1, 16, generator=torch.Generator().manual_seed(0))
    selection = PRUNERS.get("holitom")(num_tokens=5).select(scores, ScoringContext(x))
    assert selection.keep_index[0].tolist() == sorted(scores[0].topk(5).indices.tolist())
    with pytest.raises(ValueError, match=r"token_grid \(2, 2, 2\) does not hold 16 tokens"):
        PRUNERS.get("holitom")(num_tokens=5).select(scores, ScoringContext(x, token_grid=(2, 2, 2)))
    with pytest.raises(ValueError, match="pruner 'holitom' works only before the LLM"):
        requirements_of(SCORERS.get("fastv")(), PRUNERS.get("holitom")())
