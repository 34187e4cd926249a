"""MustDrop's local window merging against a slow, direct version of the rule."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qapframe.strategies.base import PRUNERS, SCORERS, requirements_of
from qapframe.strategies.context import ScoringContext
from qapframe.strategies.pruners.mustdrop import window_ids, window_similarity


def slow_groups(x: torch.Tensor, grid: tuple[int, int, int], window: int, budget: int) -> list[list[int]]:
    """``x [N, D]`` float64 -> merged token sets, by looping over windows and pairs."""
    frames, rows, cols = grid
    windows = []
    for f in range(frames):
        for r0 in range(0, rows, window):
            for c0 in range(0, cols, window):
                windows.append([f * rows * cols + r * cols + c for r in range(r0, min(rows, r0 + window))
                                for c in range(c0, min(cols, c0 + window))])
    unit = torch.nn.functional.normalize(x, dim=-1)

    def similarity(w):
        if len(w) < 2:
            return -math.inf
        pairs = list(itertools.permutations(w, 2))
        return float(sum(unit[a] @ unit[b] for a, b in pairs)) / len(pairs)

    order = sorted(range(len(windows)), key=lambda i: (-similarity(windows[i]), i))
    need, groups, merged = x.shape[0] - budget, [], set()
    for i in order:
        if need == 0:
            break
        take = windows[i][: min(len(windows[i]), need + 1)]
        groups.append(take)
        merged.update(take)
        need -= len(take) - 1
    return groups + [[t] for t in range(x.shape[0]) if t not in merged]


@settings(max_examples=40, deadline=None)
@given(
    frames=st.integers(1, 2), rows=st.integers(1, 7), cols=st.integers(1, 7), window=st.integers(2, 3),
    fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
)
def test_the_most_similar_windows_merge_into_their_means_until_the_budget(frames, rows, cols, window, fraction, seed):
    n = frames * rows * cols
    windows = int(window_ids(((rows, cols),) * frames, window).max()) + 1
    budget = windows + round(fraction * (n - windows))
    if budget >= n:
        return
    g = torch.Generator().manual_seed(seed)
    looks = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)  # few looks: similar windows exist
    x = looks[:, torch.randint(0, 3, (n,), generator=g)] + 0.3 * torch.randn(2, n, 4, generator=g, dtype=torch.float64)
    grid = (frames, rows, cols) if frames > 1 or rows != cols else None
    selection = PRUNERS.get("mustdrop_merge")(num_tokens=budget, window=window).select(
        torch.zeros(2, n), ScoringContext(x, token_grid=grid if grid else None)
    )
    for b in range(2):
        groups = sorted(slow_groups(x[b], (frames, rows, cols), window, budget), key=min)
        assert selection.keep_index[b].tolist() == [min(gr) for gr in groups]
        expected = torch.zeros(budget, n, dtype=torch.float64)
        for j, gr in enumerate(groups):
            expected[j, gr] = 1.0 / len(gr)
        assert torch.allclose(selection.kept_weights[b], expected)


def test_window_similarity_is_the_mean_pairwise_cosine_and_windows_tile_the_grid():
    ids = window_ids(((4, 5),), 3)  # windows: cols 0-2 and 3-4, rows 0-2 and 3
    assert ids.view(4, 5).tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [2, 2, 2, 3, 3]]
    x = torch.randn(1, 20, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    similarity, size = window_similarity(x, ids, 4)
    assert size.tolist() == [9, 6, 3, 2]
    unit = torch.nn.functional.normalize(x[0], dim=-1)
    for w in range(4):
        members = (ids == w).nonzero().squeeze(-1).tolist()
        pairs = list(itertools.permutations(members, 2))
        assert similarity[0, w].item() == pytest.approx(float(sum(unit[a] @ unit[b] for a, b in pairs)) / len(pairs))


def test_a_flat_window_merges_first_and_the_llm_gets_its_mean():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 36, 8, generator=g)  # 6 x 6 grid, four 3 x 3 windows
    window = [r * 6 + c for r in range(3, 6) for c in range(3, 6)]  # the bottom-right one
    x[0, window] = torch.randn(8, generator=g) + 0.01 * torch.randn(9, 8, generator=g)
    selection = PRUNERS.get("mustdrop_merge")(num_tokens=28).select(torch.zeros(1, 36), ScoringContext(x))
    kept = selection.keep_index[0].tolist()
    assert 21 in kept and not set(window[1:]) & set(kept)  # merged into its top-left token
    assert torch.allclose(selection.gather(x)[0, kept.index(21)], x[0, window].mean(dim=0), atol=1e-6)


def test_budgets_below_one_token_per_window_and_unknown_layouts_are_refused():
    x = torch.randn(1, 64, 4)
    merge = PRUNERS.get("mustdrop_merge")
    with pytest.raises(ValueError, match=r"9 of 64 \(retention >= 0.141\), but its budget is 8"):
        merge(retention=0.125).select(torch.zeros(1, 64), ScoringContext(x))
    assert merge(retention=0.125, window=4).select(torch.zeros(1, 64), ScoringContext(x)).keep_index.shape == (1, 8)
    unknown = r"the adapter gave none \(token_layout, token_grid\) and 12 tokens are not a square grid"
    with pytest.raises(ValueError, match=unknown):
        merge(retention=0.5).select(torch.zeros(1, 12), ScoringContext(torch.randn(1, 12, 4)))
    with pytest.raises(ValueError, match="pruner 'mustdrop_merge' works only before the LLM"):
        requirements_of(SCORERS.get("mustdrop")(), merge())
