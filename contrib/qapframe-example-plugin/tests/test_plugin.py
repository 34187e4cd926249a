"""The plugin works through qapframe's public surface only: registries, specs, pipeline."""

import torch

import qapframe
from qapframe_example_plugin.quantizers import E4M3_MAX, FP8WeightQuantizer, fp8_round_trip
from qapframe_example_plugin.scorers import ChannelVarianceScorer


def test_entry_points_register_both_strategies():
    assert qapframe.SCORERS.get("channel-variance") is ChannelVarianceScorer
    assert qapframe.QUANTIZERS.get("fp8-weights") is FP8WeightQuantizer
    assert qapframe.SCORERS.entry("channel-variance").source.startswith("qapframe-example-plugin 0.1.0")


def test_channel_variance_matches_float64_variance():
    x = torch.randn(2, 7, 33)
    scores = ChannelVarianceScorer().score(qapframe.ScoringContext(vision_embeds=x))
    expected = x.double().var(dim=-1, unbiased=False)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)


def test_fp8_round_trip_relative_error_is_bounded_by_e4m3_precision():
    w = torch.randn(16, 64) * torch.logspace(-2, 2, 64)  # wide dynamic range across columns
    out = fp8_round_trip(w)
    row_max = w.abs().amax(dim=1, keepdim=True)
    # Normal E4M3 numbers carry 3 mantissa bits: relative error <= 2^-4 above the subnormal range.
    normal = w.abs() >= row_max / E4M3_MAX * 2**-6
    assert ((out - w).abs() <= w.abs() * 2**-4 + 1e-12)[normal].all()
    # The row maximum maps onto E4M3_MAX, which is representable: only float32 rounding remains.
    torch.testing.assert_close(out.abs().amax(dim=1), row_max.squeeze(1), rtol=1e-6, atol=0)


def test_spec_with_plugin_strategies_validates_and_quantizes_only_targets():
    spec = qapframe.load_spec({"quantizer": {"name": "fp8-weights", "ignore": ["*skip*"]}, "scorer": {"name": "channel-variance"}})
    pipeline = qapframe.Pipeline.from_spec(spec)
    model = torch.nn.ModuleDict({"keep": torch.nn.Linear(8, 8), "skip": torch.nn.Linear(8, 8)})
    before = {k: m.weight.detach().clone() for k, m in model.items()}
    pipeline.quantizer.apply(model)
    assert not torch.equal(model["keep"].weight, before["keep"])
    assert torch.equal(model["skip"].weight, before["skip"])
