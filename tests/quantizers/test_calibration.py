import logging

import pytest
import torch
from torch import nn

import qapframe
from qapframe.quantizers import QuantizedLinear
from qapframe.quantizers import gptq as gptq_module
from qapframe.quantizers.calibration import find_blocks, select_samples
from qapframe.quantizers.targets import select_linears
from tests.quantizers.minilm import load_minilm
from tests.tiny_models import llava_inputs, tiny_llava


def test_select_samples_is_a_seeded_subset():
    items = [{"i": torch.tensor(i)} for i in range(20)]
    a = select_samples(items, 5, seed=0, device=torch.device("cpu"))
    b = select_samples(iter(items), 5, seed=0, device=torch.device("cpu"))
    c = select_samples(items, 5, seed=1, device=torch.device("cpu"))
    ids = lambda s: [int(x["i"]) for x in s]
    assert ids(a) == ids(b) and len(set(ids(a))) == 5 and ids(a) == sorted(ids(a))
    assert ids(a) != ids(c)
    assert ids(select_samples(items[:3], 5, 0, torch.device("cpu"))) == [0, 1, 2]
    with pytest.raises(TypeError, match="calibration item 0"):
        select_samples([torch.zeros(2)], 1, 0, torch.device("cpu"))


def test_find_blocks_picks_the_decoder_layers():
    llava = tiny_llava()
    name, blocks = find_blocks(llava, select_linears(llava, ["*"], qapframe.quantizers.config.DEFAULT_IGNORE))
    assert name == "model.language_model.layers" and len(blocks) == 3
    bert = load_minilm()
    name, blocks = find_blocks(bert, select_linears(bert, ["*"], []))
    assert name == "encoder.layer" and len(blocks) == 6


def test_each_block_is_calibrated_on_the_quantized_outputs_of_the_blocks_before(monkeypatch):
    recorded = []
    original_add = gptq_module.Hessian.add
    monkeypatch.setattr(gptq_module.Hessian, "add", lambda self, x: (recorded.append((self, x)), original_add(self, x))[1])
    calibration = [llava_inputs(1, seed=i) for i in range(2)]
    model = qapframe.quantize(tiny_llava(), {"name": "gptq", "scheme": "W4A16", "group_size": 32}, calibration)
    hessians = list(dict.fromkeys(h for h, _ in recorded))
    # one per input (q/k/v share one, gate/up share one, o_proj, down_proj), layer after layer
    assert len(hessians) == 3 * 4
    layer1_qkv = [x for h, x in recorded if h is hessians[4]]  # layer 1's q/k/v
    seen = []
    q_proj = model.model.language_model.layers[1].self_attn.q_proj
    q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    fp_seen = []
    fp = tiny_llava()
    fp.model.language_model.layers[1].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: fp_seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for sample in calibration:
            model(**sample)
            fp(**sample)
    assert torch.allclose(torch.cat(layer1_qkv), torch.cat(seen), atol=1e-6)
    assert not torch.allclose(torch.cat(layer1_qkv), torch.cat(fp_seen), atol=1e-4)


