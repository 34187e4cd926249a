"""AWQ (Lin et al., MLSys 2024): protect salient weight channels by scaling them up before quantization.

For each group of Linears sharing an input, ``s = mean|x|^a`` (normalised to geometric mean 1), with
``a`` chosen on a grid over [0, 1] to minimise the error of the output of the smallest module holding the
group (as the paper's code does: the attention module for q/k/v, the MLP for gate/up, the Linear itself
for o_proj and down_proj) when the group's weights are ``Q(W s) / s`` (everything else fp). Each grid
point then re-runs only that module on its recorded inputs, not the whole block (on SmolLM2, 3x fewer
FLOPs). The chosen scale is folded upstream (see `scaling`). Optional clipping search then shrinks each
weight group's range where that lowers the Linear's output error.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from pydantic import Field

from qapframe.distributed import all_reduce_sum
from qapframe.quantizers.base import QUANTIZERS
from qapframe.quantizers.calibration import BlockData, first_tensor
from qapframe.quantizers.config import WeightSpec
from qapframe.quant_grid import dequantize, qparams, quantize
from qapframe.quantizers.fake_quant import QuantizedLinear, dequantize_weight, quantize_weight_rtn
from qapframe.quantizers.layerwise import LayerwiseQuantizer
from qapframe.quantizers.scaling import ScalingConfig, apply_scales, quantize_weights
from qapframe.quantizers.targets import name_matches


class AWQConfig(ScalingConfig):
    """Shared and scaling parameters plus AWQ's search grids."""

    grid_size: int = Field(20, ge=1, description="points of the exponent search over [0, 1]")
    search_samples: int | None = Field(16, ge=1, description="calibration inputs used by the search; None = all")
    clip: bool = Field(True, description="search a per-group clipping ratio after scaling")
    clip_grid: int = Field(20, ge=1, description="ratio steps of 1/clip_grid")
    clip_max_shrink: float = Field(0.5, gt=0, lt=1, description="smallest ratio tried is 1 - clip_max_shrink")
    clip_tokens: int = Field(256, ge=1, description="tokens used by the clipping search")
    clip_ignore: list[str] = Field(
        default_factory=lambda: ["*q_proj", "*k_proj", "*query", "*key"],
        description="Linears not clipped (attention logits amplify q/k clipping error, as in AWQ)",
    )


def fake_rtn(weight: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """RTN quantize-dequantize of ``W [O, I]`` in float32."""
    return dequantize_weight(*quantize_weight_rtn(weight, spec))


def awq_scales(act_mean: torch.Tensor, a: float) -> torch.Tensor:
    """``mean|x| [I]`` -> ``s [I] = mean|x|^a``, geometric-mean normalised so weights keep their magnitude."""
    s = act_mean.float().clamp_min(1e-4).pow(a)
    return s / (s.max() * s.min()).sqrt()


def clip_search(weight: torch.Tensor, x: torch.Tensor, spec: WeightSpec, grid: int, max_shrink: float) -> torch.Tensor:
    """Clip ``W [O, I]`` per group to ``+-r max|W_g|``, r chosen per (row, group) to minimise ``|x W_g^T - x Q(W_g)^T|^2``.

    ``x [n, I]``: input tokens. Returns the clipped weight, float32.
    """
    out_f, in_f = weight.shape
    g = in_f if spec.group_size == -1 else spec.group_size
    w = weight.float()
    if in_f % g:
        return w  # a short last group would need its own pass; not worth it
    wg = w.reshape(out_f, -1, g)  # [O, G, g]
    xg = x.float().reshape(x.shape[0], -1, g)  # [n, G, g]
    ref = torch.einsum("ngk,ogk->nog", xg, wg)
    max0 = wg.abs().amax(dim=-1, keepdim=True)  # [O, G, 1]
    # The buffer follows the weight: on CUDA a CPU buffer fails at the first comparison.
    best_err = torch.full(max0.shape[:2], float("inf"), device=max0.device)
    best_max = max0.clone()
    for i in range(int(max_shrink * grid) + 1):
        m = max0 * (1 - i / grid)
        clipped = torch.clamp(wg, -m, m)
        scale, zero = qparams(clipped, spec.bits, spec.symmetric, spec.full_range)
        q = dequantize(quantize(clipped, scale, zero, spec.bits, spec.symmetric), scale, zero)
        err = all_reduce_sum((torch.einsum("ngk,ogk->nog", xg, q) - ref).pow(2).sum(dim=0))  # [O, G], all ranks' tokens
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better[..., None], m, best_max)
    return torch.clamp(wg, -best_max, best_max).reshape(out_f, in_f)


