"""What a scorer may look at: tensors only, never a model class (model adapters fill this in)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch


@dataclass(frozen=True)
class QuantSettings:
    """The activation quantizer a token will pass through; the hybrid scorer simulates it."""

    bits: int = 4
    group_size: int = 128  # channels per quantization group; -1 = the whole token
    symmetric: bool = False
    full_range: bool = False  # a symmetric grid scaled by max|x| / (2^(b-1) - 1/2) (qapframe.quant_grid)


@dataclass(frozen=True)
class Requirements:
    """Context fields a scorer needs beyond the vision embeddings; adapters compute only these."""

    cls_attention: bool = False
    vision_keys: bool = False
    text_embeds: bool = False  # the prompt's LLM input embeddings (CDPruner's text side)
    text_attention_layer: int | None = None  # LLM decoder layer whose attention rows are needed
    # Several in-LLM pruning stages: where each stage's pruned layers start, as a fraction of the LLM's
    # depth (PyramidDrop's layers 8/16/24 of 32 are 0.25/0.5/0.75); the adapter resolves them to layers.
    stage_fractions: tuple[float, ...] = ()
    llm_hidden: bool = False  # in-LLM: the vision tokens' hidden states and keys at the ranking layer (DART)
    activation_error: bool = False  # the pipeline's activation quantizer's error on each token (hybrid e_mode=pipeline)
    # In-LLM: the attention rows of each image's text raters to its vision tokens at every ranking layer (SparseVLM).
    rater_attention: bool = False
    # Which text tokens after an image rate it, chosen once from the LLM input embeddings before the first layer:
    # ``(vision [N, D], text [T, D]) -> [T] bool``. A function, so that the rule stays with the strategy that
    # defines it while the adapter computes the rows; None = every text token after the image.
    text_raters: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @property
    def in_llm(self) -> bool:
        return self.text_attention_layer is not None or bool(self.stage_fractions)

    def union(self, other: "Requirements") -> "Requirements":
        layers = {self.text_attention_layer, other.text_attention_layer} - {None}
        if len(layers) > 1:
            raise ValueError(f"scorers ask for text attention at different LLM layers: {sorted(layers)}")
        stages = {self.stage_fractions, other.stage_fractions} - {()}
        raters = {self.text_raters, other.text_raters} - {None}
        if len(raters) > 1:
            raise ValueError(f"strategies choose their text raters by different rules: {sorted(map(repr, raters))}")
        if len(stages) > 1 or (stages and layers):
            raise ValueError(
                f"strategies ask for different in-LLM pruning points: layer {sorted(layers)} and stages {sorted(stages)}"
            )
        return Requirements(
            cls_attention=self.cls_attention or other.cls_attention,
            vision_keys=self.vision_keys or other.vision_keys,
            text_embeds=self.text_embeds or other.text_embeds,
            text_attention_layer=layers.pop() if layers else None,
            stage_fractions=stages.pop() if stages else (),
            llm_hidden=self.llm_hidden or other.llm_hidden,
            activation_error=self.activation_error or other.activation_error,
            rater_attention=self.rater_attention or other.rater_attention,
            text_raters=raters.pop() if raters else None,
        )


@dataclass
class ScoringContext:
    """Per-image tensors for scoring; B counts images (or image crops), N vision tokens each."""

    vision_embeds: torch.Tensor  # [B, N, D] projected embeddings the LLM receives
    cls_attention: torch.Tensor | None = None  # [B, N] vision-encoder [CLS] -> patch attention, mean over heads
    vision_keys: torch.Tensor | None = None  # [B, N, Dk] vision-encoder keys at the feature layer
    text_attention: torch.Tensor | None = None  # [B, N] last text token -> vision tokens at layer K, mean over heads
    text_embeds: torch.Tensor | None = None  # [B, T, D] LLM input embeddings of each image's prompt text (padded)
    text_mask: torch.Tensor | None = None  # [B, T] bool, True = a real text token of ``text_embeds``
    llm_hidden: torch.Tensor | None = None  # [B, N, D] in-LLM: vision tokens' hidden states after the ranking layer
    llm_keys: torch.Tensor | None = None  # [B, N, Hkv * Dh] in-LLM: their keys at the ranking layer (rotary applied)
    quant: QuantSettings | None = None  # the pipeline's activation quantizer, if any
    activation_error: torch.Tensor | None = None  # [B, N] ||x - Q(x)||_2 by the pipeline's first activation quantizer
    rater_attention: torch.Tensor | None = None  # [B, R, N] in-LLM: each text rater's attention row, mean over heads
    rater_mask: torch.Tensor | None = None  # [B, R] bool, True = a real rater (padding rows of rater_attention are 0)
    # In-LLM, a stage before the last: the budget is the stage's planned count, which a pruner may adapt per image
    # (SparseVLM's rank rule); each image then comes alone (B = 1). False: the budget must be met exactly.
    adaptive_budget: bool = False
    # (frames, rows, cols) shared by every image of the batch, N = frames * rows * cols in frame-major order
    # (video clips; before the LLM only); None = no frame layout known.
    token_grid: tuple[int, int, int] | None = None
    # The tokens as consecutive row-major 2-D pieces ((rows, cols), ...), shared by the batch: a clip's frames, an
    # anyres image's base crop and high-resolution grid (before the LLM only); None = no 2-D layout known.
    token_layout: tuple[tuple[int, int], ...] | None = None
    seed: int = 0
    extras: dict = field(default_factory=dict)  # room for plugin scorers' adapter-provided data

    @property
    def batch_size(self) -> int:
        return self.vision_embeds.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.vision_embeds.shape[1]

    def require(self, name: str, scorer: str) -> torch.Tensor:
        """Fetch a context tensor, explaining which scorer needed it when it is missing."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(
                f"scorer {scorer!r} needs `{name}` in the scoring context, but the model adapter did not "
                f"provide it (does the scorer's `requirements()` declare it?)"
            )
        return value

    def with_(self, **changes) -> "ScoringContext":
        return replace(self, **changes)
