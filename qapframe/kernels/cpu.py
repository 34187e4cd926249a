"""numba CPU backend: one parallel pass over the B*N tokens computing E, R (and optionally SQ).

Per token and per group of channels: load the group once for min/max, then quantize-dequantize it
and accumulate the squared error while it is still in L1. Arithmetic follows `reference.py` op for op
in float32 (IEEE division, round-half-even, no FMA contraction), so results match the torch
reference up to the summation order of the squared errors.

Why the few LLVM intrinsics below instead of ``fastmath``: fastmath would license reciprocal division
and FMA contraction, both of which change per-element results. Instead only the error *sum* is
reassociable, the group min/max scan is a no-NaN compare-select (vectorized into ``vminps``/``vmaxps``
reductions; NaN is detected through the error path instead, see `_token_stats`), and the clamp uses
``llvm.minimum``/``llvm.maximum`` (NaN-propagating, like ``torch.clamp``). ``error_model="numpy"``
drops numba's per-element zero-division check, which would otherwise block vectorization.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from qapframe.cache import cache_dir


def numba_cache_dir() -> Path:
    """Where qapframe's compiled kernels are cached: ``numba`` under `qapframe.cache.cache_dir`."""
    return cache_dir() / "numba"


# Why before numba's import: with ``cache=True`` numba otherwise writes .nbi/.nbc files into the installed
# package's ``__pycache__``; a later ``pip install -e`` leaves that folder behind in site-packages, where
# Python imports it as an empty ``qapframe`` package that hides the editable one. numba re-reads the
# variable whenever it compiles, so the environment (not ``numba.config``) is the setting that holds.
# A user's own NUMBA_CACHE_DIR wins.
if not os.environ.get("NUMBA_CACHE_DIR"):
    os.environ["NUMBA_CACHE_DIR"] = str(numba_cache_dir())

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402

_JIT = dict(error_model="numpy", boundscheck=False, cache=True)
_CHUNK = 16  # tokens per parallel work item: amortizes the per-item scratch row of the 2-byte paths

# Input formats: float16/bfloat16 arrive as their raw 16-bit patterns (numba has no CPU half types).
FMT_F32, FMT_F16, FMT_BF16 = 0, 1, 2


def _float_binary_intrinsic(llvm_name: str):
    @intrinsic
    def _fn(typingctx, a, b):
        def codegen(context, builder, signature, args):
            fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType(), ir.FloatType()])
            return builder.call(cgutils.get_or_insert_function(builder.module, fnty, llvm_name), args)

        return types.float32(types.float32, types.float32), codegen

    return _fn


_minimum = _float_binary_intrinsic("llvm.minimum.f32")
_maximum = _float_binary_intrinsic("llvm.maximum.f32")


def _select_intrinsic(op: str):
    """``b if b <op> a else a`` with no-NaN flags: what lets LLVM turn a min/max scan into a vector
    reduction (with ``llvm.minimum`` the horizontal step costs more than the scan itself)."""

    @intrinsic
    def _fn(typingctx, a, b):
        def codegen(context, builder, signature, args):
            take_b = builder.fcmp_ordered(op, args[1], args[0], flags=("nnan", "nsz"))
            return builder.select(take_b, args[1], args[0], flags=("nnan", "nsz"))

        return types.float32(types.float32, types.float32), codegen

    return _fn


_scan_min = _select_intrinsic("<")
_scan_max = _select_intrinsic(">")


@intrinsic
def _add_reassoc(typingctx, a, b):
    """float32 add that LLVM may reorder: turns the squared-error sum into a vector reduction."""

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1], flags=("reassoc",))

    return types.float32(types.float32, types.float32), codegen


@intrinsic
def _half_bits_to_f32(typingctx, bits):
    """IEEE binary16 bit pattern (uint16) -> float32, exact (subnormals, inf, NaN included)."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _bf16_bits_to_f32(typingctx, bits):
    """bfloat16 bit pattern (uint16) -> float32: the pattern is the float32's upper half."""

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.uint16), codegen


