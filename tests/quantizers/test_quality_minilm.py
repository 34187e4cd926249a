"""Quality orderings on real pretrained weights (all-MiniLM-L6-v2), measured on held-out sentences."""

import pytest
import torch

import qapframe
from tests.quantizers.minilm import calibration_inputs, embed, held_out_batch, load_minilm, quality

METHODS = {
    "rtn-w4a16-g128": {"name": "rtn", "scheme": "W4A16", "group_size": 128},
    "gptq-w4a16-g128": {"name": "gptq", "scheme": "W4A16", "group_size": 128},
    "awq-w4a16-g128": {"name": "awq", "scheme": "W4A16", "group_size": 128},
    "rtn-w4a16-pc": {"name": "rtn", "scheme": "W4A16", "group_size": -1},
    "rtn-w4a16-pc-sym": {"name": "rtn", "scheme": "W4A16", "group_size": -1, "symmetric": True},
    "rtn-w4a16-pc-sym-full": {"name": "rtn", "scheme": "W4A16", "group_size": -1, "symmetric": True,
                              "symmetric_grid": "full"},
    "gptq-w4a16-pc": {"name": "gptq", "scheme": "W4A16", "group_size": -1},
    "awq-w4a16-pc": {"name": "awq", "scheme": "W4A16", "group_size": -1},
    "rtn-w8a8": {"name": "rtn", "scheme": "W8A8", "group_size": -1},
    "smoothquant-w8a8": {"name": "smoothquant", "scheme": "W8A8", "group_size": -1},
    "smoothquant+gptq-w8a8": {"name": "smoothquant", "scheme": "W8A8", "group_size": -1, "weight_quantizer": "gptq"},
}


@pytest.fixture(scope="module")
def results():
    torch.manual_seed(0)
    batch = held_out_batch()
    reference = embed(load_minilm(), batch)
    calibration = calibration_inputs()
    return {name: quality(qapframe.quantize(load_minilm(), spec, calibration), reference, batch)
            for name, spec in METHODS.items()}


def test_the_full_symmetric_grid_beats_the_narrow_one(results):
    """16 levels instead of 15: a finer step on real weights, at the cost of clipping the largest by half a step."""
    full, narrow = results["rtn-w4a16-pc-sym-full"], results["rtn-w4a16-pc-sym"]
    assert full["rel_error"] < narrow["rel_error"] and full["cosine"] > narrow["cosine"], (full, narrow)


@pytest.mark.parametrize("grouping", ["g128", "pc"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_w4a16_beats_rtn(results, method, grouping):
    ours, rtn = results[f"{method}-w4a16-{grouping}"], results[f"rtn-w4a16-{grouping}"]
    assert ours["rel_error"] < rtn["rel_error"], (ours, rtn)
    assert ours["cosine"] > rtn["cosine"], (ours, rtn)


@pytest.mark.parametrize("method", ["smoothquant", "smoothquant+gptq"])
def test_w8a8_smoothquant_beats_rtn(results, method):
    ours, rtn = results[f"{method}-w8a8"], results["rtn-w8a8"]
    assert ours["rel_error"] < rtn["rel_error"], (ours, rtn)
    assert ours["cosine"] > rtn["cosine"], (ours, rtn)


def test_quantization_changes_the_model_but_keeps_it_sane(results):
    for name, r in results.items():
        assert 0 < r["rel_error"] < 0.5, name
        assert 0.9 < r["cosine"] < 1.0, name
