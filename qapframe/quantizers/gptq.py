"""GPTQ (Frantar et al., ICLR 2023): quantize columns one at a time, pushing each column's error onto
the columns not yet quantized through the inverse Hessian ``H = 2 X^T X`` of the layer inputs.

The inverse comes from a Cholesky factorisation of the damped Hessian (upper factor ``U`` of
``H^-1``: row ``i`` of ``U`` scaled by ``1 / U[i, i]`` is the OBS update for column ``i`` once columns
``< i`` are fixed). Updates are applied lazily per block of columns.

Column order (``act_order``), with llm-compressor's names for the two act-order variants:

- ``off``: channel order; each group's grid is taken from its updated columns when the group starts.
- ``static`` (llm-compressor ``static``/``weight``): columns in order of decreasing Hessian diagonal,
  groups stay in channel order (``g_idx`` is the identity layout, so serving kernels need no reorder);
  a group's columns are then visited out of order, so every grid is fixed beforehand from the fp weights.
- ``group`` (llm-compressor ``group``/``dynamic``; ``act_order: true``): the same column order, groups
  formed along it (``g_idx`` maps each input channel to its group), grids from the updated columns.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from qapframe.distributed import all_reduce_sum
from qapframe.quantizers.base import QUANTIZERS
from qapframe.quantizers.calibration import BlockData
from qapframe.quantizers.config import QuantizerConfig, WeightSpec
from qapframe.quant_grid import code_range, qparams
from qapframe.quantizers.fake_quant import QuantizedLinear, group_index, group_qparams
from qapframe.quantizers.layerwise import LayerwiseQuantizer
from qapframe.strategy import StrategyConfig

ActOrder = Literal["off", "static", "group"]
ACT_ORDERS: tuple[str, ...] = ("off", "static", "group")


def act_order_name(value: Any) -> str:
    """``act_order`` as one of `ACT_ORDERS`; booleans are the older spelling (true = group, false = off)."""
    if value is True:
        return "group"
    if value is False or value is None:
        return "off"
    if value not in ACT_ORDERS:
        raise ValueError(f"act_order must be one of {', '.join(ACT_ORDERS)} (or true/false), got {value!r}")
    return value


class GPTQOptions(StrategyConfig):
    """GPTQ's own parameters (also nested as ``gptq`` in the scaling quantizers)."""

    dampening: float = Field(0.01, gt=0, lt=1, description="added to H's diagonal, as a fraction of its mean")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    act_order: ActOrder = Field(
        "static",
        description="column order: off, static (decreasing Hessian diagonal, groups in channel order), "
        "group (decreasing Hessian diagonal, groups along it, g_idx); true = group, false = off",
    )
    true_sequential: bool = Field(
        True, description="within a block, collect each Linear's Hessian after the Linears before it are quantized"
    )

    @field_validator("act_order", mode="before")
    @classmethod
    def _act_order(cls, v: Any) -> Any:
        return act_order_name(v) if isinstance(v, bool) else v


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
                  block_size: int = 128, act_order: ActOrder | bool = "off"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W [O, I]``, ``H [I, I]`` -> ``(codes [O, I], scales [O, G], zeros [O, G], g_idx [I])``."""
    order = act_order_name(act_order)
    W = weight.float().clone()
    H = hessian.float().clone()
    out_f, in_f = W.shape
    dead = torch.diag(H) == 0
    # A channel that never fired carries no information: fix it at 0 and keep H invertible.
    H[dead, dead] = 1
    W[:, dead] = 0
    # A group at least as wide as the weight is a single group per row: its grid must span every column.
    g = in_f if spec.group_size == -1 else min(spec.group_size, in_f)
    n_groups = -(-in_f // g)
    # With one group no column is updated before the grid is needed; with static order a group's columns
    # are visited out of order. Either way the grid comes from the fp weights, before any update.
    fixed_grid = g == in_f or order == "static"
    if fixed_grid:
        scales, zeros = group_qparams(W, WeightSpec(spec.bits, g, spec.symmetric))  # [O, G], channel order
    else:
        scales = torch.zeros(out_f, n_groups, device=W.device)
        zeros = torch.zeros(out_f, n_groups, device=W.device)
    perm = None
    if order != "off":
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += dampening * torch.diag(H).mean() * torch.eye(in_f, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    # The loop runs on transposed copies: a column of W is then a contiguous row, which halves the time
    # of the per-column updates (same operations, same results).
    WT = W.T.contiguous()  # [I, O], rows in processing order
    if fixed_grid:
        col_group = group_index(in_f, g).long().to(W.device)
        if perm is not None:
            col_group = col_group[perm]
        scale_t, zero_t = scales.T[col_group].contiguous(), zeros.T[col_group].contiguous()  # [I, O]
    else:  # filled group by group
        scale_t, zero_t = torch.empty_like(WT), torch.empty_like(WT)
    # Blocks hold whole groups, so a group's grid is computed from fully updated columns.
    block = block_size if fixed_grid else max(1, block_size // g) * g
    lo, hi = code_range(spec.bits, spec.symmetric)
    codes_t = torch.empty_like(WT)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = WT[i1:i2].clone()
        err = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not fixed_grid and col % g == 0:
                scale, zero = qparams(W1[i : i + g].T, spec.bits, spec.symmetric)  # [O, 1]
                scales[:, col // g], zeros[:, col // g] = scale[:, 0], zero[:, 0]
                scale_t[col : col + g], zero_t[col : col + g] = scale.T, zero.T
            w, s, z = W1[i], scale_t[col], zero_t[col]
            q = torch.clamp(torch.round(w / s) + z, lo, hi)
            codes_t[col] = q
            e = (w - (q - z) * s) / U1[i, i]
            # Only the columns after i still matter; the column itself is final.
            W1[i + 1 :] -= U1[i, i + 1 :, None] * e
            err[i] = e
        WT[i2:] -= U[i1:i2, i2:].T @ err
    codes = codes_t.T
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    g_idx = group_index(in_f, g, perm.cpu() if order == "group" else None)
    return codes, scales, zeros, g_idx


def gptq_modules(data: BlockData, modules: dict[str, QuantizedLinear], spec: WeightSpec, options: GPTQOptions) -> None:
    """Collect Hessians on ``data`` and GPTQ-quantize ``modules``, group after group when true-sequential.

    Linears fed the same tensor (q/k/v, gate/up) share one Hessian: the same tokens give the same matrix.
    Each calibration pass runs the block only as far as the Linears being observed.
    """
    shared_input = data.input_groups(modules)
    passes = shared_input if options.true_sequential else [[n for group in shared_input for n in group]]
    leader_of = {name: group[0] for group in shared_input for name in group}
    for names in passes:
        leaders = {leader_of[n]: modules[leader_of[n]] for n in names}
        hessians = {name: Hessian(m.in_features, m.weight.device) for name, m in leaders.items()}
        data.run_observed(leaders, lambda name, x: hessians[name].add(x))
        for name in names:
            module = modules[name]
            module.set_quantized(*gptq_quantize(
                module.weight, hessians[leader_of[name]].matrix, spec, options.dampening, options.block_size,
                options.act_order,
            ))


@QUANTIZERS.register("gptq")
class GPTQ(LayerwiseQuantizer):
    """GPTQ with Cholesky inverse, lazy block updates, act-order (static by default); calibrated block by block."""

    Config = GPTQConfig
    config: GPTQConfig

    def needs_calibration(self) -> bool:
        return True

    def process_block(self, data: BlockData, modules: dict[str, QuantizedLinear]) -> None:
        gptq_modules(data, modules, self.config.weight_spec, self.config)


__all__ = ["ACT_ORDERS", "GPTQ", "GPTQConfig", "GPTQOptions", "Hessian", "act_order_name", "gptq_modules",
           "gptq_quantize"]
