"""FastVID's segments, budget plan and merges, each against a direct computation of its rule."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qapframe.strategies.base import PRUNERS, SCORERS, requirements_of
from qapframe.strategies.context import ScoringContext
from qapframe.strategies.pruners.fastvid import FastVIDConfig, plan_counts, segment_spans
from qapframe.strategies.pruners.selection import density_peak_scores


def scenes(pattern: list[int], per_frame: int, dim: int, seed: int, noise: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    looks = torch.randn(max(pattern) + 1, per_frame, dim, generator=g, dtype=torch.float64)
    noisy = [looks[s] + noise * torch.randn(per_frame, dim, generator=g, dtype=torch.float64) for s in pattern]
    return torch.stack(noisy)


def test_segments_cut_where_frames_change_and_at_the_lowest_similarities():
    clip = scenes([0, 0, 0, 1, 1, 2, 2, 2], 6, 8, seed=0)
    means = clip.mean(dim=1)
    assert segment_spans(means, 1, 0.9) == [(0, 3), (3, 5), (5, 8)]  # tau alone: the two scene changes
    unit = torch.nn.functional.normalize(means, dim=-1)
    similarity = (unit[:-1] * unit[1:]).sum(-1).tolist()
    third = sorted(range(7), key=lambda i: (similarity[i], i))[2]  # the lowest after the two changes
    expected = sorted({2, 4, third})
    bounds = [0] + [c + 1 for c in expected] + [8]
    assert segment_spans(means, 4, 0.0) == list(zip(bounds[:-1], bounds[1:]))  # c = 4: three lowest cut
    assert segment_spans(means[:1], 8, 0.9) == [(0, 1)]


@settings(max_examples=60, deadline=None)
@given(frames=st.integers(1, 9), per_frame=st.integers(1, 12), fraction=st.floats(0.0, 1.0),
       cuts=st.sets(st.integers(0, 7)), stride=st.integers(1, 4), ratio=st.floats(0.0, 1.0))
def test_the_plan_meets_the_budget_with_context_only_on_anchor_frames(frames, per_frame, fraction, cuts, stride, ratio):
    n = frames * per_frame
    budget = min(n - 1, max(1, round(fraction * n))) if n > 1 else 1
    bounds = [0] + sorted(c + 1 for c in cuts if c + 1 < frames) + [frames]
    spans = list(zip(bounds[:-1], bounds[1:]))
    config = FastVIDConfig(anchor_stride=stride, context_ratio=ratio)
    salient, context = plan_counts(spans, frames, per_frame, budget, config)
    assert sum(salient) + sum(context) == budget
    anchors = {t for start, stop in spans for t in range(stop - 1, start - 1, -stride)}
    for t in range(frames):
        assert salient[t] >= 0 and context[t] >= 0 and salient[t] + context[t] <= per_frame
        assert context[t] == 0 or t in anchors
    for start, stop in spans:  # a segment keeps what its frames' shares add up to
        share = [budget // frames + (1 if t < budget % frames else 0) for t in range(frames)]
        assert sum(salient[start:stop]) + sum(context[start:stop]) == sum(share[start:stop])


@settings(max_examples=30, deadline=None)
@given(pattern=st.lists(st.integers(0, 2), min_size=1, max_size=7), rows=st.integers(1, 3), cols=st.integers(1, 3),
       fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_salient_tokens_pass_whole_and_every_merge_follows_the_rule(pattern, rows, cols, fraction, seed):
    per_frame, frames = rows * cols, len(pattern)
    n = frames * per_frame
    budget = min(n - 1, max(1, round(fraction * n)))
    if n < 2:
        return
    x = scenes(pattern, per_frame, 5, seed, noise=0.3).reshape(1, n, 5)
    scores = torch.rand(1, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    config = FastVIDConfig(segments=2)
    selection = PRUNERS.get("fastvid")(num_tokens=budget, segments=2).select(
        scores, ScoringContext(x, token_grid=(frames, rows, cols))
    )
    assert selection.keep_index.shape == (1, budget) and (selection.keep_index.diff() > 0).all()
    spans = segment_spans(x[0].view(frames, per_frame, 5).mean(dim=1), 2, 0.9)
    salient, context = plan_counts(spans, frames, per_frame, budget, config)
    segment_of = [s for s, (a, b) in enumerate(spans) for _ in range((b - a) * per_frame)]
    chosen = set()
    for t in range(frames):  # salient: the frame's top scores
        frame = scores[0, t * per_frame : (t + 1) * per_frame]
        top = torch.sort(frame, descending=True, stable=True).indices[: salient[t]]
        chosen |= {t * per_frame + i for i in top.tolist()}
    unit = torch.nn.functional.normalize(x[0], dim=-1)
    rows_by_token = dict(zip(selection.keep_index[0].tolist(), selection.kept_weights[0]))
    for token, row in rows_by_token.items():
        assert float(row.sum()) == pytest.approx(1.0)
        if token in chosen:
            assert row[token] == 1.0 and int((row > 0).sum()) == 1
            continue
        t = token // per_frame
        assert context[t] > 0  # an anchor, in an anchor frame
        rest = [i for i in range(t * per_frame, (t + 1) * per_frame) if i not in chosen]
        score, _ = density_peak_scores(x[0, rest], 4)
        picked = torch.sort(score, descending=True, stable=True).indices[: context[t]]
        anchors = sorted(rest[i] for i in picked.tolist())
        assert token in anchors
        members = [i for i in row.nonzero().squeeze(-1).tolist() if i != token]
        for m in members:  # same segment, not salient, not another anchor of this frame, nearest to this anchor
            assert segment_of[m] == segment_of[token] and m not in chosen and m not in anchors
            similarity = unit[m] @ unit[anchors].T
            assert anchors[int(similarity.argmax())] == token
        w = max(1 / (len(members) + 1), 0.6) if members else 1.0
        assert float(row[token]) == pytest.approx(w)
    for t in [t for t in range(frames) if context[t]]:  # each anchor frame takes in its whole segment's rest
        anchors = [k for k in rows_by_token if k // per_frame == t and k not in chosen]
        taken = sorted(m for a in anchors for m in rows_by_token[a].nonzero().squeeze(-1).tolist() if m != a)
        segment = [i for i in range(n) if segment_of[i] == segment_of[t * per_frame]]
        assert taken == sorted(i for i in segment if i not in chosen and i not in anchors)


def test_an_image_is_one_frame_and_an_in_llm_scorer_is_refused():
    x = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(1))
    scores = torch.arange(16.0)[None]
    selection = PRUNERS.get("fastvid")(num_tokens=5).select(scores, ScoringContext(x))
    kept = selection.keep_index[0].tolist()
    assert {15, 14, 13} <= set(kept)  # 5 - int(0.4 * 5) = 3 salient: the top scores, passed whole
    assert torch.allclose(selection.kept_weights[0].sum(-1), torch.ones(5))
    assert PRUNERS.get("fastvid")(retention=1.0).select(scores, ScoringContext(x)).kept_weights is None
    with pytest.raises(ValueError, match=r"token_grid \(2, 2, 2\) does not hold 16 tokens"):
        PRUNERS.get("fastvid")(num_tokens=5).select(scores, ScoringContext(x, token_grid=(2, 2, 2)))
    with pytest.raises(ValueError, match="pruner 'fastvid' works only before the LLM"):
        requirements_of(SCORERS.get("fastv")(), PRUNERS.get("fastvid")())
