"""The state in-LLM pruning keeps (`qapframe.models.inllm`): per sequence from prefill to every decode step
(`InLLMState`, one `StageState` per pruning stage), per language-model call (`CallState`), and the stages'
token schedule (`stage_targets`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qapframe.models.pruning import ImageTokens


def stage_targets(n0: int, final: int, stages: int) -> list[int]:
    """Tokens an image keeps after each of ``stages`` stages: geometric steps from ``n0`` to ``final``.

    Stage s keeps ``max(final, round(n0 * (final / n0) ** ((s + 1) / stages)))``, so each stage keeps the
    same share ``lambda = (final / n0) ** (1 / stages)`` of what reaches it and the last one meets the budget.
    """
    if n0 == 0:
        return [final] * stages
    return [max(final, round(n0 * (final / n0) ** ((s + 1) / stages))) for s in range(stages)]


@dataclass
class StageState:
    """One stage's kept prefill tokens, as seen by its layers (ranking layer + 1 onwards)."""

    first_layer: int
    keep_index: torch.Tensor  # [B, L_s] token ids: prefill positions, or prefill_length + j (padding slots: arbitrary)
    kept_mask: torch.Tensor  # [B, L_s] 1 = real kept token
    position_index: torch.Tensor  # [B, L_s] prefill position whose position ids each token takes


@dataclass
class InLLMState:
    """Per-sequence pruning state, carried from prefill to every decode step."""

    prefill_length: int
    stages: list[StageState]
    merged: torch.Tensor | None = None  # [B, M, D] merged tokens' hidden states as made (rows padded with 0)

    @property
    def keep_index(self) -> torch.Tensor:  # [B, L'] the last stage's (what the logits cover)
        return self.stages[-1].keep_index

    @property
    def kept_mask(self) -> torch.Tensor:
        return self.stages[-1].kept_mask


@dataclass
class CallState:
    """What the hooks share during one language-model call."""

    prefill: bool
    full_mask: torch.Tensor  # [B, past + L] 2-D padding mask of all positions
    cache: object
    inputs_embeds: torch.Tensor | None = None
    vision_mask: torch.Tensor | None = None  # [B, L]
    state: InLLMState | None = None
    stage_kwargs: dict[int, dict] = field(default_factory=dict)  # stage -> kwargs for its layers
    # prefill bookkeeping between stages
    current_index: torch.Tensor | None = None  # [B, L_s] token ids of the current sequence
    current_position: torch.Tensor | None = None  # [B, L_s] their position sources (prefill positions)
    current_mask: torch.Tensor | None = None  # [B, L_s]
    position_embeddings: tuple | None = None  # the prefill's rotary embeddings, [1 or B, L, Dh] each
    images: list[ImageTokens] | None = None
    members: list[torch.Tensor] | None = None  # per image: ids of its remaining tokens (originals, then merged)
    spans: list | None = None
    raters: list[torch.Tensor] | None = None  # per image: prefill positions of its text raters
    merged: list[torch.Tensor] | None = None  # per row: hidden states of its merged tokens so far [M_r, D]
    records: list[dict] = field(default_factory=list)


__all__ = ["CallState", "InLLMState", "StageState", "stage_targets"]
