import pytest
import torch

import qapframe
from qapframe.quantizers import QuantizedLinear, load_quantized, save_quantized
from tests.tiny_models import llava_inputs, tiny_llava


@pytest.mark.parametrize("spec", [
    {"name": "gptq", "scheme": "W4A8", "group_size": 32, "act_order": True, "act_dynamic": False, "symmetric": True},
    {"name": "smoothquant", "scheme": "W8A8"},
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