def _widen_row(src, scratch, fmt):
    """``src [D]`` as float32: itself when already float32, else decoded into ``scratch [D]``."""


@overload(_widen_row, inline="always")
def _widen_row_impl(src, scratch, fmt):
    if src.dtype == types.float32:
        return lambda src, scratch, fmt: src
    if src.dtype == types.uint16:

        def impl(src, scratch, fmt):
            if fmt == FMT_F16:
                for j in range(src.shape[0]):
                    scratch[j] = _half_bits_to_f32(src[j])
            else:
                for j in range(src.shape[0]):
                    scratch[j] = _bf16_bits_to_f32(src[j])
            return scratch

        return impl
    return None


@njit(inline="always", **_JIT)
def _group_minmax(seg):
    lo = seg[0]
    hi = lo
    # Start at 0 (re-reading seg[0]) so the trip count stays a multiple of the vector width.
    for j in range(seg.shape[0]):
        lo = _scan_min(lo, seg[j])
        hi = _scan_max(hi, seg[j])
    return lo, hi


@njit(inline="always", **_JIT)
def _has_non_finite(seg):
    for j in range(seg.shape[0]):
        if seg[j] - seg[j] != 0:  # NaN for inf and NaN alike
            return True
    return False


@njit(inline="always", **_JIT)
def _group_sq_error(seg, lo, hi, qmax, symmetric):
    """Sum of squared quantize-dequantize errors of one group ``seg [g]``; zero scale is exact."""
    acc = np.float32(0.0)
    if symmetric:
        scale = _maximum(abs(lo), abs(hi)) / qmax
        if scale > 0:
            qlo = -qmax - np.float32(1.0)
            for j in range(seg.shape[0]):
                v = seg[j]
                q = _minimum(_maximum(np.rint(v / scale), qlo), qmax)
                d = v - q * scale
                acc = _add_reassoc(acc, d * d)
    else:
        scale = (hi - lo) / qmax
        if scale > 0:
            zero = np.rint(-lo / scale)
            for j in range(seg.shape[0]):
                v = seg[j]
                q = _minimum(_maximum(np.rint(v / scale) + zero, np.float32(0.0)), qmax)
                d = v - (q - zero) * scale
                acc = _add_reassoc(acc, d * d)
    # With a positive scale a non-finite element reaches `acc` through the division; otherwise (the
    # min/max scan does not see NaN) the reference's exact path gives x - x = NaN for it, so look.
    if not scale > 0 and _has_non_finite(seg):
        acc = np.float32(np.nan)
    return acc


@njit(inline="always", **_JIT)
def _token_stats(row, group, qmax, symmetric):
    """``row [D]`` float32 -> (E, R) of one token."""
    lo_all = row[0]
    hi_all = lo_all
    acc = np.float32(0.0)
    for start in range(0, row.shape[0], group):
        seg = row[start : start + group]
        lo, hi = _group_minmax(seg)
        lo_all = min(lo_all, lo)
        hi_all = max(hi_all, hi)
        acc += _group_sq_error(seg, lo, hi, qmax, symmetric)
    spread = hi_all - lo_all
    if acc != acc:  # non-finite input: redo R with NaN-propagating min/max, as torch.amax/amin do
        lo_all = row[0]
        hi_all = lo_all
        for j in range(row.shape[0]):
            lo_all = _minimum(lo_all, row[j])
            hi_all = _maximum(hi_all, row[j])
        spread = hi_all - lo_all
    return np.sqrt(acc), spread


@njit(inline="always", **_JIT)
def _row_minmax_f64(row):
    lo = np.float64(row[0])
    hi = lo
    for j in range(row.shape[0]):
        lo = min(lo, np.float64(row[j]))
        hi = max(hi, np.float64(row[j]))
    return lo, hi


@njit(inline="always", **_JIT)
def _minmax_unit_f32(v, lo, span):
    # Same float64 ops as `normalization.minmax`, rounded to float32 as it returns.
    if span > 0:
        return np.float32(min(max((np.float64(v) - lo) / span, 0.0), 1.0))
    return np.float32(0.5)


