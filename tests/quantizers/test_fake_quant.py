import pytest
import torch
from hypothesis import given, settings, strategies as st

from qapframe.kernels.reference import hybrid_sensitivity_reference
from qapframe.quant_grid import code_range, fake_quantize_groups, qparams, quantize
from qapframe.quantizers.config import ActSpec, WeightSpec
from qapframe.quantizers.fake_quant import ActQuantizer, QuantizedLinear, dequantize_weight, group_index, quantize_weight_rtn


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("value", [0.0, 2.5, -0.75])
def test_constant_groups_are_represented_exactly_with_codes_in_range(value, symmetric):
    """The one grid's edge case: a zero-range group keeps its value, and its codes are valid codes."""
    x = torch.full((3, 8), value)
    assert torch.equal(fake_quantize_groups(x, 4, 4, symmetric), x)
    scale, zero = qparams(x.reshape(3, 2, 4), 4, symmetric)
    codes = quantize(x.reshape(3, 2, 4), scale, zero, 4, symmetric)
    lo, hi = code_range(4, symmetric)
    assert bool((codes >= lo).all() and (codes <= hi).all()) and bool((scale > 0).all())


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8), group=st.sampled_from([-1, 4, 8, 5]), symmetric=st.booleans(),
    rows=st.integers(1, 6), cols=st.integers(1, 24), seed=st.integers(0, 2**16),
)
def test_rtn_weight_is_the_kernel_convention(bits, group, symmetric, rows, cols, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    codes, scales, zeros, g_idx = quantize_weight_rtn(w, WeightSpec(bits, group, symmetric))
    lo, hi = code_range(bits, symmetric)
    assert codes.min() >= lo and codes.max() <= hi and torch.equal(codes, codes.round())
    expected = fake_quantize_groups(w, bits, group, symmetric)
    assert torch.equal(dequantize_weight(codes, scales, zeros, g_idx), expected)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), group=st.sampled_from([-1, 4, 7]), seed=st.integers(0, 2**16))
def test_the_full_symmetric_grid_against_a_direct_reference(bits, group, seed):
    """Full range: scale max|x| / (2^(b-1) - 1/2), every code in [-2^(b-1), 2^(b-1) - 1], round half to even
    (float32, as the grid computes: float64 would round some halves the other way)."""
    x = torch.randn(3, 21, generator=torch.Generator().manual_seed(seed)) * 2
    out = fake_quantize_groups(x, bits, group, True, full_range=True)
    g = 21 if group == -1 else group
    expected = torch.empty(3, 21)
    for start in range(0, 21, g):
        block = x[:, start : start + g]
        scale = block.abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - 0.5)
        codes = torch.clamp(torch.round(block / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        expected[:, start : start + g] = codes * scale
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_the_full_grid_has_a_finer_step_and_errs_by_at_most_half_of_it():
    # max|x| sits 7.5 steps out: clipped to code 7 it is off by half a step, no more than rounding elsewhere
    x = torch.linspace(-1, 1, 1001)[None, :]
    narrow, full = (float(qparams(x, 4, True, f)[0]) for f in (False, True))
    assert narrow == pytest.approx(1 / 7) and full == pytest.approx(1 / 7.5)
    error = (fake_quantize_groups(x, 4, -1, True, full_range=True) - x).abs()
    assert float(error[0, -1]) == pytest.approx(full / 2, rel=1e-5)  # +max|x| clipped
    assert float(error.max()) <= full / 2 + 1e-6 < narrow / 2
    assert float((fake_quantize_groups(x, 4, -1, True) - x).abs().max()) <= narrow / 2 + 1e-6
    # asymmetric grids already span their range: full_range leaves them alone
    assert torch.equal(fake_quantize_groups(x, 4, -1, False, full_range=True), fake_quantize_groups(x, 4, -1, False))


def test_constant_groups_are_exact():
    w = torch.tensor([[0.5] * 4 + [-2.0] * 4, [0.0] * 8])
    for symmetric in (False, True):
        deq = dequantize_weight(*quantize_weight_rtn(w, WeightSpec(4, 4, symmetric)))
        assert torch.equal(deq, w)


def test_group_index_with_permutation():
    perm = torch.tensor([3, 0, 2, 1])
    idx = group_index(4, 2, perm)
    # channels 3 and 0 come first in the permuted order: group 0; channels 2 and 1: group 1
    assert idx.tolist() == [0, 1, 1, 0]


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(4, 8), group=st.sampled_from([-1, 16, 7]), symmetric=st.booleans(), seed=st.integers(0, 999))
def test_activation_quantizer_error_equals_kernel_reference(bits, group, symmetric, seed):
    """The hybrid scorer's E_i is exactly the error this activation quantizer makes on token i."""
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(seed)) * 3  # [B, N, D]
    quant = ActQuantizer(ActSpec(bits, group, symmetric, dynamic=True))
    quant.enabled = True
    error = (x - quant(x)).norm(dim=-1)
    expected, _ = hybrid_sensitivity_reference(x, bits, group, symmetric)
    assert torch.equal(error, expected)


