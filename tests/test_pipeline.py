"""The library API: pipelines from specs or objects, `qapframe.quantize` accepting every quantizer form."""

import pytest
import torch

import qapframe
from qapframe import Pipeline, Quantizer, QapframeError, StrategyConfig
from qapframe.quantizers.base import QUANTIZERS
from qapframe.strategies.pruners.topk import TopKPruner
from qapframe.strategies.scorers.baselines import L2NormScorer


class HalveConfig(StrategyConfig):
    factor: float = 0.5
    act_bits: int = 16


class HalveWeights(Quantizer):
    """A transparent test quantizer: multiplies every Linear weight by ``factor``."""

    Config = HalveConfig

    def apply(self, model, calibration=None):
        self.calibration_seen = list(calibration or [])
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data.mul_(self.config.factor)
        return model

    def activation_settings(self):
        return None if self.config.act_bits == 16 else {"bits": self.config.act_bits, "group_size": -1, "symmetric": True}


@pytest.fixture
def halve_registered():
    QUANTIZERS.add("test-halve", HalveWeights, "tests")
    yield
    QUANTIZERS.reload()


@pytest.mark.parametrize("form", ["object", "dict", "spec"])
def test_quantize_accepts_object_dict_or_spec(form, halve_registered):
    quantizer = {
        "object": HalveWeights(factor=0.25),
        "dict": {"name": "test-halve", "factor": 0.25},
        "spec": qapframe.spec.QuantizerSpec(name="test-halve", factor=0.25),
    }[form]
    model = torch.nn.Linear(4, 4)
    weight = model.weight.detach().clone()
    assert qapframe.quantize(model, quantizer, calibration=[{"x": 1}]) is model
    torch.testing.assert_close(model.weight, weight * 0.25)


def test_quantize_rejects_other_types():
    with pytest.raises(TypeError, match="expected a Quantizer"):
        qapframe.quantize(torch.nn.Linear(2, 2), 42)


def test_from_spec_builds_every_strategy_and_a_default_pruner(halve_registered):
    pipeline = Pipeline.from_spec({"quantizer": {"name": "test-halve", "act_bits": 4}, "scorer": {"name": "l2norm"}})
    assert isinstance(pipeline.quantizer, HalveWeights) and isinstance(pipeline.scorer, L2NormScorer)
    assert isinstance(pipeline.pruner, TopKPruner) and pipeline.pruner.config.retention == 0.125
    assert pipeline.quant_settings == qapframe.QuantSettings(bits=4, group_size=-1, symmetric=True)
    assert Pipeline(quantizer=HalveWeights()).quant_settings is None


def test_from_spec_refuses_a_sweep_and_a_pruner_alone_is_an_error():
    with pytest.raises(QapframeError, match="sweep"):
        Pipeline.from_spec({"scorer": {"name": "random"}, "sweep": {"pruner.retention": [0.5, 0.25]}})
    with pytest.raises(ValueError, match="needs a scorer"):
        Pipeline(pruner={"name": "topk"})


def test_apply_without_strategies_returns_the_model_unchanged():
    model = torch.nn.Linear(3, 3)
    weight = model.weight.detach().clone()
    assert Pipeline().apply(model) is model
    assert torch.equal(model.weight, weight)


def test_strategies_accept_config_or_keywords_but_not_both():
    assert TopKPruner(retention=0.5).config.retention == 0.5
    assert TopKPruner({"num_tokens": 3}).budget(10) == 3
    with pytest.raises(TypeError, match="not both"):
        TopKPruner({"retention": 0.5}, retention=0.25)
    assert TopKPruner(retention=0.01).budget(10) == 1  # never an empty image


def test_wrapped_generate_prunes_without_the_callers_no_grad():
    """`model.generate` "used as usual" (grad mode on, as in a fresh session) on a pipeline whose hybrid
    scorer runs the numba kernel: the pruning before generate must not see tensors that require grad."""
    from qapframe import Pipeline
    from tests.tiny_models import llava_inputs, tiny_llava

    inputs = llava_inputs(batch_size=2, prompt_lengths=[4, 6])
    model = Pipeline(scorer={"name": "hybrid"}, pruner={"name": "topk", "retention": 0.25}).apply(tiny_llava())
    with torch.enable_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, reference) and not out.requires_grad
    assert [s.num_tokens for s in model.qapframe_last_selection["selections"]] == [4, 4]  # 25 % of 16


def test_a_spec_quantizer_calibrates_on_every_record_evaluation_builds():
    """evaluation.calibration_samples governs: the quantizer uses all the records built (here 40, above the
    quantizer's former default cap of 32), the same as a quantizer told 40 explicitly."""
    from qapframe import Pipeline, load_spec
    from tests.tiny_models import llava_inputs, tiny_llava

    calibration = [llava_inputs(seed=i) for i in range(40)]

    def samples_seen(quantizer: dict) -> int:
        spec = load_spec({"quantizer": quantizer, "evaluation": {"calibration_samples": 40}})
        model = tiny_llava()
        seen = []
        block = model.model.language_model.layers[0]
        handle = block.register_forward_pre_hook(lambda module, args, kwargs: seen.append(1), with_kwargs=True)
        Pipeline.from_spec(spec).apply(model, calibration)
        handle.remove()
        return len(seen)

    static = {"name": "rtn", "scheme": "W4A4", "act_dynamic": False}
    assert samples_seen(static) == samples_seen({**static, "calibration_samples": 40}) >= 40
