"""research/toy/check.py: its statistics against closed forms and float64 references, and the whole check on the
shipped toy through qapframe's own Pipeline."""

import numpy as np
import pytest
import torch

from research.toy.check import W4A4_RTN, answer_changes, linear_input_outliers, outlier_stats, prepared, run_check
from tests.tiny_models import llava_inputs, tiny_llava


@pytest.fixture(scope="module")
def toy():
    from qapframe.toy import load_toy

    torch.set_num_threads(1)
    return load_toy()


def test_configurations_are_fresh_copies_through_the_registered_strategies(toy):
    from qapframe.quantizers import QuantizedLinear

    model, processor = toy
    before = {n: p.clone() for n, p in model.named_parameters()}
    quantized = prepared(model, processor, quantizer=W4A4_RTN, calibration_size=2)
    linears = [m for m in quantized.model.language_model.modules() if isinstance(m, QuantizedLinear)]
    assert linears and all(m.weight_spec.bits == 4 for m in linears)
    assert not any(isinstance(m, QuantizedLinear) for m in quantized.model.vision_tower.modules())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the toy itself is untouched


def test_degeneracy_check_reports_both_axes_and_why(toy):
    model, processor = toy
    results = run_check(model, processor, size=20, batch_size=10)
    for key in ("fp_dense", "fp_blank_image", "w4a4_rtn_dense", "fp_random_12.5%", "fp_l2norm_25%",
                "w4a4_rtn_l2norm_12.5%"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["fp_dense"] > results["fp_blank_image"]
    assert 0 <= results["w4a4_rtn_changed_answers"] <= 20
    # the outliers of the shipped toy sit in the inputs of down_proj (docs/toy.md)
    assert results["max_kurtosis_down_proj"] > 50 > results["max_kurtosis_q_proj"]


def test_outlier_stats_closed_forms():
    signs = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]])
    stats = outlier_stats(signs)  # every standardized entry is +-1
    assert stats["kurtosis"] == 1.0 and stats["channel_peak_ratio"] == 1.0
    gaussian = torch.randn(200_000, 8, generator=torch.Generator().manual_seed(0))
    assert abs(outlier_stats(gaussian)["kurtosis"] - 3.0) < 0.1
    scaled = signs.clone()
    scaled[:, 2] *= 10  # one outlier channel
    assert outlier_stats(scaled)["channel_peak_ratio"] == 10.0


def test_linear_input_outliers_cover_every_llm_linear_and_match_a_float64_reference():
    model = tiny_llava(seed=0).eval()
    inputs = llava_inputs(batch_size=2)
    stats = linear_input_outliers(model, inputs)
    names = {n for n, m in model.model.language_model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(stats) == names
    seen = {}
    layer = model.model.language_model.layers[1].mlp.down_proj
    hook = layer.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach()))
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).double().numpy()
    z = (x - x.mean()) / x.std()
    peaks = np.abs(x).max(axis=0)
    expected = {"kurtosis": (z**4).mean(), "channel_peak_ratio": peaks.max() / np.median(peaks)}
    for key, value in expected.items():
        assert abs(stats["layers.1.mlp.down_proj"][key] - value) < 1e-6 * max(1.0, value), key
    assert not layer._forward_pre_hooks  # the hooks are removed


def test_answer_changes_count_flips_and_correct_answers_per_type():
    from qapframe.data.synthetic import make_record

    records = [make_record(0, "test", i) for i in range(12)]
    before = [r.answer for r in records]
    after = list(before)
    after[0] = "zzz"  # a correct answer turned wrong
    after[1] = " " + after[1] + " "  # whitespace only: not a change
    table = answer_changes(before, after, records)
    assert sum(row["questions"] for row in table.values()) == 12
    assert sum(row["changed"] for row in table.values()) == 1
    assert sum(row["correct_before"] for row in table.values()) == 12
    assert sum(row["correct_after"] for row in table.values()) == 11
    assert table[records[0].meta["type"]]["changed"] == 1
