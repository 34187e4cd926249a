"""Hadamard matrices of the sizes LLMs use, orthogonal rotations built from them, and the online transform.

A Hadamard matrix ``H [n, n]`` has entries +-1 and ``H H^T = n I``. Powers of two come from Sylvester's
construction; other sizes as a Kronecker product ``H_m (x) H_{2^k}`` where ``H_m`` is a Paley matrix
(type I for ``m = q + 1``, type II for ``m = 2 (q + 1)``, ``q`` prime): SmolLM2's hidden size
576 = 36 * 16 (Paley II, q = 17), its MLP size 1536 = 12 * 128 (Paley I, q = 11). Sizes with no such
construction (no Hadamard matrix exists unless 4 divides n) get a seeded random orthogonal matrix instead.
"""

from __future__ import annotations

from functools import lru_cache, reduce

import torch
import torch.nn.functional as F
from torch import nn

MAX_DENSE_FACTOR = 64  # the power-of-two part is applied online as factors of at most this size


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)``, chi the quadratic character mod prime ``q``: ``[q, q]`` float64."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(n: int) -> torch.Tensor | None:
    """A Paley Hadamard matrix of order ``n`` (``[n, n]`` float64), or None when neither type applies."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:  # type I: I + [[0, 1^T], [-1, Q]], Q skew-symmetric
        S = torch.zeros(n, n, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(n, dtype=torch.float64) + S
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:  # type II from the symmetric conference matrix
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        B = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)
    return None


def _sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@lru_cache(maxsize=None)
def _factors(n: int) -> tuple[torch.Tensor, ...] | None:
    if n < 1:
        return None
    power = n & -n  # the largest power of two dividing n
    odd = n // power
    pow2: list[int] = []
    for j in range(power.bit_length()):
        m = odd << j
        head = [] if m == 1 else ([_paley(m)] if _paley(m) is not None else None)
        if head is None:
            continue
        rest = power >> j
        while rest > 1:
            size = min(rest, MAX_DENSE_FACTOR)
            pow2.append(size)
            rest //= size
        return tuple(head + [_sylvester(s) for s in pow2])
    return None


def hadamard_factors(n: int) -> list[torch.Tensor] | None:
    """Hadamard matrices whose Kronecker product is a Hadamard matrix of order ``n``; None if none is known."""
    found = _factors(n)
    return None if found is None else [f.clone() for f in found]


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """A Hadamard matrix ``[n, n]`` (float64, entries +-1), or None when no construction here gives one."""
    factors = hadamard_factors(n)
    if factors is None:
        return None
    return reduce(torch.kron, factors, torch.ones(1, 1, dtype=torch.float64))


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded Haar-random orthogonal matrix ``[n, n]`` float64 (QR of a Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def random_hadamard(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """``Q = diag(s) H / sqrt(n)`` with seeded random signs ``s``: ``([n, n]`` float64 orthogonal, how it was built)."""
    H = hadamard_matrix(n)
    if H is None:
        return random_orthogonal(n, seed), "random orthogonal (no Hadamard matrix of this order is known here)"
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return signs[:, None] * H / n**0.5, "randomised Hadamard"


class OnlineHadamard(nn.Module):
    """``x [..., n]`` -> ``x M^T``, ``M = H_n / sqrt(n)`` orthogonal, applied factor by factor (``O(n sum n_i)``).

    With no Hadamard of order ``n`` it holds a seeded random orthogonal matrix instead (``O(n^2)``).
    The factors are derived data (non-persistent buffers): a state dict does not change.
    """

    def __init__(self, n: int, seed: int = 0, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.n, self.seed = n, seed  # all it takes to rebuild it (qapframe.quantizers.serialization)
        factors = hadamard_factors(n)
        self.structured = factors is not None
        if factors is None:
            factors = [random_orthogonal(n, seed) * n**0.5]
        self.sizes = [f.shape[0] for f in factors]
        for i, f in enumerate(factors):
            self.register_buffer(f"factor{i}", f.to(dtype=dtype, device=device), persistent=False)
        self.scale = n**-0.5

    def matrix(self) -> torch.Tensor:
        """The dense ``M [n, n]`` float64 (for folding its inverse into a weight)."""
        factors = [getattr(self, f"factor{i}").double() for i in range(len(self.sizes))]
        return reduce(torch.kron, factors, torch.ones(1, 1, dtype=torch.float64, device=factors[0].device)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = x.reshape(-1, *self.sizes)
        for i in range(len(self.sizes)):
            f = getattr(self, f"factor{i}").to(y.dtype)
            # contract axis i+1 with the factor's columns; the new axis lands last, move it back
            y = torch.movedim(torch.tensordot(y, f, dims=([i + 1], [1])), -1, i + 1)
        return (y * self.scale).reshape(shape)

    def extra_repr(self) -> str:
        kind = "x".join(map(str, self.sizes)) if self.structured else "random orthogonal"
        return f"n={self.n}, factors={kind}"


class HadamardLinear(nn.Linear):
    """An ``nn.Linear`` whose input first goes through ``input_transform``: ``x [..., I]`` -> ``[..., O]``.

    The transform's inverse is folded into the weight, so the function is the original Linear's. Being an
    ``nn.Linear`` it stays a quantization target under its own name; `QuantizedLinear.from_linear` keeps
    the transform, ahead of the activation quantizer.
    """

    def __init__(self, linear: nn.Linear, input_transform: nn.Module):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_transform = input_transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_transform(x), self.weight, self.bias)


__all__ = [
    "HadamardLinear", "OnlineHadamard", "hadamard_factors", "hadamard_matrix", "random_hadamard", "random_orthogonal",
]
