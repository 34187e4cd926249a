"""MustDrop's dual-attention score against the paper's threshold rule, computed directly."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qapframe.strategies.base import SCORERS
from qapframe.strategies.context import ScoringContext


def passes_rule(rows: list[list[float]], j: int, global_threshold: float, individual_threshold: float) -> bool:
    """The authors' filter for one token: kept unless both its summed and its largest attention are low."""
    total = [sum(r[i] for r in rows) for i in range(len(rows[0]))]
    return total[j] >= global_threshold * sum(total) or max(r[j] for r in rows) >= individual_threshold


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(1, 5), n=st.integers(1, 10), data=st.data())
def test_a_token_scores_at_least_one_exactly_when_the_papers_rule_keeps_it(seed, r, n, data):
    g = torch.Generator().manual_seed(seed)
    real = data.draw(st.integers(1, r))
    rows = torch.rand(1, r, n, generator=g, dtype=torch.float64).softmax(-1)
    mask = torch.tensor([[i < real for i in range(r)]])
    rows[0, real:] = 0.0
    global_threshold, individual_threshold = data.draw(st.floats(0.01, 0.3)), data.draw(st.floats(0.05, 0.5))
    scorer = SCORERS.get("mustdrop")(global_threshold=global_threshold, individual_threshold=individual_threshold,
                                    key_ratio=0.0)
    scores = scorer.score(ScoringContext(torch.zeros(1, n, 2), rater_attention=rows, rater_mask=mask))
    lists = rows[0, :real].tolist()
    for j in range(n):
        if abs(float(scores[0, j]) - 1.0) > 1e-6:  # away from the boundary, where float32 rounding decides
            assert (float(scores[0, j]) >= 1.0) == passes_rule(lists, j, global_threshold, individual_threshold)


def test_the_top_k_is_the_rule_with_both_thresholds_scaled_by_one_factor():
    g = torch.Generator().manual_seed(3)
    rows = torch.rand(1, 4, 30, generator=g, dtype=torch.float64).pow(4).softmax(-1)
    scorer = SCORERS.get("mustdrop")(global_threshold=0.01, individual_threshold=0.02, key_ratio=0.0)
    context = ScoringContext(torch.zeros(1, 30, 2), rater_attention=rows, rater_mask=torch.ones(1, 4, dtype=torch.bool))
    scores = scorer.score(context)
    lists = rows[0].tolist()
    for factor in (0.5, 1.0, 1.5, 2.0, 3.0):
        kept = {j for j in range(30) if passes_rule(lists, j, 0.01 * factor, 0.02 * factor)}
        top = set(scores[0].topk(len(kept)).indices.tolist()) if kept else set()
        assert top == kept


def test_key_tokens_rank_first_in_their_own_order():
    g = torch.Generator().manual_seed(4)
    n = 25
    rows = torch.rand(2, 3, n, generator=g).softmax(-1)
    cls = torch.rand(2, n, generator=g)
    context = ScoringContext(torch.zeros(2, n, 2), cls_attention=cls, rater_attention=rows,
                             rater_mask=torch.ones(2, 3, dtype=torch.bool))
    plain = SCORERS.get("mustdrop")(key_ratio=0.0).score(context)
    scores = SCORERS.get("mustdrop")(key_ratio=0.08).score(context)
    keys = math.ceil(0.08 * n)  # 2
    for b in range(2):
        key = cls[b].topk(keys).indices
        assert set(scores[b].topk(keys).indices.tolist()) == set(key.tolist())
        others = torch.ones(n, dtype=torch.bool)
        others[key] = False
        assert torch.equal(scores[b, others], plain[b, others])  # the rest keep their dual scores
        assert torch.equal(scores[b, key].argsort(), plain[b, key].argsort())


def test_requirements_are_the_authors_stages_every_text_token_and_cls_attention():
    req = SCORERS.get("mustdrop")().requirements()
    assert req.in_llm and req.rater_attention and req.cls_attention and req.text_raters is None
    assert req.stage_fractions == (3 / 32, 7 / 32, 11 / 32, 15 / 32)
