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

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from pydantic import Field, field_validator

from qapframe.distributed import all_reduce_, all_reduce_sum
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


STRIPE = 384  # Hessian rows per stripe of the upper-triangle product (inputs narrower than 2 stripes: one product)


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
        # Only the upper triangle is needed (H is symmetric): wide inputs (down_proj's) are done in row stripes
        # ``X_i^T X[:, i:]``, a third fewer FLOPs than the full product; `matrix` mirrors it.
        width = x.shape[1]
        stripe = width // max(1, width // STRIPE)
        for start in range(0, width, stripe):
            self._sum[start : start + stripe, start:] += x[:, start : start + stripe].T @ x[:, start:]
        self.count += x.shape[0]
        self._reduced = None

    @property
    def matrix(self) -> torch.Tensor:
        """The float32 Hessian over every rank's tokens (an all-reduce, once, when distributed)."""
        if self._reduced is None:
            total = all_reduce_sum(torch.triu(self._sum))
            total = total + torch.triu(total, 1).T
            count = int(all_reduce_sum(torch.tensor([float(self.count)], dtype=torch.float64)).item())
            self._reduced = (total * (2.0 / max(count, 1))).float()
        return self._reduced


def gptq_columns_torch(W: torch.Tensor, U: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, start: int,
                       stop: int, lo: int, hi: int, codes: torch.Tensor, err: torch.Tensor) -> None:
    """Quantize block columns ``start .. stop - 1`` in order, in place (the reference; any device).

    All ``[b, O]`` float32, one row per column of the block (transposed weight): ``W`` the block's current
    weights (later rows receive each column's error), ``scale``/``zero`` each column's grid, ``codes`` and
    ``err`` (error divided by the pivot) written; ``U [b, b]`` the block of the inverse Hessian's factor.
    """
    for i in range(start, stop):
        w, s, z = W[i], scale[i], zero[i]
        q = torch.clamp(torch.round(w / s) + z, lo, hi)
        codes[i] = q
        e = (w - (q - z) * s) / U[i, i]
        # Only the columns after i still matter; the column itself is final.
        W[i + 1 :] -= U[i, i + 1 :, None] * e
        err[i] = e


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ needs of a Hessian; computed once for the Linears that read the same input (q/k/v, gate/up)."""

    U: torch.Tensor  # [I, I] upper Cholesky factor of the damped inverse Hessian, rows in processing order
    perm: torch.Tensor | None  # [I] processing order (act order); None = channel order
    dead: torch.Tensor  # [I] bool: channels that never fired


def hessian_factor(hessian: torch.Tensor, dampening: float = 0.01, act_order: ActOrder | bool = "off") -> HessianFactor:
    """``H [I, I]`` -> its `HessianFactor` for the given column order."""
    H = hessian.float().clone()
    in_f = H.shape[0]
    dead = torch.diag(H) == 0
    # A channel that never fired carries no information: its weights are fixed at 0; H stays invertible.
    H[dead, dead] = 1
    perm = None
    if act_order_name(act_order) != "off":
        perm = torch.argsort(torch.diag(H), descending=True)
        H = H[perm][:, perm]
    H += dampening * torch.diag(H).mean() * torch.eye(in_f, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    return HessianFactor(U, perm, dead)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | None, spec: WeightSpec, dampening: float = 0.01,
                  block_size: int = 128, act_order: ActOrder | bool = "off", factor: HessianFactor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W [O, I]``, ``H [I, I]`` -> ``(codes [O, I], scales [O, G], zeros [O, G], g_idx [I])``.

    ``factor``: `hessian_factor` of ``H`` with the same ``dampening`` and ``act_order``, when already known.
    """
    order = act_order_name(act_order)
    if factor is None:
        factor = hessian_factor(hessian, dampening, order)
    U, perm = factor.U, factor.perm
    W = weight.float().clone()
    out_f, in_f = W.shape
    W[:, factor.dead] = 0
    # A group at least as wide as the weight is a single group per row: its grid must span every column.
    g = in_f if spec.group_size == -1 else min(spec.group_size, in_f)
    n_groups = -(-in_f // g)
    # With one group no column is updated before the grid is needed; with static order a group's columns
    # are visited out of order. Either way the grid comes from the fp weights, before any update.
    fixed_grid = g == in_f or order == "static"
    if fixed_grid:
        # [O, G], channel order
        scales, zeros = group_qparams(W, WeightSpec(spec.bits, g, spec.symmetric, spec.full_range))
    else:
        scales = torch.zeros(out_f, n_groups, device=W.device)
        zeros = torch.zeros(out_f, n_groups, device=W.device)
    if perm is not None:
        W = W[:, perm]

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
    columns = gptq_columns_torch
    if WT.device.type == "cpu":  # imported here: numba costs a second that `qapframe list` should not pay
        from qapframe.kernels.gptq_cpu import gptq_columns_cpu as columns
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = WT[i1:i2].clone()
        err = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2].contiguous()
        # Without a fixed grid, each group's grid comes from its columns as updated so far.
        starts = range(0, i2 - i1, block if fixed_grid else g)
        for start in starts:
            stop = min(start + (block if fixed_grid else g), i2 - i1)
            if not fixed_grid:
                col = i1 + start
                scale, zero = qparams(W1[start:stop].T, spec.bits, spec.symmetric, spec.full_range)  # [O, 1]
                scales[:, col // g], zeros[:, col // g] = scale[:, 0], zero[:, 0]
                scale_t[col : i1 + stop], zero_t[col : i1 + stop] = scale.T, zero.T
            columns(W1, U1, scale_t[i1:i2], zero_t[i1:i2], start, stop, lo, hi, codes_t[i1:i2], err)
        WT[i2:] -= U[i1:i2, i2:].T @ err
    codes = codes_t.T
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    g_idx = group_index(in_f, g, perm.cpu() if order == "group" else None)
    return codes, scales, zeros, g_idx


def _quantize_group(modules: dict[str, QuantizedLinear], names: list[str], hessian: torch.Tensor, spec: WeightSpec,
                    options: GPTQOptions) -> None:
    """GPTQ for Linears that share one input: one factorization of their Hessian serves them all."""
    factor = hessian_factor(hessian, options.dampening, options.act_order)
    for name in names:
        module = modules[name]
        module.set_quantized(*gptq_quantize(
            module.weight, None, spec, options.dampening, options.block_size, options.act_order, factor,
        ))


def _one_pass(data: BlockData, modules: dict[str, QuantizedLinear], groups: list[list[str]], spec: WeightSpec,
              options: GPTQOptions) -> None:
    """True-sequential GPTQ in one forward of the whole calibration batch.

    When a group's first Linear is called, its input holds every calibration token as the Linears before
    it (already quantized) produced it: exactly the Hessian the multi-pass schedule collects. The group is
    quantized on the spot and the forward goes on with it, so a block costs one forward, not one per group,
    and that forward's output is the quantized block's (activations aside; see `BlockData.quantized_outputs`).
    """
    def quantize_on_call(names: list[str]) -> Callable:
        def callback(module: QuantizedLinear, x: torch.Tensor) -> None:
            module.observers.remove(callback)
            hessian = Hessian(module.in_features, module.weight.device)
            for tokens in data.tokens_of(x.detach()):  # per calibration input, as the multi-pass schedule adds them
                hessian.add(tokens)
            _quantize_group(modules, names, hessian.matrix, spec, options)

        return callback

    callbacks = {names[0]: quantize_on_call(names) for names in groups}
    for leader, callback in callbacks.items():
        modules[leader].observers.append(callback)
    try:
        outputs = data.forward()
    finally:
        for leader, callback in callbacks.items():
            if callback in modules[leader].observers:
                modules[leader].observers.remove(callback)
    unreached = [names for names in groups if not modules[names[0]].quantized]
    for names in unreached:  # a group the forward never reached (data-dependent routing) saw no token
        _quantize_group(modules, names, Hessian(modules[names[0]].in_features, modules[names[0]].weight.device).matrix,
                        spec, options)
    if not unreached:  # every Linear computed with its quantized weight: the block's quantized output
        data.quantized_outputs = outputs


def _multi_pass(data: BlockData, modules: dict[str, QuantizedLinear], groups: list[list[str]], spec: WeightSpec,
                options: GPTQOptions) -> None:
    """One calibration pass per group (all groups at once unless true-sequential), each run only as far as
    the Linears it observes."""
    passes = groups if options.true_sequential else [[n for group in groups for n in group]]
    leader_of = {name: group[0] for group in groups for name in group}
    for names in passes:
        leaders = {leader_of[n]: modules[leader_of[n]] for n in names}
        hessians = {name: Hessian(m.in_features, m.weight.device) for name, m in leaders.items()}
        data.run_observed(leaders, lambda name, x: hessians[name].add(x))
        for leader, hessian in hessians.items():
            _quantize_group(modules, [n for n in names if leader_of[n] == leader], hessian.matrix, spec, options)


def gptq_modules(data: BlockData, modules: dict[str, QuantizedLinear], spec: WeightSpec, options: GPTQOptions) -> None:
    """Collect Hessians on ``data`` and GPTQ-quantize ``modules``, group after group when true-sequential.

    Linears fed the same tensor (q/k/v, gate/up) share one Hessian: the same tokens give the same matrix.
    When every calibration input fits one batch (on every rank) and each group's Linears run once per
    input, true-sequential GPTQ takes one forward per block (`_one_pass`), else one pass per group.
    """
    groups = data.input_groups(modules)
    # Every rank must take the same path (the Hessians are all-reduced group by group).
    once = all(data.calls_per_input(modules[names[0]]) == 1 for names in groups)
    one_batch = torch.tensor([float(once and len(data.batches) == 1)])
    if options.true_sequential and all_reduce_(one_batch, "min").item() == 1.0:
        _one_pass(data, modules, groups, spec, options)
    else:
        _multi_pass(data, modules, groups, spec, options)


@QUANTIZERS.register("gptq")
class GPTQ(LayerwiseQuantizer):
    """GPTQ with Cholesky inverse, lazy block updates, act-order (static by default); calibrated block by block."""

    Config = GPTQConfig
    config: GPTQConfig

    def needs_calibration(self) -> bool:
        return True

    def process_block(self, data: BlockData, modules: dict[str, QuantizedLinear]) -> None:
        gptq_modules(data, modules, self.config.weight_spec, self.config)


__all__ = ["ACT_ORDERS", "GPTQ", "GPTQConfig", "GPTQOptions", "Hessian", "HessianFactor", "act_order_name",
           "gptq_columns_torch", "gptq_modules", "gptq_quantize", "hessian_factor"]
