"""numba CPU kernel for GPTQ's column loop (`qapframe.quantizers.gptq.gptq_columns_torch` is the reference).

Inside one lazy-update block GPTQ quantizes a column, divides its error by the Cholesky pivot and pushes
it onto every later column of the block: a few small tensor ops per column, so on a CPU the loop is
per-op dispatch (SmolLM2-135M: 150 000 columns, 18 % of GPTQ's time). Here a block's whole loop runs
compiled, output rows in parallel chunks (rows never interact) that stay in cache. Arithmetic is float32 op for op as in the
torch loop (IEEE division, round-half-even, no FMA contraction), so codes and errors are bit-identical.
"""

from __future__ import annotations

import numpy as np
import torch

# qapframe.kernels.cpu sets numba's cache directory before numba compiles anything: import it first.
from qapframe.kernels.cpu import torch_threads_kept

from numba import njit, prange  # noqa: E402

_ROWS = 128  # output rows per parallel work item: a [b, 128] float32 slab (64 KiB at b = 128) stays in cache


@njit(parallel=True, error_model="numpy", boundscheck=False, cache=True, nogil=True)
def _columns(W, U, scale, zero, start, stop, bounds, codes, err):  # pragma: no cover - compiled
    b, rows = W.shape[0], W.shape[1]
    lo, hi = bounds[0], bounds[1]
    for chunk in prange((rows + _ROWS - 1) // _ROWS):
        r0 = chunk * _ROWS
        r1 = min(rows, r0 + _ROWS)
        n = r1 - r0
        # Private copies: numba then knows the slab and the error row do not alias, and vectorizes the
        # rank-1 updates (8x faster than updating W in place).
        slab = W[:, r0:r1].copy()  # [b, n]
        e = np.empty(n, dtype=W.dtype)
        for i in range(start, stop):
            pivot = U[i, i]
            w_i, s_i, z_i, c_i = slab[i], scale[i, r0:r1], zero[i, r0:r1], codes[i, r0:r1]
            for r in range(n):
                w, s, z = w_i[r], s_i[r], z_i[r]
                q = min(max(np.rint(w / s) + z, lo), hi)
                c_i[r] = q
                e[r] = (w - (q - z) * s) / pivot
            err[i, r0:r1] = e
            for j in range(i + 1, b):
                u = U[i, j]
                w_j = slab[j]
                for r in range(n):
                    w_j[r] -= u * e[r]
        W[:, r0:r1] = slab


def gptq_columns_cpu(W: torch.Tensor, U: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, start: int,
                     stop: int, lo: int, hi: int, codes: torch.Tensor, err: torch.Tensor) -> None:
    """`gptq_columns_torch` for contiguous float32 CPU tensors, in place (same arguments and shapes)."""
    with torch_threads_kept():
        _columns(W.numpy(), U.numpy(), scale.numpy(), zero.numpy(), start, stop,
                 np.array([lo, hi], dtype=np.float32), codes.numpy(), err.numpy())


__all__ = ["gptq_columns_cpu"]
