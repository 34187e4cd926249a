"""QuaRot-style rotation (Ashkboos et al., 2024) of a LLaMA-family decoder, alone or inside LLaVA.

Steps, each exact in real arithmetic (done in float64, stored in the model's dtype):

1. Fuse every RMSNorm's scale into the Linears that read its output (q/k/v, gate/up; the final norm
   into ``lm_head``), leaving the norm with unit weight: RMSNorm then commutes with any orthogonal ``Q``,
   since ``rms(x Q) = rms(x)``.
2. Rotate the residual stream ``x -> x Q`` with ``Q = diag(s) H / sqrt(D)`` (random signs ``s``, a Hadamard
   ``H``; see `hadamard`): embeddings ``E Q``; readers ``W -> W Q``; writers (o_proj, down_proj, and the
   LLaVA projector's or Qwen-VL patch mergers' last Linear, so vision tokens enter the rotated stream)
   ``W -> Q^T W``, ``b -> Q^T b``.
   ``lm_head`` reads it: ``W diag(w_final) Q``. Tied embeddings are untied when the final norm's scale
   makes ``lm_head`` differ from the embeddings (``config.tie_word_embeddings`` is then set false).
3. Per attention head, ``v -> v R`` and o_proj's input columns ``-> R`` (``R = H_d / sqrt(d)``): o_proj's
   input is then rotated too, at no run-time cost (attention mixes value rows linearly).
4. An online Hadamard on down_proj's input (``HadamardLinear``), its inverse folded into down_proj's weight.

The vision tower and the projector's inner layers are untouched. Norms are checked to be plain RMSNorms
(``w * x / rms(x)``); LayerNorm models (BERT) are refused: rotating them needs the mean folded first.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from pydantic import Field
from torch import nn

from qapframe.quantizers.rotations.base import ROTATIONS, Rotation
from qapframe.quantizers.rotations.hadamard import HadamardLinear, OnlineHadamard, random_hadamard, random_orthogonal
from qapframe.strategy import StrategyConfig

log = logging.getLogger("qapframe.quantizers")

_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class DecoderLayout:
    """The parts of a LLaMA-family decoder a rotation rewrites."""

    decoder: nn.Module  # holds embed_tokens, layers, norm
    layers: list[nn.Module]
    lm_head: nn.Linear | None
    projector_out: nn.Linear | None  # the LLaVA projector's last Linear
    extra_stream: list[nn.Parameter]  # parameters added to the stream as tokens (LLaVA-NeXT's image_newline)
    hidden: int
    head_dim: int
    mergers_out: list[nn.Linear] = field(default_factory=list)  # Qwen-VL: last Linear of each patch merger


def _refuse(model: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"rotation: cannot rotate {type(model).__name__}: {why}. Supported: LLaMA-family decoders with "
        "RMSNorm (LlamaForCausalLM, Qwen2, Mistral) and LLaVA models built on them; LayerNorm models such as "
        "BERT would need their mean folded first, which is not supported"
    )


def find_layout(model: nn.Module) -> DecoderLayout:
    """Locate the decoder (the module holding ``embed_tokens``, ``layers`` and ``norm``) and its neighbours."""
    decoders = [m for _, m in model.named_modules()
                if isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "embed_tokens") and hasattr(m, "norm")]
    if len(decoders) != 1:
        if any(isinstance(m, nn.LayerNorm) for m in model.modules()):
            raise _refuse(model, "it has LayerNorm layers and no LLaMA-style decoder")
        raise _refuse(model, f"found {len(decoders)} decoders (modules with embed_tokens, layers and norm), expected 1")
    decoder = decoders[0]
    layers = list(decoder.layers)
    for i, layer in enumerate(layers):
        for part in _LAYER_PARTS:
            try:
                layer.get_submodule(part)
            except AttributeError:
                raise _refuse(model, f"decoder layer {i} has no {part}") from None
    for norm in [decoder.norm] + [getattr(layer, n) for layer in layers for n in _LAYER_PARTS[:2]]:
        _check_rmsnorm(model, norm)
    hidden = decoder.embed_tokens.weight.shape[1]
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    projector_out = None
    for name, module in model.named_modules():
        if name.endswith("multi_modal_projector"):
            linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
            if not linears or linears[-1].out_features != hidden:
                raise _refuse(model, f"{name} does not end in a Linear writing {hidden} channels")
            projector_out = linears[-1]
    extra = [p for n, p in model.named_parameters() if n.endswith("image_newline") and p.shape == (hidden,)]
    mergers = []  # Qwen-VL's merger (and Qwen3-VL's deepstack mergers) write vision tokens into the stream
    for name, module in model.named_modules():
        if re.search(r"(^|\.)visual\.(merger|deepstack_merger_list\.\d+)$", name):
            linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
            if not linears or linears[-1].out_features != hidden:
                raise _refuse(model, f"{name} does not end in a Linear writing {hidden} channels")
            mergers.append(linears[-1])
    attn = layers[0].self_attn
    head_dim = getattr(attn, "head_dim", None) or hidden // attn.config.num_attention_heads
    return DecoderLayout(decoder, layers, lm_head, projector_out, extra, hidden, head_dim, mergers)


def _check_rmsnorm(model: nn.Module, norm: nn.Module) -> None:
    """Refuse anything that is not ``w * x / sqrt(mean(x^2) + eps)`` (LayerNorm, Gemma's ``1 + w``)."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if isinstance(norm, nn.LayerNorm) or weight is None or eps is None or getattr(norm, "bias", None) is not None:
        raise _refuse(model, f"{type(norm).__name__} is not an RMSNorm")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, weight.shape[0], generator=g).to(weight)
    with torch.no_grad():
        expected = weight.float() * x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        if not torch.allclose(norm(x).float(), expected, rtol=1e-2, atol=1e-3):
            raise _refuse(model, f"{type(norm).__name__} does not compute w * x / rms(x)")


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device)


