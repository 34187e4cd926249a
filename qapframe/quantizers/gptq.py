"""GPTQ (Frantar et al., ICLR 2023): quantize columns one at a time, pushing each column's error onto
the columns not yet quantized through the inverse Hessian ``H = 2 X^T X`` of the layer inputs.

The inverse comes from a Cholesky factorisation of the damped Hessian (upper factor ``U`` of
``H^-1``: row ``i`` of ``U`` scaled by ``1 / U[i, i]`` is the OBS update for column ``i`` once columns
``< i`` are fixed). Updates are applied lazily per block of columns. With ``act_order`` columns go in
order of decreasing Hessian diagonal and groups are formed along that order (``g_idx`` maps each
input channel to its group).
"""

from __future__ import annotations

import torch
from pydantic import Field

from qapframe.distributed import all_reduce_sum
from qapframe.quantizers.base import QUANTIZERS
from qapframe.quantizers.calibration import BlockData
from qapframe.quantizers.config import QuantizerConfig, WeightSpec
from qapframe.quantizers.fake_quant import QuantizedLinear, dequantize, group_index, qparams, quantize
from qapframe.quantizers.layerwise import LayerwiseQuantizer
from qapframe.strategy import StrategyConfig


class GPTQOptions(StrategyConfig):
    """GPTQ's own parameters (also nested as ``gptq`` in the scaling quantizers)."""

    dampening: float = Field(0.01, gt=0, lt=1, description="added to H's diagonal, as a fraction of its mean")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    act_order: bool = Field(False, description="quantize columns in order of decreasing Hessian diagonal")
    true_sequential: bool = Field(
        True, description="within a block, collect each Linear's Hessian after the Linears before it are quantized"
    )


class GPTQConfig(QuantizerConfig, GPTQOptions):
    """Shared quantizer parameters plus `GPTQOptions`."""


class Hessian:
    """``H = 2 / n * X^T X`` over ``[n, I]`` token batches, reduced over ranks when distributed.

    The sum is kept in float64 so that summing per-rank shards (or batches in another order) gives the
    same float32 ``H`` as one process summing everything: ranks then quantize bit-identically.
    """

    def __init__(self, in_features: int, device: torch.device):
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0
        self._reduced: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:  # x [n, I]
        if x.shape[0] == 0:
            return
        x = x.float()
        self._sum += (x.T @ x).double()
        self.count += x.shape[0]
        self._reduced = None

    @property
    def matrix(self) -> torch.Tensor:
        """The float32 Hessian over every rank's tokens (an all-reduce, once, when distributed)."""
        if self._reduced is None:
            total = all_reduce_sum(self._sum.clone())
            count = int(all_reduce_sum(torch.tensor([float(self.count)], dtype=torch.float64)).item())
            self._reduced = (total * (2.0 / max(count, 1))).float()
        return self._reduced


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightSpec, dampening: float = 0.01,
                  block_size: int = 128, act_order: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W [O, I]``, ``H [I, I]`` -> ``(codes [O, I], scales [O, G], zeros [O, G], g_idx [I])``."""
    W = weight.float().clone()
    H = hessian.float().clone()
    out_f, in_f = W.shape
    dead = torch.diag(H) == 0
    # A channel that never fired carries no information: fix it at 0 and keep H invertible.
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += dampening * torch.diag(H).mean() * torch.eye(in_f, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    g = in_f if spec.group_size == -1 else spec.group_size
    # Blocks hold whole groups, so a group's grid is computed from fully updated columns.
    block = max(1, block_size // g) * g if g < in_f else block_size
    n_groups = -(-in_f // g)
    codes = torch.zeros_like(W)
    scales = torch.zeros(out_f, n_groups, device=W.device)
    zeros = torch.zeros(out_f, n_groups, device=W.device)
    if spec.group_size == -1:
        scale, zero = qparams(W, spec.bits, spec.symmetric)
        scales[:, :1], zeros[:, :1] = scale, zero
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = W[:, i1:i2].clone()
        err = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if spec.group_size != -1 and col % g == 0:
                scale, zero = qparams(W1[:, i : i + g], spec.bits, spec.symmetric)  # [O, 1]
                scales[:, col // g : col // g + 1], zeros[:, col // g : col // g + 1] = scale, zero
            w = W1[:, i : i + 1]
            q = quantize(w, scale, zero, spec.bits, spec.symmetric)
            codes[:, col : col + 1] = q
            e = (w - dequantize(q, scale, zero)) / U1[i, i]
            W1[:, i:] -= e * U1[i : i + 1, i:]
            err[:, i : i + 1] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scales, zeros, group_index(in_f, spec.group_size, perm.cpu() if perm is not None else None)


def gptq_modules(data: BlockData, modules: dict[str, QuantizedLinear], spec: WeightSpec, options: GPTQOptions) -> None:
    """Collect Hessians on ``data`` and GPTQ-quantize ``modules``, group after group when true-sequential."""
    groups = data.input_groups(modules) if options.true_sequential else [list(modules)]
    for group in groups:
        members = {name: modules[name] for name in group}
        hessians = {name: Hessian(m.in_features, m.weight.device) for name, m in members.items()}
        with data.observe(members, lambda name, x: hessians[name].add(x)):
            data.forward()
        for name, module in members.items():
            module.set_quantized(*gptq_quantize(
                module.weight, hessians[name].matrix, spec, options.dampening, options.block_size, options.act_order
            ))


@QUANTIZERS.register("gptq")
class GPTQ(LayerwiseQuantizer):
    """GPTQ with Cholesky inverse, lazy block updates, optional act-order; calibrated block by block."""

    Config = GPTQConfig
    config: GPTQConfig

    def needs_calibration(self) -> bool:
        return True

    def process_block(self, data: BlockData, modules: dict[str, QuantizedLinear]) -> None:
        gptq_modules(data, modules, self.config.weight_spec, self.config)


__all__ = ["GPTQ", "GPTQConfig", "GPTQOptions", "Hessian", "gptq_modules", "gptq_quantize"]