@njit(parallel=True, **_JIT)
def _kernel(x, fmt, group, bits, symmetric, fuse, error, spread, score):
    """``x [B, N, D]`` (float32, or uint16 bit patterns) -> ``error, spread [B, N]``; if ``fuse``, also
    ``score [B, N] = 0.5 * minmax(E) + 0.5 * minmax(R)`` per image."""
    n_img, n_tok, dim = x.shape
    qmax = np.float32(2 ** (bits - 1) - 1) if symmetric else np.float32(2**bits - 1)
    tokens = x.reshape(n_img * n_tok, dim)  # [T, D], a view (x is C-contiguous)
    err = error.reshape(n_img * n_tok)
    spr = spread.reshape(n_img * n_tok)
    n_total = n_img * n_tok
    for chunk in prange((n_total + _CHUNK - 1) // _CHUNK):
        scratch = np.empty(dim, np.float32)  # [D] decoded row for the 16-bit formats
        for t in range(chunk * _CHUNK, min(n_total, (chunk + 1) * _CHUNK)):
            row = _widen_row(tokens[t], scratch, fmt)
            err[t], spr[t] = _token_stats(row, group, qmax, symmetric)
    if fuse:
        for b in prange(n_img):
            e_lo, e_hi = _row_minmax_f64(error[b])
            r_lo, r_hi = _row_minmax_f64(spread[b])
            for i in range(n_tok):
                # float64 accumulation of the two float32 halves, as `normalization.fuse` does.
                total = 0.5 * np.float64(_minmax_unit_f32(error[b, i], e_lo, e_hi - e_lo))
                total += 0.5 * np.float64(_minmax_unit_f32(spread[b, i], r_lo, r_hi - r_lo))
                score[b, i] = np.float32(total)


def _run(x: torch.Tensor, bits: int, group_size: int, symmetric: bool, fuse: bool):
    b, n, d = x.shape
    group = d if group_size == -1 else group_size
    # detach: the kernel reads raw memory and is not differentiable (scores only rank tokens), and
    # `.numpy()` refuses a tensor that requires grad (a pruned model called with autograd on).
    x = x.detach().contiguous()  # no-op for the usual layout; a strided view is copied once
    if x.dtype == torch.float32:
        raw, fmt = x.numpy(), FMT_F32
    else:
        # A zero-copy view of the 16-bit patterns, decoded per row inside the kernel.
        raw = x.view(torch.int16).numpy().view(np.uint16)
        fmt = FMT_F16 if x.dtype == torch.float16 else FMT_BF16
    error = torch.empty(b, n, dtype=torch.float32)
    spread = torch.empty(b, n, dtype=torch.float32)
    score = torch.empty(b, n if fuse else 0, dtype=torch.float32)
    if b * n:
        with torch_threads_kept():
            _kernel(raw, fmt, group, bits, symmetric, fuse, error.numpy(), spread.numpy(), score.numpy())
    return error, spread, score


@contextlib.contextmanager
def torch_threads_kept():
    """The kernel runs on torch's intra-op thread count, and torch keeps it afterwards.

    numba's OpenMP threading layer sets the process's OpenMP thread count to numba's own (every core) when
    it first runs: torch, which shares that OpenMP runtime, would then run every later matmul on more
    threads than the user chose (``OMP_NUM_THREADS``, ``torch.set_num_threads``), and logits would change
    in their last bits between the first call and the next.
    """
    threads = torch.get_num_threads()
    numba_threads = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(numba_threads)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def hybrid_sensitivity_cpu(
    x: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU ``x [B, N, D]`` -> ``(E [B, N], R [B, N])`` float32 (inputs already validated by the dispatch)."""
    error, spread, _ = _run(x, bits, group_size, symmetric, fuse=False)
    return error, spread


def sensitivity_score_cpu(
    x: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU ``x [B, N, D]`` -> ``(E, R, SQ)``, each ``[B, N]`` float32, in one kernel call."""
    return _run(x, bits, group_size, symmetric, fuse=True)


__all__ = ["hybrid_sensitivity_cpu", "numba_cache_dir", "sensitivity_score_cpu", "torch_threads_kept"]
