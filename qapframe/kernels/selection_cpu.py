"""numba CPU kernels for the diversity pruners' greedy selections (`qapframe.strategies.pruners.selection`).

The torch versions take one batched step per pick: a few tensor ops each, so for k = 288 of 576 tokens the
selection is mostly per-op dispatch (tens of ms on one core). Here each image's whole greedy loop runs in
compiled code, images in parallel. Same rules as the torch versions, op for op: ties go to the earlier token,
picked tokens leave with -inf, an exhausted DPP row follows its fallback; arithmetic is in the inputs' dtype
(the DPP's dot products summed in pick order, where torch's bmm may sum in another, so float32 gains can
differ in their last bits; DivPrune only compares and takes minima, so its picks are identical).
"""

from __future__ import annotations

import numpy as np
import torch

# qapframe.kernels.cpu sets numba's cache directory before numba compiles anything: import it first.
from qapframe.kernels.cpu import torch_threads_kept

from numba import njit, prange  # noqa: E402

_JIT = dict(cache=True, nogil=True)


@njit(parallel=True, **_JIT)
def _dpp_map(kernel, k, fallback, eps_array, picks):  # pragma: no cover - compiled
    b, n = kernel.shape[0], kernel.shape[1]
    eps = eps_array[0]  # in the kernel's dtype, as torch compares and clamps against it
    for r in prange(b):
        gains = np.empty(n, dtype=kernel.dtype)
        order = np.empty(n, dtype=fallback.dtype)
        for i in range(n):
            gains[i] = kernel[r, i, i]
            order[i] = fallback[r, i]
        factors = np.zeros((k, n), dtype=kernel.dtype)
        dots = np.empty(n, dtype=kernel.dtype)
        for step in range(k):
            j, best = 0, gains[0]
            for i in range(1, n):
                if gains[i] > best:
                    best, j = gains[i], i
            alive = best > eps
            if not alive:  # no volume left in this row: the fallback order decides from here on
                j, top = 0, order[0]
                for i in range(1, n):
                    if order[i] > top:
                        top, j = order[i], i
            picks[r, step] = j
            dots[:] = 0
            for s in range(step):
                c = factors[s, j]
                for i in range(n):
                    dots[i] += c * factors[s, i]
            if alive:  # else the row's update is zero: factors stay 0, gains unchanged
                pivot = np.sqrt(max(best, eps))
                for i in range(n):
                    update = (kernel[r, j, i] - dots[i]) / pivot
                    factors[step, i] = update
                    gains[i] -= update * update
            gains[j] = -np.inf
            order[j] = -np.inf


@njit(parallel=True, **_JIT)
def _max_min(distance, k, picks):  # pragma: no cover - compiled
    b, n = distance.shape[0], distance.shape[1]
    for r in prange(b):
        first = 0
        if n > 1:
            best = -np.inf
            for i in range(n):
                nearest_other = np.inf
                for j in range(n):
                    if j != i and distance[r, i, j] < nearest_other:
                        nearest_other = distance[r, i, j]
                if nearest_other > best:
                    best, first = nearest_other, i
        picks[r, 0] = first
        taken = np.zeros(n, dtype=np.bool_)
        taken[first] = True
        nearest = distance[r, first].copy()
        for step in range(1, k):
            j, far = -1, -np.inf
            for i in range(n):
                if not taken[i] and (j < 0 or nearest[i] > far):
                    far, j = nearest[i], i
            picks[r, step] = j
            taken[j] = True
            for i in range(n):
                if distance[r, j, i] < nearest[i]:
                    nearest[i] = distance[r, j, i]


def greedy_dpp_map_cpu(kernel: torch.Tensor, k: int, fallback: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """`greedy_dpp_map` for CPU tensors: ``kernel [B, N, N]`` -> ``[B, k]`` picks in pick order."""
    kernel = kernel.detach().contiguous()
    fallback = fallback.detach().to(kernel.dtype).contiguous()
    picks = torch.empty(kernel.shape[0], k, dtype=torch.int64)
    if k and kernel.shape[0]:
        with torch_threads_kept():
            _dpp_map(kernel.numpy(), k, fallback.numpy(), kernel.new_tensor([eps]).numpy(), picks.numpy())
    return picks


def greedy_max_min_cpu(distance: torch.Tensor, k: int) -> torch.Tensor:
    """`greedy_max_min` for CPU tensors: ``distance [B, N, N]`` -> ``[B, k]`` picks in pick order."""
    distance = distance.detach().contiguous()
    picks = torch.empty(distance.shape[0], k, dtype=torch.int64)
    if k and distance.shape[0]:
        with torch_threads_kept():
            _max_min(distance.numpy(), k, picks.numpy())
    return picks


__all__ = ["greedy_dpp_map_cpu", "greedy_max_min_cpu"]