def _read(linear: nn.Linear, scale: torch.Tensor, Q: torch.Tensor) -> None:
    """A Linear reading the (normalised) stream: ``W -> W diag(scale) Q``."""
    _set(linear.weight, (linear.weight.double() * scale[None, :]) @ Q)


def _write(linear: nn.Linear, Q: torch.Tensor) -> None:
    """A Linear writing the stream: ``W -> Q^T W``, ``b -> Q^T b``."""
    _set(linear.weight, Q.T @ linear.weight.double())
    if linear.bias is not None:
        _set(linear.bias, Q.T @ linear.bias.double())


def _untie(model: nn.Module, lm_head: nn.Linear) -> None:
    lm_head.weight = nn.Parameter(lm_head.weight.detach().clone(), requires_grad=lm_head.weight.requires_grad)
    configs = [getattr(model, "config", None)]
    if configs[0] is not None and hasattr(configs[0], "get_text_config"):
        configs.append(configs[0].get_text_config())
    for config in configs:
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    log.info("qapframe: rotation untied lm_head from the embeddings (the final norm's scale is folded into lm_head)")


@torch.no_grad()
def rotate_decoder(model: nn.Module, Q: torch.Tensor, head_rotation: torch.Tensor | list[torch.Tensor] | None,
                   online_down_proj: bool, seed: int) -> DecoderLayout:
    """Fuse the norms and rotate the residual stream by ``Q [D, D]`` (float64, orthogonal); see the module docstring.

    ``head_rotation``: one ``[d, d]`` orthogonal matrix for every layer's value heads, or one per layer.
    """
    layout = find_layout(model)
    if isinstance(head_rotation, (list, tuple)) and len(head_rotation) != len(layout.layers):
        raise ValueError(f"rotation: {len(head_rotation)} head rotations for {len(layout.layers)} layers")
    dec = layout.decoder
    Q = Q.to(dec.embed_tokens.weight.device)
    if layout.lm_head is not None:
        final = dec.norm.weight.double()
        if layout.lm_head.weight is dec.embed_tokens.weight and not torch.all(final == 1):
            _untie(model, layout.lm_head)
    _set(dec.embed_tokens.weight, dec.embed_tokens.weight.double() @ Q)
    for p in layout.extra_stream:
        _set(p, p.double() @ Q)
    if layout.projector_out is not None:
        _write(layout.projector_out, Q)
    for linear in layout.mergers_out:
        _write(linear, Q)
    for i, layer in enumerate(layout.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                              (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
            scale = norm.weight.double()
            for linear in readers:
                _read(linear, scale, Q)
            _set(norm.weight, torch.ones_like(scale))
        _write(attn.o_proj, Q)
        if head_rotation is not None:
            R = head_rotation[i] if isinstance(head_rotation, (list, tuple)) else head_rotation
            _rotate_heads(attn, R.to(Q.device))
        down = mlp.down_proj
        _write(down, Q)
        if online_down_proj:
            transform = OnlineHadamard(down.in_features, seed, down.weight.dtype, down.weight.device)
            _set(down.weight, down.weight.double() @ transform.matrix().to(Q.device).T)  # W M^T undoes x M^T
            mlp.down_proj = HadamardLinear(down, transform)
    if layout.lm_head is not None and layout.lm_head.weight is not dec.embed_tokens.weight:
        _read(layout.lm_head, dec.norm.weight.double(), Q)
    _set(dec.norm.weight, torch.ones_like(dec.norm.weight))
    return layout


def head_rows_rotated(W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``R^T W_h`` for each head's block of ``d`` rows of ``W [H d, I]`` (v_proj: ``v_h -> v_h R``), ``R [d, d]``."""
    d = R.shape[0]
    return torch.einsum("ji,hjk->hik", R.to(W.dtype), W.reshape(-1, d, W.shape[1])).reshape(W.shape)


def head_columns_rotated(W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``W[:, h] R`` for each head's block of ``d`` columns of ``W [O, H d]`` (o_proj's input), ``R [d, d]``."""
    d = R.shape[0]
    return torch.einsum("ohj,jk->ohk", W.reshape(W.shape[0], -1, d), R.to(W.dtype)).reshape(W.shape)


def _rotate_heads(attn: nn.Module, R: torch.Tensor) -> None:
    """``v_h -> v_h R`` for every value head and o_proj's input columns per head ``-> R``."""
    v, o = attn.v_proj, attn.o_proj
    _set(v.weight, head_rows_rotated(v.weight.double(), R))
    if v.bias is not None:
        _set(v.bias, head_columns_rotated(v.bias.double()[None, :], R)[0])
    _set(o.weight, head_columns_rotated(o.weight.double(), R))


class HadamardConfig(StrategyConfig):
    """A randomised Hadamard rotation of the residual stream."""

    seed: int = Field(0, description="seed of the random signs (and of any random orthogonal fallback)")
    rotate_heads: bool = Field(True, description="also rotate each value head and o_proj's input (offline)")
    online_down_proj: bool = Field(True, description="online Hadamard on down_proj's input, inverse folded into its weight")


@ROTATIONS.register("hadamard")
class HadamardRotation(Rotation):
    """QuaRot: ``Q = diag(s) H / sqrt(D)``; a seeded random orthogonal ``Q`` for sizes with no known Hadamard."""

    Config = HadamardConfig
    config: HadamardConfig

    def stream_matrix(self, n: int) -> torch.Tensor:
        Q, how = random_hadamard(n, self.config.seed)
        log.info("qapframe: rotating the residual stream (%d channels) by a %s matrix", n, how)
        return Q

    def head_matrix(self, d: int) -> torch.Tensor:
        return OnlineHadamard(d, self.config.seed, torch.float64).matrix()

    def apply(self, model: nn.Module) -> nn.Module:
        layout = find_layout(model)
        cfg = self.config
        head = self.head_matrix(layout.head_dim) if cfg.rotate_heads else None
        rotate_decoder(model, self.stream_matrix(layout.hidden), head, cfg.online_down_proj, cfg.seed)
        return model


class OrthogonalConfig(HadamardConfig):
    """A seeded random orthogonal rotation (QR of a Gaussian), for comparison with the Hadamard one."""


@ROTATIONS.register("orthogonal")
class OrthogonalRotation(HadamardRotation):
    """Like ``hadamard`` with a Haar-random orthogonal ``Q`` (the QuaRot/SpinQuant baseline)."""

    Config = OrthogonalConfig

    def stream_matrix(self, n: int) -> torch.Tensor:
        return random_orthogonal(n, self.config.seed)

    def head_matrix(self, d: int) -> torch.Tensor:
        return random_orthogonal(d, self.config.seed + 1)


__all__ = ["DecoderLayout", "HadamardConfig", "HadamardRotation", "OrthogonalConfig", "OrthogonalRotation",
           "find_layout", "head_columns_rotated", "head_rows_rotated", "rotate_decoder"]
