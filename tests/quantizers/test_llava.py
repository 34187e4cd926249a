"""Every quantizer end to end on a tiny LlavaForConditionalGeneration: forward, generate, ignore rules."""

import pytest
import torch

import qapframe
from qapframe.pipeline import Pipeline
from qapframe.quantizers import QuantizedLinear
from tests.tiny_models import llava_inputs, tiny_llava

CASES = {
    "rtn-w4a4": {"name": "rtn", "scheme": "W4A4", "group_size": 32},
    "gptq-w4a16-actorder": {"name": "gptq", "scheme": "W4A16", "group_size": 32, "act_order": True},
    "awq-w4a8": {"name": "awq", "scheme": "W4A8", "group_size": 32, "grid_size": 5},
    "smoothquant-w8a8": {"name": "smoothquant", "scheme": "W8A8"},
    "smoothquant+gptq-w4a8-static": {"name": "smoothquant", "scheme": "W4A8", "weight_quantizer": "gptq",
                                     "act_dynamic": False, "group_size": 32},
    "awq+gptq-w4a16": {"name": "awq", "scheme": "W4A16", "group_size": -1, "weight_quantizer": "gptq",
                       "grid_size": 5},
}


@pytest.fixture(scope="module")
def calibration():
    return [llava_inputs(1, prompt_lengths=[4 + i % 3], seed=i) for i in range(6)]


@pytest.fixture(scope="module")
def inputs():
    return llava_inputs(2, prompt_lengths=[3, 7], seed=99)


@pytest.fixture(scope="module")
def reference(inputs):
    with torch.no_grad():
        return tiny_llava()(**inputs).logits


@pytest.mark.parametrize("case", list(CASES))
def test_quantizer_end_to_end(case, calibration, inputs, reference):
    model = qapframe.quantize(tiny_llava(), CASES[case], calibration)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    # ignore rules: exactly the LLM's Linears, never the vision tower, projector or lm_head
    expected = {n for n, m in tiny_llava().named_modules()
                if isinstance(m, torch.nn.Linear) and ".language_model." in n}
    assert set(quantized) == expected and len(expected) == 3 * 7
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if "vision_tower" in n and "proj" in n)
    assert all(m.quantized for m in quantized.values())
    act_bits = qapframe.QUANTIZERS.get(CASES[case]["name"])(**{k: v for k, v in CASES[case].items() if k != "name"}).config.act_bits
    for m in quantized.values():
        assert (m.act_quant is None) == (act_bits == 16)
        assert m.act_quant is None or m.act_quant.enabled
        w = m.weight_spec
        lo, hi = (-(2 ** (w.bits - 1)), 2 ** (w.bits - 1) - 1) if w.symmetric else (0, 2**w.bits - 1)
        assert int(m.codes.min()) >= lo and int(m.codes.max()) <= hi
    with torch.no_grad():
        logits = model(**inputs).logits
    rel = float((logits - reference).norm() / reference.norm())
    assert 0 < rel < 0.6
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 4)


def test_vision_tokens_pass_through_activation_quantizers(calibration, inputs):
    """In the W4A4 setting the projected vision tokens are quantized by the first LLM Linears."""
    model = qapframe.quantize(tiny_llava(), {"name": "rtn", "scheme": "W4A4"}, calibration)
    seen = []
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    q_proj.act_quant.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        model(**inputs)
    x, y = seen[0]
    image_positions = inputs["input_ids"] == 3
    assert x.shape[:2] == image_positions.shape and not torch.equal(x[image_positions], y[image_positions])


def test_pipeline_from_spec_quantizes_and_reports_activation_settings(calibration):
    pipeline = Pipeline.from_spec({"quantizer": {"name": "gptq", "scheme": "W4A4", "group_size": 32,
                                                 "act_group_size": 16}})
    assert pipeline.quant_settings == qapframe.QuantSettings(bits=4, group_size=16, symmetric=False)
    model = pipeline.apply(tiny_llava(), calibration)
    assert model.qapframe_quantization["name"] == "gptq"


def test_targets_and_ignore_patterns(calibration):
    spec = {"name": "rtn", "targets": ["re:layers\\.[01]\\."], "ignore": ["*mlp*", "*lm_head*", "*vision_tower*"]}
    model = qapframe.quantize(tiny_llava(), spec, calibration)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
    assert len(names) == 2 * 4 and all(".language_model.layers." in n and "self_attn" in n for n in names)
    # `ignore` replaces the defaults: without the vision-tower pattern its matching Linears are quantized too
    model = qapframe.quantize(tiny_llava(), {**spec, "ignore": ["*mlp*", "*lm_head*"]}, calibration)
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert sum("vision_tower" in n for n in names) == 2 * 4 and len(names) == 16
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        qapframe.quantize(tiny_llava(), {"name": "rtn", "targets": ["nothing*"]})


def test_calibration_required_where_needed():
    with pytest.raises(ValueError, match="needs calibration data"):
        qapframe.quantize(tiny_llava(), {"name": "gptq"})
    # RTN with dynamic activations needs none
    model = qapframe.quantize(tiny_llava(), {"name": "rtn", "scheme": "W4A4"})
    assert isinstance(model.model.language_model.layers[0].mlp.down_proj, QuantizedLinear)
