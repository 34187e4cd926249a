"""SparseVLM scorer: text raters by relevance, scores = the raters' mean attention, stages as requirements."""

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from qapframe.models.installation import HookingAdapter
from qapframe.strategies.base import SCORERS
from qapframe.strategies.context import Requirements, ScoringContext
from qapframe.strategies.scorers.sparsevlm import text_raters


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), t=st.integers(1, 9))
def test_raters_are_the_text_tokens_at_or_above_the_mean_relevance(seed, n, t):
    g = torch.Generator().manual_seed(seed)
    vision, text = torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(t, 6, generator=g, dtype=torch.float64)
    relevance = [0.0] * t
    for j in range(n):  # softmax over the text tokens of each vision token's dot products, averaged over vision tokens
        logits = [float(vision[j] @ text[i]) for i in range(t)]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        for i in range(t):
            relevance[i] += weights[i] / sum(weights) / n
    mean = sum(relevance) / t
    expected = [r >= mean - 1e-12 for r in relevance]
    assert text_raters(vision, text).tolist() == expected
    assert any(expected)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), r=st.integers(1, 5), n=st.integers(1, 8), data=st.data())
def test_score_is_the_mean_over_real_raters(seed, b, r, n, data):
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(b, r, n, generator=g)
    counts = [data.draw(st.integers(1, r)) for _ in range(b)]
    mask = torch.tensor([[i < c for i in range(r)] for c in counts])
    rows = rows * mask[..., None]  # padding rows are 0, as the adapter pads them
    context = ScoringContext(vision_embeds=torch.randn(b, n, 3), rater_attention=rows, rater_mask=mask)
    scores = SCORERS.get("sparsevlm")().score(context)
    for i, c in enumerate(counts):
        assert torch.allclose(scores[i], rows[i, :c].mean(0))


def test_requirements_ask_for_stages_and_raters():
    scorer = SCORERS.get("sparsevlm")()
    req = scorer.requirements()
    assert req.in_llm and req.rater_attention and req.text_raters is text_raters
    assert req.stage_fractions == (3 / 32, 7 / 32, 0.5)
    with pytest.raises(ValueError, match="different in-LLM pruning points"):
        req.union(Requirements(text_attention_layer=1))
    with pytest.raises(ValueError, match="text raters by different rules"):
        req.union(Requirements(text_raters=lambda v, t: torch.ones(t.shape[0], dtype=torch.bool)))
    assert req.union(Requirements(llm_hidden=True, rater_attention=True)).text_raters is text_raters
    with pytest.raises(ValueError, match="needs `rater_attention`"):
        scorer.score(ScoringContext(vision_embeds=torch.randn(1, 4, 2)))


def test_default_stages_are_the_papers_layers_on_a_32_layer_llm():
    model = SimpleNamespace(model=SimpleNamespace(language_model=SimpleNamespace(layers=[None] * 32)))
    assert HookingAdapter.ranking_layers(model, SCORERS.get("sparsevlm")().requirements()) == [2, 6, 15]


@pytest.mark.parametrize("stages", [[0.5, 0.25], [0.0, 0.5], [0.5, 0.5], [], [1.0]])
def test_bad_stages_are_rejected(stages):
    with pytest.raises(ValidationError, match="stages"):
        SCORERS.get("sparsevlm")(stages=stages)
