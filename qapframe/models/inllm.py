"""In-LLM pruning (FastV, DART, PyramidDrop): rank at some decoder layers, later layers see only kept tokens.

Design (hooks on the unmodified language model, so any v5 LLaMA-style decoder works):
- A pre-hook on the language model notes the 2-D padding mask and the cache of each call.
- Each *ranking layer* r_s (one for FastV/DART, one per stage for PyramidDrop) gets hooks on its
  ``q_proj``/``k_proj`` (and rotary embeddings), so the last real token's attention row is recomputed
  in float32 (`sdpa` never exposes attention probabilities), and a forward hook that selects tokens per
  image and returns the *gathered* hidden states ``[B, L_s+1, D]``. Pre-hooks on every later layer swap
  in the gathered rotary embeddings, position ids and a mask built for the shorter sequence of their
  stage, so they really compute on fewer tokens (the saving).
- KV cache: layers of stage s cache only that stage's kept tokens. The prefill's per-stage kept index
  and mask live in this handle, keyed (weakly) by the cache object, so each decode step builds each
  stage's mask from its kept prefix mask plus the new tokens' mask, sized against the stage's first
  cache layer. Kept tokens keep their original positions (as in FastV), and decode tokens continue them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from qapframe.models.attention import ProjectionCapture, last_token_attention
from qapframe.models.pruning import ImageSelection, ImageTokens, image_spans, stack_padded, uses_right_padding


@dataclass
class StageState:
    """One stage's kept prefill tokens, as seen by its layers (ranking layer + 1 onwards)."""

    first_layer: int
    keep_index: torch.Tensor  # [B, L_s] original prefill positions kept (padding slots: arbitrary)
    kept_mask: torch.Tensor  # [B, L_s] 1 = real kept token


@dataclass
class InLLMState:
    """Per-sequence pruning state, carried from prefill to every decode step."""

    prefill_length: int
    stages: list[StageState]

    @property
    def keep_index(self) -> torch.Tensor:  # [B, L'] the last stage's (what the logits cover)
        return self.stages[-1].keep_index

    @property
    def kept_mask(self) -> torch.Tensor:
        return self.stages[-1].kept_mask


@dataclass
class _Call:
    """What the hooks share during one language-model call."""

    prefill: bool
    full_mask: torch.Tensor  # [B, past + L] 2-D padding mask of all positions
    cache: object
    inputs_embeds: torch.Tensor | None = None
    vision_mask: torch.Tensor | None = None  # [B, L]
    state: InLLMState | None = None
    stage_kwargs: dict[int, dict] = field(default_factory=dict)  # stage -> kwargs for its layers
    # prefill bookkeeping between stages
    current_index: torch.Tensor | None = None  # [B, L_s] original positions of the current sequence
    current_mask: torch.Tensor | None = None  # [B, L_s]
    images: list[ImageTokens] | None = None
    remaining: list[torch.Tensor] | None = None  # per image: indices into its original tokens still present
    spans: list | None = None
    records: list[dict] = field(default_factory=list)


