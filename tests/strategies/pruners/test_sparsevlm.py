"""SparseVLM's selection rule (scores, rank-based count, recycling into merged tokens) against a slow direct
implementation of the paper's and the authors' code's steps, through the batched per-image dispatch."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qapframe.models.pruning import ImageTokens, select_per_image
from qapframe.strategies.base import PRUNERS, SCORERS
from qapframe.strategies.context import ScoringContext


def rank_slow(rows: np.ndarray) -> int:
    s = np.linalg.svd(rows, compute_uv=False) if rows.size else np.zeros(0)
    return int((s > 1e-4 * s.max()).sum()) if s.size and s.max() > 0 else 0


def merged_slow(deleted: int, tau: float, theta: float) -> tuple[int, int]:
    """(recycled, clusters) for ``deleted`` tokens, as the authors' code counts them."""
    if deleted == 0 or tau == 0:
        return 0, 0
    recycled = min(deleted, math.floor(tau * deleted) + 1)
    return recycled, min(recycled, math.floor(theta * recycled) + 1)


def split_slow(n: int, total: int, tau: float, theta: float) -> tuple[int, int]:
    if total >= n:
        return n, 0
    exact = [k for k in range(total + 1) if k + merged_slow(n - k, tau, theta)[1] == total]
    return (max(exact), total - max(exact)) if exact else (0, total)


def dpc_merge_slow(x: list[list[float]], clusters: int) -> list[list[float]]:
    """Density-peak clustering (k nearest = clusters, self included) and cluster means, in plain Python."""
    r, d = len(x), len(x[0])
    dist = [[math.dist(x[i], x[j]) / math.sqrt(d) for j in range(r)] for i in range(r)]
    k = min(clusters, r)
    density = [math.exp(-sum(v * v for v in sorted(dist[i])[:k]) / k) for i in range(r)]
    far = max(max(row) for row in dist)
    delta = []
    for i in range(r):
        denser = [dist[i][j] for j in range(r) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min(denser) if denser else far)
    score = [delta[i] * density[i] for i in range(r)]
    centres = sorted(sorted(range(r), key=lambda i: (-score[i], i))[:clusters])
    assign = [min(range(clusters), key=lambda c: (dist[i][centres[c]], c)) for i in range(r)]
    for c, i in enumerate(centres):
        assign[i] = c
    return [[sum(x[i][t] for i in range(r) if assign[i] == c) / assign.count(c) for t in range(d)] for c in range(clusters)]


def sparsevlm_slow(rows, hidden, budget, tau, theta, planned=None):
    """One image: rater rows ``[R, N]``, hidden ``[N, D]`` -> (kept indices, merged tokens)."""
    n = rows.shape[1]
    scores = rows.mean(axis=0)
    total = min(budget, n)
    if planned is not None and total < n:  # an adaptive stage: delete lambda * (n - rank(P)), rounded half up
        deletions = math.floor((n - total) * (n - rank_slow(rows)) / n + 0.5)
        total = n - deletions
    kept, clusters = split_slow(n, total, tau, theta)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    keep = sorted(order[:kept])
    if clusters == 0:
        return keep, None
    deleted = [i for i in range(n) if i not in keep]
    recycled, _ = merged_slow(len(deleted), tau, theta)
    best = sorted(sorted(deleted, key=lambda i: (-scores[i], i))[:recycled])
    return keep, dpc_merge_slow([hidden[i].tolist() for i in best], clusters)


