"""Greedy DPP MAP and greedy max-min against direct, slow references on small random inputs."""

import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qapframe.strategies.pruners.selection import cosine_similarity_matrix, greedy_dpp_map, greedy_max_min


def psd_kernel(seed: int, b: int, n: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    r = torch.rand(b, n, generator=g, dtype=torch.float64) + 0.1
    s = cosine_similarity_matrix(x)
    return r[:, :, None] * s * r[:, None, :]


def greedy_by_determinants(kernel: torch.Tensor, k: int) -> list[float]:
    """log det of the greedy set after each step, choosing by explicit determinants (one row)."""
    chosen, logdets = [], []
    for _ in range(k):
        best, best_det = None, -math.inf
        for j in range(kernel.shape[0]):
            if j in chosen:
                continue
            idx = torch.tensor(chosen + [j])
            det = torch.linalg.det(kernel[idx][:, idx]).item()
            if det > best_det:
                best, best_det = j, det
        chosen.append(best)
        logdets.append(best_det)
    return logdets


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 9), d=st.integers(3, 12), data=st.data())
def test_greedy_dpp_map_picks_the_largest_determinant_each_step(seed, n, d, data):
    k = data.draw(st.integers(1, min(n, d)))  # within the kernel's rank every gain is positive
    kernel = psd_kernel(seed, 2, n, d)
    picks = greedy_dpp_map(kernel, k, fallback=torch.zeros(2, n, dtype=torch.float64))
    for row in range(2):
        expected = greedy_by_determinants(kernel[row], k)
        for step in range(1, k + 1):
            idx = picks[row, :step]
            got = torch.linalg.det(kernel[row][idx][:, idx]).item()
            # the greedy choice's determinant is the best available one (ties may pick another token)
            assert got >= expected[step - 1] * (1 - 1e-7) - 1e-12
            assert len(set(idx.tolist())) == step


def test_dpp_exhausted_rank_falls_back_to_the_fallback_order():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]], dtype=torch.float64)
    kernel = cosine_similarity_matrix(x)  # rank 2: after two picks no volume is left
    fallback = torch.tensor([[0.0, 0.0, 0.3, 0.9]], dtype=torch.float64)
    picks = greedy_dpp_map(kernel, 4, fallback=fallback)[0].tolist()
    assert sorted(picks) == [0, 1, 2, 3]
    assert picks[2:] == [3, 2]  # the two picks made after the rank ran out follow the fallback


def greedy_max_min_slow(dist: torch.Tensor, k: int) -> list[int]:
    n = dist.shape[0]
    first = max(range(n), key=lambda i: (min(dist[i, j].item() for j in range(n) if j != i), -i))
    chosen = [first]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(dist[i, j].item() for j in chosen), -i)))
    return chosen


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 8), data=st.data())
def test_greedy_max_min_matches_the_direct_loop_and_is_a_2_approximation(seed, n, data):
    k = data.draw(st.integers(2, n))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, 4, generator=g, dtype=torch.float64)
    cos = cosine_similarity_matrix(x)[0].clamp(-1, 1)
    picks = greedy_max_min(1 - cos[None], k)[0].tolist()
    assert picks == greedy_max_min_slow(1 - cos, k)
    # 1 - cos is not a metric, but the angle is and orders pairs the same way, so the greedy set is the
    # farthest-point greedy of the angle: its smallest pairwise angle is >= half the optimum's.
    angle = torch.arccos(cos)

    def spread(subset):
        return min(angle[i, j].item() for i, j in itertools.combinations(subset, 2))

    best = max(spread(s) for s in itertools.combinations(range(n), k))
    assert spread(picks) >= best / 2 - 1e-9


# -- the numba CPU kernels against the batched torch steps ------------------------------------------------------
from qapframe.strategies.pruners.selection import greedy_dpp_map_torch, greedy_max_min_torch  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), n=st.integers(1, 40), d=st.integers(2, 16),
       dtype=st.sampled_from([torch.float32, torch.float64]), duplicates=st.booleans(), data=st.data())
def test_numba_max_min_picks_what_the_torch_steps_pick(seed, b, n, d, dtype, duplicates, data):
    """Only comparisons and minima: identical picks, exact ties (duplicated tokens) included."""
    k = data.draw(st.integers(1, n))
    x = torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    if duplicates and n > 2:
        x[:, n // 2] = x[:, 0]
    distance = 1.0 - cosine_similarity_matrix(x)
    assert torch.equal(greedy_max_min(distance, k), greedy_max_min_torch(distance, k))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), n=st.integers(1, 40), d=st.integers(2, 48),
       data=st.data())
def test_numba_dpp_map_picks_what_the_torch_steps_pick(seed, b, n, d, data):
    """float64 (sums in another order move gains by ~1e-16), past the rank too, where the fallback decides."""
    k = data.draw(st.integers(1, n))
    kernel = psd_kernel(seed, b, n, d)
    fallback = torch.rand(b, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    assert torch.equal(greedy_dpp_map(kernel, k, fallback), greedy_dpp_map_torch(kernel, k, fallback))


def test_numba_dpp_map_in_float32_keeps_the_torch_picks_on_cdpruners_shapes():
    """576 tokens of an LLaVA image, half kept: the float32 kernel's picks are the torch steps' picks.

    The tokens are wider than they are many (as LLaVA's 4096 > 576), so the kernel has full rank: past its
    rank the float32 gains are rounding noise above ``eps`` and either version's picks would be arbitrary."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 576, 640, generator=g)
    relevance = torch.rand(2, 576, generator=g)
    similarity = cosine_similarity_matrix(x)
    kernel = relevance[:, :, None] * similarity * relevance[:, None, :]
    numba_picks, torch_picks = greedy_dpp_map(kernel, 288, relevance), greedy_dpp_map_torch(kernel, 288, relevance)
    agree = (numba_picks == torch_picks).float().mean().item()
    assert agree == 1.0, f"{agree:.3f} of picks agree"


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 300), d=st.integers(1, 40), b=st.integers(1, 2))
def test_cosine_similarity_matrix_is_symmetric_and_matches_float64(seed, n, d, b):
    """The strip-wise upper triangle, mirrored, across strip edges (N up to 300 spans three strips)."""
    x = torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))
    similarity = cosine_similarity_matrix(x)
    unit = x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    assert similarity.dtype == torch.float32 and similarity.shape == (b, n, n)
    assert torch.equal(similarity, similarity.transpose(1, 2))
    torch.testing.assert_close(similarity.double(), unit @ unit.transpose(1, 2), atol=1e-5, rtol=0)
