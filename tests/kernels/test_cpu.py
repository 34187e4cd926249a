"""numba CPU kernel against the torch reference (hypothesis shapes, dtypes, ties, constant tokens)."""

import pytest
import torch
from hypothesis import given, settings

from qapframe.kernels import BACKENDS, hybrid_sensitivity
from qapframe.kernels.reference import hybrid_sensitivity_reference
from tests.kernels.cases import (
    assert_matches_reference,
    assert_non_finite_like_reference,
    assert_score_is_minmax_fusion,
    problems,
)

pytestmark = pytest.mark.skipif("numba-cpu" not in BACKENDS, reason="numba CPU backend unavailable")


@settings(max_examples=60, deadline=None)
@given(problems())
def test_cpu_matches_reference(problem):
    assert_matches_reference(*problem, backend="numba-cpu")


@settings(max_examples=20, deadline=None)
@given(problems(max_tokens=12, max_dim=80))
def test_cpu_score_equals_minmax_fusion(problem):
    x, bits, group, symmetric = problem
    if not torch.isfinite(hybrid_sensitivity_reference(x, bits, group, symmetric)[0]).all():
        return  # fp16 overflow of a large outlier; covered by the non-finite test
    assert_score_is_minmax_fusion(x, bits, group, symmetric, backend="numba-cpu")


def test_cpu_non_finite_like_reference():
    assert_non_finite_like_reference("numba-cpu")


def test_cpu_llava_shape_and_strided_input():
    # One LLaVA-1.5-sized image (576 x 4096, group 128), read through a transposed (non-contiguous) view.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4096, 576, generator=gen).transpose(1, 2)  # [1, 576, 4096], strided
    assert_matches_reference(x, 4, 128, False, backend="numba-cpu")
    assert_matches_reference(x.to(torch.bfloat16), 4, 128, True, backend="numba-cpu")


def test_cpu_is_the_default_for_cpu_tensors():
    x = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(1))
    default = hybrid_sensitivity(x, 4, 32)
    explicit = BACKENDS["numba-cpu"](x, 4, 32, False)
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))


def test_cpu_empty_token_axis():
    error, spread = hybrid_sensitivity(torch.zeros(2, 0, 16), 4, 8, backend="numba-cpu")
    assert error.shape == spread.shape == (2, 0)