class _Flat(nn.Module):
    """No repeated blocks: the whole-model fallback has to calibrate it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_models_without_blocks_fall_back_to_one_pass(caplog):
    g = torch.Generator().manual_seed(0)
    calibration = [{"x": torch.randn(4, 16, generator=g) * torch.linspace(0.1, 4, 16)} for _ in range(8)]
    x = torch.cat([c["x"] for c in calibration])
    fp = _Flat()
    with torch.no_grad():
        ref = fp(x)
        errors = {}
        for name in ("rtn", "gptq"):
            with caplog.at_level(logging.WARNING, logger="qapframe.quantizers"):
                model = qapframe.quantize(_Flat(), {"name": name, "scheme": "W4A16", "group_size": -1,
                                                    "act_dynamic": False}, calibration)
            assert isinstance(model.up, QuantizedLinear) and isinstance(model.down, QuantizedLinear)
            errors[name] = float((model(x) - ref).norm())
    assert "no repeated blocks found" in caplog.text
    assert errors["gptq"] < errors["rtn"]


@pytest.mark.parametrize("spec", [{"name": "rtn", "scheme": "W4A16"}, {"name": "rtn", "scheme": "W4A4"},
                                  {"name": "rtn", "scheme": "W4A16", "rotation": {"name": "hadamard"}}])
def test_rtn_without_static_ranges_runs_no_calibration_forward(spec):
    """Issue 25: weight-only (or dynamic-activation) RTN needs no data; given some, it must not run the model."""
    calls = []
    model = tiny_llava()
    for layer in model.model.language_model.layers:
        layer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    calibration = [llava_inputs(1, seed=i) for i in range(4)]
    with_data = qapframe.quantize(model, spec, calibration)
    assert calls == []
    without = qapframe.quantize(tiny_llava(), spec).state_dict()
    assert all(torch.equal(v, without[k]) for k, v in with_data.state_dict().items())
    # static ranges do need the data: then the blocks run
    model = tiny_llava()
    model.model.language_model.layers[0].register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    qapframe.quantize(model, {"name": "rtn", "scheme": "W8A8", "act_dynamic": False}, calibration)
    assert calls


def test_calibration_dequantizes_each_weight_once_per_block_and_keeps_no_copy(monkeypatch):
    """Held dequantized weights change no result, save the per-forward dequantization, and are dropped."""
    import contextlib

    from qapframe.quantizers import calibration, fake_quant

    calls = []
    dequantize = fake_quant.dequantize_weight

    def counted(*args):
        calls.append(1)
        return dequantize(*args)

    monkeypatch.setattr(fake_quant, "dequantize_weight", counted)
    samples = [llava_inputs(1, seed=i) for i in range(4)]
    spec = {"name": "gptq", "scheme": "W4A8", "group_size": 32, "act_dynamic": False}
    held_model = qapframe.quantize(tiny_llava(), spec, samples)
    held_calls, calls[:] = len(calls), []
    monkeypatch.setattr(calibration, "holding_weights", lambda modules: contextlib.nullcontext())
    plain_model = qapframe.quantize(tiny_llava(), spec, samples)
    held, plain = held_model.state_dict(), plain_model.state_dict()
    assert held.keys() == plain.keys() and all(torch.equal(held[k], plain[k]) for k in plain)
    assert held_calls < len(calls) / 2
    quantized = [m for m in held_model.modules() if isinstance(m, QuantizedLinear)]
    assert quantized and all(m._held_weight is None and not m.holds_weight for m in quantized)
    x = llava_inputs(1, seed=9)
    torch.testing.assert_close(held_model(**x).logits, plain_model(**x).logits, rtol=0, atol=0)


def test_inputs_differing_only_in_hidden_states_run_as_one_batch():
    """Same-length windows coalesce (padding masks of another length do not); observers still get each
    input's real tokens apart, and a full pass returns one output per input, as one-by-one calls do."""
    from qapframe.quantizers.block_inputs import BlockInput, coalesce
    from qapframe.quantizers.calibration import BlockData

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    position = torch.randn(1, 5, 16)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.proj = layer, QuantizedLinear.from_linear(nn.Linear(16, 16), *_fp_specs())

        def forward(self, hidden, position=None):
            return self.proj(self.inner(hidden + position[:, : hidden.shape[1]]))

    def inp(length, real):
        mask = torch.zeros(1, length, dtype=torch.bool)
        mask[:, :real] = True
        return BlockInput((torch.randn(1, length, 16), position), {}, mask)

    inputs = [inp(5, 5), inp(5, 3), inp(5, 4), inp(4, 4), inp(5, 5)]
    batches = coalesce(inputs)
    assert [b.rows for b in batches] == [(1, 1, 1), None, None]  # the 4-token input splits the run
    assert len(coalesce(inputs, max_tokens=10)) == 4  # at most 2 windows of 5 tokens per batch
    block = Block()
    data = BlockData(block, inputs)
    seen = []
    with data.observe({"proj": block.proj}, lambda name, x: seen.append(x.shape[0])):
        outputs = data.forward()
    assert seen == [5, 3, 4, 4, 5]
    one_by_one = [block(*i.args) for i in inputs]
    assert len(outputs) == 5
    for a, b in zip(outputs, one_by_one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _fp_specs():
    from qapframe.quantizers.config import WeightSpec

    return WeightSpec(8, -1, True), None
