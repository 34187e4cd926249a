"""Input generators and backend-vs-reference checks shared by the CPU tests and the CUDA(-simulator) cases."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from qapframe.kernels import hybrid_sensitivity, sensitivity_score
from qapframe.kernels.reference import hybrid_sensitivity_reference
from qapframe.strategies.normalization import fuse

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@st.composite
def problems(draw, max_tokens=24, max_dim=300):
    """(x [B, N, D], bits, group_size, symmetric) with awkward shapes, exact ties and constant tokens."""
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_tokens))
    d = draw(st.integers(1, max_dim))
    group = draw(st.sampled_from([-1, 1, 2, 3, 16, 32, 64, 128, 129]))  # D % group is often non-zero
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    style = draw(st.sampled_from(["normal", "halves", "outliers", "offset"]))
    x = torch.randn(b, n, d, generator=gen)
    if style == "halves":  # multiples of 0.5 on a small range: many exact round-half-even ties
        x = torch.randint(-6, 7, (b, n, d), generator=gen).float() / 2
    elif style == "outliers":  # a few large channels, as LLaVA projector outputs have
        x[..., torch.randint(0, d, (max(1, d // 50),), generator=gen)] *= 40.0
    elif style == "offset":  # values far from zero relative to their range
        x = 100.0 + 0.01 * x
    constant = torch.rand(b, n, generator=gen) < 0.2  # tokens with max == min
    x[constant] = x[constant][..., :1].expand(-1, d).clone()
    return x.to(dtype), bits, group, symmetric


def assert_matches_reference(x, bits, group, symmetric, backend):
    error, spread = hybrid_sensitivity(x, bits, group, symmetric, backend=backend)
    ref_error, ref_spread = hybrid_sensitivity_reference(x, bits, group, symmetric)
    assert error.dtype == spread.dtype == torch.float32
    assert error.shape == spread.shape == x.shape[:2]
    assert error.device == x.device
    # Only the summation order of the squared errors may differ; R is exact.
    torch.testing.assert_close(error.cpu(), ref_error.cpu(), rtol=1e-5, atol=0.0)
    assert torch.equal(spread.cpu(), ref_spread.cpu())


def assert_score_is_minmax_fusion(x, bits, group, symmetric, backend):
    score = sensitivity_score(x, bits, group, symmetric, backend=backend)
    error, spread = hybrid_sensitivity(x, bits, group, symmetric, backend=backend)
    assert score.dtype == torch.float32 and score.shape == x.shape[:2]
    assert torch.equal(score.cpu(), fuse([error.cpu(), spread.cpu()], [0.5, 0.5], "minmax"))


def non_finite_input() -> torch.Tensor:
    x = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(0))
    x[0, 1, 3] = float("nan")  # one NaN in a group
    x[0, 2, :20] = float("nan")  # a whole group NaN
    x[0, 3, 5] = float("inf")
    x[1, 4, :] = float("-inf")  # constant -inf token: the exact (zero-scale) path gives -inf - -inf = NaN
    x[1, 5, :] = float("nan")
    return x


def assert_non_finite_like_reference(backend):
    x = non_finite_input()
    for symmetric in (False, True):
        error, spread = hybrid_sensitivity(x, 4, 16, symmetric, backend=backend)
        ref_error, ref_spread = hybrid_sensitivity_reference(x, 4, 16, symmetric)
        torch.testing.assert_close(error.cpu(), ref_error, rtol=1e-5, atol=0.0, equal_nan=True)
        torch.testing.assert_close(spread.cpu(), ref_spread, rtol=0.0, atol=0.0, equal_nan=True)
