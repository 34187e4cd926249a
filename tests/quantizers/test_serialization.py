import pytest
import torch

import qapframe
from qapframe.quantizers import QuantizedLinear, load_quantized, save_quantized
from tests.tiny_models import llava_inputs, tiny_llava


@pytest.mark.parametrize("spec", [
    {"name": "gptq", "scheme": "W4A8", "group_size": 32, "act_order": True, "act_dynamic": False, "symmetric": True},
    {"name": "smoothquant", "scheme": "W8A8"},
    {"name": "rtn", "scheme": "W4A4", "group_size": 32, "symmetric": True, "act_symmetric": True,
     "symmetric_grid": "full", "act_symmetric_grid": "full"},
])
def test_round_trip_is_exact(tmp_path, spec):
    calibration = [llava_inputs(1, seed=i) for i in range(4)]
    inputs = llava_inputs(2, prompt_lengths=[3, 5], seed=7)
    model = qapframe.quantize(tiny_llava(seed=1), spec, calibration)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tiny_llava(seed=2), tmp_path / "q")  # different fp weights: all must come from disk
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    a = dict(model.named_modules())
    for name, m in loaded.named_modules():
        if isinstance(m, QuantizedLinear):
            ref = a[name]
            for attr in ("qweight", "scales", "zeros", "g_idx", "weight"):
                assert torch.equal(getattr(m, attr), getattr(ref, attr)), (name, attr)
            assert (m.smooth is None) == (ref.smooth is None)
    assert loaded.qapframe_quantization == model.qapframe_quantization


def test_save_requires_a_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="no QuantizedLinear"):
        save_quantized(tiny_llava(), tmp_path)


def test_format_1_directories_still_load(tmp_path):
    """Format 1 (one code per byte) is packed on load; a newer format names what to do."""
    import json

    from safetensors.torch import load_file, save_file

    from qapframe.quantizers.serialization import MANIFEST_FILE, WEIGHTS_FILE

    inputs = llava_inputs(1, seed=7)
    model = qapframe.quantize(tiny_llava(seed=1), {"name": "rtn", "scheme": "W4A16", "group_size": 32})
    save_quantized(model, tmp_path / "q")
    state = load_file(str(tmp_path / "q" / WEIGHTS_FILE))
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            state[f"{name}.qweight"] = m.codes.contiguous()  # [O, I] uint8, as format 1 stored it
    save_file(state, str(tmp_path / "q" / WEIGHTS_FILE))
    manifest = json.loads((tmp_path / "q" / MANIFEST_FILE).read_text())
    (tmp_path / "q" / MANIFEST_FILE).write_text(json.dumps({**manifest, "format": 1}))
    loaded = load_quantized(tiny_llava(seed=2), tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    (tmp_path / "q" / MANIFEST_FILE).write_text(json.dumps({**manifest, "format": 7}))
    with pytest.raises(ValueError, match="format 7; this qapframe reads formats \\[1, 2\\]"):
        load_quantized(tiny_llava(seed=2), tmp_path / "q")


@pytest.mark.parametrize("inter", [96, 90])  # a Hadamard of order 96; none of order 90 (its seeded random one)
def test_rotated_model_round_trip_is_exact(tmp_path, inter):
    """QuaRot-rotated W4A4: rotated weights, unit norms, the untied lm_head and each down_proj's online Hadamard
    all come back from disk onto a fresh, tied, unrotated model of the same config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qapframe.quantizers.rotations import OnlineHadamard

    def fresh(seed):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=inter, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = LlamaForCausalLM(config).eval()
        for name, p in model.named_parameters():
            if "norm" in name:  # non-unit norm scales, so that folding them (and untying lm_head) matters
                p.data = torch.rand(p.shape, generator=torch.Generator().manual_seed(seed)) + 0.5
        return model

    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    calibration = [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}]
    spec = {"name": "rtn", "scheme": "W4A4", "group_size": 16, "rotation": {"name": "hadamard", "seed": 3}}
    model = qapframe.quantize(fresh(0), spec, calibration)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(fresh(1), tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    transforms = [m.input_transform for m in loaded.modules() if getattr(m, "input_transform", None) is not None]
    assert len(transforms) == 2 and all(isinstance(t, OnlineHadamard) and t.structured == (inter == 96)
                                        for t in transforms)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert loaded.config.tie_word_embeddings is False
