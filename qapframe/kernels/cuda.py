"""numba CUDA backend: one block per token, the token's row staged once in shared memory.

A CUDA tensor is shared with numba zero-copy (``numba.cuda.as_cuda_array``) and the kernel runs on
torch's current stream. Any other tensor (CPU CI, where ``NUMBA_ENABLE_CUDASIM=1`` makes numba
simulate the device) is copied to a device array, so the same kernel body runs under the simulator.

Layout: threads load the row coalesced into shared memory, leaving one padding slot per group so that
thread q (which owns group q) reads with stride ``group + 1``, free of bank conflicts; each thread
then quantizes its groups serially and a shared-memory tree reduces the per-thread partials.
bfloat16 is not a numba type: it is converted to float32 by torch first (one extra read of 2 bytes and
write of 4 bytes per element); float16 is read natively. NVVM may contract ``x - q * scale`` into an
FMA (numba exposes no switch), which differs from the reference by at most an ulp per element.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import config, cuda, float32, float64

THREADS = 32 if config.ENABLE_CUDASIM else 128  # per block; a power of two (the simulator runs threads as Python threads)
_MAX_THREADS = 128


def unavailable_reason() -> str | None:
    """Why this backend cannot run here, or None when a GPU (or the simulator) is usable."""
    if cuda.is_available():
        return None
    return "numba finds no usable CUDA GPU; NUMBA_ENABLE_CUDASIM=1 (set before numba is imported) simulates one"


@cuda.jit(device=True, inline=True)
def _rint(v):
    # round-half-even; `round` lowers to llrint, undefined for non-finite values, which pass through.
    if v - v != 0:
        return v
    return np.float32(round(v))


@cuda.jit(device=True, inline=True)
def _clamp(v, lo, hi):
    # Comparisons (not fminf/fmaxf) so that NaN propagates, as torch.clamp does.
    if v < lo:
        return lo
    if v > hi:
        return hi
    return v


@cuda.jit(device=True, inline=True)
def _nan_min(a, b):
    return b if (b < a or b != b) else a


@cuda.jit(device=True, inline=True)
def _nan_max(a, b):
    return b if (b > a or b != b) else a


@cuda.jit(device=True)
def _group_stats(row, start, length, qmax, symmetric):
    """Shared-memory group ``row[start : start + length]`` -> (sum of squared errors, min, max)."""
    lo = row[start]
    hi = lo
    for j in range(start, start + length):
        lo = _nan_min(lo, row[j])
        hi = _nan_max(hi, row[j])
    acc = np.float32(0.0)
    if symmetric:
        scale = _nan_max(abs(lo), abs(hi)) / qmax
        if scale > 0:
            qlo = -qmax - np.float32(1.0)
            for j in range(start, start + length):
                v = row[j]
                d = v - _clamp(_rint(v / scale), qlo, qmax) * scale
                acc += d * d
    else:
        scale = (hi - lo) / qmax
        if scale > 0:
            zero = _rint(-lo / scale)
            for j in range(start, start + length):
                v = row[j]
                d = v - (_clamp(_rint(v / scale) + zero, np.float32(0.0), qmax) - zero) * scale
                acc += d * d
    if not scale > 0:
        # The reference keeps such a group exact: x - x, which is NaN for non-finite x.
        for j in range(start, start + length):
            d = row[j] - row[j]
            acc += d * d
    return acc, lo, hi


@cuda.jit
def _sensitivity_kernel(x, group, qmax, symmetric, error, spread):
    """``x [T, D]`` float32/float16 -> ``error, spread [T]``; grid = T blocks."""
    t = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nth = cuda.blockDim.x
    dim = x.shape[1]
    n_groups = (dim + group - 1) // group
    row = cuda.shared.array(0, dtype=float32)  # [D + n_groups] dynamic: one pad slot per group
    part_err = cuda.shared.array(_MAX_THREADS, dtype=float32)
    part_lo = cuda.shared.array(_MAX_THREADS, dtype=float32)
    part_hi = cuda.shared.array(_MAX_THREADS, dtype=float32)

    for k in range(tid, dim, nth):
        row[k + k // group] = np.float32(x[t, k])
    cuda.syncthreads()

    acc = np.float32(0.0)
    lo = np.float32(np.inf)
    hi = np.float32(-np.inf)
    for q in range(tid, n_groups, nth):
        length = min(group, dim - q * group)
        g_err, g_lo, g_hi = _group_stats(row, q * (group + 1), length, qmax, symmetric)
        acc += g_err
        lo = _nan_min(lo, g_lo)
        hi = _nan_max(hi, g_hi)
    part_err[tid] = acc
    part_lo[tid] = lo
    part_hi[tid] = hi
    cuda.syncthreads()

    stride = nth // 2
    while stride > 0:
        if tid < stride:
            part_err[tid] += part_err[tid + stride]
            part_lo[tid] = _nan_min(part_lo[tid], part_lo[tid + stride])
            part_hi[tid] = _nan_max(part_hi[tid], part_hi[tid + stride])
        cuda.syncthreads()
        stride //= 2
    if tid == 0:
        error[t] = math.sqrt(part_err[0])
        spread[t] = part_hi[0] - part_lo[0]


@cuda.jit(device=True, inline=True)
def _unit(v, lo, span):
    # Same float64 ops as `normalization.minmax`, rounded to float32 as it returns.
    if span > 0:
        return np.float32(min(max((np.float64(v) - lo) / span, 0.0), 1.0))
    return np.float32(0.5)


@cuda.jit
def _fuse_kernel(error, spread, score):
    """``error, spread [B, N]`` -> ``score [B, N] = 0.5 * minmax(E) + 0.5 * minmax(R)``; grid = B blocks."""
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nth = cuda.blockDim.x
    n_tok = error.shape[1]
    ext = cuda.shared.array((4, _MAX_THREADS), dtype=float64)  # E min, E max, R min, R max
    e_lo = np.float64(np.inf)
    e_hi = np.float64(-np.inf)
    r_lo = np.float64(np.inf)
    r_hi = np.float64(-np.inf)
    for i in range(tid, n_tok, nth):
        e_lo = min(e_lo, np.float64(error[b, i]))
        e_hi = max(e_hi, np.float64(error[b, i]))
        r_lo = min(r_lo, np.float64(spread[b, i]))
        r_hi = max(r_hi, np.float64(spread[b, i]))
    ext[0, tid] = e_lo
    ext[1, tid] = e_hi
    ext[2, tid] = r_lo
    ext[3, tid] = r_hi
    cuda.syncthreads()
    stride = nth // 2
    while stride > 0:
        if tid < stride:
            ext[0, tid] = min(ext[0, tid], ext[0, tid + stride])
            ext[1, tid] = max(ext[1, tid], ext[1, tid + stride])
            ext[2, tid] = min(ext[2, tid], ext[2, tid + stride])
            ext[3, tid] = max(ext[3, tid], ext[3, tid + stride])
        cuda.syncthreads()
        stride //= 2
    e_lo = ext[0, 0]
    r_lo = ext[2, 0]
    e_span = ext[1, 0] - e_lo
    r_span = ext[3, 0] - r_lo
    for i in range(tid, n_tok, nth):
        # float64 sum of the two float32 halves, as `normalization.fuse` does.
        total = 0.5 * np.float64(_unit(error[b, i], e_lo, e_span))
        total += 0.5 * np.float64(_unit(spread[b, i], r_lo, r_span))
        score[b, i] = np.float32(total)


def _run(x: torch.Tensor, bits: int, group_size: int, symmetric: bool, fuse: bool):
    b, n, d = x.shape
    group = d if group_size == -1 else group_size
    qmax = np.float32(2 ** (bits - 1) - 1) if symmetric else np.float32(2**bits - 1)
    if x.dtype == torch.bfloat16:
        x = x.float()
    tokens = x.reshape(b * n, d).contiguous()  # [T, D]
    shared_bytes = 4 * (d + (d + group - 1) // group)
    sizes = (b, n)
    if x.is_cuda:
        # Zero-copy views of torch buffers, launched on torch's stream so ordering with torch ops holds.
        stream = cuda.external_stream(torch.cuda.current_stream(x.device).cuda_stream)
        error = torch.empty(sizes, dtype=torch.float32, device=x.device)
        spread = torch.empty_like(error)
        score = torch.empty(b, n if fuse else 0, dtype=torch.float32, device=x.device)
        dev = [cuda.as_cuda_array(a) for a in (tokens, error, spread, score)]
    else:
        stream = cuda.stream()
        dev = [cuda.to_device(tokens.numpy(), stream=stream)] + [
            cuda.device_array((b, m), np.float32, stream=stream) for m in (n, n, n if fuse else 0)
        ]
    d_tokens, d_error, d_spread, d_score = dev
    if b * n:
        _sensitivity_kernel[b * n, THREADS, stream, shared_bytes](
            d_tokens, group, qmax, symmetric, d_error.reshape(b * n), d_spread.reshape(b * n)
        )
        if fuse:
            # A second launch: the per-image min/max needs every token of the image finished.
            _fuse_kernel[b, THREADS, stream](d_error, d_spread, d_score)
    if x.is_cuda:
        return error, spread, score
    stream.synchronize()
    return tuple(torch.from_numpy(a.copy_to_host(stream=stream)) for a in (d_error, d_spread, d_score))


def hybrid_sensitivity_cuda(
    x: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, N, D]`` -> ``(E [B, N], R [B, N])`` float32 on ``x``'s device."""
    error, spread, _ = _run(x, bits, group_size, symmetric, fuse=False)
    return error, spread


def sensitivity_score_cuda(
    x: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [B, N, D]`` -> ``(E, R, SQ)``, each ``[B, N]`` float32 on ``x``'s device."""
    return _run(x, bits, group_size, symmetric, fuse=True)


__all__ = ["THREADS", "hybrid_sensitivity_cuda", "sensitivity_score_cuda", "unavailable_reason"]
