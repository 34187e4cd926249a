"""The installation shared by the adapters: hooks that prune vision tokens in an unmodified transformers model.

Two pruning points, chosen from the scorer's requirements:
- **pre-LLM** (no in-LLM requirement: VisionZip, hybrid, CDPruner, DivPrune, VisPruner, random, l2norm):
  the prompt is shortened before the language model runs. ``model.forward`` gets a pre-hook that, when
  images are given, encodes them, selects tokens and replaces ``input_ids``/``pixel_values`` by the
  shortened ``inputs_embeds`` and ``attention_mask``; the logits then cover the shortened sequence.
  ``model.generate`` is wrapped the same way and delegates with ``inputs_embeds``, so generate's own
  mask, position-id and cache bookkeeping all start from the shortened prompt (exactly as if only
  the kept tokens had been fed); it returns ``[original prompt ids, new tokens]`` like the unwrapped
  model. Position ids passed explicitly to ``forward`` are recomputed from the shortened mask.
  `HookingAdapter.pruned_inputs` builds the shortened prompt; an architecture with its own position
  scheme (Qwen's M-RoPE) overrides it.
- **in-LLM** (FastV, DART, PyramidDrop, SparseVLM): see `qapframe.models.inllm`. Context that exists only
  inside the LLM (hidden states, text raters' attention) is refused without an in-LLM pruning point.

Beyond the vision features, the installation adds what only the model can compute when a strategy asks
for it: the prompt's LLM input embeddings per image (CDPruner's relevance) and the error of the first
activation quantizer on each vision token (the hybrid's ``e_mode: pipeline``).

Pruned sequences keep their tokens' order; rows that shrink by different amounts (images with
different token counts) are re-padded on their original padding side. What was kept is exposed as
``model.qapframe_last_selection`` (a dict; ``"selections"`` holds one `ImageSelection` per image and, before
the LLM, ``"units"`` the `ImageTokens` they were selected from).
`remove()` detaches every hook and restores ``generate`` and the wrapped feature methods.

An adapter subclasses `HookingAdapter` and supplies the architecture: where the image features come
from (`feature_methods`), how they split into images (`describe_images`), which attention module the
[CLS]-style scores are read from (`feature_attention`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import ClassVar

import torch

from qapframe.models.attention import ProjectionCapture
from qapframe.models.base import ModelAdapter
from qapframe.models.inllm import InLLMPruning
from qapframe.models.pruning import (
    ImageTokens,
    image_spans,
    rebuild_sequences,
    select_per_image,
)
from qapframe.strategies.base import Pruner, Scorer, requirements_of
from qapframe.strategies.context import QuantSettings

ATTR = "qapframe_installation"  # where an installed model keeps its `Installation`


class Installation:
    """Everything one `install` attached to a model, so that `remove` can take it all off again."""

    def __init__(self, adapter: "HookingAdapter", model, scorer: Scorer, pruner: Pruner, quant, seed: int):
        self.adapter, self.model = adapter, model
        self.scorer, self.pruner, self.quant, self.seed = scorer, pruner, quant, seed
        # Resolved before anything is attached, so that a bad setting leaves the model untouched.
        self.requirements = requirements_of(scorer, pruner)
        ranking_layers = adapter.ranking_layers(model, self.requirements) if self.requirements.in_llm else None
        base = model.model
        # The images of one prompt may come from several feature calls (Qwen: images, then videos), made
        # by generate before the forward or inside it; a call after a forward has run starts a new group.
        self._pending: list[ImageTokens] = []
        self._group_open = False
        self._in_features = False
        self.vision_capture = None
        if self.requirements.cls_attention or self.requirements.vision_keys:
            self.vision_capture = adapter.vision_capture(model)
        self._wrapped = []
        for name in adapter.feature_methods:
            setattr(base, name, self._wrap_features(getattr(base, name), name))
            self._wrapped.append(name)
        self._handles = []
        self.inllm: InLLMPruning | None = None
        self._original_generate = None
        self._prompt: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (input_ids, mask) being pruned
        self._forward_signature = inspect.signature(type(model).forward)
        self._handles.append(model.register_forward_hook(self._close_group))
        if self.requirements.in_llm:
            self.inllm = InLLMPruning(
                base.language_model,
                ranking_layers,
                images=self._current_images,
                select=self._select,
                on_selection=self._record,
                final_budget=pruner.budget,
                need_hidden=self.requirements.llm_hidden,
                rater_attention=self.requirements.rater_attention,
                text_raters=self.requirements.text_raters,
            )
            self._handles.append(model.register_forward_pre_hook(self._fastv_pre_hook, with_kwargs=True))
        else:
            self._handles.append(model.register_forward_pre_hook(self._prellm_pre_hook, with_kwargs=True))
            self._original_generate = model.generate
            model.generate = self._wrap_generate(model.generate)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self.inllm is not None:
            self.inllm.remove()
        if self.vision_capture is not None:
            self.vision_capture.remove()
        # The wrappers were set as instance attributes; deleting them re-exposes the class methods.
        for name in self._wrapped:
            delattr(self.model.model, name)
        if self._original_generate is not None:
            del self.model.generate

    # -- shared pieces ------------------------------------------------------------------------------
    def _wrap_features(self, original, name: str):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def get_features(*args, **kwargs):
            if self._in_features:  # one feature method calling another (Qwen3-VL's videos): described once
                return original(*args, **kwargs)
            self._in_features = True
            if self.vision_capture is not None:
                self.vision_capture.enabled = True
            try:
                out = original(*args, **kwargs)
            finally:
                self._in_features = False
                if self.vision_capture is not None:
                    self.vision_capture.enabled = False
            bound = signature.bind(*args, **kwargs).arguments
            if not self._group_open:
                self._pending, self._group_open = [], True
            self._pending.extend(self.adapter.describe_features(self.model, out, self.vision_capture, bound, name))
            if self.vision_capture is not None:
                self.vision_capture.clear()
            return out

        return get_features

    def _start_prompt(self, input_ids, attention_mask) -> None:
        self._prompt = (input_ids, attention_mask)
        self._pending, self._group_open = [], True

    @property
    def latest_images(self) -> list[ImageTokens] | None:
        """The current prompt's images, in the order of their placeholder runs."""
        if not self._pending:
            return None
        return self.adapter.order_images(self.model, self._pending, self._prompt)

    def _current_images(self) -> list[ImageTokens]:
        images = self.latest_images
        if images is None:
            raise RuntimeError("no image features were computed for this prompt")
        return images

    def _select(self, images, text_attention=None, targets=None, rater_attention=None, adaptive=False):
        images = self._with_context(images)
        return select_per_image(
            self.scorer, self.pruner, images, self.quant, self.seed, text_attention, targets, rater_attention, adaptive
        )

    def _with_context(self, images: list[ImageTokens]) -> list[ImageTokens]:
        """Add what only the model can compute: prompt text embeddings, the activation quantizer's error."""
        if self.requirements.text_embeds:
            if self._prompt is None:
                raise RuntimeError("no prompt ids were recorded for this forward")
            texts = self.adapter.prompt_text_embeds(self.model, *self._prompt, [im.num_tokens for im in images])
            images = [dataclasses.replace(im, text_embeds=t) for im, t in zip(images, texts)]
        if self.requirements.activation_error:
            images = [
                dataclasses.replace(im, activation_error=self.adapter.activation_error(self.model, im.features))
                for im in images
            ]
        return images

    def _close_group(self, *_) -> None:
        self._group_open = False  # features computed from now on belong to a later prompt

    def _record(self, info: dict) -> None:
        self.model.qapframe_last_selection = info

    def _bind(self, args, kwargs) -> dict:
        """The forward call's arguments by name (positional ones included), without ``self``."""
        arguments = dict(self._forward_signature.bind_partial(self.model, *args, **kwargs).arguments)
        arguments.pop("self", None)
        return {**arguments, **arguments.pop("kwargs", {})}

    def _has_pixels(self, bound: dict) -> bool:
        return any(bound.get(k) is not None for k in self.adapter.pixel_keys)

    # -- in-LLM (FastV, DART, PyramidDrop, SparseVLM) -------------------------------------------------------------
    def _fastv_pre_hook(self, module, args, kwargs):
        bound = self._bind(args, kwargs)
        if not (self._has_pixels(bound) or bound.get("mm_encoder_outputs")):
            return None
        input_ids = bound.get("input_ids")
        if input_ids is None:
            raise ValueError("vision-token pruning needs `input_ids` to locate the image tokens")
        if self._has_pixels(bound):
            self._start_prompt(input_ids, bound.get("attention_mask"))  # images computed inside this forward
        else:
            self._prompt = (input_ids, bound.get("attention_mask"))
        self.inllm.pending_vision_mask = self.adapter.vision_mask(self.model, input_ids)
        return None

    # -- pre-LLM ----------------------------------------------------------------------------------
    def prune_inputs(self, input_ids, attention_mask=None, generate: bool = False, **vision_inputs) -> dict:
        """Encode the images, select tokens and build the shortened LLM input (`inputs_embeds`, mask, ...);
        ``generate``: for `generate` rather than `forward` (whose position ids can differ)."""
        vision_inputs = {k: v for k, v in vision_inputs.items() if v is not None}
        self._start_prompt(input_ids, attention_mask)
        self.adapter.encode_images(self.model, vision_inputs)
        images = self._current_images()
        self._group_open = False
        selections = self._select(images)
        spans = image_spans(self.adapter.vision_mask(self.model, input_ids), [im.num_tokens for im in images])
        pruned = self.adapter.pruned_inputs(
            self.model, input_ids, attention_mask, vision_inputs, images, spans, selections, generate=generate
        )
        info = {"selections": selections, "spans": spans, "units": images}
        info.update({k: v for k, v in pruned.items() if k in ("attention_mask", "position_ids")})
        self._record(info)
        return pruned

    def _prellm_pre_hook(self, module, args, kwargs):
        bound = self._bind(args, kwargs)
        if not self._has_pixels(bound):
            return None
        if bound.get("input_ids") is None:
            raise ValueError("vision-token pruning needs `input_ids` to locate the image tokens")
        vision = {k: bound.get(k) for k in self.adapter.vision_keys}
        explicit_positions = bound.get("position_ids") is not None
        pruned = self.prune_inputs(bound["input_ids"], bound.get("attention_mask"), **vision)
        new = {k: v for k, v in bound.items() if k not in ("input_ids", *self.adapter.vision_keys)}
        new.update(pruned)
        if explicit_positions and "position_ids" not in pruned:
            mask = pruned["attention_mask"]
            new["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        return (), new

    def _wrap_generate(self, original):
        @functools.wraps(original)
        def generate(inputs=None, *args, **kwargs):
            input_ids = kwargs.pop("input_ids", inputs)
            if input_ids is None or not any(kwargs.get(k) is not None for k in self.adapter.pixel_keys):
                return original(input_ids, *args, **kwargs)
            vision = {k: kwargs.pop(k, None) for k in self.adapter.vision_keys}
            # generate itself runs under no_grad; the pruning done before it must too, or a model used
            # outside `torch.no_grad()` (as in the README) hands the scorers tensors that require grad.
            with torch.no_grad():
                pruned = self.prune_inputs(input_ids, kwargs.pop("attention_mask", None), generate=True, **vision)
            out = original(*args, **self.adapter.generate_kwargs(self.model, pruned), **kwargs)
            # Generate returns the shortened prompt's ids (none for inputs_embeds) and the new tokens;
            # callers see the same layout as from the unwrapped model: [original prompt ids, new tokens].
            short = pruned["input_ids"].shape[1] if pruned.get("input_ids") is not None else 0
            if isinstance(out, torch.Tensor):
                return torch.cat([input_ids, out[:, short:]], dim=1)
            out.sequences = torch.cat([input_ids, out.sequences[:, short:]], dim=1)
            return out

        return generate


class HookingAdapter(ModelAdapter):
    """An adapter that installs an `Installation`; subclasses describe their architecture's vision tokens.

    The defaults fit a ``model.model`` with ``get_image_features``, ``language_model`` (a LLaMA-style
    decoder) and ``config.image_token_id``.
    """

    feature_methods: ClassVar[tuple[str, ...]] = ("get_image_features",)  # methods of model.model yielding features
    pixel_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)  # forward arguments that mean "images given"
    vision_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)  # forward arguments consumed by the pruning

    def install(self, model, scorer: Scorer, pruner: Pruner, quant: QuantSettings | None = None, seed: int = 0):
        if getattr(model, ATTR, None) is not None:
            raise ValueError("token pruning is already installed on this model; call remove() first")
        setattr(model, ATTR, Installation(self, model, scorer, pruner, quant, seed))
        model.qapframe_last_selection = None
        return model

    def remove(self, model):
        installation = getattr(model, ATTR, None)
        if installation is not None:
            installation.remove()
            delattr(model, ATTR)
            del model.qapframe_last_selection
        return model

    # -- what an architecture supplies ----------------------------------------------------------------
    def describe_images(self, model, features, capture, bound: dict) -> list[ImageTokens]:
        """``features``: one ``[N_i, D]`` per image (``pooler_output``) -> one `ImageTokens` each."""
        raise NotImplementedError

    def describe_features(self, model, output, capture, bound: dict, method: str) -> list[ImageTokens]:
        """The `ImageTokens` of one call of the wrapped feature ``method`` (``bound``: its arguments by name)."""
        return self.describe_images(model, output.pooler_output, capture, bound)

    def feature_attention(self, model) -> torch.nn.Module:
        """The vision attention module whose [CLS]-style scores and keys the scorers read."""
        raise NotImplementedError

    def vision_capture(self, model):
        return ProjectionCapture(self.feature_attention(model))

    @staticmethod
    def order_images(model, images: list[ImageTokens], prompt) -> list[ImageTokens]:
        """The images in the order their placeholder runs appear in the prompt (row-major)."""
        return list(images)

    @staticmethod
    def vision_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` bool: placeholder positions of the vision tokens."""
        return input_ids == model.config.image_token_id

    def encode_images(self, model, vision_inputs: dict) -> None:
        """Run the vision side once (through the wrapped feature methods) for the pre-LLM path."""
        model.model.get_image_features(**vision_inputs, return_dict=True)

    @staticmethod
    def pruned_inputs(model, input_ids, attention_mask, vision_inputs, images, spans, selections, generate=False) -> dict:
        """The shortened prompt as forward arguments: here ``inputs_embeds [B, L', D]`` and ``attention_mask``.

        ``spans``: per image (row, placeholder positions); ``selections``: what each image keeps.
        """
        embed = model.get_input_embeddings()
        text_embeds = embed(input_ids)  # [B, L, D]
        tokens = [sel.tokens(im.features) for sel, im in zip(selections, images)]
        pad_id = getattr(model.config.get_text_config(), "pad_token_id", None) or 0
        pad = embed(torch.tensor(pad_id, device=input_ids.device))
        inputs_embeds, mask = rebuild_sequences(text_embeds, attention_mask, spans, tokens, pad)
        return {"inputs_embeds": inputs_embeds, "attention_mask": mask}

    @staticmethod
    def generate_kwargs(model, pruned: dict) -> dict:
        """`pruned_inputs`' forward arguments as ``generate`` takes them."""
        return pruned

    # -- LLaMA-style language model ----------------------------------------------------------------------
    @staticmethod
    def ranking_layers(model, requirements) -> list[int]:
        """Decoder layers whose outputs are pruned: FastV/DART's K - 1, or one per PyramidDrop/SparseVLM stage."""
        depth = len(model.model.language_model.layers)
        if not requirements.stage_fractions:
            layer = requirements.text_attention_layer
            if not 0 <= layer < depth - 1:
                raise ValueError(
                    f"in-LLM pruning ranks at layer {layer} (K = {layer + 1}), but this {depth}-layer LLM needs "
                    f"K in [1, {depth - 1}] so that some layer sees only the kept tokens"
                )
            return [layer]
        layers = [round(f * depth) - 1 for f in requirements.stage_fractions]
        if any(not 0 <= r < depth - 1 for r in layers) or len(set(layers)) != len(layers):
            raise ValueError(
                f"stages {list(requirements.stage_fractions)} resolve to ranking layers {layers} on this "
                f"{depth}-layer LLM; each stage needs its own layer in [0, {depth - 2}] (use fewer stages)"
            )
        return layers

    def prompt_text_embeds(self, model, input_ids, attention_mask, lengths: list[int]) -> list[torch.Tensor]:
        """Per image ``[T, D]``: LLM input embeddings of its row's real text tokens (CDPruner's text side)."""
        image = self.vision_mask(model, input_ids)
        real = torch.ones_like(image) if attention_mask is None else attention_mask.bool()
        spans = image_spans(image, lengths)
        embed = model.get_input_embeddings()
        rows = {}
        for row, _ in spans:
            if row not in rows:
                rows[row] = embed(input_ids[row][real[row] & ~image[row]])
        return [rows[row] for row, _ in spans]

    @staticmethod
    def activation_error(model, features: torch.Tensor) -> torch.Tensor | None:
        """``features [N, D]`` -> ``[N]`` L2 error of the first activation quantizer the tokens reach.

        For LLaMA-style LLMs that is layer 0's ``q_proj`` input (after the input norm), quantized exactly as
        the quantized Linear does it (rotation, smoothing, then its static or dynamic act quantizer).
        """
        layer = model.model.language_model.layers[0]
        linear = layer.self_attn.q_proj
        act = getattr(linear, "act_quant", None)
        if act is None or not getattr(act, "enabled", True):
            return None
        x = layer.input_layernorm(features)
        if getattr(linear, "input_transform", None) is not None:
            x = linear.input_transform(x)
        if getattr(linear, "smooth", None) is not None:
            x = (x.float() / linear.smooth).to(x.dtype)
        return (x.float() - act(x).float()).norm(dim=-1)
