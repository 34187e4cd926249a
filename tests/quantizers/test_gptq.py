"""GPTQ against a float64 textbook OBS implementation (full inverse, no Cholesky, no blocking)."""

import pytest
import torch

from qapframe.quantizers.config import WeightSpec
from qapframe.quantizers.fake_quant import dequantize_weight, quantize_weight_rtn
from qapframe.quantizers.gptq import Hessian, gptq_quantize


def _grid64(w, bits, symmetric):
    """Group grid in float64 (independent of the float32 helpers)."""
    if symmetric:
        scale = w.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
        return scale, torch.zeros_like(scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    return scale, torch.round(-lo / scale), 0, 2**bits - 1


def obs_reference(weight, hessian, bits, group, symmetric, damp, act_order):
    """Quantize columns one by one; after each, ``W_F -= e / [H^-1]_qq * [H^-1]_{q,F}`` and eliminate q from H^-1.

    ``act_order``: False/"off", True/"group" (groups along the order, grids from updated columns) or
    "static" (groups in channel order, every grid from the original weights).
    """
    W = weight.double().clone()
    H = hessian.double().clone()
    n = W.shape[1]
    act_order = {False: "off", True: "group"}.get(act_order, act_order)
    order = torch.argsort(torch.diag(H), descending=True) if act_order != "off" else torch.arange(n)
    H = H + damp * torch.diag(H).mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros_like(W)
    deq = torch.zeros_like(W)
    g = n if group == -1 else group
    static = [_grid64(W[:, k : k + g], bits, symmetric) for k in range(0, n, g)]
    for pos, q in enumerate(order.tolist()):
        if act_order == "static":
            scale, zero, lo, hi = static[q // g]
        elif pos % g == 0:
            cols = order[pos : pos + g]
            scale, zero, lo, hi = _grid64(W[:, cols], bits, symmetric)
        c = torch.clamp(torch.round(W[:, q : q + 1] / scale) + zero, lo, hi)
        codes[:, q : q + 1] = c
        deq[:, q : q + 1] = (c - zero) * scale
        err = (W[:, q] - deq[:, q]) / Hinv[q, q]
        W -= err[:, None] * Hinv[q][None, :]
        Hinv = Hinv - Hinv[:, q : q + 1] @ Hinv[q : q + 1, :] / Hinv[q, q]
    return codes, deq


def _layer(seed, out_f=24, in_f=64, tokens=256):
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs with uneven channel scales, as real activations have.
    x = torch.randn(tokens, in_f, generator=g) @ (torch.randn(in_f, in_f, generator=g) * 0.3 + torch.eye(in_f))
    x = x * torch.linspace(0.2, 3.0, in_f)
    w = torch.randn(out_f, in_f, generator=g)
    h = Hessian(in_f, torch.device("cpu"))
    h.add(x[:100])
    h.add(x[100:])
    return w, x, h.matrix


def test_hessian_is_two_xtx_over_n():
    w, x, H = _layer(0)
    assert torch.allclose(H.double(), 2 * x.double().T @ x.double() / x.shape[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("width", [800, 1536])  # 2 and 4 stripes of the upper-triangle product
def test_a_wide_hessian_from_stripes_is_symmetric_and_exact(width):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(300, width, generator=g) * torch.linspace(0.1, 5, width)
    h = Hessian(width, torch.device("cpu"))
    h.add(x[:120])
    h.add(x[120:])
    reference = 2 * x.double().T @ x.double() / 300
    assert torch.equal(h.matrix, h.matrix.T)
    torch.testing.assert_close(h.matrix.double(), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


@pytest.mark.parametrize("group, act_order, symmetric", [(-1, False, False), (16, False, False), (16, True, False),
                                                         (-1, True, True), (32, True, True), (16, "static", False),
                                                         (32, "static", True), (16, "group", True)])
def test_gptq_matches_float64_obs_reference(group, act_order, symmetric):
    w, x, H = _layer(1)
    spec = WeightSpec(4, group, symmetric)
    codes, scales, zeros, g_idx = gptq_quantize(w, H, spec, dampening=0.01, block_size=16, act_order=act_order)
    ref_codes, ref_deq = obs_reference(w, H, 4, group, symmetric, 0.01, act_order)
    same = (codes == ref_codes.float()).float().mean().item()
    assert same >= 0.97, f"only {same:.3f} of the codes agree with the reference"
    deq = dequantize_weight(codes, scales, zeros, g_idx)
    ours = ((w - deq) @ x.T).pow(2).sum().item()
    theirs = ((w.double() - ref_deq) @ x.double().T).pow(2).sum().item()
    assert ours == pytest.approx(theirs, rel=0.02)


@pytest.mark.parametrize("group, act_order", [(-1, False), (16, False), (16, True)])
def test_gptq_objective_below_rtn(group, act_order):
    w, x, H = _layer(2)
    spec = WeightSpec(3, group, False)
    gptq = dequantize_weight(*gptq_quantize(w, H, spec, act_order=act_order))
    rtn = dequantize_weight(*quantize_weight_rtn(w, spec))
    objective = lambda q: ((w - q) @ x.T).pow(2).sum().item()  # ||WX - QX||^2
    assert objective(gptq) < 0.8 * objective(rtn)


def test_blocking_does_not_change_the_result():
    w, x, H = _layer(3)
    spec = WeightSpec(4, 16, False)
    a = gptq_quantize(w, H, spec, block_size=16)
    b = gptq_quantize(w, H, spec, block_size=64)
    assert (a[0] == b[0]).float().mean() > 0.99


def test_dead_columns_are_zero_and_stay_finite():
    w, x, H = _layer(4)
    x[:, 5] = 0
    H = 2 * x.T @ x / x.shape[0]
    codes, scales, zeros, g_idx = gptq_quantize(w, H, WeightSpec(4, 16, False))
    deq = dequantize_weight(codes, scales, zeros, g_idx)
    assert torch.isfinite(deq).all()
    assert deq[:, 5].abs().max() == 0


def test_a_group_wider_than_the_weight_takes_its_grid_from_every_column():
    """Issue 25: group 256 >= 192 inputs with blocks of 128 took the grid from the first block only."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(512, 192, generator=g)
    w = torch.randn(32, 192, generator=g)
    w[:, 150] = 6.0  # each row's maximum lies in the second block
    H = 2 * x.T @ x / x.shape[0]
    codes, scales, zeros, g_idx = gptq_quantize(w, H, WeightSpec(4, 256, True), block_size=128)
    assert scales.shape == (32, 1) and torch.equal(g_idx, torch.zeros(192, dtype=torch.int32))
    assert torch.equal(scales[:, 0], w.abs().amax(dim=1) / 7)  # the grid of the whole (un-updated) row
    deq = dequantize_weight(codes, scales, zeros, g_idx)
    assert (deq[:, 150] - 6.0).abs().max() < 1e-5  # representable, not clipped to the first block's range
    ref_codes, _ = obs_reference(w, H, 4, 256, True, 0.01, False)
    assert (codes == ref_codes.float()).float().mean() >= 0.97
    # and it is the same quantizer as one group per row
    assert all(torch.equal(a, b) for a, b in zip((codes, scales, zeros),
                                                  gptq_quantize(w, H, WeightSpec(4, -1, True), block_size=128)[:3]))


def test_static_act_order_keeps_channel_order_groups():
    w, x, H = _layer(6)
    codes, scales, zeros, g_idx = gptq_quantize(w, H, WeightSpec(4, 16, False), act_order="static")
    assert torch.equal(g_idx, (torch.arange(64) // 16).int())  # no reorder needed to serve it
    _, ref_scales, ref_zeros, _ = quantize_weight_rtn(w, WeightSpec(4, 16, False))
    assert torch.equal(scales, ref_scales) and torch.equal(zeros, ref_zeros)  # grids of the fp weights


def test_act_order_defaults_to_static_and_accepts_booleans():
    from qapframe.quantizers.gptq import GPTQConfig

    assert GPTQConfig().act_order == "static"
    assert GPTQConfig(act_order=True).act_order == "group" and GPTQConfig(act_order=False).act_order == "off"
    with pytest.raises(Exception, match="act_order"):
        GPTQConfig(act_order="dynamic")


def _outlier_llama():
    """Tiny LlamaForCausalLM with a few massive input channels into q/k/v and gate/up (as real LLaMAs have)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data[[3, 17, 40, 51]] = 25.0
    return model


def test_act_order_lowers_the_output_error_on_outlier_channels():
    import qapframe

    g = torch.Generator().manual_seed(0)
    calibration = [{"input_ids": torch.randint(0, 64, (1, 24), generator=g)} for _ in range(8)]
    held_out = torch.randint(0, 64, (4, 24), generator=g)
    with torch.no_grad():
        ref = _outlier_llama()(input_ids=held_out).logits
    errors = {}
    for order in ("off", "static", "group"):
        spec = {"name": "gptq", "scheme": "W4A16", "group_size": 16, "symmetric": True, "act_order": order}
        model = qapframe.quantize(_outlier_llama(), spec, calibration)
        with torch.no_grad():
            errors[order] = float((model(input_ids=held_out).logits - ref).norm() / ref.norm())
    assert errors["static"] < 0.8 * errors["off"] and errors["group"] < 0.8 * errors["off"], errors


@pytest.mark.parametrize("batch_tokens", [1, 10**6], ids=["per-input", "one-batch"])
def test_shortened_calibration_passes_give_identical_weights(monkeypatch, batch_tokens):
    """Each Hessian pass stops after its Linears (and q/k/v share one Hessian): same codes as full passes,
    whether the inputs run one by one or coalesced into a batch."""
    import qapframe
    from qapframe.quantizers import block_inputs
    from qapframe.quantizers import gptq
    from qapframe.quantizers.calibration import BlockData
    from tests.tiny_models import llava_inputs, tiny_llava

    monkeypatch.setattr(block_inputs, "BATCH_TOKENS", batch_tokens)
    monkeypatch.setattr(gptq, "_one_pass", gptq._multi_pass)  # the schedule under test
    calibration = [llava_inputs(1, seed=i) for i in range(3)]
    spec = {"name": "gptq", "scheme": "W4A16", "group_size": 32}
    downs = []  # completed MLP forwards

    def count(model):
        for layer in model.model.language_model.layers:
            layer.mlp.register_forward_hook(lambda m, a, out: downs.append(1))
        return model

    fast = qapframe.quantize(count(tiny_llava()), spec, calibration).state_dict()
    fast_calls, downs[:] = len(downs), []

    def full(self, modules, fn):
        with self.observe(modules, fn):
            self.forward()

    monkeypatch.setattr(BlockData, "run_observed", full)
    slow = qapframe.quantize(count(tiny_llava()), spec, calibration).state_dict()
    assert all(torch.equal(fast[k], slow[k]) for k in slow)
    assert fast_calls < len(downs)


@pytest.mark.parametrize("act_order", ["static", "group", "off"])
@pytest.mark.parametrize("scheme", ["W4A16", "W4A8"])
def test_one_pass_gptq_equals_one_pass_per_group(monkeypatch, act_order, scheme):
    """Quantizing each group as the single batched forward reaches it gives the multi-pass codes, bit for
    bit, in one forward per block."""
    import qapframe
    from qapframe.quantizers import gptq
    from tests.tiny_models import llava_inputs, tiny_llava

    calibration = [llava_inputs(1, seed=i) for i in range(3)]
    spec = {"name": "gptq", "scheme": scheme, "group_size": 32, "act_order": act_order}
    block_calls = []  # started decoder-layer calls (a shortened pass never completes one)

    def count(model):
        for layer in model.model.language_model.layers:
            layer.register_forward_pre_hook(lambda m, a: block_calls.append(1))
        return model

    one_pass, used = gptq._one_pass, []
    monkeypatch.setattr(gptq, "_one_pass", lambda data, *a: used.append(data.module) or one_pass(data, *a))
    model = count(tiny_llava())
    one = qapframe.quantize(model, spec, calibration).state_dict()
    one_calls, block_calls[:] = len(block_calls), []
    assert used == list(model.model.language_model.layers)  # every decoder block took the one-pass path
    monkeypatch.setattr(gptq, "_one_pass", gptq._multi_pass)
    multi = qapframe.quantize(count(tiny_llava()), spec, calibration).state_dict()
    assert one.keys() == multi.keys() and all(torch.equal(one[k], multi[k]) for k in multi)
    # The batched forward replaces one pass per group (q/k/v, o, gate/up, down), and its output (weight-only
    # scheme) is the block's quantized output: 3 fewer calls per block, and no output pass before the
    # next block (the last block has none anyway).
    blocks = len(model.model.language_model.layers)
    reused_outputs = blocks - 1 if scheme == "W4A16" else 0  # quantized activations need the output pass
    assert len(block_calls) - one_calls == blocks * 3 + reused_outputs
