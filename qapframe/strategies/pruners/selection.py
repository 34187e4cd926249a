"""Diversity-driven subset selection shared by the pre-LLM pruners, as pure functions over ``[B, N, *]``.

- `greedy_dpp_map`: greedy MAP inference for a DPP with kernel ``L [B, N, N]`` by the incremental
  Cholesky updates of Chen, Zhang & Zhou, "Fast Greedy MAP Inference for Determinantal Point Process
  to Improve Recommendation Diversity" (NeurIPS 2018), Algorithm 1: O(N k) memory and O(N k^2) time for
  k picks, with no determinant ever computed.
- `greedy_max_min`: the greedy (farthest-point) heuristic for the max-min diversity problem, as DivPrune
  uses it; for a metric distance it is a 2-approximation (Ravi, Rosenkrantz & Tayi, 1994).
- `cosine_similarity_matrix`: ``[B, N, D] -> [B, N, N]``, through `symmetric_gram` (half the FLOPs of a matmul).
- `density_peak_clusters`: DPC-kNN (Du et al., 2016) as SparseVLM and PruneVid cluster tokens before merging;
  `density_peak_scores`, its centre scores, as FastVID picks its anchor tokens.

All run batched over images, compute in at least float32, and break ties toward the earlier token. On CPU
the two greedy loops run as numba kernels (`qapframe.kernels.selection_cpu`: the same rules, compiled; the
batched torch steps here are the reference and the GPU path).
"""

from __future__ import annotations

import torch


SIMILARITY_BLOCK = 128  # rows per strip of the upper triangle: big enough for an efficient matmul