def rater_rows(generator, raters: int, n: int, rank: int) -> torch.Tensor:
    """Positive rows ``[raters, n]`` summing to at most 1, of rank ``min(rank, ...)`` (attention-like)."""
    base = torch.rand(rank, n, generator=generator, dtype=torch.float64).softmax(-1)
    mix = torch.rand(raters, rank, generator=generator, dtype=torch.float64)
    return (mix / mix.sum(-1, keepdim=True)) @ base


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    sizes=st.lists(st.sampled_from([6, 13, 40]), min_size=1, max_size=4),
    tau=st.sampled_from([0.0, 0.3, 0.6, 1.0]),
    theta=st.sampled_from([0.1, 0.3, 1.0]),
    adaptive=st.booleans(),
    data=st.data(),
)
def test_selection_matches_the_slow_rule(seed, sizes, tau, theta, adaptive, data):
    g = torch.Generator().manual_seed(seed)
    dim = 5
    images, rows = [], []
    for n in sizes:
        raters, rank = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
        rows.append(rater_rows(g, raters, n, rank))
        hidden = torch.randn(n, dim, generator=g, dtype=torch.float64)
        images.append(ImageTokens(features=hidden, prunable=torch.ones(n, dtype=torch.bool), llm_hidden=hidden))
    budget = data.draw(st.integers(1, max(sizes)))
    targets = [min(budget, n) for n in sizes] if adaptive else None
    scorer = SCORERS.get("sparsevlm")()
    pruner = PRUNERS.get("sparsevlm")(num_tokens=budget, recycle_ratio=tau, cluster_ratio=theta)
    got = select_per_image(scorer, pruner, images, None, 0, targets=targets, rater_attention=rows, adaptive=adaptive)
    for image, p, sel in zip(images, rows, got):
        keep, merged = sparsevlm_slow(p.numpy(), image.llm_hidden.numpy(), budget, tau, theta,
                                      planned=budget if adaptive else None)
        assert sel.keep_index.tolist() == keep
        if merged is None:
            assert sel.extra_tokens is None or sel.extra_tokens.shape[0] == 0
        else:
            assert sel.extra_tokens is not None and sel.extra_tokens.dtype == torch.float64
            assert torch.allclose(sel.extra_tokens, torch.tensor(merged, dtype=torch.float64), atol=1e-12)
        if not adaptive:  # the last stage meets the budget exactly, merged tokens included
            assert sel.num_tokens == min(budget, image.num_tokens)


def test_mutual_nearest_neighbours_tie_toward_the_earlier_token():
    """Tokens 2 and 3 here are each other's nearest neighbour: equal densities, so the earlier is denser.
    An asymmetric float Gram matrix once gave them unequal densities and another pair of centres."""
    from qapframe.strategies.pruners.sparsevlm import density_peak_merge

    g = torch.Generator().manual_seed(1)
    rater_rows(g, 1, 6, 1)
    hidden = torch.randn(6, 5, generator=g, dtype=torch.float64)
    expected = torch.tensor(dpc_merge_slow(hidden.tolist(), 2), dtype=torch.float64)
    assert torch.allclose(density_peak_merge(hidden, 2), expected, atol=1e-12)


def test_rank_deficient_raters_delete_more_at_an_adaptive_stage():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 20, 4, generator=g)
    pruner = PRUNERS.get("sparsevlm")(num_tokens=10)
    counts = {}
    for rank in (1, 6):
        rows = rater_rows(g, 6, 20, rank).float()[None]
        context = ScoringContext(vision_embeds=hidden, llm_hidden=hidden, rater_attention=rows,
                                 rater_mask=torch.ones(1, 6, dtype=torch.bool), adaptive_budget=True)
        counts[rank] = pruner.select(rows.mean(1), context).num_tokens
    # 20 - round_half_up(10 * (20 - rank) / 20) tokens (kept + merged) left: the whole plan (10) at rank 1, 13 at rank 6
    assert counts == {1: 10, 6: 13}


def test_full_retention_keeps_everything_and_merges_nothing():
    hidden = torch.randn(2, 7, 3)
    rows = torch.rand(2, 3, 7)
    context = ScoringContext(vision_embeds=hidden, llm_hidden=hidden, rater_attention=rows,
                             rater_mask=torch.ones(2, 3, dtype=torch.bool), adaptive_budget=True)
    sel = PRUNERS.get("sparsevlm")(retention=1.0).select(rows.mean(1), context)
    assert sel.keep_index.tolist() == [list(range(7))] * 2 and sel.extra_tokens is None


def test_an_adaptive_batch_with_different_counts_is_refused():
    g = torch.Generator().manual_seed(1)
    rows = torch.stack([rater_rows(g, 4, 12, 1), rater_rows(g, 4, 12, 4)]).float()
    hidden = torch.randn(2, 12, 3)
    context = ScoringContext(vision_embeds=hidden, llm_hidden=hidden, rater_attention=rows,
                             rater_mask=torch.ones(2, 4, dtype=torch.bool), adaptive_budget=True)
    with pytest.raises(ValueError, match="adapted counts differ"):
        PRUNERS.get("sparsevlm")(num_tokens=3).select(rows.mean(1), context)


def test_requirements_and_config():
    pruner = PRUNERS.get("sparsevlm")
    assert pruner().requirements().llm_hidden and pruner().requirements().rater_attention
    for bad in ({"recycle_ratio": 1.5}, {"cluster_ratio": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            pruner(**bad)
