"""The numba GPTQ column loop against the torch loop it replaces: the same float32 ops, so identical bits."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qapframe.kernels.gptq_cpu import gptq_columns_cpu
from qapframe.quantizers.config import WeightSpec
from qapframe.quantizers.gptq import gptq_columns_torch, gptq_quantize


def _block(seed: int, b: int, rows: int, bits: int, symmetric: bool):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(b, rows, generator=g) * torch.rand(1, rows, generator=g) * 3
    A = torch.randn(b, b, generator=g) * 0.2 + torch.eye(b) * 2
    U = torch.linalg.cholesky(A @ A.T, upper=True).contiguous()
    scale = W.abs().amax(dim=0, keepdim=True).expand(b, rows).contiguous() / (2 ** (bits - 1) - 1)
    zero = torch.zeros(b, rows) if symmetric else torch.full((b, rows), float(2 ** (bits - 1)))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    return W, U, scale, zero, lo, hi


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 40), rows=st.integers(1, 300), bits=st.sampled_from([2, 4, 8]),
       symmetric=st.booleans(), data=st.data())
def test_numba_columns_are_bit_identical_to_the_torch_loop(seed, b, rows, bits, symmetric, data):
    start = data.draw(st.integers(0, b - 1))
    stop = data.draw(st.integers(start + 1, b))
    W, U, scale, zero, lo, hi = _block(seed, b, rows, bits, symmetric)
    outs = []
    for columns in (gptq_columns_torch, gptq_columns_cpu):
        w, codes, err = W.clone(), torch.full((b, rows), -99.0), torch.full((b, rows), -99.0)
        columns(w, U, scale, zero, start, stop, lo, hi, codes, err)
        outs.append((w, codes[start:stop], err[start:stop]))
    for numba_out, torch_out in zip(outs[1], outs[0]):
        assert torch.equal(numba_out, torch_out)


@pytest.mark.parametrize("group, act_order", [(-1, "off"), (32, "off"), (32, "group"), (32, "static"), (256, "off")])
def test_gptq_with_the_numba_loop_equals_the_torch_loop(monkeypatch, group, act_order):
    """Whole-layer GPTQ (grids per group from updated columns, blocks of 64) with either loop."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 192, generator=g) * torch.linspace(0.1, 4, 192)
    w = torch.randn(80, 192, generator=g)
    spec = WeightSpec(4, group, False)
    fast = gptq_quantize(w, 2 * x.T @ x / 400, spec, block_size=64, act_order=act_order)
    monkeypatch.setattr("qapframe.kernels.gptq_cpu.gptq_columns_cpu", gptq_columns_torch)
    slow = gptq_quantize(w, 2 * x.T @ x / 400, spec, block_size=64, act_order=act_order)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))
