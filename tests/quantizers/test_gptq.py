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
    """Quantize columns one by one; after each, ``W_F -= e / [H^-1]_qq * [H^-1]_{q,F}`` and eliminate q from H^-1."""
    W = weight.double().clone()
    H = hessian.double().clone()
    n = W.shape[1]
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n)
    H = H + damp * torch.diag(H).mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros_like(W)
    deq = torch.zeros_like(W)
    g = n if group == -1 else group
    for pos, q in enumerate(order.tolist()):
        if pos % g == 0:
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


@pytest.mark.parametrize("group, act_order, symmetric", [(-1, False, False), (16, False, False), (16, True, False),
                                                         (-1, True, True), (32, True, True)])
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