class InLLMPruning:
    """Installs in-LLM pruning after each decoder layer of ``layers`` (ascending) of ``language_model``.

    ``select(images, text_attention, targets) -> list[ImageSelection]`` is the adapter's scoring
    callback (``targets``: per image prunable tokens to keep, None = the pruner's own budget);
    ``images()`` returns the current prompt's `ImageTokens`; ``final_budget(n)`` is the pruner's budget
    for n prunable tokens (the count left after the last stage).
    """

    def __init__(
        self,
        language_model: torch.nn.Module,
        layers: list[int],
        images: Callable[[], list[ImageTokens]],
        select: Callable[..., list[ImageSelection]],
        on_selection: Callable[[dict], None],
        final_budget: Callable[[int], int] | None = None,
        need_hidden: bool = False,
    ):
        num_layers = len(language_model.layers)
        if not layers or any(not 0 <= r < num_layers - 1 for r in layers) or sorted(set(layers)) != list(layers):
            raise ValueError(
                f"in-LLM ranking layers must be distinct, ascending and in [0, {num_layers - 2}] for this "
                f"{num_layers}-layer model (some later layer must see the kept tokens), got {list(layers)}"
            )
        self.lm = language_model
        self.layers = list(layers)
        self._images = images
        self._select = select
        self._on_selection = on_selection
        self._final_budget = final_budget
        self._need_hidden = need_hidden
        self.pending_vision_mask: torch.Tensor | None = None  # [B, L] set by the adapter before a prefill
        self._call: _Call | None = None
        self._states: "weakref.WeakKeyDictionary[object, InLLMState]" = weakref.WeakKeyDictionary()
        self.captures = [ProjectionCapture(language_model.layers[r].self_attn) for r in self.layers]
        self._handles = [language_model.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True)]
        for s, r in enumerate(self.layers):
            self._handles.append(language_model.layers[r].register_forward_hook(self._ranking_hook(s)))
        for index in range(self.layers[0] + 1, num_layers):
            stage = max(s for s, r in enumerate(self.layers) if r < index)
            hook = self._later_pre_hook(stage)
            self._handles.append(language_model.layers[index].register_forward_pre_hook(hook, with_kwargs=True))

    @property
    def layer(self) -> int:
        return self.layers[0]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for capture in self.captures:
            capture.remove()

    def state_for(self, cache) -> InLLMState | None:
        return self._states.get(cache) if cache is not None else None

    # -- hooks ------------------------------------------------------------------------------------
    def _lm_pre_hook(self, module, args, kwargs):
        embeds, mask, cache = kwargs.get("inputs_embeds"), kwargs.get("attention_mask"), kwargs.get("cache")
        if embeds is None:
            raise ValueError("in-LLM pruning expects the language model to be called with inputs_embeds")
        if mask is not None and mask.dim() != 2:
            raise ValueError("in-LLM pruning needs a 2-D attention mask (got a prepared 4-D mask)")
        past = cache.get_seq_length() if cache is not None else 0
        b, length = embeds.shape[:2]
        full = mask if mask is not None else torch.ones(b, past + length, dtype=torch.long, device=embeds.device)
        vision_mask, self.pending_vision_mask = self.pending_vision_mask, None
        state = self.state_for(cache)
        if vision_mask is not None:
            if past:
                raise ValueError("in-LLM pruning needs the prompt in one prefill call (the cache was not empty)")
            self._call = _Call(prefill=True, full_mask=full, cache=cache, inputs_embeds=embeds, vision_mask=vision_mask)
            self._call.state = InLLMState(prefill_length=length, stages=[])
            positions = torch.arange(length, device=embeds.device)
            self._call.current_index = positions.expand(b, length)
            self._call.current_mask = full
            self.captures[0].enabled = True
        elif state is not None:
            self._call = _Call(prefill=False, full_mask=full, cache=cache, state=state)
        else:
            self._call = None  # text only: nothing to prune
        return None

    def _ranking_hook(self, stage: int):
        def hook(module, args, output):
            call = self._call
            if call is None or not call.prefill:
                return None
            return self._prune_stage(call, stage, output)

        return hook

    def _stage_images(self, call: _Call, hidden: torch.Tensor, keys: torch.Tensor | None) -> list[ImageTokens]:
        """The images' remaining tokens, as the scorers see them at this stage."""
        if call.images is None:
            call.images = self._images()
            call.spans = image_spans(call.vision_mask, [im.num_tokens for im in call.images])
            call.remaining = [torch.arange(im.num_tokens, device=hidden.device) for im in call.images]
        where = self._where(call)
        out = []
        for im, rem, (row, pos) in zip(call.images, call.remaining, call.spans):
            rem_pos = pos[rem.to(pos.device)]  # original prefill positions of the remaining tokens
            here = where[row, rem_pos]  # [R] positions in the current sequence

            def sub(t):
                return None if t is None else t[rem]

            out.append(
                ImageTokens(
                    # Scorers rate the tokens the LLM received; the hybrid's SQ uses the same embeddings.
                    features=call.inputs_embeds[row, rem_pos],
                    prunable=im.prunable[rem],
                    cls_attention=sub(im.cls_attention),
                    keys=sub(im.keys),
                    text_embeds=im.text_embeds,
                    activation_error=sub(im.activation_error),
                    llm_hidden=hidden[row, here] if self._need_hidden else None,
                    llm_keys=keys[row, here] if keys is not None else None,
                )
            )
        return out

    def _prune_stage(self, call: _Call, stage: int, output):
        capture = self.captures[stage]
        capture.enabled = False
        hidden = output[0] if isinstance(output, tuple) else output  # [B, L_s, D]
        text_attention = last_token_attention(capture, call.current_mask)  # [B, L_s]
        keys = None
        if self._need_hidden:
            k = capture.query_key()[1]  # [B, Hkv, L_s, Dh]
            keys = k.transpose(1, 2).reshape(k.shape[0], k.shape[2], -1)  # [B, L_s, Hkv * Dh]
        position_embeddings = capture.position_embeddings
        capture.clear()

        images = self._stage_images(call, hidden, keys)
        b = hidden.shape[0]
        where = self._where(call)
        attention = []
        for im, rem, (row, pos) in zip(images, call.remaining, call.spans):
            attention.append(text_attention[row, where[row, pos[rem.to(pos.device)]]])
        targets = self._targets(call, stage)
        selections = self._select(images, attention, targets)
        if any(s.extra_tokens is not None for s in selections):
            raise ValueError("in-LLM pruning cannot insert merged tokens; use a pruner without extra tokens")

        keep = call.current_mask.bool().clone()  # [B, L_s] real tokens
        for i, (sel, rem, (row, pos)) in enumerate(zip(selections, call.remaining, call.spans)):
            dropped = torch.ones(rem.numel(), dtype=torch.bool, device=rem.device)
            dropped[sel.keep_index.to(rem.device)] = False
            keep[row, where[row, pos[rem[dropped].to(pos.device)]]] = False
            call.remaining[i] = rem[~dropped]
        rows = [keep[r].nonzero().squeeze(-1) for r in range(b)]
        local, kept_mask = stack_padded(rows, 0, uses_right_padding(call.full_mask))  # [B, L_s+1] each
        kept_mask = kept_mask.to(call.full_mask.dtype)
        global_index = call.current_index.gather(1, local)
        call.state.stages.append(StageState(self.layers[stage] + 1, global_index, kept_mask))
        call.current_index, call.current_mask = global_index, kept_mask
        call.records.append({"selections": selections, "text_attention": text_attention, "targets": targets})

        def gather(t: torch.Tensor) -> torch.Tensor:  # [1 or B, L_s, *] -> [B, L_s+1, *]
            t = t.expand(b, *t.shape[1:])
            return t.gather(1, local.view(b, -1, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))

        kept_hidden = gather(hidden)
        kwargs: dict = {}
        if position_embeddings is not None:
            kwargs["position_embeddings"] = tuple(gather(t) for t in position_embeddings)
        kwargs["position_ids"] = global_index  # the gather index; applied to the ids each layer receives
        kwargs["attention_mask"] = self._mask(kept_hidden, kept_mask, call.cache, self.layers[stage] + 1)
        call.stage_kwargs[stage] = kwargs
        if stage + 1 < len(self.layers):
            self.captures[stage + 1].enabled = True
        else:
            self._finish(call)
        return (kept_hidden, *output[1:]) if isinstance(output, tuple) else kept_hidden

    def _where(self, call: _Call) -> torch.Tensor:
        """``[B, L]``: where each original prefill position sits in the current sequence (-1: gone / padding)."""
        b = call.current_index.shape[0]
        where = torch.full((b, call.full_mask.shape[1]), -1, dtype=torch.long, device=call.current_index.device)
        real = call.current_mask.bool()
        for row in range(b):
            where[row, call.current_index[row][real[row]]] = real[row].nonzero().squeeze(-1)
        return where

    def _targets(self, call: _Call, stage: int) -> list[int] | None:
        """Single stage: the pruner's budget. Several: geometric steps toward it, the last stage reaching it."""
        stages = len(self.layers)
        if stages == 1 or self._final_budget is None:
            return None
        out = []
        for im in call.images:
            n0 = int(im.prunable.sum())
            final = self._final_budget(n0)
            share = (final / n0) ** ((stage + 1) / stages) if n0 else 1.0
            out.append(max(final, round(n0 * share)))
        return out

    def _finish(self, call: _Call) -> None:
        if call.cache is not None:
            self._states[call.cache] = call.state
        final = []
        first = call.records[0]["selections"]
        for im, rem, sel0 in zip(call.images, call.remaining, first):
            final.append(ImageSelection(keep_index=rem.sort().values, extra_tokens=None, scores=sel0.scores))
        self._on_selection(
            {
                "selections": final,
                "spans": call.spans,
                "text_attention": call.records[0]["text_attention"],
                "stages": call.records,
                "state": call.state,
            }
        )

    def _later_pre_hook(self, stage: int):
        first_layer = self.layers[stage] + 1

        def hook(module, args, kwargs):
            call = self._call
            if call is None:
                return None
            if not call.prefill and stage not in call.stage_kwargs:
                st = call.state.stages[stage]
                tail = call.full_mask[:, call.state.prefill_length :]
                kept = torch.cat([st.kept_mask, tail.to(st.kept_mask.dtype)], dim=1)
                hidden = args[0] if args else kwargs["hidden_states"]
                call.stage_kwargs[stage] = {"attention_mask": self._mask(hidden, kept, call.cache, first_layer)}
            for key, value in call.stage_kwargs.get(stage, {}).items():
                if key == "position_ids":
                    ids = kwargs.get("position_ids")
                    if ids is not None:
                        kwargs["position_ids"] = ids.expand(value.shape[0], -1).gather(1, value)
                else:
                    kwargs[key] = value
            return args, kwargs

        return hook

    def _mask(self, hidden: torch.Tensor, mask_2d: torch.Tensor, cache, first_layer: int) -> torch.Tensor | None:
        # Sized against the stage's first cache layer, which holds only its kept tokens; no position ids,
        # since kept positions have gaps that would look like packed sequences.
        from qapframe.transformers_internals import create_causal_mask

        return create_causal_mask(
            config=self.lm.config,
            inputs_embeds=hidden,
            attention_mask=mask_2d,
            cache=cache,
            position_ids=None,
            layer_idx=first_layer if cache is not None and first_layer < len(self.lm.layers) else None,
        )
