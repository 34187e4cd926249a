"""Weight and activation quantize-dequantize, and `QuantizedLinear`, the module that carries the codes.

The grid is qapframe's one grid (`qapframe.quant_grid`: float32, round-half-even, plain min/max,
asymmetric zero point ``round(-min / scale)``), the one the hybrid score's E is measured on too; the
activation quantizer *is* its `fake_quantize_groups`. Weights keep their integer codes,
scales and zero points, the codes packed (`qapframe.quantizers.packing`); the dequantized weight is
recomputed from them at every forward, never kept.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qapframe.distributed import all_reduce_
from qapframe.quantizers.config import ActSpec, WeightSpec
from qapframe.quantizers.observers import MinMaxObserver, Observer
from qapframe.quant_grid import channel_groups, code_range, dequantize, fake_quantize_groups, qparams, quantize
from qapframe.quantizers.packing import pack_codes, packed_width, unpack_codes


def group_index(in_features: int, group_size: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Group of each input channel ``[I]``; with ``perm`` (act order) groups run along the permuted order."""
    g = in_features if group_size == -1 else group_size
    order_groups = torch.arange(in_features) // g
    if perm is None:
        return order_groups.int()
    idx = torch.empty(in_features, dtype=torch.int32)
    idx[perm] = order_groups.int()
    return idx