def symmetric_gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows [B, N, D]`` -> ``rows @ rows^T`` ``[B, N, N]``, exactly symmetric.

    Only the upper triangle is multiplied, in strips of `SIMILARITY_BLOCK` rows, and mirrored: ~(1/2 + b/2N)
    of the full product's FLOPs (0.6 at N = 576), which is most of CDPruner's and DivPrune's cost at D = 4096.
    Exact symmetry also keeps mutual ties (two tokens that are each other's nearest neighbour) tied, so they
    break toward the earlier token as documented; a full matmul may round g_ij and g_ji differently.
    """
    b, n, _ = rows.shape
    gram = rows.new_empty(b, n, n)
    for start in range(0, n, SIMILARITY_BLOCK):
        stop = min(n, start + SIMILARITY_BLOCK)
        strip = rows[:, start:stop] @ rows[:, start:].transpose(1, 2)  # [B, strip rows, N - start]
        square = strip[:, :, : stop - start]  # the strip's own diagonal block: mirror its upper triangle
        strip[:, :, : stop - start] = square.triu() + square.triu(1).transpose(1, 2)
        gram[:, start:stop, start:] = strip
        gram[:, stop:, start:stop] = strip[:, :, stop - start :].transpose(1, 2)
    return gram


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [B, N, D]`` -> each token scaled to unit L2 norm, in float32 or wider."""
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return torch.nn.functional.normalize(x, dim=-1)


def cosine_similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """``x [B, N, D]`` -> pairwise cosine similarity ``[B, N, N]`` (float32 or wider), exactly symmetric."""
    return symmetric_gram(unit_rows(x))


def density_peak_scores(x: torch.Tensor, neighbours: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [R, D]`` -> each token's centre score ``density * delta`` ``[R]`` and the distances ``[R, R]``.

    Distances over ``sqrt(D)``; density ``exp(-mean d^2)`` over the ``neighbours`` nearest tokens, self
    included; delta: the distance to the nearest denser token (the densest: the largest distance).
    Computed in float64; equal densities: the earlier token counts as denser.
    """
    x = x.double()  # float64 Gram matrix: fast (one matmul) yet exact enough for the comparisons below
    r, d = x.shape
    gram = x @ x.transpose(0, 1)  # [R, R]
    # Exactly symmetric, so mutual nearest neighbours get bit-equal densities and their tie goes to the
    # earlier token (a matmul may round g_ij and g_ji differently).
    gram = (gram + gram.transpose(0, 1)) / 2
    squared = (gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram).clamp_min(0).fill_diagonal_(0)
    dist = squared.sqrt() / d**0.5  # [R, R]
    nearest = dist.topk(min(neighbours, r), dim=-1, largest=False).values  # [R, k], self (0) included
    density = torch.exp(-nearest.square().mean(dim=-1))  # [R]
    index = torch.arange(r, device=x.device)
    # denser[i, j]: token j is denser than token i (equal densities: the earlier token counts as denser)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))
    delta = torch.where(denser, dist, dist.max()).amin(dim=-1)  # distance to the nearest denser token
    return delta * density, dist


def density_peak_centres(x: torch.Tensor, clusters: int, neighbours: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [R, D]`` -> the DPC-kNN centres ``[C]`` (ascending) and each token's cluster ``[R]`` in ``0..C-1``.

    The centres are the ``C`` highest `density_peak_scores` (ties: the earlier token); every other token
    joins its nearest centre (ties: the earlier one); cluster ``c`` is the one of ``centres[c]``.
    """
    score, dist = density_peak_scores(x, neighbours)
    order = torch.sort(score, descending=True, stable=True).indices[:clusters]
    centres = torch.sort(order).values  # [C] ascending
    assign = dist[:, centres].argmin(dim=-1)  # nearest centre (ties: the earlier one)
    assign[centres] = torch.arange(clusters, device=x.device)
    return centres, assign


def density_peak_clusters(x: torch.Tensor, clusters: int, neighbours: int) -> torch.Tensor:
    """``x [R, D]`` -> each token's cluster ``[R]`` in ``0..C-1``, clusters numbered by their centre's index."""
    return density_peak_centres(x, clusters, neighbours)[1]


def greedy_dpp_map(kernel: torch.Tensor, k: int, fallback: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """`greedy_dpp_map_torch`, as a numba kernel for CPU tensors."""
    if kernel.device.type == "cpu":
        from qapframe.kernels.selection_cpu import greedy_dpp_map_cpu

        return greedy_dpp_map_cpu(kernel, k, fallback, eps)
    return greedy_dpp_map_torch(kernel, k, fallback, eps)


def greedy_max_min(distance: torch.Tensor, k: int) -> torch.Tensor:
    """`greedy_max_min_torch`, as a numba kernel for CPU tensors."""
    if distance.device.type == "cpu":
        from qapframe.kernels.selection_cpu import greedy_max_min_cpu

        return greedy_max_min_cpu(distance, k)
    return greedy_max_min_torch(distance, k)


def greedy_dpp_map_torch(kernel: torch.Tensor, k: int, fallback: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Greedy MAP of a DPP: ``kernel [B, N, N]`` (PSD) -> ``[B, k]`` picked indices, in pick order.

    Each step adds the token with the largest marginal gain ``d_j^2 = L_jj - ||c_j||^2`` (the squared
    Cholesky pivot, i.e. ``det(L_{S+j}) / det(L_S)``). Once every gain of a row is below ``eps`` the
    kernel has no volume left there (rank exhausted, or zero relevance); the remaining picks then
    follow ``fallback [B, N]`` (higher first), so that exactly k tokens come back.
    """
    b, n, _ = kernel.shape
    rows = torch.arange(b, device=kernel.device)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # [B, N] d_j^2; picked tokens become -inf
    factors = kernel.new_zeros(b, k, n)  # [B, k, N] c_j, one Cholesky row per pick
    fallback = fallback.to(kernel.dtype).clone()  # picked tokens become -inf here too
    picks = torch.empty(k, b, dtype=torch.long, device=kernel.device)
    for step in range(k):
        best_gain, j = gains.max(dim=-1)  # max() returns the first index of a tie
        alive = best_gain > eps
        exhausted = not bool(alive.all())
        if exhausted:  # rare: some row has no volume left; it follows the fallback order from here on
            j = torch.where(alive, j, fallback.argmax(dim=-1))
        picks[step] = j
        # e_i = (L_ji - <c_j, c_i>) / d_j, then d_i^2 -= e_i^2: the rank-one Cholesky update.
        dot = torch.bmm(factors[rows, :step, j].unsqueeze(1), factors[:, :step]).squeeze(1)  # [B, N]
        update = (kernel[rows, j] - dot) / best_gain.clamp_min(eps).sqrt()[:, None]
        if exhausted:
            update = torch.where(alive[:, None], update, torch.zeros_like(update))
        factors[:, step] = update
        gains -= update.square()
        gains[rows, j] = float("-inf")
        fallback[rows, j] = float("-inf")
    return picks.transpose(0, 1)  # [B, k]


def greedy_max_min_torch(distance: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity: ``distance [B, N, N]`` -> ``[B, k]`` picked indices, in pick order.

    The first pick is the token whose nearest other token is farthest away; each next pick is the
    token farthest from its nearest already-picked token.
    """
    b, n, _ = distance.shape
    rows = torch.arange(b, device=distance.device)
    off_diagonal = distance.masked_fill(torch.eye(n, dtype=torch.bool, device=distance.device), float("inf"))
    if n > 1:
        first = off_diagonal.amin(dim=-1).argmax(dim=-1)
    else:
        first = torch.zeros(b, dtype=torch.long, device=distance.device)
    picks = [first]
    taken = torch.zeros(b, n, dtype=torch.bool, device=distance.device)
    taken[rows, first] = True
    nearest = distance[rows, first].clone()  # [B, N] distance to the nearest picked token
    for _ in range(1, k):
        j = nearest.masked_fill(taken, float("-inf")).argmax(dim=-1)
        picks.append(j)
        taken[rows, j] = True
        nearest = torch.minimum(nearest, distance[rows, j])
    return torch.stack(picks, dim=1)
