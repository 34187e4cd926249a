import numpy as np
import torch

from qapframe.toy.check import answer_changes, linear_input_outliers, outlier_stats, simulate_w4a4_rtn
from qapframe.toy.evaluate import l2norm_selector, random_selector
from tests.tiny_models import llava_inputs, tiny_llava


def _rtn_reference(w: np.ndarray, bits: int, group: int, symmetric: bool) -> np.ndarray:
    """Float64 quantize-dequantize along the last dim, written independently of the kernel."""
    out = np.empty_like(w)
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    for start in range(0, w.shape[-1], group):
        g = w[..., start : start + group]
        if symmetric:
            scale = np.abs(g).max(axis=-1, keepdims=True) / qmax
            out[..., start : start + group] = np.clip(np.round(g / scale), -qmax - 1, qmax) * scale
        else:
            lo, hi = g.min(axis=-1, keepdims=True), g.max(axis=-1, keepdims=True)
            scale = (hi - lo) / qmax
            zero = np.round(-lo / scale)
            out[..., start : start + group] = (np.clip(np.round(g / scale) + zero, 0, qmax) - zero) * scale
    return out


def test_w4a4_simulation_quantizes_llm_linears_only():
    model = tiny_llava(seed=0)
    quantized = simulate_w4a4_rtn(model, group_size=32)
    before = dict(model.named_parameters())
    for name, param in quantized.named_parameters():
        if ".language_model." in name and name.endswith("proj.weight"):
            ref = _rtn_reference(before[name].detach().double().numpy(), 4, 32, True)
            np.testing.assert_allclose(param.detach().numpy(), ref, rtol=1e-5, atol=1e-7)
            for row in param.detach().reshape(param.shape[0], -1, 32):
                assert all(len(torch.unique(g)) <= 16 for g in row)
        else:  # vision tower, projector, embeddings, norms, lm_head
            assert torch.equal(param, before[name]), name
    # the original model is left untouched
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_w4a4_simulation_quantizes_linear_inputs_per_token():
    model = tiny_llava(seed=0)
    quantized = simulate_w4a4_rtn(model, group_size=32)
    layer = quantized.model.language_model.layers[0].mlp.down_proj
    seen = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    with torch.no_grad():
        quantized(**llava_inputs(batch_size=2))
    x, y = seen["x"], seen["y"]
    # Each token's input takes at most 16 levels, and the output is the Linear of that quantized input.
    assert all(len(torch.unique(tok)) <= 16 for tok in x.reshape(-1, x.shape[-1]))
    np.testing.assert_allclose(y.numpy(), (x.double() @ layer.weight.detach().double().T).numpy(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        dense_logits = model(**llava_inputs(batch_size=2)).logits
        quant_logits = quantized(**llava_inputs(batch_size=2)).logits
    assert not torch.allclose(dense_logits, quant_logits)


def test_selectors_keep_the_requested_tokens_in_order():
    vision = torch.randn(3, 64, 8, generator=torch.Generator().manual_seed(0))
    keep = l2norm_selector(0.125)(vision)
    assert keep.shape == (3, 8)
    norms = vision.double().norm(dim=-1).numpy()
    for b in range(3):
        assert list(keep[b]) == sorted(np.argsort(-norms[b])[:8].tolist())
    rand = random_selector(0.25, seed=1)(vision)
    assert rand.shape == (3, 16) and (rand.diff(dim=1) > 0).all()
    assert torch.equal(rand, random_selector(0.25, seed=1)(vision))
    assert not torch.equal(rand, random_selector(0.25, seed=2)(vision))


def test_outlier_stats_closed_forms():
    signs = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]])
    stats = outlier_stats(signs)  # every standardized entry is +-1
    assert stats["kurtosis"] == 1.0 and stats["channel_peak_ratio"] == 1.0
    gaussian = torch.randn(200_000, 8, generator=torch.Generator().manual_seed(0))
    assert abs(outlier_stats(gaussian)["kurtosis"] - 3.0) < 0.1
    scaled = signs.clone()
    scaled[:, 2] *= 10  # one outlier channel
    assert outlier_stats(scaled)["channel_peak_ratio"] == 10.0


def test_linear_input_outliers_cover_every_llm_linear_and_match_a_float64_reference():
    model = tiny_llava(seed=0).eval()
    inputs = llava_inputs(batch_size=2)
    stats = linear_input_outliers(model, inputs)
    names = {n for n, m in model.model.language_model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(stats) == names
    seen = {}
    layer = model.model.language_model.layers[1].mlp.down_proj
    hook = layer.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach()))
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).double().numpy()
    z = (x - x.mean()) / x.std()
    peaks = np.abs(x).max(axis=0)
    expected = {"kurtosis": (z**4).mean(), "channel_peak_ratio": peaks.max() / np.median(peaks)}
    for key, value in expected.items():
        assert abs(stats["layers.1.mlp.down_proj"][key] - value) < 1e-6 * max(1.0, value), key
    assert not layer._forward_pre_hooks  # the hooks are removed


def test_answer_changes_count_flips_and_correct_answers_per_type():
    from qapframe.data.synthetic import make_record

    records = [make_record(0, "test", i) for i in range(12)]
    before = [r.answer for r in records]
    after = list(before)
    after[0] = "zzz"  # a correct answer turned wrong
    after[1] = " " + after[1] + " "  # whitespace only: not a change
    table = answer_changes(before, after, records)
    assert sum(row["questions"] for row in table.values()) == 12
    assert sum(row["changed"] for row in table.values()) == 1
    assert sum(row["correct_before"] for row in table.values()) == 12
    assert sum(row["correct_after"] for row in table.values()) == 11
    assert table[records[0].meta["type"]]["changed"] == 1