def group_qparams(weight: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The RTN grid of every weight group: ``W [O, I]`` -> ``(scales [O, G], zeros [O, G])`` float32."""
    scale, zero = qparams(channel_groups(weight, spec.group_size), spec.bits, spec.symmetric, spec.full_range)
    return scale.squeeze(-1), zero.squeeze(-1)


def quantize_weight_rtn(weight: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``W [O, I]`` -> ``(codes [O, I], scales [O, G], zeros [O, G], g_idx [I])``."""
    out_f, in_f = weight.shape
    groups = channel_groups(weight, spec.group_size)  # [O, G, g]
    scale, zero = qparams(groups, spec.bits, spec.symmetric, spec.full_range)
    codes = quantize(groups, scale, zero, spec.bits, spec.symmetric).reshape(out_f, -1)[:, :in_f]
    return codes, scale.squeeze(-1), zero.squeeze(-1), group_index(in_f, spec.group_size)


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """``codes [O, I]``, ``scales/zeros [O, G]``, ``g_idx [I]`` -> float32 ``[O, I]``."""
    idx = g_idx.long()
    return dequantize(codes, scales[:, idx], zeros[:, idx])


class ActQuantizer(nn.Module):
    """Fake-quantizes a Linear's input: dynamic per token/group, or static per tensor from calibration.

    A static range is the running min/max of what `observe` sees, narrowed at `reduce_over_ranks` by the
    ``observer`` (see `qapframe.quantizers.observers`; the default, minmax, keeps it as it is).
    """

    def __init__(self, spec: ActSpec, observer: Observer | None = None):
        super().__init__()
        self.spec = spec
        self.enabled = False  # switched on once the module's weights are quantized (and static ranges calibrated)
        self.observer = observer if observer is not None else MinMaxObserver()  # calibration state, not saved
        # Static range, float32 scalars; +/-inf until observed.
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    def observe(self, x: torch.Tensor) -> None:
        self.lo = torch.minimum(self.lo, x.detach().float().amin())
        self.hi = torch.maximum(self.hi, x.detach().float().amax())
        self.observer.observe(x)

    def reduce_over_ranks(self) -> None:
        """End calibration: widen the observed range to every rank's, then let the observer choose within it.

        Both steps are reductions over ranks (no-ops in one process), so ranks agree on the range.
        """
        all_reduce_(self.lo, "min")
        all_reduce_(self.hi, "max")
        if torch.isfinite(self.lo):
            grid = {"full_range": True} if self.spec.full_range else {}  # see Observer.range
            lo, hi = self.observer.range(self.lo.float(), self.hi.float(), self.spec.bits, self.spec.symmetric, **grid)
            self.lo, self.hi = lo.to(self.lo), hi.to(self.hi)
        self.observer = MinMaxObserver()  # drops the observer's samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D], same dtype
        if not self.enabled:
            return x
        s = self.spec
        if s.dynamic:
            return fake_quantize_groups(x, s.bits, s.group_size, s.symmetric, s.full_range).to(x.dtype)
        if not torch.isfinite(self.lo):
            raise RuntimeError("static activation quantizer was never calibrated; pass calibration data")
        scale, zero = qparams(torch.stack([self.lo, self.hi]), s.bits, s.symmetric, s.full_range)
        return dequantize(quantize(x, scale, zero, s.bits, s.symmetric), scale, zero).to(x.dtype)

    def extra_repr(self) -> str:
        s = self.spec
        grid = ", full_range=True" if s.full_range else ""
        return f"bits={s.bits}, group_size={s.group_size}, symmetric={s.symmetric}, dynamic={s.dynamic}{grid}"


@contextlib.contextmanager
def holding_weights(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Dequantize each `QuantizedLinear` of ``modules`` once, not at every forward, while the block is re-run.

    Calibration runs a block's samples through several passes after some of its Linears are quantized;
    unpacking and dequantizing their codes at every call cost more than the matmuls (SmolLM2's GPTQ spent
    28 % of its time there). The held copies are dropped on exit.
    """
    held = [m for m in modules if isinstance(m, QuantizedLinear)]
    for module in held:
        module.holds_weight = True
    try:
        yield
    finally:
        for module in held:
            module.holds_weight = False
            module._held_weight = None


class QuantizedLinear(nn.Module):
    """A Linear with fake-quantized weights (packed codes, scales, zeros kept) and an optional input quantizer.

    Before `set_quantized` it computes in full precision (calibration phase) with the fp ``weight``. After it,
    only the codes (``qweight``: int32 words ``[O, ceil(I*b/32)]``, see `qapframe.quantizers.packing`; a code
    ``q`` is stored as ``q - code_range(...)[0]``), ``scales``/``zeros`` ``[O, G]`` and ``g_idx`` ``[I]`` stay
    resident: ``weight`` is dequantized from them on every access and forward, never kept. ``smooth`` holds
    per-input-channel SmoothQuant/AWQ divisors that no preceding op could absorb: the input is divided
    by them before the activation quantizer, exactly as if they had been folded upstream.
    Forward: ``x [..., I]`` -> ``[..., O]``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_spec: WeightSpec,
                 act_spec: ActSpec | None, dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec = weight_spec
        groups = 1 if weight_spec.group_size == -1 else -(-in_features // weight_spec.group_size)
        words = packed_width(in_features, weight_spec.bits)
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("g_idx", group_index(in_features, weight_spec.group_size).to(device))
        # The fp weight while calibrating ([O, I]); once quantized an empty [0] tensor that only carries the
        # compute dtype (so `model.to(dtype)` still decides it). Derived data: never saved.
        self.register_buffer("_fp_weight", torch.zeros(0, dtype=dtype, device=device), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.register_buffer("smooth", None)  # [I] float32 input divisors, when smoothing could not be folded
        self.act_quant = ActQuantizer(act_spec) if act_spec is not None else None
        # An orthogonal transform of the input (a rotation's online Hadamard), applied first; its inverse
        # is already in the weight.
        self.input_transform: nn.Module | None = None
        self.quantized = False
        self.observers: list = []  # calibration callbacks seeing the (transformed, smoothed) input
        # While calibration re-runs a block many times, its dequantized weight is kept here (see
        # `holding_weights`); None otherwise, so a quantized model stays at its packed size.
        self._held_weight: torch.Tensor | None = None
        self.holds_weight = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_spec: WeightSpec, act_spec: ActSpec | None) -> "QuantizedLinear":
        """An fp copy of ``linear`` ready for calibration; weights are quantized later by `set_quantized`."""
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_spec, act_spec, w.dtype, w.device)
        module.weight = w.detach().clone()
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().clone()
        module.input_transform = getattr(linear, "input_transform", None)
        return module

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (of the fp weight before quantization, of the dequantized weight after)."""
        return self._fp_weight.dtype

    @property
    def weight(self) -> torch.Tensor:
        """``[O, I]`` in the compute dtype: the fp weight, or once quantized a fresh dequantization of the codes."""
        if not self.quantized:
            return self._fp_weight
        if self._held_weight is not None:
            return self._held_weight
        weight = dequantize_weight(self.codes, self.scales, self.zeros, self.g_idx).to(self.dtype)
        if self.holds_weight:
            self._held_weight = weight
        return weight

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        if self.quantized:
            raise AttributeError(
                "QuantizedLinear.weight is derived from the codes once quantized; change them with set_quantized"
            )
        self._fp_weight = value

    @property
    def codes(self) -> torch.Tensor:
        """The integer codes ``[O, I]``: int8 when symmetric, uint8 (``0 .. 2^b - 1``) when asymmetric."""
        spec = self.weight_spec
        lo, _ = code_range(spec.bits, spec.symmetric)
        unsigned = unpack_codes(self.qweight, spec.bits, self.in_features)
        if not spec.symmetric:
            return unsigned
        return (unsigned.to(torch.int16) + lo).to(torch.int8)

    def set_smooth(self, divisor: torch.Tensor) -> None:
        """Divide the input by ``divisor [I]`` (accumulating) and multiply the weight's columns by it."""
        divisor = divisor.float()
        self.weight = (self.weight.float() * divisor).to(self.weight.dtype)
        total = divisor if self.smooth is None else self.smooth * divisor
        self.smooth = total.to(self.weight.device)

    def set_quantized(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> None:
        """Store the integer weight (packed) and execute with it; the fp weight is dropped.

        ``codes [O, I]`` (any dtype holding integers in `code_range`), ``scales/zeros [O, G]``, ``g_idx [I]``.
        The activation quantizer is enabled separately.
        """
        spec = self.weight_spec
        lo, _ = code_range(spec.bits, spec.symmetric)
        device = self.qweight.device
        self.qweight = pack_codes(codes.to(device).to(torch.int64) - lo, spec.bits)
        self.scales = scales.float().to(device)
        self.zeros = zeros.float().to(device)
        self.g_idx = g_idx.int().to(device)
        self._fp_weight = torch.zeros(0, dtype=self.dtype, device=self._fp_weight.device)
        self._held_weight = None
        self.quantized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.smooth is not None:
            x = (x.float() / self.smooth).to(x.dtype)
        for observe in self.observers:
            observe(self, x)
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        w = self.weight_spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={w.bits}, "
                f"group_size={w.group_size}, symmetric={w.symmetric}, quantized={self.quantized}"
                + (", full_range=True" if w.full_range else ""))


__all__ = [
    "ActQuantizer", "QuantizedLinear", "dequantize_weight", "group_index", "group_qparams", "holding_weights",
    "quantize_weight_rtn",
]