def inspected_module(group: list[str]) -> str:
    """The smallest module holding every Linear of ``group`` (names relative to the block; "" = the block)."""
    common: list[str] = []
    for parts in zip(*(name.split(".") for name in group)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


class ModuleCalls:
    """Records every call of ``module`` (args, kwargs, main output) while active; the search replays them."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.calls: list[tuple[tuple, dict]] = []
        self.outputs: list[torch.Tensor] = []
        self._handle = None

    def __enter__(self) -> "ModuleCalls":
        def hook(module, args, kwargs, output):
            self.calls.append((args, kwargs))
            self.outputs.append(first_tensor(output))

        self._handle = self.module.register_forward_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @torch.no_grad()
    def replay(self) -> list[torch.Tensor]:
        return [first_tensor(self.module(*args, **kwargs)) for args, kwargs in self.calls]


def _mse(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Summed squared error over every rank's outputs (ranks must pick the same exponent)."""
    local = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(outputs, reference))
    return float(all_reduce_sum(torch.tensor([local], dtype=torch.float64)).item())


@QUANTIZERS.register("awq")
class AWQ(LayerwiseQuantizer):
    """Activation-aware weight scaling, then RTN or GPTQ weights (declarative composition).

    Compose with GPTQ in a spec as ``{name: awq, scheme: W4A16, group_size: 128, weight_quantizer: gptq,
    gptq: {act_order: false}}``; bit widths, groups and targets are shared by both steps.
    """

    Config = AWQConfig
    config: AWQConfig

    def needs_calibration(self) -> bool:
        return True

    def process_block(self, data: BlockData, modules: dict[str, QuantizedLinear]) -> None:
        cfg = self.config
        groups = data.input_groups(modules)
        leaders = {group[0]: modules[group[0]] for group in groups}
        sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in leaders.items()}
        counts = dict.fromkeys(leaders, 0)
        tokens: dict[str, list[torch.Tensor]] = {n: [] for n in leaders}

        def record(name: str, x: torch.Tensor) -> None:
            sums[name] += x.abs().double().sum(dim=0).cpu()
            counts[name] += x.shape[0]
            tokens[name].append(x.float())

        inspected = {group[0]: inspected_module(group) for group in groups}
        recorders = {n: ModuleCalls(data.module.get_submodule(m)) for n, m in inspected.items() if m}
        with data.observe(leaders, record), contextlib.ExitStack() as stack:
            for recorder in recorders.values():
                stack.enter_context(recorder)
            reference = data.forward(limit=cfg.search_samples)
        # Replay only where the module ran once per input (a module re-entered per token would not replay).
        recorders = {n: r for n, r in recorders.items() if len(r.calls) == len(reference)}
        if cfg.search_samples is not None and len(data.inputs) > cfg.search_samples:
            with data.observe(leaders, record):  # the rest of the inputs only feed the statistics
                BlockData(data.module, data.inputs[cfg.search_samples:]).forward()
        for name in leaders:  # statistics over every rank's calibration tokens
            all_reduce_sum(sums[name])
            counts[name] = int(all_reduce_sum(torch.tensor([float(counts[name])], dtype=torch.float64)).item())
        scales: dict[str, torch.Tensor] = {}
        for group in groups:
            act_mean = (sums[group[0]] / max(counts[group[0]], 1)).float().to(modules[group[0]].weight.device)
            recorder = recorders.get(group[0])
            s = self._search(modules, group, act_mean,
                             recorder.replay if recorder else lambda: data.forward(limit=len(reference)),
                             recorder.outputs if recorder else reference)
            if s is not None and apply_scales(data, modules, group, s, cfg.unfused_scales, reference[:1]) != "skipped":
                scales.update(dict.fromkeys(group, s))
        if cfg.clip:
            generator = torch.Generator().manual_seed(cfg.seed)
            for group in groups:
                x = torch.cat(tokens[group[0]])
                x = x[torch.randperm(x.shape[0], generator=generator)[: cfg.clip_tokens]]
                for name in group:
                    if any(name_matches(name, p) for p in cfg.clip_ignore):
                        continue
                    xs = x / scales[name] if name in scales else x  # the input the weight now sees
                    m = modules[name]
                    m.weight = clip_search(m.weight, xs, cfg.weight_spec, cfg.clip_grid, cfg.clip_max_shrink).to(m.weight.dtype)
        quantize_weights(data, modules, cfg)

    def _search(self, modules: dict[str, QuantizedLinear], group: list[str], act_mean: torch.Tensor,
                run: Callable[[], list[torch.Tensor]], reference: list[torch.Tensor]) -> torch.Tensor | None:
        """Best ``s [I]`` over the exponent grid, or None when no scaling (a = 0) is best.

        ``run()`` recomputes the inspected module's outputs, compared with its fp ``reference`` outputs.
        """
        cfg = self.config
        original = {n: modules[n].weight for n in group}
        best_err, best = float("inf"), None
        for k in range(cfg.grid_size + 1):
            a = k / cfg.grid_size
            s = awq_scales(act_mean, a)
            for n in group:
                w = original[n]
                modules[n].weight = (fake_rtn(w.float() * s, cfg.weight_spec) / s).to(w.dtype)
            err = _mse(run(), reference)
            if err < best_err:
                best_err, best = err, (None if k == 0 else s)
        for n in group:
            modules[n].weight = original[n]
        return best


__all__ = ["AWQ", "AWQConfig", "ModuleCalls", "awq_scales", "clip_search", "fake_rtn", "inspected_module"]
