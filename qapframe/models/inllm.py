"""In-LLM (FastV) pruning: score at decoder layer K, let layers > K see only the kept tokens.

Design (hooks on the unmodified language model, so any v5 LLaMA-style decoder works):
- A pre-hook on the language model notes the 2-D padding mask and the cache of each call.
- Hooks on layer K's ``q_proj``/``k_proj`` (and its rotary embeddings) give the last real token's
  attention row, recomputed in float32 (`sdpa` never exposes attention probabilities).
- A forward hook on layer K selects tokens per image and returns the *gathered* hidden states
  ``[B, L', D]``; pre-hooks on layers > K swap in the gathered rotary embeddings, position ids and a
  mask built for the shorter sequence. Layers > K therefore really compute on L' tokens (the saving).
- KV cache: layers <= K cache all L prompt tokens, layers > K only the L' kept ones. The prefill's
  kept-token index and mask are stored on the cache object itself (``cache.qapframe_fastv``), so each
  decode step builds the layers > K mask from the kept prefix mask plus the new tokens' mask, sized
  against cache layer K + 1 (`create_causal_mask(layer_idx=K + 1)`). Kept tokens keep their original
  positions (as in FastV), and decode tokens continue the original positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from qapframe.models.attention import ProjectionCapture, last_token_attention
from qapframe.models.pruning import ImageSelection, ImageTokens, image_spans, stack_padded, uses_right_padding


@dataclass
class FastVState:
    """Per-sequence pruning state, carried by the cache from prefill to every decode step."""

    prefill_length: int
    keep_index: torch.Tensor  # [B, L'] prefill positions kept for layers > K (padding slots: 0)
    kept_mask: torch.Tensor  # [B, L'] 1 = real kept token


@dataclass
class _Call:
    """What the hooks share during one language-model call."""

    prefill: bool
    full_mask: torch.Tensor  # [B, past + L] 2-D padding mask of all positions
    cache: object
    inputs_embeds: torch.Tensor | None = None
    state: FastVState | None = None
    layer_kwargs: dict = field(default_factory=dict)


class InLLMPruning:
    """Installs FastV-style pruning after decoder layer ``layer`` of ``language_model``.

    ``select(images, text_attention) -> list[ImageSelection]`` is the adapter's scoring callback;
    ``images()`` returns the current prompt's `ImageTokens` (lengths and structural tokens).
    """

    def __init__(
        self,
        language_model: torch.nn.Module,
        layer: int,
        images: Callable[[], list[ImageTokens]],
        select: Callable[[list[ImageTokens], list[torch.Tensor]], list[ImageSelection]],
        on_selection: Callable[[dict], None],
    ):
        num_layers = len(language_model.layers)
        if not 0 <= layer < num_layers:
            raise ValueError(f"fastv layer must be in [0, {num_layers - 1}] for this model, got {layer}")
        self.lm = language_model
        self.layer = layer
        self._images = images
        self._select = select
        self._on_selection = on_selection
        self.pending_vision_mask: torch.Tensor | None = None  # [B, L] set by the adapter before a prefill
        self._call: _Call | None = None
        self.capture = ProjectionCapture(language_model.layers[layer].self_attn)
        self._handles = [
            language_model.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True),
            language_model.layers[layer].register_forward_hook(self._layer_k_hook),
        ]
        for later in language_model.layers[layer + 1 :]:
            self._handles.append(later.register_forward_pre_hook(self._later_pre_hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.capture.remove()

    # -- hooks ------------------------------------------------------------------------------------
    def _lm_pre_hook(self, module, args, kwargs):
        embeds, mask, cache = kwargs.get("inputs_embeds"), kwargs.get("attention_mask"), kwargs.get("cache")
        if embeds is None:
            raise ValueError("FastV pruning expects the language model to be called with inputs_embeds")
        if mask is not None and mask.dim() != 2:
            raise ValueError("FastV pruning needs a 2-D attention mask (got a prepared 4-D mask)")
        past = cache.get_seq_length() if cache is not None else 0
        b, length = embeds.shape[:2]
        full = mask if mask is not None else torch.ones(b, past + length, dtype=torch.long, device=embeds.device)
        vision_mask, self.pending_vision_mask = self.pending_vision_mask, None
        state = getattr(cache, "qapframe_fastv", None) if cache is not None else None
        if vision_mask is not None:
            if past:
                raise ValueError("FastV pruning needs the prompt in one prefill call (the cache was not empty)")
            self._call = _Call(prefill=True, full_mask=full, cache=cache, inputs_embeds=embeds)
            self._call.vision_mask = vision_mask  # type: ignore[attr-defined]
            self.capture.enabled = True
        elif state is not None:
            self._call = _Call(prefill=False, full_mask=full, cache=cache, state=state)
        else:
            self._call = None  # text only: nothing to prune
        return None

    def _layer_k_hook(self, module, args, output):
        call = self._call
        if call is None or not call.prefill:
            return None
        self.capture.enabled = False
        hidden = output[0] if isinstance(output, tuple) else output  # [B, L, D]
        text_attention = last_token_attention(self.capture, call.full_mask)  # [B, L]
        position_embeddings = self.capture.position_embeddings
        self.capture.clear()

        images = self._images()
        spans = image_spans(call.vision_mask, [im.num_tokens for im in images])  # type: ignore[attr-defined]
        # FastV scores the tokens the LLM actually received; the hybrid's SQ uses the same embeddings.
        images = [
            ImageTokens(call.inputs_embeds[row, pos], im.prunable, im.cls_attention, im.keys)
            for im, (row, pos) in zip(images, spans)
        ]
        selections = self._select(images, [text_attention[row, pos] for row, pos in spans])
        if any(s.extra_tokens is not None for s in selections):
            raise ValueError("in-LLM (FastV) pruning cannot insert merged tokens; use a pruner without extra tokens")

        b, length = hidden.shape[:2]
        keep = call.full_mask.bool().clone()  # [B, L] real tokens
        for sel, (row, pos) in zip(selections, spans):
            dropped = torch.ones(pos.numel(), dtype=torch.bool, device=pos.device)
            dropped[sel.keep_index.to(pos.device)] = False
            keep[row, pos[dropped]] = False
        rows = [keep[r].nonzero().squeeze(-1) for r in range(b)]
        index, kept_mask = stack_padded(rows, 0, uses_right_padding(call.full_mask))  # [B, L'] each
        kept_mask = kept_mask.to(call.full_mask.dtype)
        call.state = FastVState(prefill_length=length, keep_index=index, kept_mask=kept_mask)
        if call.cache is not None:
            call.cache.qapframe_fastv = call.state

        def gather(t: torch.Tensor) -> torch.Tensor:  # [1 or B, L, *] -> [B, L', *]
            t = t.expand(b, *t.shape[1:])
            return t.gather(1, index.view(b, -1, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))

        kept_hidden = gather(hidden)
        if position_embeddings is not None:
            call.layer_kwargs["position_embeddings"] = tuple(gather(t) for t in position_embeddings)
        call.layer_kwargs["position_ids"] = index  # the gather index; applied to the ids each layer receives
        call.layer_kwargs["attention_mask"] = self._mask(kept_hidden, kept_mask, call.cache)
        self._on_selection(
            {"selections": selections, "spans": spans, "text_attention": text_attention, "state": call.state}
        )
        return (kept_hidden, *output[1:]) if isinstance(output, tuple) else kept_hidden

    def _later_pre_hook(self, module, args, kwargs):
        call = self._call
        if call is None:
            return None
        if not call.prefill and not call.layer_kwargs:
            state = call.state
            tail = call.full_mask[:, state.prefill_length :]
            kept = torch.cat([state.kept_mask, tail.to(state.kept_mask.dtype)], dim=1)
            hidden = args[0] if args else kwargs["hidden_states"]
            call.layer_kwargs["attention_mask"] = self._mask(hidden, kept, call.cache)
        for key, value in call.layer_kwargs.items():
            if key == "position_ids":
                ids = kwargs.get("position_ids")
                if ids is not None:
                    ids = ids.expand(value.shape[0], -1)
                    kwargs["position_ids"] = ids.gather(1, value)
            else:
                kwargs[key] = value
        return args, kwargs

    def _mask(self, hidden: torch.Tensor, mask_2d: torch.Tensor, cache) -> torch.Tensor | None:
        # Sized against cache layer K + 1, which holds only kept tokens; no position ids, since kept
        # positions have gaps that would look like packed sequences.
        from transformers.masking_utils import create_causal_mask  # lazily: see `LlavaAdapter.matches`

        return create_causal_mask(
            config=self.lm.config,
            inputs_embeds=hidden,
            attention_mask=mask_2d,
            cache=cache,
            position_ids=None,
            layer_idx=self.layer + 1 if cache is not None and self.layer + 1 < len(self.lm.layers) else None,
        )
