"""ToMe's bipartite soft matching against a slow direct version of the paper's rule, and what it hands the LLM."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qapframe.strategies.base import PRUNERS
from qapframe.strategies.context import ScoringContext
from qapframe.strategies.pruners.tome import bipartite_merge


def tome_slow(keys: torch.Tensor, budget: int) -> tuple[list[int], list[list[int]]]:
    """One image, ``keys [N, Dk]`` float64: (survivors ascending, each survivor's members), round by round."""
    groups = [[i] for i in range(keys.shape[0])]  # the current tokens, in order, as lists of original tokens
    survivors = list(range(keys.shape[0]))  # the original token each current token sits at

    def key(g):
        return keys[g].mean(dim=0)

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    while len(groups) > budget:
        t = len(groups)
        r = min(t - budget, t // 2)
        a_side, b_side = list(range(0, t, 2)), list(range(1, t, 2))
        edges = []
        for a in a_side:
            sims = [cos(key(groups[a]), key(groups[b])) for b in b_side]
            best = max(sims)
            edges.append((best, a, b_side[sims.index(best)]))  # index(): the first most similar b
        edges.sort(key=lambda e: (-e[0], e[1]))  # strongest first, ties: the earlier a
        merged = {a: b for _, a, b in edges[:r]}
        for a, b in merged.items():
            groups[b] = groups[b] + groups[a]
        groups = [g for i, g in enumerate(groups) if i not in merged]
        survivors = [s for i, s in enumerate(survivors) if i not in merged]
    return survivors, [sorted(g) for g in groups]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 40), data=st.data())
def test_merging_matches_the_slow_rule_round_by_round(seed, n, data):
    budget = data.draw(st.integers(1, n))
    keys = torch.randn(2, n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    keep, group = bipartite_merge(keys, budget)
    assert keep.shape == (2, budget)
    for b in range(2):
        survivors, members = tome_slow(keys[b], budget)
        assert keep[b].tolist() == survivors
        assert [sorted((group[b] == k).nonzero().squeeze(-1).tolist()) for k in range(budget)] == members


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 30), metric=st.sampled_from(["keys", "embeds"]), data=st.data())
def test_the_llm_gets_each_groups_mean_at_its_survivors_position(seed, n, metric, data):
    budget = data.draw(st.integers(1, n - 1))
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(2, n, 6, generator=g, dtype=torch.float64)
    keys = torch.randn(2, n, 4, generator=g, dtype=torch.float64)
    pruner = PRUNERS.get("tome")(num_tokens=budget, metric=metric)
    sel = pruner.select(torch.zeros(2, n), ScoringContext(vision_embeds=embeds, vision_keys=keys))
    keep, group = bipartite_merge(keys if metric == "keys" else embeds, budget)
    assert torch.equal(sel.keep_index, keep) and sel.extra_tokens is None and sel.num_tokens == budget
    tokens = sel.gather(embeds)  # [2, budget, 6]
    for b in range(2):
        assert set(group[b].tolist()) == set(range(budget))  # every token in one group, no group empty
        for k in range(budget):
            members = (group[b] == k).nonzero().squeeze(-1)
            assert int(keep[b, k]) in members.tolist()  # a group sits where its survivor was
            assert torch.allclose(tokens[b, k], embeds[b, members].mean(dim=0), atol=1e-12)
            if members.numel() == 1:  # an unmerged token is passed on exactly
                assert torch.equal(tokens[b, k], embeds[b, int(keep[b, k])])


def test_twins_merge_into_one_token_each():
    """Adjacent identical pairs (even a, odd b) are each other's best match: 50 % leaves one of each."""
    unique = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0))
    twins = unique.repeat_interleave(2, dim=1)  # [1, 16, 16]: x0 x0 x1 x1 ...
    sel = PRUNERS.get("tome")(retention=0.5, metric="embeds").select(torch.zeros(1, 16), ScoringContext(vision_embeds=twins))
    assert sel.keep_index.tolist() == [list(range(1, 16, 2))]
    assert torch.allclose(sel.gather(twins), unique, atol=1e-6)


