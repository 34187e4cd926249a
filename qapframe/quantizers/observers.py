"""Observers: how a static activation quantizer turns its calibration tokens into one range ``(lo, hi)``.

Every observer sees the running min/max (reduced over ranks, as before); ``minmax`` keeps exactly that
range. ``percentile`` and ``mse`` keep a seeded sample of the observed values (at most
``values_per_call`` per calibration call, so memory stays bounded) and clip the range, so that a single
outlier token does not set the grid for every other token. Built-ins register with `OBSERVERS`; plugins
use the entry-point group ``qapframe.observers``.
"""

from __future__ import annotations

import abc
import inspect

import torch
from pydantic import Field

from qapframe.distributed import all_gather_objects, all_reduce_sum
from qapframe.quant_grid import dequantize, qparams, quantize
from qapframe.registry import Registry
from qapframe.strategy import Strategy, StrategyConfig

OBSERVERS: Registry[type["Observer"]] = Registry("observer", "qapframe.observers", ("qapframe.quantizers.observers",))


class Observer(Strategy, abc.ABC):
    """Collects what one static activation quantizer sees during calibration and picks its range."""

    def observe(self, x: torch.Tensor) -> None:
        """``x [..., D]``: the (real) tokens entering the quantizer in one calibration call."""

    @abc.abstractmethod
    def range(self, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen ``(lo, hi)`` (float32 scalars) given the observed min/max over every rank.

        With ``act_symmetric_grid: full`` the quantizer also passes ``full_range=True`` (by keyword, and only then,
        so observers written before it keep working); one that measures errors on the grid should accept it.
        """


def check_full_range(observer: Observer) -> None:
    """Refuse an observer whose ``range`` cannot be told that the grid is the full one (see `Observer.range`)."""
    parameters = inspect.signature(observer.range).parameters
    if "full_range" not in parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        raise ValueError(f"act_observer {observer.name or type(observer).__name__!r}: its range() takes no full_range "
                         "argument, so it would choose ranges for the narrow grid; use act_symmetric_grid: narrow, or "
                         "give range() a full_range=False keyword")


class MinMaxConfig(StrategyConfig):
    """The observed minimum and maximum; no parameters."""


@OBSERVERS.register("minmax")
class MinMaxObserver(Observer):
    """The plain observed range (the default; the numbers of every earlier release)."""

    Config = MinMaxConfig

    def range(self, lo, hi, bits, symmetric, full_range=False):
        return lo, hi


class SampledConfig(StrategyConfig):
    values_per_call: int = Field(65536, ge=1, description="values kept per calibration call (a seeded sample beyond that)")
    seed: int = Field(0, description="seed of the value sample")


class _SampledObserver(Observer):
    """Keeps a bounded, seeded sample of the observed values (flattened, float32, on their device)."""

    config: SampledConfig

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self._values: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(self.config.seed)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        cap = self.config.values_per_call
        if x.numel() > cap:  # sampled with replacement: cheap for millions of values, unbiased for quantiles
            x = x[torch.randint(0, x.numel(), (cap,), generator=self._generator).to(x.device)]
        self._values.append(x)

    def values(self) -> torch.Tensor:  # [n]
        if not self._values:
            return torch.zeros(0)
        return torch.cat(self._values)


class PercentileConfig(SampledConfig):
    percentile: float = Field(99.99, gt=50, le=100, description="percentile of the values kept as the range's end")
    absolute: bool = Field(
        False, description="percentile of |x|, range +-p within the observed one; False: lower and upper percentiles of x"
    )


@OBSERVERS.register("percentile")
class PercentileObserver(_SampledObserver):
    """Range from percentiles of the observed values (over every rank's sample)."""

    Config = PercentileConfig
    config: PercentileConfig

    def range(self, lo, hi, bits, symmetric, full_range=False):
        # Quantiles do not decompose over ranks: gather the (bounded) samples, so ranks pick one range.
        values = torch.cat([v.to(lo.device) for v in all_gather_objects(self.values().cpu())])
        self._values = []
        if values.numel() == 0:
            return lo, hi
        p = self.config.percentile / 100
        if self.config.absolute:
            bound = torch.quantile(values.abs().double(), p).float()
            return torch.maximum(lo, -bound), torch.minimum(hi, bound)
        q = torch.quantile(values.double(), torch.tensor([1 - p, p], dtype=torch.float64)).float()
        return torch.maximum(lo, q[0]), torch.minimum(hi, q[1])


class MSEConfig(SampledConfig):
    grid: int = Field(100, ge=1, description="clip ratios tried: 1 - k / grid * max_shrink, k = 0..grid")
    max_shrink: float = Field(0.8, gt=0, lt=1, description="the smallest ratio tried is 1 - max_shrink")
    norm: float = Field(2.0, gt=0, description="exponent of the error (2: mean squared error)")


@OBSERVERS.register("mse")
class MSEObserver(_SampledObserver):
    """The observed range shrunk by the ratio minimising the quantization error of the observed values."""

    Config = MSEConfig
    config: MSEConfig

    def range(self, lo, hi, bits, symmetric, full_range=False):
        cfg = self.config
        values = self.values().to(lo.device)
        self._values = []
        ratios = 1 - torch.arange(cfg.grid + 1, dtype=torch.float32, device=lo.device) / cfg.grid * cfg.max_shrink
        bounds = torch.stack([ratios * lo, ratios * hi], dim=1)  # [K, 2]
        scale, zero = qparams(bounds, bits, symmetric, full_range)  # [K, 1]
        error = torch.zeros(len(ratios), dtype=torch.float64, device=lo.device)
        for chunk in values.split(1 << 15):  # [K, chunk] at a time
            q = dequantize(quantize(chunk[None, :], scale, zero, bits, symmetric), scale, zero)
            error += (q - chunk[None, :]).abs().pow(cfg.norm).sum(dim=1).double()
        all_reduce_sum(error)  # every rank's values; ranks then choose the same ratio
        best = int(torch.argmin(error))  # the first minimum: ties keep the wider range
        return bounds[best, 0], bounds[best, 1]


__all__ = ["MSEObserver", "MinMaxObserver", "OBSERVERS", "Observer", "PercentileObserver", "check_full_range"]
