"""numba CUDA kernel cases. Collected only through `test_cuda.py`, which runs this file in a subprocess
with NUMBA_ENABLE_CUDASIM=1 (the simulator must be chosen before numba.cuda is imported), and directly
on a machine with a GPU. Shapes stay tiny: the simulator runs every GPU thread as a Python thread."""

import pytest
import torch
from hypothesis import given, settings

from qapframe.kernels import BACKENDS
from tests.kernels.cases import (
    assert_matches_reference,
    assert_non_finite_like_reference,
    assert_score_is_minmax_fusion,
    problems,
)

pytestmark = pytest.mark.skipif("numba-cuda" not in BACKENDS, reason="no CUDA GPU and no simulator")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors are copied to the (simulated) device


@settings(max_examples=12, deadline=None)
@given(problems(max_tokens=3, max_dim=70))
def test_cuda_matches_reference(problem):
    x, bits, group, symmetric = problem
    assert_matches_reference(x.to(DEVICE), bits, group, symmetric, backend="numba-cuda")


def test_cuda_many_groups_per_thread():
    # 70 one-channel groups > 32 threads per block: threads loop over several groups.
    x = torch.randn(1, 2, 70, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for symmetric in (False, True):
        assert_matches_reference(x, 3, 1, symmetric, backend="numba-cuda")


def test_cuda_score_equals_minmax_fusion():
    x = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(1))
    x[1, 2] = 0.5  # a constant token
    assert_score_is_minmax_fusion(x.to(DEVICE), 4, 16, False, backend="numba-cuda")
    assert_score_is_minmax_fusion(torch.full((1, 3, 8), 2.0).to(DEVICE), 4, 4, True, backend="numba-cuda")


def test_cuda_non_finite_like_reference():
    assert_non_finite_like_reference("numba-cuda")