def test_a_blank_image_of_identical_tokens_meets_the_budget_deterministically():
    """Exact ties everywhere (a blank image's tokens are identical): the earliest b takes every a."""
    blank = torch.randn(1, 1, 8).expand(2, 64, 8).contiguous()
    keep, group = bipartite_merge(blank, 8)
    assert keep.shape == (2, 8) and torch.equal(keep[0], keep[1]) and torch.equal(group[0], group[1])
    assert set(group[0].tolist()) == set(range(8))
    keep_one, group_one = bipartite_merge(blank[:1], 8)
    assert torch.equal(keep_one[0], keep[0]) and torch.equal(group_one[0], group[0])


def test_full_retention_keeps_every_token_unmerged():
    x = torch.randn(3, 10, 4)
    sel = PRUNERS.get("tome")(retention=1.0).select(torch.zeros(3, 10), ScoringContext(vision_embeds=x))
    assert sel.kept_weights is None and torch.equal(sel.gather(x), x)


def test_keys_are_required_unless_the_metric_is_the_embeddings():
    assert PRUNERS.get("tome")().requirements().vision_keys
    assert not PRUNERS.get("tome")(metric="embeds").requirements().vision_keys
    with pytest.raises(ValueError, match="tome pruner.*vision_keys"):
        PRUNERS.get("tome")(retention=0.5).select(torch.zeros(1, 8), ScoringContext(vision_embeds=torch.randn(1, 8, 4)))
    with pytest.raises(Exception, match="metric"):
        PRUNERS.get("tome")(metric="queries")


def test_an_in_llm_scorer_is_refused_before_anything_is_attached():
    from qapframe.models import adapter_for
    from qapframe.strategies.base import SCORERS
    from tests.tiny_models import tiny_llava

    model = tiny_llava(seed=0, num_layers=4)
    with pytest.raises(ValueError, match="pruner 'tome' works only before the LLM.*scorer 'fastv'"):
        adapter_for(model).install(model, SCORERS.get("fastv")(k=2), PRUNERS.get("tome")(retention=0.25))
    assert not hasattr(model, "qapframe_installation")


def test_structural_tokens_pass_through_and_groups_stay_within_the_prunable_ones():
    """LLaVA-NeXT/OneVision newlines are never merged: their rows of the weights are one-hot."""
    from qapframe.models.pruning import ImageTokens, select_per_image
    from qapframe.strategies.base import SCORERS

    g = torch.Generator().manual_seed(3)
    features = torch.randn(14, 6, generator=g, dtype=torch.float64)
    prunable = torch.ones(14, dtype=torch.bool)
    prunable[[4, 9, 13]] = False  # three newlines
    image = ImageTokens(features, prunable, keys=torch.randn(14, 4, generator=g, dtype=torch.float64))
    (sel,) = select_per_image(SCORERS.get("l2norm")(), PRUNERS.get("tome")(num_tokens=3), [image], None, 0)
    assert sel.num_tokens == 6 and {4, 9, 13} <= set(sel.keep_index.tolist())
    tokens = sel.tokens(features)
    assert torch.equal(sel.keep_index, sel.keep_index.sort().values)
    for row, kept in enumerate(sel.keep_index.tolist()):
        members = sel.kept_weights[row].nonzero().squeeze(-1).tolist()
        assert kept in members
        if not prunable[kept]:
            assert members == [kept] and torch.equal(tokens[row], features[kept])
        else:
            assert all(prunable[m] for m in members)
            assert torch.allclose(tokens[row], features[members].mean(dim=0), atol=1e-12)
    assert sorted(sum((sel.kept_weights[r].nonzero().squeeze(-1).tolist() for r in range(6)), [])) == list(range(14))
