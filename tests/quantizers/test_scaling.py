"""SmoothQuant / AWQ scaling keeps the fp function (before quantization), on MiniLM and a tiny LLaVA."""

import pytest
import torch

from qapframe.quantizers import QUANTIZERS, QuantizedLinear
from qapframe.quantizers import awq as awq_module
from qapframe.quantizers import smoothquant as smoothquant_module
from qapframe.quantizers.awq import awq_scales, clip_search
from qapframe.quantizers.config import WeightSpec
from qapframe.quantizers.smoothquant import smoothing_scales
from tests.quantizers.minilm import calibration_inputs, held_out_batch, load_minilm
from tests.tiny_models import llava_inputs, tiny_llava


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _smoothed_only(monkeypatch, module, name, model, calibration, **params):
    """Run a scaling quantizer with its weight quantization step removed: scaling alone."""
    monkeypatch.setattr(module, "quantize_weights", lambda data, modules, config: None)
    QUANTIZERS.get(name)(weight_bits=4, act_bits=16, **params).apply(model, calibration)
    return model


def _fold_summary(model, fp_model):
    smoothed = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.smooth is not None]
    fp = dict(fp_model.named_parameters())
    changed = [n for n, p in model.named_parameters() if "norm" in n.lower() and not torch.equal(p, fp[n])]
    return smoothed, changed


@pytest.mark.parametrize("name, module, params", [
    ("smoothquant", smoothquant_module, {"alpha": 0.5}),
    ("awq", awq_module, {"clip": False, "grid_size": 4, "search_samples": 4}),
])
def test_minilm_scaling_keeps_fp_function(monkeypatch, name, module, params):
    fp = load_minilm()
    batch = held_out_batch()
    with torch.no_grad():
        ref = fp(**batch).last_hidden_state
    model = _smoothed_only(monkeypatch, module, name, load_minilm(), calibration_inputs()[:8], **params)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert _rel(out, ref) <= 1e-5
    smoothed, _ = _fold_summary(model, fp)
    if name == "smoothquant":  # BERT's LayerNorms also feed the residual: no exact fold, scales stay on the Linears
        assert len(smoothed) >= 6 * 4
    fp_modules = dict(fp.named_modules())
    rescaled = [n for n, m in model.named_modules()
                if isinstance(m, QuantizedLinear) and not torch.equal(m.weight, fp_modules[n].weight)]
    assert rescaled, "no weight was rescaled: the test would be vacuous"


@pytest.mark.parametrize("name, module, params", [
    ("smoothquant", smoothquant_module, {"alpha": 0.5}),
    ("awq", awq_module, {"clip": False, "grid_size": 4}),
])
def test_llava_scaling_folds_into_rmsnorm_and_keeps_fp_function(monkeypatch, name, module, params):
    fp = tiny_llava()
    inputs = llava_inputs(2, prompt_lengths=[3, 6], seed=5)
    with torch.no_grad():
        ref = fp(**inputs).logits
    calibration = [llava_inputs(1, seed=i) for i in range(6)]
    model = _smoothed_only(monkeypatch, module, name, tiny_llava(), calibration, **params)
    with torch.no_grad():
        out = model(**inputs).logits
    assert _rel(out, ref) <= 1e-5
    smoothed, changed_norms = _fold_summary(model, fp)
    if name == "smoothquant":
        # input_layernorm and post_attention_layernorm absorb the scales in every LLM layer
        assert len(changed_norms) == 2 * 3
        assert all("language_model" in n for n in changed_norms)
        # o_proj's input comes from GQA-repeated values (no exact fold): its scale stays unfused
        assert sorted(smoothed) == [f"model.language_model.layers.{i}.self_attn.o_proj" for i in range(3)]


def test_smoothing_scales_formula():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_scales(act, w, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))  # unseen / zero-weight channels keep 1


def test_awq_scales_are_normalised_powers():
    mean = torch.tensor([1.0, 4.0, 16.0])
    s = awq_scales(mean, 0.5)
    assert torch.allclose(s, torch.tensor([1.0, 2.0, 4.0]) / 2.0)
    assert torch.allclose(awq_scales(mean, 0.0), torch.ones(3))


def test_clip_search_never_increases_output_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    w[:, 3] *= 8  # an outlier column makes clipping worthwhile
    x = torch.randn(128, 64, generator=g)
    spec = WeightSpec(3, 32, False)
    from qapframe.quantizers.awq import fake_rtn

    err = lambda q: ((w - q) @ x.T).pow(2).sum().item()
    clipped = clip_search(w, x, spec, grid=20, max_shrink=0.5)
    assert err(fake_rtn(clipped, spec)) <= err(fake_rtn(w, spec)) + 1e-6
    assert (clipped.abs() <= w.abs() + 1e-6).all()


def test_clip_search_buffers_follow_the_weight_device():
    """Issue 25: the error buffer was allocated on the CPU, so AWQ with clip=true failed on CUDA.

    The meta device stands in for CUDA: any CPU buffer mixed into the search raises there, as on a GPU.
    """
    w = torch.randn(8, 64, device="meta")
    x = torch.randn(32, 64, device="meta")
    clipped = clip_search(w, x, WeightSpec(4, 32, False), grid=4, max_shrink=0.5)
    assert clipped.device.type == "meta" and clipped.shape == (8, 64)


def test_awq_inspects_the_smallest_module_holding_each_group():
    from qapframe.quantizers.awq import inspected_module

    assert inspected_module(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]) == "self_attn"
    assert inspected_module(["mlp.gate_proj", "mlp.up_proj"]) == "mlp"
    assert inspected_module(["mlp.down_proj"]) == "mlp.down_proj"
    assert inspected_module(["attention.self.query", "intermediate.dense"]) == ""  # the block itself


def test_awq_search_replays_the_inspected_modules_not_the_block():
    """Each exponent of the grid re-runs only the module holding the group, on its recorded inputs."""
    model = tiny_llava()
    calibration = [llava_inputs(1, seed=i) for i in range(3)]
    layers = model.model.language_model.layers
    block_calls, attention_calls = [], []
    layers[0].register_forward_hook(lambda m, a, out: block_calls.append(1))
    layers[0].self_attn.register_forward_hook(lambda m, a, out: attention_calls.append(1))
    grid = 6
    QUANTIZERS.get("awq")(scheme="W4A16", group_size=32, clip=False, grid_size=grid, search_samples=3).apply(
        model, calibration)
    # Block 0 runs on its 3 inputs for the reference and the output pass, once for the group detection and
    # once per fold check (up to 4 groups; none where no scaling wins): at most 11 calls; searching 4 groups
    # x (grid + 1) exponents on the block would add 84. Its attention module also runs in q/k/v's (grid + 1)
    # replays of the 3 inputs.
    assert len(block_calls) <= 3 + 1 + 4 + 3
    assert len(attention_calls) == len(block_calls) + (grid + 1) * 3
