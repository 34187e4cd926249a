"""SpinQuant (Liu et al., 2024): rotations learned on calibration data instead of drawn at random.

A random Hadamard (QuaRot) spreads outliers over channels, but which rotation quantizes best is left to chance.
SpinQuant learns the residual-stream rotation ``R1 [D, D]`` and one value-head rotation ``R2 [d, d]`` per layer
by minimising the next-token loss (or, with ``loss: fp_kl``, the divergence from the fp model) of the network
with its activations (and, with ``weights_in_loss: quantized``, its weights) fake-quantized, gradients passed
straight through the rounding. Every step is a Cayley transform on the orthogonal group (Wen & Yin, 2013;
Li et al., 2020), so the rotations stay orthogonal and the fp model is unchanged whatever is learned; folding
them into the weights afterwards is `rotate_decoder`'s exact rewrite. The online Hadamard on down_proj's input
(SpinQuant's R4) stays fixed.

The learning forward never writes a weight: it calls the model with rotated copies of its weights
(`torch.func.functional_call`), built from the fused weights and the current rotations at every step.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from qapframe.distributed import all_reduce_, world_size
from qapframe.quant_grid import fake_quantize_groups
from qapframe.quantizers.config import ActSpec, WeightSpec
from qapframe.quantizers.fake_quant import dequantize_weight, quantize_weight_rtn
from qapframe.quantizers.rotations.base import ROTATIONS, CalibrationContext
from qapframe.quantizers.rotations.hadamard import HadamardLinear, random_orthogonal
from qapframe.quantizers.rotations.quarot import (
    DecoderLayout, HadamardConfig, HadamardRotation, find_layout, head_columns_rotated, head_rows_rotated,
    rotate_decoder,
)
from qapframe.quantizers.targets import select_linears

log = logging.getLogger("qapframe.quantizers")

# Config attributes naming the placeholder tokens of image and video features: never a next-token target.
_PLACEHOLDER_IDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def cayley_step(R: torch.Tensor, grad: torch.Tensor, step: float) -> torch.Tensor:
    """One descent step on the orthogonal group: ``R [n, n]`` (orthogonal), ``grad = df/dR`` -> orthogonal ``[n, n]``.

    ``A = G R^T - R G^T`` is skew-symmetric, so the Cayley transform ``(I + s/2 A)^{-1} (I - s/2 A)`` is
    orthogonal and so is its product with ``R``; its derivative at ``s = 0`` is ``-A R``, a descent direction
    (``<G, -A R> = -||A||^2 / 2``). The step ``s`` is capped at ``1 / ||A||_F`` (Li et al.'s rule), so one
    step turns ``R`` by at most about a radian however large the gradient.
    """
    R, G = R.double(), grad.double()
    A = G @ R.T - R @ G.T
    norm = torch.linalg.matrix_norm(A).item()
    s = min(step, 1.0 / norm) if norm > 0 else 0.0
    eye = torch.eye(R.shape[0], dtype=torch.float64, device=R.device)
    return torch.linalg.solve(eye + (s / 2) * A, (eye - (s / 2) * A) @ R)


def nearest_orthogonal(M: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix closest to ``M [n, n]`` in Frobenius norm (``U V^T`` of its SVD), float64."""
    U, _, Vh = torch.linalg.svd(M.double())
    return U @ Vh


def _ste(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` forward, identity backward (the straight-through estimator)."""
    return x + (quantized - x).detach()


def fake_quantize_weight(weight: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """RTN quantize-dequantize of ``W [O, I]`` on qapframe's grid, straight-through for the gradient."""
    codes, scales, zeros, g_idx = quantize_weight_rtn(weight.detach().float(), spec)
    return _ste(weight, dequantize_weight(codes, scales, zeros, g_idx).to(weight.dtype))


def fake_quantize_activation(x: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """Per-token (or per-group) dynamic quantize-dequantize of ``x [..., D]``, straight-through."""
    grid = fake_quantize_groups(x.detach(), spec.bits, spec.group_size, spec.symmetric, spec.full_range)
    return _ste(x, grid.to(x.dtype))


@dataclass
class _Rotated:
    """A parameter of the model whose learning-forward value is ``build(R1, R2 of its layer)``."""

    name: str
    build: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    layer: int | None  # whose R2 it uses; None: R1 only
    quantize: bool  # a target Linear's weight: fake-quantized when weights_in_loss is "quantized"


def rotated_parameters(model: nn.Module, layout: DecoderLayout, targets: set[str]) -> list[_Rotated]:
    """How each stream-touching weight of a fused model depends on ``R1`` and its layer's ``R2``.

    The same rewrite as `rotate_decoder` (readers ``W R1``, writers ``R1^T W``, value heads ``R2^T W_h``,
    o_proj's input columns ``W_o[:, h] R2``), as functions, so that gradients reach the rotations.
    """
    names = {id(m): n for n, m in model.named_modules()}
    out: list[_Rotated] = []

    def add(module: nn.Module, attr: str, build, layer=None) -> None:
        name = names[id(module)]
        tensor = getattr(module, attr).detach()
        out.append(_Rotated(f"{name}.{attr}" if name else attr, lambda R1, R2, t=tensor: build(t, R1, R2), layer,
                            attr == "weight" and name in targets))

    read = lambda t, R1, R2: t @ R1.to(t.dtype)  # noqa: E731
    write = lambda t, R1, R2: R1.to(t.dtype).T @ t  # noqa: E731
    add(layout.decoder.embed_tokens, "weight", read)
    tied = layout.lm_head is not None and layout.lm_head.weight is layout.decoder.embed_tokens.weight
    if layout.lm_head is not None and not tied:
        add(layout.lm_head, "weight", read)
    for module in [layout.projector_out, *layout.mergers_out]:
        if module is not None:
            add(module, "weight", write)
            if module.bias is not None:
                add(module, "bias", read)  # a writer's bias: R1^T b = b R1
    param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for p in layout.extra_stream:
        tensor = p.detach()
        out.append(_Rotated(param_names[id(p)], lambda R1, R2, t=tensor: read(t, R1, R2), None, False))
    for i, layer in enumerate(layout.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for linear in (attn.q_proj, attn.k_proj, mlp.gate_proj, mlp.up_proj):
            add(linear, "weight", read)
        add(attn.v_proj, "weight", lambda t, R1, R2: head_rows_rotated(read(t, R1, R2), R2), i)
        if attn.v_proj.bias is not None:
            add(attn.v_proj, "bias", lambda t, R1, R2: head_columns_rotated(t[None, :], R2)[0], i)
        add(attn.o_proj, "weight", lambda t, R1, R2: head_columns_rotated(write(t, R1, R2), R2), i)
        add(mlp.down_proj, "weight", write)
        for writer in (attn.o_proj, mlp.down_proj):
            if writer.bias is not None:
                add(writer, "bias", read)  # R1^T b = b R1
    return out


def _next_token_labels(model: nn.Module, sample: dict[str, Any]) -> torch.Tensor:
    """The sample's ``labels``, or its ``input_ids`` with padding and image/video placeholders ignored (-100)."""
    if "labels" in sample:
        return sample["labels"]
    labels = sample["input_ids"].clone()
    mask = sample.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == labels.shape:
        labels[mask == 0] = -100
    config = getattr(model, "config", None)
    for attr in _PLACEHOLDER_IDS:
        token = getattr(config, attr, None)
        if isinstance(token, int):
            labels[labels == token] = -100
    return labels


class _InputQuantization:
    """Forward hooks that fake-quantize every target Linear's input (after its online Hadamard, as
    `QuantizedLinear` does), switched off while the fp reference runs."""

    def __init__(self, model: nn.Module, targets: set[str], spec: ActSpec | None):
        self.model, self.targets, self.spec = model, targets, spec
        self.enabled = True

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activation(x, self.spec) if self.enabled else x

    @contextmanager
    def installed(self) -> Iterator[None]:
        with ExitStack() as stack:
            if self.spec is not None:
                for name, module in self.model.named_modules():
                    if name not in self.targets:
                        continue
                    if isinstance(module, HadamardLinear):
                        hook = module.input_transform.register_forward_hook(lambda m, args, out: self._quantize(out))
                    else:
                        hook = module.register_forward_pre_hook(lambda m, args: (self._quantize(args[0]), *args[1:]))
                    stack.callback(hook.remove)
            yield

    @contextmanager
    def off(self) -> Iterator[None]:
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients while the rotations learn (only they need a graph), then as before."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class QuantizedLoss:
    """The learning objective of the fused model rotated by ``(R1, R2)``, fake-quantized.

    ``next_token`` (SpinQuant's): the next-token cross-entropy, exactly the loss of the model that
    `rotate_decoder` and RTN quantization (dynamic activations) would make from the same rotations.
    Activations are quantized per token (or group) as they come, also for a quantizer with static ranges,
    which are calibrated only after the rotation: the loss then stands in for the static grid.
    ``fp_kl``: the KL divergence from the fp model's next-token distribution to the quantized one's, on the
    same positions; it asks the quantized model to match the fp one, not to fit the calibration text better
    than fp does (VQA prompts are not the text an LLM was trained to predict).
    Differentiable in the rotations: weights are rebuilt from the fused ones at every call and passed to
    `functional_call`, so the model itself is never written. Use it inside ``with objective.quantizing():``.
    """

    def __init__(self, model: nn.Module, layout: DecoderLayout, context: CalibrationContext, quantize_weights: bool,
                 loss: Literal["next_token", "fp_kl"] = "next_token"):
        self.model = model
        self.targets = set(select_linears(model, context.targets, context.ignore))
        self.recipes = rotated_parameters(model, layout, self.targets)
        self.weight_spec = context.weight_spec if quantize_weights else None
        self.inputs = _InputQuantization(model, self.targets, context.act_spec)
        self.loss = loss

    def quantizing(self):
        return self.inputs.installed()

    def __call__(self, R1: torch.Tensor, R2: list[torch.Tensor], samples: list[dict[str, Any]]) -> torch.Tensor:
        """Mean loss over ``samples`` (one forward each); ``R1 [D, D]``, ``R2``: ``[d, d]`` per layer."""
        params = {}
        for recipe in self.recipes:
            value = recipe.build(R1, None if recipe.layer is None else R2[recipe.layer])
            if recipe.quantize and self.weight_spec is not None:
                value = fake_quantize_weight(value, self.weight_spec)
            params[recipe.name] = value
        losses = []
        for sample in samples:
            inputs = {k: v for k, v in sample.items() if k != "labels"}
            labels = _next_token_labels(self.model, sample)
            if self.loss == "next_token":
                losses.append(functional_call(self.model, params, args=(), kwargs={**inputs, "labels": labels},
                                              strict=False).loss)
                continue
            with torch.no_grad(), self.inputs.off():
                reference = self.model(**inputs).logits  # the fused model is the fp model
            logits = functional_call(self.model, params, args=(), kwargs=inputs, strict=False).logits
            losses.append(_kl_at_labelled_positions(reference, logits, labels))
        return torch.stack(losses).mean()


def _kl_at_labelled_positions(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the positions that predict a labelled token of ``KL(p_ref || p)``; logits ``[B, T, V]``."""
    keep = labels[:, 1:] != -100  # position t predicts token t + 1
    ref = torch.log_softmax(reference[:, :-1][keep].float(), dim=-1)
    log_p = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1)
    return (ref.exp() * (ref - log_p)).sum(-1).mean()


class SpinQuantConfig(HadamardConfig):
    """SpinQuant: R1 and per-layer R2 learned with Cayley SGD on the fake-quantized network's loss."""

    init: Literal["hadamard", "orthogonal"] = Field(
        "hadamard", description="starting rotations: randomised Hadamard (SpinQuant's choice) or random orthogonal")
    steps: int = Field(100, ge=0, description="Cayley SGD steps (0: the starting rotation, unlearned)")
    learning_rate: float = Field(
        1.5, gt=0, description="step size, decaying linearly to 0 (each step capped at 1/||A||); fp_kl needs ~20")
    samples_per_step: int = Field(1, ge=1, description="calibration samples whose mean loss one step descends")
    weights_in_loss: Literal["quantized", "fp"] = Field(
        "quantized", description="fake-quantize the target weights (RTN) in the loss; SpinQuant uses fp before GPTQ")
    loss: Literal["next_token", "fp_kl"] = Field(
        "next_token", description="next_token: cross-entropy on the calibration tokens (SpinQuant's); fp_kl: KL "
        "divergence from the fp model's predictions, for calibration data that is not text the LLM models well")


@ROTATIONS.register("spinquant")
class SpinQuantRotation(HadamardRotation):
    """Learned rotations (SpinQuant's R1, R2) with QuaRot's fixed online Hadamard on down_proj (R4)."""

    Config = SpinQuantConfig
    config: SpinQuantConfig

    def __init__(self, config: SpinQuantConfig | None = None, **params: Any):
        super().__init__(config, **params)
        self.learned: tuple[torch.Tensor, list[torch.Tensor]] | None = None  # (R1, R2 per layer), float64
        self.losses: list[float] = []  # the learning loss at each step (mean over the step's samples)

    def needs_calibration(self) -> bool:
        return self.config.steps > 0

    def stream_matrix(self, n: int) -> torch.Tensor:
        if self.config.init == "orthogonal":
            return random_orthogonal(n, self.config.seed)
        return super().stream_matrix(n)

    def head_matrix(self, d: int) -> torch.Tensor:
        if self.config.init == "orthogonal":
            return random_orthogonal(d, self.config.seed + 1)
        return super().head_matrix(d)

    def fit(self, model: nn.Module, context: CalibrationContext | None) -> None:
        """Fuse the norms (and place the online Hadamard), then learn ``R1`` and each layer's ``R2``.

        With ``steps: 0`` nothing is learned (``context`` may be None): the rotation is ``hadamard``'s."""
        cfg = self.config
        layout = find_layout(model)
        eye = torch.eye(layout.hidden, dtype=torch.float64)
        layout = rotate_decoder(model, eye, None, cfg.online_down_proj, cfg.seed)  # fused, unrotated
        R1 = self.stream_matrix(layout.hidden)
        eye_d = torch.eye(layout.head_dim, dtype=torch.float64)
        R2 = [self.head_matrix(layout.head_dim) if cfg.rotate_heads else eye_d for _ in layout.layers]
        if cfg.steps > 0:
            if context is None or not context.samples:
                raise ValueError("rotation spinquant: steps > 0 needs calibration samples to learn from")
            R1, R2 = self._learn(model, layout, context, R1, R2)
        self.learned = (R1, R2)

    def _learn(self, model: nn.Module, layout: DecoderLayout, context: CalibrationContext,
               R1: torch.Tensor, R2: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cfg = self.config
        objective = QuantizedLoss(model, layout, context, cfg.weights_in_loss == "quantized", cfg.loss)
        device = layout.decoder.embed_tokens.weight.device
        order = torch.Generator().manual_seed(cfg.seed)
        n = len(context.samples)
        self.losses = []
        start = time.perf_counter()
        with torch.enable_grad(), objective.quantizing(), _frozen(model):
            for step in range(cfg.steps):
                r1 = R1.to(device=device, dtype=torch.float32).requires_grad_()
                r2 = [r.to(device=device, dtype=torch.float32).requires_grad_(cfg.rotate_heads) for r in R2]
                picks = torch.randint(0, n, (cfg.samples_per_step,), generator=order).tolist()
                loss = objective(r1, r2, [context.samples[i] for i in picks])
                learned = [r1, *r2] if cfg.rotate_heads else [r1]
                grads = [g.double().cpu() for g in torch.autograd.grad(loss, learned)]
                if world_size() > 1:  # every rank learns the same rotations from all ranks' samples
                    for g in grads:
                        all_reduce_(g, "sum").div_(world_size())
                step_size = cfg.learning_rate * (1 - step / cfg.steps)
                R1 = cayley_step(R1, grads[0], step_size)
                if cfg.rotate_heads:
                    R2 = [cayley_step(r, g, step_size) for r, g in zip(R2, grads[1:])]
                self.losses.append(loss.item())
                every = max(1, cfg.steps // 10)  # about ten progress lines, each the mean loss since the last
                if (step + 1) % every == 0 or step + 1 == cfg.steps:
                    recent = self.losses[-every:]
                    log.info("qapframe: spinquant step %d/%d: loss %.4f (%.1f s)", step + 1, cfg.steps,
                             sum(recent) / len(recent), time.perf_counter() - start)
        tenth = max(1, cfg.steps // 10)
        log.info("qapframe: spinquant learned R1 [%d] and %d R2 [%d] in %d steps (%.0f s): loss %.4f -> %.4f "
                 "(first and last tenth of the steps)", layout.hidden, len(R2) if cfg.rotate_heads else 0,
                 layout.head_dim, cfg.steps, time.perf_counter() - start,
                 sum(self.losses[:tenth]) / tenth, sum(self.losses[-tenth:]) / tenth)
        return nearest_orthogonal(R1), [nearest_orthogonal(r) for r in R2]

    def apply(self, model: nn.Module) -> nn.Module:
        """Fold the learned rotations into the (already fused) weights; `fit` must have run."""
        if self.learned is None and self.config.steps == 0:
            self.fit(model, None)
        if self.learned is None:
            raise ValueError("rotation spinquant learns its rotations from calibration data: use it as a "
                             "quantizer's rotation (quantizer: {name: gptq, rotation: {name: spinquant}}), which "
                             "calls fit first, or call fit(model, context) yourself")
        R1, R2 = self.learned
        heads = R2 if self.config.rotate_heads else None
        rotate_decoder(model, R1, heads, False, self.config.seed)  # the norms are unit and R4 is in place already
        return model


__all__ = ["QuantizedLoss", "SpinQuantConfig", "SpinQuantRotation", "cayley_step", "fake_quantize_activation",
           "fake_quantize_weight", "nearest_orthogonal", "rotated_parameters"]
