import pytest
from pydantic import ValidationError

from qapframe.errors import SpecError
from qapframe.quantizers import QUANTIZERS, PRESETS
from qapframe.quantizers.config import QuantizerConfig
from qapframe.spec import load_spec


def test_builtins_are_registered():
    assert {"rtn", "gptq", "awq", "smoothquant"} <= set(QUANTIZERS.names())


@pytest.mark.parametrize("scheme", sorted(PRESETS))
def test_scheme_sets_bits(scheme):
    cfg = QuantizerConfig(scheme=scheme)
    assert (cfg.weight_bits, cfg.act_bits) == PRESETS[scheme]
    assert (cfg.act_spec is None) == (PRESETS[scheme][1] == 16)


def test_default_is_w4a16_per_group_with_default_ignores():
    cfg = QuantizerConfig()
    assert (cfg.weight_bits, cfg.act_bits, cfg.group_size) == (4, 16, 128)
    assert "*lm_head*" in cfg.ignore and "*vision_tower*" in cfg.ignore and "*multi_modal_projector*" in cfg.ignore


@pytest.mark.parametrize(
    "params, field",
    [
        ({"scheme": "W4A4", "act_bits": 8}, "act_bits"),
        ({"weight_bits": 1}, "weight_bits"),
        ({"weight_bits": 9}, "weight_bits"),
        ({"act_bits": 3}, "act_bits"),
        ({"group_size": 0}, "group_size"),
        ({"act_group_size": -2}, "act_group_size"),
        ({"scheme": "W3A3"}, "scheme"),
        ({"bits": 4}, "bits"),
        ({"symmetric_grid": "wide"}, "symmetric_grid"),
    ],
)
def test_bad_values_name_the_field(params, field):
    with pytest.raises(ValidationError) as info:
        QuantizerConfig(**params)
    assert field in str(info.value)


def test_activation_settings_follow_config():
    gptq = QUANTIZERS.get("gptq")
    assert gptq(scheme="W4A16").activation_settings() is None
    settings = gptq(scheme="W4A4", act_group_size=64, act_symmetric=True).activation_settings()
    assert settings == {"bits": 4, "group_size": 64, "symmetric": True, "full_range": False}
    full = gptq(scheme="W4A4", act_symmetric=True, act_symmetric_grid="full").activation_settings()
    assert full["full_range"] is True


def test_composed_quantizer_from_spec_is_validated():
    spec = load_spec({"quantizer": {"name": "smoothquant", "scheme": "W8A8", "alpha": 0.6,
                                    "weight_quantizer": "gptq", "gptq": {"act_order": True}}})
    quantizer = spec.quantizer.build()
    assert quantizer.config.weight_quantizer == "gptq" and quantizer.config.gptq.act_order
    assert quantizer.config.alpha == 0.6 and quantizer.config.weight_bits == 8
    with pytest.raises(SpecError) as info:
        load_spec({"quantizer": {"name": "awq", "weight_quantizer": "awq"}})
    assert "quantizer.weight_quantizer" in str(info.value)
    with pytest.raises(SpecError) as info:
        load_spec({"quantizer": {"name": "gptq", "dampening": 2.0}})
    assert "quantizer.dampening" in str(info.value)


def test_smoothquant_defaults_to_w8a8_per_channel():
    cfg = QUANTIZERS.get("smoothquant")().config
    assert (cfg.weight_bits, cfg.act_bits, cfg.group_size, cfg.alpha) == (8, 8, -1, 0.5)


def test_scheme_can_be_swept():
    spec = load_spec({"quantizer": {"name": "gptq", "scheme": "W4A16"},
                      "sweep": {"quantizer.scheme": ["W4A16", "W8A8", "W4A4"]}})
    bits = [(s.quantizer.config.weight_bits, s.quantizer.config.act_bits) for s in spec.expand()]
    assert bits == [(4, 16), (8, 8), (4, 4)]
    dumped = QUANTIZERS.get("gptq")(scheme="W8A8").config.model_dump()
    assert "weight_bits" not in dumped and QuantizerConfig.model_validate(
        {k: v for k, v in dumped.items() if k in QuantizerConfig.model_fields}).act_bits == 8
