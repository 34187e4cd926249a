"""Per-input-channel scales that move quantization difficulty between activations and weights.

Both SmoothQuant and AWQ multiply a Linear's weight columns by ``s`` and divide its input by ``s``; the
fp function is unchanged. The division is folded into the op producing the input when that is exact:
a norm whose output feeds only these Linears (pre-norm LLaMA/OPT blocks), or a Linear whose output
rows can be scaled (v_proj -> o_proj, up_proj -> down_proj, BERT value -> attention output). Where no
exact fold exists (e.g. BERT's post-norm LayerNorms also feed the residual), the divisor stays on the
`QuantizedLinear` as ``smooth`` when ``unfused_scales`` is on, else the group is left unscaled.
Every fold is checked on a calibration input and undone if the block's fp output changed.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from qapframe.distributed import all_reduce_sum
from qapframe.quantizers.calibration import BlockData
from qapframe.quantizers.config import QuantizerConfig
from qapframe.quantizers.fake_quant import QuantizedLinear, quantize_weight_rtn
from qapframe.quantizers.gptq import GPTQOptions, gptq_modules

log = logging.getLogger("qapframe.quantizers")

# (producer, consumers), names relative to a block; a rule applies when the consumers are exactly
# one group of Linears sharing an input.
FOLD_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),  # LLaMA family
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("mlp.up_proj", ("mlp.down_proj",)),  # down's input is act(gate) * up: linear in up's output
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),  # OPT
    ("final_layer_norm", ("fc1",)),
    ("self_attn.v_proj", ("self_attn.out_proj",)),
    ("attention.self.value", ("attention.output.dense",)),  # BERT: attention mixes value rows linearly
]

FOLD_TOLERANCE = 1e-4  # relative change of the block's fp output that marks a fold as inexact


class ScalingConfig(QuantizerConfig):
    """Shared parameters of the scaling quantizers: how scales are applied and which weight quantizer follows."""

    weight_quantizer: Literal["rtn", "gptq"] = Field("rtn", description="quantizer of the scaled weights")
    gptq: GPTQOptions = Field(default_factory=GPTQOptions, description="GPTQ parameters when weight_quantizer=gptq")
    unfused_scales: bool = Field(
        True, description="keep scales on the Linear when no preceding op can absorb them exactly"
    )


def _rel_change(new: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Relative L2 change over every rank's outputs, so all ranks take the same fold decision."""
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(new, ref))
    den = sum(float(b.double().pow(2).sum()) for b in ref)
    num, den = all_reduce_sum(torch.tensor([num, den], dtype=torch.float64)).tolist()
    return (num / max(den, 1e-30)) ** 0.5


def _divide_producer(producer: nn.Module, s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s [D]``: a norm's affine parameters or a Linear's rows."""
    weight = producer.weight
    if weight.dim() == 2:  # Linear: rows are output channels
        producer.weight.data = (weight.float() / s[:, None]).to(weight.dtype)
    else:
        producer.weight.data = (weight.float() / s).to(weight.dtype)
    bias = getattr(producer, "bias", None)
    if isinstance(bias, torch.Tensor):
        producer.bias.data = (bias.float() / s).to(bias.dtype)


def fold_target(block: nn.Module, group: list[str]) -> nn.Module | None:
    """The module a group's input divisor can be folded into, per `FOLD_RULES`."""
    for producer, consumers in FOLD_RULES:
        if set(consumers) != set(group):
            continue
        try:
            module = block.get_submodule(producer)
        except AttributeError:
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.shape[0] == block.get_submodule(group[0]).in_features:
            return module
    return None


def apply_scales(data: BlockData, modules: dict[str, QuantizedLinear], group: list[str], s: torch.Tensor,
                 unfused: bool, reference: list[torch.Tensor] | None = None) -> str:
    """Scale ``group``'s weight columns by ``s [I]`` and its input by ``1 / s``; returns how: folded/unfused/skipped.

    ``reference``: the block's outputs on its first inputs, to verify an attempted fold.
    """
    s = s.float()
    producer = fold_target(data.module, group)
    if producer is not None:
        # The producer may be a wrapped Linear, whose weight is a buffer: save tensors, not parameters.
        saved = {k: getattr(producer, k).detach().clone() for k in ("weight", "bias")
                 if isinstance(getattr(producer, k, None), torch.Tensor)}
        saved_buffers = {n: modules[n].weight.clone() for n in group}
        _divide_producer(producer, s)
        for name in group:
            modules[name].weight = (modules[name].weight.float() * s).to(modules[name].weight.dtype)
        if reference is None or _rel_change(data.forward(limit=len(reference)), reference) <= FOLD_TOLERANCE:
            return "folded"
        log.info("qapframe: folding scales of %s into their producer is not exact here; undone", group)
        for k, v in saved.items():
            getattr(producer, k).data = v
        for name in group:
            modules[name].weight = saved_buffers[name]
    if not unfused:
        return "skipped"
    for name in group:
        modules[name].set_smooth(s)
    return "unfused"


def quantize_weights(data: BlockData, modules: dict[str, QuantizedLinear], config: ScalingConfig) -> None:
    """The composed weight quantizer (RTN or GPTQ) on the scaled block."""
    if config.weight_quantizer == "gptq":
        gptq_modules(data, modules, config.weight_spec, config.gptq)
    else:
        for module in modules.values():
            module.set_quantized(*quantize_weight_rtn(module.weight, config.weight_spec))


__all__ = ["FOLD_RULES", "ScalingConfig", "apply_scales", "fold_target", "quantize_weights"]
