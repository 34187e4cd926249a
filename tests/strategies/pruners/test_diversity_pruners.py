"""DivPrune, VisPruner and DART pruners against slow direct implementations of their papers' rules."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qapframe.strategies.base import PRUNERS
from qapframe.strategies.context import ScoringContext


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 12), data=st.data())
def test_divprune_is_greedy_max_min_cosine_distance(seed, n, data):
    keep = data.draw(st.integers(1, n))
    x = torch.randn(2, n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sel = PRUNERS.get("divprune")(num_tokens=keep).select(torch.zeros(2, n), ScoringContext(vision_embeds=x))
    for b in range(2):
        d = [[1 - cos(x[b, i], x[b, j]) for j in range(n)] for i in range(n)]
        chosen = [max(range(n), key=lambda i: (min(d[i][j] for j in range(n) if j != i), -i))] if n > 1 else [0]
        while len(chosen) < keep:
            rest = [i for i in range(n) if i not in chosen]
            chosen.append(max(rest, key=lambda i: (min(d[i][j] for j in chosen), -i)))
        assert sel.keep_index[b].tolist() == sorted(chosen)


def vispruner_slow(x, scores, keep, ratio):
    n = len(scores)
    important = min(keep, round(ratio * keep))
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    chosen = sorted(order[:important])
    rest = [i for i in range(n) if i not in chosen]
    while len(rest) > keep - important:
        a, b = rest[0::2], rest[1::2]
        if not b:
            rest = rest[: keep - important]
            break
        red = {i: max(cos(x[i], x[j]) for j in b) for i in a}
        drop = min(len(rest) - (keep - important), len(a))
        dropped = set(sorted(a, key=lambda i: (red[i], i))[len(a) - drop :])
        rest = sorted(set(rest) - dropped)  # the most redundant go; ties keep the earlier token
    return sorted(chosen + rest)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 14), ratio=st.sampled_from([0.0, 0.25, 0.5, 1.0]), data=st.data())
def test_vispruner_important_then_deduplicated(seed, n, ratio, data):
    keep = data.draw(st.integers(1, n - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, 5, generator=g, dtype=torch.float64)
    scores = torch.rand(1, n, generator=g)
    sel = PRUNERS.get("vispruner")(num_tokens=keep, important_ratio=ratio).select(scores, ScoringContext(vision_embeds=x))
    assert sel.keep_index[0].tolist() == vispruner_slow(x[0], scores[0].tolist(), keep, ratio)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 12), pivots=st.integers(1, 4), norm=st.sampled_from(["l1", "l2"]), data=st.data())
def test_dart_keeps_pivots_and_least_duplicated(seed, n, pivots, norm, data):
    keep = data.draw(st.integers(1, n - 1))
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, n, 6, generator=g, dtype=torch.float64)
    keys = torch.randn(1, n, 4, generator=g, dtype=torch.float64)
    ctx = ScoringContext(vision_embeds=hidden, llm_hidden=hidden, llm_keys=keys)
    sel = PRUNERS.get("dart")(num_tokens=keep, num_pivots=pivots, norm=norm).select(torch.zeros(1, n), ctx)
    p = min(pivots, keep)
    size = [float(keys[0, i].abs().sum() if norm == "l1" else keys[0, i].norm()) for i in range(n)]
    piv = sorted(range(n), key=lambda i: (-size[i], i))[:p]
    dup = {i: max(cos(hidden[0, i], hidden[0, j]) for j in piv) for i in range(n) if i not in piv}
    others = sorted(dup, key=lambda i: (dup[i], i))[: keep - p]
    assert sel.keep_index[0].tolist() == sorted(piv + others)
    assert PRUNERS.get("dart")(k=3).requirements().text_attention_layer == 2
