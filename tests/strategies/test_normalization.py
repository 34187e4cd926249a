"""Property tests of per-image normalization and weighted fusion (the math the hybrid score rests on)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qapframe.strategies.base import keep_top_k
from qapframe.strategies.normalization import fuse, minmax, normalize, rank, zscore

settings.register_profile("qapframe", deadline=None, max_examples=60)
settings.load_profile("qapframe")

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def score_rows(draw, min_tokens=1, max_tokens=24, elements=finite):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(min_tokens, max_tokens))
    values = draw(st.lists(elements, min_size=b * n, max_size=b * n))
    return torch.tensor(values, dtype=torch.float64).reshape(b, n)


def spread(x: torch.Tensor) -> torch.Tensor:
    return (x.amax(-1) - x.amin(-1))


@given(score_rows())
def test_minmax_lies_in_unit_interval_and_hits_both_ends(x):
    y = minmax(x)
    assert torch.isfinite(y).all() and (y >= 0).all() and (y <= 1).all()
    varying = spread(x) > 0
    assert torch.equal(y.amin(-1)[varying], torch.zeros_like(y.amin(-1)[varying]))
    assert torch.equal(y.amax(-1)[varying], torch.ones_like(y.amax(-1)[varying]))


@given(score_rows(), st.floats(1e-2, 1e2), st.floats(-1e3, 1e3))
def test_minmax_and_zscore_are_invariant_under_positive_affine_maps(x, a, b):
    # Rows whose spread is tiny relative to their magnitude lose information to rounding in a*x+b.
    y = a * x + b
    ok = spread(x) > 1e-6 * (x.abs().amax(-1) + abs(b) / a + 1)
    for fn in (minmax, zscore):
        torch.testing.assert_close(fn(y)[ok], fn(x)[ok], atol=1e-6, rtol=1e-6)


@given(score_rows(min_tokens=2))
def test_normalizations_preserve_order(x):
    for fn in (minmax, zscore, rank):
        y = fn(x)
        lower = x.unsqueeze(-1) < x.unsqueeze(-2)  # [B, N, N]: x_i < x_j
        assert (y.unsqueeze(-1) <= y.unsqueeze(-2))[lower].all(), fn.__name__


@given(st.integers(1, 3), st.integers(1, 20), finite)
def test_constant_rows_give_the_scale_centre_not_nan(b, n, value):
    x = torch.full((b, n), value, dtype=torch.float64)
    assert torch.equal(minmax(x), torch.full_like(x, 0.5))
    assert torch.equal(zscore(x), torch.zeros_like(x))
    assert torch.equal(rank(x), torch.full_like(x, 0.5))


@given(score_rows(min_tokens=2))
def test_zscore_has_zero_mean_and_unit_std(x):
    y = zscore(x)
    ok = spread(x) > 1e-9 * (x.abs().amax(-1) + 1)
    torch.testing.assert_close(y.mean(-1)[ok], torch.zeros_like(y.mean(-1)[ok]), atol=1e-9, rtol=0)
    torch.testing.assert_close(y.std(-1, unbiased=False)[ok], torch.ones_like(y.mean(-1)[ok]), atol=1e-9, rtol=0)


@given(score_rows(min_tokens=1, elements=st.integers(-5, 5).map(float)))
def test_rank_gives_tied_values_their_mean_rank(x):
    y = rank(x)
    n = x.shape[-1]
    for row_x, row_y in zip(x, y):
        for i in range(n):
            less = (row_x < row_x[i]).sum().item()
            equal = (row_x == row_x[i]).sum().item()
            expected = 0.5 if n == 1 else (less + (equal - 1) / 2) / (n - 1)
            assert math.isclose(row_y[i].item(), expected, abs_tol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["minmax", "zscore", "rank", "none"])
def test_non_finite_input_is_rejected_with_the_row(bad, method):
    x = torch.zeros(3, 5)
    x[2, 1] = bad
    with pytest.raises(ValueError, match=r"NaN or inf \(rows \[2\]\)"):
        normalize(x, method)


def test_bad_shapes_methods_and_weights_are_rejected():
    with pytest.raises(ValueError, match=r"shape \[B, N\]"):
        minmax(torch.zeros(5))
    with pytest.raises(ValueError, match="valid: minmax, zscore, rank, none"):
        normalize(torch.zeros(1, 3), "softmax")
    with pytest.raises(ValueError, match="non-negative"):
        fuse([torch.zeros(1, 3)], [-1.0])
    with pytest.raises(ValueError, match="one weight per score"):
        fuse([torch.zeros(1, 3)], [0.5, 0.5])


@given(score_rows(), st.integers(0, 2**16))
def test_fusion_with_weight_one_on_one_input_equals_that_input(a, seed):
    b = torch.randn(a.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(fuse([a, b], [1.0, 0.0]), minmax(a), atol=0, rtol=0)
    torch.testing.assert_close(fuse([a, b], [1.0, 0.0], normalization="none"), a, atol=0, rtol=0)


@given(score_rows(), st.floats(0, 1))
def test_fusion_matches_a_float64_hand_computation(a, alpha):
    b = torch.flip(a, dims=[-1]) ** 2
    expected = alpha * minmax(a) + (1 - alpha) * minmax(b)
    torch.testing.assert_close(fuse([a, b], [alpha, 1 - alpha]), expected, atol=1e-12, rtol=0)


@given(
    st.lists(st.integers(-10_000, 10_000), min_size=2, max_size=40, unique=True),
    st.lists(st.integers(-10_000, 10_000), min_size=40, max_size=40),
    st.floats(0, 1),
    st.integers(1, 40),
)
def test_top_k_of_fused_score_is_invariant_under_monotone_maps(sem, quant, alpha, k):
    n = len(sem)
    k = min(k, n)
    a = torch.tensor(sem, dtype=torch.float64).unsqueeze(0) / 64
    b = torch.tensor(quant[:n], dtype=torch.float64).unsqueeze(0) / 64
    fused = fuse([a, b], [alpha, 1 - alpha])
    expected = keep_top_k(fused, k)
    for monotone in (lambda t: 3 * t + 7, torch.exp, lambda t: t**3 + t, torch.sigmoid):
        assert torch.equal(keep_top_k(monotone(fused), k), expected)
    assert torch.equal(expected, expected.sort(dim=-1).values)  # original order preserved
