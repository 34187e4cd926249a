"""Dense packing of b-bit integer codes into int32 words, the layout compressed-tensors defines.

Element ``i`` of a row occupies bits ``[i*b, (i+1)*b)`` of the row's bit stream (least significant bit first,
little-endian words), so 32 consecutive elements fill exactly ``b`` words and a row of ``I`` codes takes
``ceil(I * b / 32)`` words. The stored values are unsigned (``0 .. 2^b - 1``); callers shift signed codes.
`QuantizedLinear` keeps its codes in this form at run time, and the exporter writes the same words as
compressed-tensors' ``weight_packed`` (its ``pack_to_int32`` adds ``2^(b-1)`` to signed codes first).
"""

from __future__ import annotations

import sys

import torch

_ROW_CHUNK = 1024  # rows unpacked/packed at a time on the general path: bounds the bit-plane temporaries


def packed_width(columns: int, bits: int) -> int:
    """int32 words per row of ``columns`` ``bits``-bit codes."""
    return -(-columns * bits // 32)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in ``[0, 2^32)`` -> int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_codes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[R, C]`` (any integer or integral float dtype, ``0 .. 2^b - 1``) -> int32 ``[R, ceil(C*b/32)]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_codes: bits must be in 1..8, got {bits}")
    rows, cols = values.shape
    v = values.to(torch.int64)
    if bool(((v < 0) | (v >= 2**bits)).any()):
        raise ValueError(f"pack_codes: codes must lie in 0..{2**bits - 1} for {bits}-bit packing")
    pad = (-cols) % 32
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    width = packed_width(cols, bits)
    if sys.byteorder == "little" and bits in (4, 8):
        # Whole nibbles/bytes: build the words' bytes directly (no bit-plane temporaries; 10x faster).
        raw = v.to(torch.uint8) if bits == 8 else (v[:, 0::2] | (v[:, 1::2] << 4)).to(torch.uint8)
        return raw.contiguous().view(torch.int32)[:, :width].contiguous()
    out = torch.empty(rows, width, dtype=torch.int32, device=values.device)
    shifts = torch.arange(32, device=values.device, dtype=torch.int64)
    for r0 in range(0, rows, _ROW_CHUNK):
        chunk = v[r0 : r0 + _ROW_CHUNK]  # [r, C']
        n = chunk.shape[0]
        # The row's bit stream, LSB first: element i bit k lands at position i*b + k.
        planes = (chunk[..., None] >> torch.arange(bits, device=v.device)) & 1  # [r, C', b]
        stream = planes.reshape(n, -1, 32)  # [r, words', 32]
        words = (stream << shifts).sum(-1)  # [r, words'] in [0, 2^32)
        out[r0 : r0 + n] = _to_int32(words[:, :width])
    return out


def unpack_codes(words: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """int32 ``[R, W]`` from `pack_codes` -> uint8 codes ``[R, columns]``."""
    if words.dtype != torch.int32:
        raise ValueError(f"unpack_codes: expected int32 words, got {words.dtype}")
    rows = words.shape[0]
    if sys.byteorder == "little" and bits in (4, 8):
        # Whole nibbles/bytes never straddle a byte: reinterpret the words' bytes (no bit-plane temporaries).
        raw = words.contiguous().view(torch.uint8).reshape(rows, -1)
        if bits == 8:
            return raw[:, :columns]
        return torch.stack((raw & 0xF, raw >> 4), dim=-1).reshape(rows, -1)[:, :columns]
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    weights = 1 << torch.arange(bits, device=words.device, dtype=torch.int64)
    out = torch.empty(rows, columns, dtype=torch.uint8, device=words.device)
    for r0 in range(0, rows, _ROW_CHUNK):
        w = words[r0 : r0 + _ROW_CHUNK].to(torch.int64) & 0xFFFFFFFF  # [r, W]
        n = w.shape[0]
        stream = ((w[..., None] >> shifts) & 1).reshape(n, -1)  # [r, 32 W] bits, LSB first
        usable = stream.shape[1] // bits * bits
        codes = (stream[:, :usable].reshape(n, -1, bits) * weights).sum(-1)  # [r, >= columns]
        out[r0 : r0 + n] = codes[:, :columns].to(torch.uint8)
    return out


__all__ = ["pack_codes", "packed_width", "unpack_codes"]
