"""Hybrid (QAPruner) scorer against a float64 hand computation."""

import pytest
import torch
from pydantic import ValidationError

from qapframe.strategies.base import SCORERS
from qapframe.strategies.context import QuantSettings, ScoringContext


def quant_error_f64(x: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """||x - Q(x)||_2 per token, quantizing each channel group independently, in float64."""
    x = x.double()
    out = torch.zeros(x.shape[:-1], dtype=torch.float64)
    for start in range(0, x.shape[-1], group):
        chunk = x[..., start : start + group]
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            scale = chunk.abs().amax(-1, keepdim=True) / qmax
            deq = torch.clamp(torch.round(chunk / scale), -qmax - 1, qmax) * scale
        else:
            qmax = 2**bits - 1
            lo, hi = chunk.amin(-1, keepdim=True), chunk.amax(-1, keepdim=True)
            scale = (hi - lo) / qmax
            zero = torch.round(-lo / scale)
            deq = (torch.clamp(torch.round(chunk / scale) + zero, 0, qmax) - zero) * scale
        out += ((chunk - deq) ** 2).sum(-1)
    return out.sqrt()


def minmax_f64(s: torch.Tensor) -> torch.Tensor:
    s = s.double()
    lo, hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
    return (s - lo) / (hi - lo)


def context(seed=0, quant=None):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(3, 20, 64, generator=g) * torch.linspace(0.2, 3.0, 20)[:, None]
    return ScoringContext(vision_embeds=embeds, cls_attention=torch.rand(3, 20, generator=g), quant=quant)


@pytest.mark.parametrize(
    "params,quant,expect",
    [
        ({}, None, (4, 128, True)),  # e_mode=paper: INT4, group 128, symmetric, per token
        # the pipeline's settings do not move the paper's E ...
        ({"alpha": 0.3}, QuantSettings(bits=3, group_size=16, symmetric=False), (4, 128, True)),
        # ... explicit overrides do
        ({"alpha": 0.7, "bits": 8, "group_size": 32}, QuantSettings(bits=3, group_size=16, symmetric=True), (8, 32, True)),
        ({"quant_error_weight": 1.0, "outlier_weight": 0.0, "group_size": 16, "symmetric": False}, None, (4, 16, False)),
        ({"quant_error_weight": 0.0, "outlier_weight": 1.0}, None, (4, 128, True)),
    ],
)
def test_hybrid_matches_float64_formula(params, quant, expect):
    ctx = context(quant=quant)
    scorer = SCORERS.get("hybrid")(**params)
    c = scorer.config
    bits, group, symmetric = expect
    e = quant_error_f64(ctx.vision_embeds, bits, group, symmetric)
    r = ctx.vision_embeds.double().amax(-1) - ctx.vision_embeds.double().amin(-1)
    sq = c.quant_error_weight * minmax_f64(e) + c.outlier_weight * minmax_f64(r)
    expected = c.alpha * minmax_f64(ctx.cls_attention) + (1 - c.alpha) * sq
    got = scorer.score(ctx)
    assert got.shape == (3, 20) and got.dtype == torch.float32
    assert (got.double() - expected).abs().max() <= 1e-5


def test_alpha_one_is_the_semantic_ranking():
    ctx = context()
    got = SCORERS.get("hybrid")(alpha=1.0, semantic={"name": "l2norm"}).score(ctx)
    assert torch.equal(got.argsort(-1), ctx.vision_embeds.norm(dim=-1).argsort(-1))


def test_requirements_follow_the_semantic_scorer():
    assert SCORERS.get("hybrid")().requirements().cls_attention
    assert SCORERS.get("hybrid")(semantic={"name": "fastv", "k": 4}).requirements().text_attention_layer == 3
    assert not SCORERS.get("hybrid")().requirements().activation_error
    assert SCORERS.get("hybrid")(e_mode="pipeline").requirements().activation_error


def test_empty_sq_is_rejected():
    with pytest.raises(ValidationError, match="SQ is empty"):
        SCORERS.get("hybrid")(quant_error_weight=0.0, outlier_weight=0.0)


def test_pipeline_mode_uses_the_adapter_measured_error():
    ctx = context()
    error = torch.rand(3, 20, generator=torch.Generator().manual_seed(5))
    got = SCORERS.get("hybrid")(e_mode="pipeline", quant_error_weight=1.0, outlier_weight=0.0, alpha=0.0).score(ctx.with_(activation_error=error))
    assert (got.double() - minmax_f64(error)).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="e_mode='pipeline'"):
        SCORERS.get("hybrid")(e_mode="pipeline").score(ctx)  # no activation quantizer in this pipeline
    with pytest.raises(ValidationError, match="only apply to e_mode='paper'"):
        SCORERS.get("hybrid")(e_mode="pipeline", bits=8)


def test_e_mode_is_part_of_the_serialized_config():
    assert SCORERS.get("hybrid")().config.model_dump()["e_mode"] == "paper"