def test_static_per_tensor_range_from_calibration():
    quant = ActQuantizer(ActSpec(8, -1, False, dynamic=False))
    quant.observe(torch.tensor([[-1.0, 0.5], [2.0, 0.0]]))
    quant.observe(torch.tensor([[3.0, -0.5]]))
    quant.enabled = True
    assert quant.lo.item() == -1.0 and quant.hi.item() == 3.0
    x = torch.tensor([[-1.0, 3.0, 10.0, 1.234]])
    y = quant(x)
    step = 4.0 / 255
    assert torch.allclose(y[0, :2], torch.tensor([-1.0, 3.0]), atol=step)
    assert abs(y[0, 2].item() - 3.0) <= step  # clipped to the calibrated range
    assert abs(y[0, 3].item() - 1.234) <= step / 2 + 1e-6


def test_quantized_linear_matches_linear_before_and_dequantized_after():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    module = QuantizedLinear.from_linear(linear, WeightSpec(4, 8, False), None)
    x = torch.randn(3, 16)
    assert torch.equal(module(x), linear(x))
    module.set_quantized(*quantize_weight_rtn(module.weight, module.weight_spec))
    w_hat = fake_quantize_groups(linear.weight, 4, 8, False)
    assert torch.allclose(module(x), torch.nn.functional.linear(x, w_hat, linear.bias))
    assert module.codes.dtype == torch.uint8 and module.scales.shape == (8, 2)


def test_unfused_smoothing_keeps_the_function():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    module = QuantizedLinear.from_linear(linear, WeightSpec(4, -1, True), None)
    module.set_smooth(torch.rand(16) + 0.5)
    x = torch.randn(5, 16)
    assert torch.allclose(module(x), linear(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits, group, symmetric", [(4, 8, False), (4, -1, True), (8, 8, False), (3, 4, True), (2, 16, False)])
def test_packed_codes_forward_like_the_dequantized_weight(bits, group, symmetric):
    """Codes are held packed and dequantized per forward: bit-identical to a Linear on the dequantized weight,
    with no fp copy of the weight resident."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    module = QuantizedLinear.from_linear(linear, WeightSpec(bits, group, symmetric), None)
    codes, scales, zeros, g_idx = quantize_weight_rtn(module.weight, module.weight_spec)
    module.set_quantized(codes, scales, zeros, g_idx)
    x = torch.randn(3, 16)
    w_hat = dequantize_weight(codes, scales, zeros, g_idx)
    assert torch.equal(module(x), torch.nn.functional.linear(x, w_hat, linear.bias))
    assert torch.equal(module.codes.long(), codes.long())
    assert module.qweight.dtype == torch.int32 and module.qweight.shape == (8, -(-16 * bits // 32))
    resident = {n: b for n, b in module.named_buffers()}
    assert all(b.numel() < 8 * 16 or b.dtype == torch.int32 for b in resident.values()), resident.keys()
    with pytest.raises(AttributeError, match="derived from the codes"):
        module.weight = w_hat
