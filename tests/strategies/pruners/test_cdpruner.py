"""CDPruner's pruner and scorer: the conditional kernel, text relevance and selection against references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qapframe.strategies.base import PRUNERS, SCORERS
from qapframe.strategies.context import ScoringContext


def context(seed, b=2, n=10, d=16, t=5):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    text = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -2:] = False  # first image's prompt is shorter
    return ScoringContext(vision_embeds=embeds, text_embeds=text, text_mask=mask, cls_attention=torch.rand(b, n, generator=g))


def test_relevance_is_the_mean_cosine_over_real_text_tokens():
    ctx = context(0)
    got = SCORERS.get("cdpruner")().score(ctx)
    for b in range(2):
        real = ctx.text_embeds[b][ctx.text_mask[b]]
        for i in range(ctx.num_tokens):
            v = ctx.vision_embeds[b, i]
            cos = [float(v @ t / (v.norm() * t.norm())) for t in real]
            assert abs(got[b, i].item() - sum(cos) / len(cos)) <= 1e-6
    assert SCORERS.get("cdpruner")().requirements().text_embeds


def log_det(kernel, idx):
    return math.log(max(torch.linalg.det(kernel[idx][:, idx]).item(), 1e-300))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), keep=st.integers(1, 6))
def test_selection_is_greedy_map_of_diag_r_S_diag_r(seed, keep):
    ctx = context(seed)
    scores = SCORERS.get("cdpruner")().score(ctx)
    sel = PRUNERS.get("cdpruner")(num_tokens=keep).select(scores, ctx)
    assert sel.keep_index.shape == (2, keep) and (sel.keep_index.diff(dim=-1) > 0).all()
    for b in range(2):
        s = scores[b].double()
        r = (s - s.min()) / (s.max() - s.min())
        unit = ctx.vision_embeds[b] / ctx.vision_embeds[b].norm(dim=-1, keepdim=True)
        kernel = r[:, None] * (unit @ unit.T) * r[None, :]
        # greedy by explicit determinants: the kept set's log det equals the reference greedy set's
        chosen = []
        for _ in range(keep):
            rest = [j for j in range(len(r)) if j not in chosen]
            chosen.append(max(rest, key=lambda j: torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]]).item()))
        if torch.linalg.det(kernel[chosen][:, chosen]).item() > 1e-12:
            assert abs(log_det(kernel, sel.keep_index[b]) - log_det(kernel, torch.tensor(chosen))) <= 1e-6


def test_conditional_kernel_is_diag_r_S_diag_r_across_strips():
    from qapframe.strategies.pruners.cdpruner import conditional_kernel

    g = torch.Generator().manual_seed(3)
    embeds, relevance = torch.randn(2, 300, 24, generator=g), torch.rand(2, 300, generator=g)
    unit = embeds.double() / embeds.double().norm(dim=-1, keepdim=True)
    r = relevance.double()
    expected = r[:, :, None] * (unit @ unit.transpose(1, 2)) * r[:, None, :]
    kernel = conditional_kernel(embeds, relevance)
    assert torch.equal(kernel, kernel.transpose(1, 2))
    torch.testing.assert_close(kernel.double(), expected, atol=1e-6, rtol=0)


def test_hybrid_relevance_plugs_into_the_kernel():
    """With the hybrid as scorer, the DPP's relevance is minmax(hybrid score): alpha=1 equals plain CDPruner."""
    ctx = context(3)
    ctx = ctx.with_(vision_embeds=ctx.vision_embeds.float(), text_embeds=ctx.text_embeds.float())  # the E kernel's dtypes
    pruner = PRUNERS.get("cdpruner")(num_tokens=4)
    plain = pruner.select(SCORERS.get("cdpruner")().score(ctx), ctx).keep_index
    semantic_only = SCORERS.get("hybrid")(alpha=1.0, semantic={"name": "cdpruner"})
    assert torch.equal(pruner.select(semantic_only.score(ctx), ctx).keep_index, plain)
    fused = SCORERS.get("hybrid")(alpha=0.0, semantic={"name": "cdpruner"}).score(ctx)  # SQ only
    assert fused.shape == (2, 10)
    assert pruner.select(fused, ctx).keep_index.shape == (2, 4)


def test_full_retention_keeps_everything_in_order():
    ctx = context(1)
    sel = PRUNERS.get("cdpruner")(retention=1.0).select(torch.rand(2, 10), ctx)
    assert torch.equal(sel.keep_index, torch.arange(10).expand(2, 10))


def test_missing_text_is_reported_by_field():
    with pytest.raises(ValueError, match="text_embeds"):
        SCORERS.get("cdpruner")().score(ScoringContext(vision_embeds=torch.randn(1, 4, 8)))
