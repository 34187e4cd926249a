"""Exported checkpoints read by plain transformers compute what qapframe's fake-quantized model computes."""

import json

import pytest
import torch

from tests.deploy.conftest import LLAVA_CASES, MINILM_CASES

# Weight-only: transformers dequantizes the same codes with the same float32 scales (measured: 0).
WEIGHT_ONLY_RTOL = 1e-4
# Quantized activations cannot match to 1e-4, for two measured reasons; instead transformers' model must be
# as close to the fp model as qapframe's (within 25%), and close to qapframe's relative to that error:
# * compressed-tensors rounds x/s + zp where qapframe rounds x/s and adds z: float rounding of the sum
#   breaks a few .5 ties the other way (2 of 319488 activations in one MiniLM layer), one step each.
#   Measured: 0 (tiny LLaVA, dynamic), 9e-4 (LLaVA static), 1.4e-2 (MiniLM) against a W8A8 error of 1.3e-2
#   and 6.9e-2 from fp: at most 0.2 of it.
# * symmetric activations: compressed-tensors' scale is amax/127.5, qapframe's narrow grid's amax/127 (vLLM's
#   int8 convention too), another grid for every token: measured 1.1e-2 against an error of 1.3e-2 (0.85 of it).
#   On the full grid (act_symmetric_grid: full) the grids are the same and the asymmetric bound holds.
ASYMMETRIC_ACT_FRACTION = 0.5
SYMMETRIC_ACT_FRACTION = 1.0
SAME_ACCURACY = 1.25


def _acts(spec: dict) -> bool:
    return spec.get("scheme") in ("W8A8", "W4A8", "W4A4") or spec.get("act_bits", 16) < 16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _check(exported, spec: dict, case: str) -> None:
    rel = _rel(exported.plain[case], exported.reference[case])
    if not _acts(spec):
        assert rel <= WEIGHT_ONLY_RTOL, rel
        return
    error = _rel(exported.reference[case], exported.fp)  # qapframe's own quantization error
    narrow = spec.get("act_symmetric") and spec.get("act_symmetric_grid", "narrow") == "narrow"
    fraction = SYMMETRIC_ACT_FRACTION if narrow else ASYMMETRIC_ACT_FRACTION
    assert rel <= fraction * error, (rel, error)
    assert _rel(exported.plain[case], exported.fp) <= SAME_ACCURACY * error


@pytest.mark.parametrize("case", list(LLAVA_CASES))
def test_llava_plain_transformers_matches_qapframe(exported_llava, case):
    _check(exported_llava, LLAVA_CASES[case], case)


@pytest.mark.parametrize("case", list(MINILM_CASES))
def test_minilm_plain_transformers_matches_qapframe(exported_minilm, case):
    _check(exported_minilm, MINILM_CASES[case], case)


def test_quantization_config_describes_the_scheme(exported_llava):
    config = json.loads((exported_llava.directories["gptq-w4a16-g32-actorder"] / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    assert config["format"] == "pack-quantized"
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32,
                                "dynamic": False, "actorder": "static"}
    model = exported_llava.models["gptq-w4a16-g32-actorder"]
    fp = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(config["ignore"]) == fp
    assert "lm_head" in fp and any("vision_tower" in n for n in fp) and any("multi_modal_projector" in n for n in fp)


def test_mixed_strategies_get_one_config_group_each(exported_llava):
    config = json.loads((exported_llava.directories["rtn-w4a16-g64-mixed"] / "config.json").read_text())["quantization_config"]
    by_strategy = {g["weights"]["strategy"]: g for g in config["config_groups"].values()}
    assert set(by_strategy) == {"channel", "group"}
    assert all(t.endswith("mlp.down_proj") for t in by_strategy["group"]["targets"])  # the only 128-wide input


def test_w8a8_declares_activations(exported_llava):
    config = json.loads((exported_llava.directories["rtn-w8a8"] / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert config["format"] == "int-quantized"
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "token",
                                          "group_size": None, "dynamic": True, "actorder": None}
    static = json.loads((exported_llava.directories["gptq-w8a8-static"] / "config.json").read_text())["quantization_config"]
    assert all(g["input_activations"]["strategy"] == "tensor" and not g["input_activations"]["dynamic"]
               for g in static["config_groups"].values())
