"""Rotations: Hadamard constructions, and the fp function of real transformers models kept exactly."""

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import qapframe
from qapframe.quantizers import QuantizedLinear
from qapframe.quantizers.rotations import (
    ROTATIONS, HadamardLinear, OnlineHadamard, hadamard_matrix, random_hadamard,
)
from qapframe.spec import load_spec
from tests.tiny_models import llava_inputs, tiny_llava


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _scramble_norms(model, seed=0):
    """Non-unit RMSNorm scales, so that fusing them is tested (fresh models have all ones)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.data = (torch.rand(p.shape, generator=g) + 0.5).to(p)
    return model


def _llama(hidden=48, inter=96, tied=True, seed=0, layers=2, dtype=torch.float64):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return _scramble_norms(LlamaForCausalLM(config).to(dtype).eval(), seed)


def _ids(seed=0, batch=2, length=12):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [4, 12, 20, 28, 36, 48, 64, 576, 1536])
def test_hadamard_matrices_are_hadamard(n):
    H = hadamard_matrix(n)
    assert H is not None and set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


def test_sizes_without_a_hadamard_fall_back_to_a_random_orthogonal_matrix():
    assert hadamard_matrix(30) is None and hadamard_matrix(90) is None
    Q, how = random_hadamard(90, seed=3)
    assert "random orthogonal" in how
    assert torch.allclose(Q @ Q.T, torch.eye(90, dtype=torch.float64), atol=1e-12)
    Q2, how2 = random_hadamard(576, seed=3)
    assert how2 == "randomised Hadamard" and torch.allclose(Q2 @ Q2.T, torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q2.abs(), torch.full_like(Q2, 576**-0.5))  # +-1/sqrt(n) entries: a scaled Hadamard


@pytest.mark.parametrize("n", [48, 576, 90])
def test_online_hadamard_is_the_dense_orthogonal_matrix(n):
    online = OnlineHadamard(n, seed=1, dtype=torch.float64)
    M = online.matrix()
    assert torch.allclose(M @ M.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(online(x), x @ M.T, atol=1e-12)
    assert online.structured == (n != 90)


@pytest.mark.parametrize("hidden, inter, tied", [(64, 128, True), (48, 96, False), (48, 90, True)])
def test_llama_logits_unchanged_by_the_rotation(hidden, inter, tied):
    """Powers of two, Paley sizes (48 = 12 * 4) and a size with no Hadamard (90): all exact."""
    model = _llama(hidden, inter, tied)
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        embed_before = model.model.embed_tokens.weight.clone()
    ROTATIONS.get("hadamard")(seed=0).apply(model)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    # HF's RMSNorm computes in float32 even in a float64 model: errors of about 1e-7 remain
    assert _rel(out, ref) <= 1e-4
    assert all(torch.equal(layer.input_layernorm.weight, torch.ones(hidden, dtype=torch.float64))
               for layer in model.model.layers)
    assert not torch.allclose(model.model.embed_tokens.weight, embed_before)  # the stream really is rotated
    assert isinstance(model.model.layers[0].mlp.down_proj, HadamardLinear)
    # the final norm's scale went into lm_head only: tied weights had to be untied
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings


def test_tied_embeddings_stay_tied_when_the_final_norm_is_unit():
    model = _llama(tied=True)
    model.model.norm.weight.data.fill_(1.0)
    ids = _ids(1)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ROTATIONS.get("orthogonal")(seed=2).apply(model)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert _rel(out, ref) <= 1e-4
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings


def test_qwen2_with_qkv_biases_keeps_its_logits():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = _scramble_norms(Qwen2ForCausalLM(config).double().eval())
    for layer in model.model.layers:  # fresh biases are zero; make them matter
        layer.self_attn.v_proj.bias.data.normal_()
        layer.self_attn.q_proj.bias.data.normal_()
    ids = _ids(2)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ROTATIONS.get("hadamard")(seed=1).apply(model)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert _rel(out, ref) <= 1e-4


def test_llava_vision_tokens_enter_the_rotated_stream():
    model = _scramble_norms(tiny_llava().double())
    vision_before = {n: p.clone() for n, p in model.named_parameters() if "vision_tower" in n}
    projector_in = model.model.multi_modal_projector.linear_1.weight.clone()
    inputs = llava_inputs(2, prompt_lengths=[3, 6], seed=5)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        ref = model(**inputs).logits
    ROTATIONS.get("hadamard")(seed=0).apply(model)
    with torch.no_grad():
        out = model(**inputs).logits
    assert _rel(out, ref) <= 1e-4
    assert all(torch.equal(p, vision_before[n]) for n, p in model.named_parameters() if "vision_tower" in n)
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, projector_in)
    assert not torch.allclose(model.model.multi_modal_projector.linear_2.weight.double(),
                              tiny_llava().model.multi_modal_projector.linear_2.weight.double())


def test_float32_model_within_the_issue_tolerance():
    model = _llama(64, 128, dtype=torch.float32)
    ids = _ids(3)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ROTATIONS.get("hadamard")(seed=0).apply(model)
    with torch.no_grad():
        assert _rel(model(input_ids=ids).logits, ref) <= 1e-3


def test_layernorm_models_are_refused_with_a_clear_message():
    model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64))
    with pytest.raises(ValueError, match="LayerNorm.*mean folded first"):
        ROTATIONS.get("hadamard")().apply(model)


def _outlier_llama(seed=0):
    """fp32 tiny LLaMA whose residual stream has a few massive channels, as pretrained LLaMAs do."""
    model = _llama(64, 128, tied=False, seed=seed, dtype=torch.float32)
    model.model.embed_tokens.weight.data[:, [3, 17, 40]] *= 30.0
    return model


def test_rotation_composes_with_every_quantizer_and_helps_w4a4():
    calibration = [{"input_ids": _ids(10 + i, batch=1, length=16)} for i in range(8)]
    held_out = _ids(99, batch=2, length=16)
    with torch.no_grad():
        ref = _outlier_llama()(input_ids=held_out).logits
    errors = {}
    for name in ("rtn", "gptq", "smoothquant", "awq"):
        for rotation in (None, {"name": "hadamard", "seed": 0}):
            spec = {"name": name, "scheme": "W4A4", "group_size": 32, "rotation": rotation}
            if name == "awq":
                spec.update(grid_size=4, clip=False)
            model = qapframe.quantize(_outlier_llama(), spec, calibration)
            recorded = model.qapframe_quantization["rotation"]
            assert recorded is None if rotation is None else rotation.items() <= recorded.items()
            with torch.no_grad():
                errors[name, rotation is not None] = _rel(model(input_ids=held_out).logits, ref)
            if rotation is not None:
                down = model.model.layers[0].mlp.down_proj
                assert isinstance(down, QuantizedLinear) and isinstance(down.input_transform, OnlineHadamard)
    # per-token 4-bit activations: the massive channels set every token's step until rotated away
    for name in ("rtn", "gptq"):
        assert errors[name, True] < 0.9 * errors[name, False], errors
    assert all(0 < e < 0.1 for e in errors.values()), errors


def test_rotation_in_a_yaml_spec(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("quantizer:\n  name: gptq\n  scheme: W4A4\n  rotation: {name: hadamard, seed: 3}\n")
    quantizer = load_spec(str(path)).quantizer.build()
    assert quantizer.config.rotation.name == "hadamard" and quantizer.config.rotation.config.seed == 3
    with pytest.raises(qapframe.SpecError, match="quantizer.rotation.name"):
        load_spec({"quantizer": {"name": "rtn", "rotation": {"name": "hadamrd"}}})


def test_rotation_registry_lists_builtins_and_is_pluggable():
    assert {"hadamard", "orthogonal"} <= set(ROTATIONS.names())
    assert ROTATIONS.group == "qapframe.rotations" and type(ROTATIONS) is type(qapframe.QUANTIZERS)
