"""In-LLM pruning (FastV, DART, PyramidDrop, SparseVLM): rank at some decoder layers, later layers see fewer tokens.

Design (hooks on the unmodified language model, so any v5 LLaMA-style decoder works):
- A pre-hook on the language model notes the 2-D padding mask and the cache of each call.
- Each *ranking layer* r_s (one for FastV/DART, one per stage for PyramidDrop and SparseVLM) gets hooks on
  its ``q_proj``/``k_proj`` (and rotary embeddings), so the last real token's attention row (and, when asked
  for, the rows of each image's text raters) is recomputed in float32 (`sdpa` never exposes attention
  probabilities), and a forward hook that selects tokens per image and returns the *gathered* hidden states
  ``[B, L_s+1, D]``. Pre-hooks on every later layer swap in the gathered rotary embeddings, position ids and
  a mask built for the shorter sequence of their stage, so they really compute on fewer tokens (the saving).
- Merged tokens (SparseVLM's recycled tokens: a selection's ``extra_tokens``, hidden states) are inserted
  into the sequence right after their image's last remaining token, before the text that follows the image,
  and take the position ids and rotary embedding of the image's *last placeholder*: the text after the image
  keeps its positions, as with Qwen's pre-LLM merged tokens. (SparseVLM's code inserts them at the same
  place but renumbers every position contiguously; here, as in FastV, kept tokens keep their positions.)
  Later stages treat them as their image's tokens, so they can be pruned or merged again. A token is named
  by an id: its prefill position, or ``prefill_length + j`` for its row's j-th merged token, whose hidden
  state (as made) is ``InLLMState.merged[:, j]``.
- Text raters (SparseVLM): per image, the text tokens after it, or those that ``text_raters`` picks from the
  LLM input embeddings before the first layer (chosen once per prompt); the row's last real token when no
  text follows the image. Their attention rows to the image's remaining tokens go to the selection.
- KV cache: layers of stage s cache only that stage's kept tokens. The prefill's per-stage kept index
  and mask live in this handle, keyed (weakly) by the cache object, so each decode step builds each
  stage's mask from its kept prefix mask plus the new tokens' mask, sized against the stage's first
  cache layer. Kept tokens keep their original positions (as in FastV), and decode tokens continue them.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch

from qapframe.models.attention import ProjectionCapture, last_token_attention, query_attention
from qapframe.models.inllm_state import CallState, InLLMState, StageState, stage_targets
from qapframe.models.pruning import ImageSelection, ImageTokens, image_spans, stack_padded, uses_right_padding
from qapframe.strategies.base import gather_rows


class InLLMPruning:
    """Installs in-LLM pruning after each decoder layer of ``layers`` (ascending) of ``language_model``.

    ``select(images, text_attention, targets, rater_attention=, adaptive=) -> list[ImageSelection]`` is the
    adapter's scoring callback (``targets``: per image prunable tokens to keep, None = the pruner's budget;
    ``adaptive``: the targets are a stage's plan the pruner may adapt); ``images()`` returns the current
    prompt's `ImageTokens`; ``final_budget(n)`` is the pruner's budget for n prunable tokens (the count left
    after the last stage). ``rater_attention``: compute the text raters' rows, chosen by ``text_raters``.
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
        rater_attention: bool = False,
        text_raters: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
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
        self._rater_attention = rater_attention
        self._text_raters = text_raters
        self.pending_vision_mask: torch.Tensor | None = None  # [B, L] set by the adapter before a prefill
        self._call: CallState | None = None
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
            self._call = CallState(prefill=True, full_mask=full, cache=cache, inputs_embeds=embeds,
                                   vision_mask=vision_mask)
            self._call.state = InLLMState(prefill_length=length, stages=[])
            positions = torch.arange(length, device=embeds.device).expand(b, length)
            self._call.current_index = self._call.current_position = positions
            self._call.current_mask = full
            self.captures[0].enabled = True
        elif state is not None:
            self._call = CallState(prefill=False, full_mask=full, cache=cache, state=state)
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

    def _start_images(self, call: CallState, hidden: torch.Tensor) -> None:
        call.images = self._images()
        call.spans = image_spans(call.vision_mask, [im.num_tokens for im in call.images])
        call.members = [pos.to(hidden.device).clone() for _, pos in call.spans]  # ids = prefill positions
        call.merged = [hidden.new_zeros(0, hidden.shape[-1]) for _ in range(hidden.shape[0])]
        if self._rater_attention:
            call.raters = self._choose_raters(call)

    def _choose_raters(self, call: CallState) -> list[torch.Tensor]:
        """Per image: prefill positions of the real text tokens after it (``text_raters`` narrows them)."""
        out = []
        for im, (row, pos) in zip(call.images, call.spans):
            text = call.full_mask[row].bool() & ~call.vision_mask[row]  # [L] real text tokens
            if pos.numel():
                text[: int(pos[-1]) + 1] = False
            candidates = text.nonzero().squeeze(-1)
            if candidates.numel() == 0:  # nothing follows the image: the last real token rates it, as in FastV
                candidates = call.full_mask[row].bool().nonzero().squeeze(-1)[-1:]
            elif self._text_raters is not None:
                vision = call.inputs_embeds[row, pos[im.prunable.to(pos.device)]]  # [P, D]
                chosen = self._text_raters(vision, call.inputs_embeds[row, candidates]).to(candidates.device)
                if chosen.any():
                    candidates = candidates[chosen]
            out.append(candidates)
        return out

    def _stage_images(self, call: CallState, hidden: torch.Tensor, keys: torch.Tensor | None, where) -> list[ImageTokens]:
        """The images' remaining tokens, as the scorers see them at this stage (merged ones last)."""
        length = call.state.prefill_length
        out = []
        for im, ids, (row, pos) in zip(call.images, call.members, call.spans):
            original = ids < length
            local = torch.searchsorted(pos.to(ids.device), ids[original])  # indices into the image's own tokens
            merged = call.merged[row][ids[~original] - length]  # [M, D]
            here = where[row, ids]  # [R] slots in the current sequence

            def sub(t):  # merged tokens have no vision-side values: zeros, like structural tokens
                return None if t is None else torch.cat([t[local], t.new_zeros(merged.shape[0], *t.shape[1:])])

            features = call.inputs_embeds[row, ids[original]]
            out.append(
                ImageTokens(
                    # Scorers rate the tokens the LLM received (a merged token: its hidden state as made);
                    # the hybrid's SQ uses the same embeddings.
                    features=torch.cat([features, merged.to(features.dtype)]),
                    prunable=torch.cat([im.prunable[local], im.prunable.new_ones(merged.shape[0])]),
                    cls_attention=sub(im.cls_attention),
                    keys=sub(im.keys),
                    text_embeds=im.text_embeds,
                    activation_error=sub(im.activation_error),
                    llm_hidden=hidden[row, here] if self._need_hidden else None,
                    llm_keys=keys[row, here] if keys is not None else None,
                )
            )
        return out

    def _rater_rows(self, call: CallState, capture: ProjectionCapture, where: torch.Tensor) -> list[torch.Tensor]:
        """Per image ``[R_i, N_i]``: its raters' attention rows over its remaining tokens (one pass per batch)."""
        b = where.shape[0]
        per_row: list[list[torch.Tensor]] = [[] for _ in range(b)]
        picks = []
        for raters, (row, _) in zip(call.raters, call.spans):
            slots = where[row, raters.to(where.device)]  # -1 for a rater that was pruned (a vision token)
            picks.append((row, sum(p.numel() for p in per_row[row]), slots.numel()))
            per_row[row].append(slots)
        empty = torch.zeros(0, dtype=torch.long, device=where.device)
        queries, _ = stack_padded([torch.cat(p) if p else empty for p in per_row], -1, right_pad=True)  # [B, Q]
        rows = query_attention(capture, call.current_mask, queries)  # [B, Q, L_s]
        return [rows[row, start : start + n][:, where[row, ids]] for (row, start, n), ids in zip(picks, call.members)]

    def _prune_stage(self, call: CallState, stage: int, output):
        capture = self.captures[stage]
        capture.enabled = False
        hidden = output[0] if isinstance(output, tuple) else output  # [B, L_s, D]
        text_attention = last_token_attention(capture, call.current_mask)  # [B, L_s]
        keys = None
        if self._need_hidden:
            k = capture.query_key()[1]  # [B, Hkv, L_s, Dh]
            keys = k.transpose(1, 2).reshape(k.shape[0], k.shape[2], -1)  # [B, L_s, Hkv * Dh]
        if stage == 0:  # every later stage takes its tokens' rotary embeddings from the full prefill's
            call.position_embeddings = capture.position_embeddings
            self._start_images(call, hidden)
        where = self._where(call)
        images = self._stage_images(call, hidden, keys, where)
        rater_attention = self._rater_rows(call, capture, where) if self._rater_attention else None
        capture.clear()

        attention = [text_attention[row, where[row, ids]] for ids, (row, _) in zip(call.members, call.spans)]
        targets = self._targets(call, stage)
        adaptive = targets is not None and stage + 1 < len(self.layers)
        selections = self._select(images, attention, targets, rater_attention=rater_attention, adaptive=adaptive)
        call.records.append({"selections": selections, "text_attention": text_attention, "targets": targets,
                             "rater_attention": rater_attention})
        kept_hidden = self._next_sequence(call, stage, hidden, where, selections)
        if stage + 1 < len(self.layers):
            self.captures[stage + 1].enabled = True
        else:
            self._finish(call)
        return (kept_hidden, *output[1:]) if isinstance(output, tuple) else kept_hidden

    def _next_sequence(self, call: CallState, stage: int, hidden: torch.Tensor, where, selections) -> torch.Tensor:
        """Apply the stage's selections: drop tokens, insert merged ones -> the next hidden states ``[B, L_s+1, D]``;
        record the stage and the kwargs its later layers get."""
        b, size = hidden.shape[:2]
        length = call.state.prefill_length
        keep = call.current_mask.bool().clone()  # [B, L_s] real tokens
        fresh: list[list[tuple]] = [[] for _ in range(b)]  # per row: (ids [M], hidden [M, D], positions [M])
        for i, (sel, ids, (row, pos)) in enumerate(zip(selections, call.members, call.spans)):
            dropped = torch.ones(ids.numel(), dtype=torch.bool, device=ids.device)
            dropped[sel.keep_index.to(ids.device)] = False
            keep[row, where[row, ids[dropped]]] = False
            survivors = ids[~dropped]
            if sel.extra_tokens is not None and sel.extra_tokens.shape[0]:
                tokens = sel.extra_tokens.to(hidden.dtype)
                new_ids = length + call.merged[row].shape[0] + torch.arange(tokens.shape[0], device=ids.device)
                call.merged[row] = torch.cat([call.merged[row], tokens])
                fresh[row].append((new_ids, tokens, pos[-1:].to(ids.device).expand(tokens.shape[0])))
                survivors = torch.cat([survivors, new_ids])
            call.members[i] = survivors

        space = length + max(m.shape[0] for m in call.merged) + 1
        rows, extra = [], []
        for r in range(b):
            slots = keep[r].nonzero().squeeze(-1)
            ids, position, source = call.current_index[r, slots], call.current_position[r, slots], slots
            added = sum(t[0].numel() for t in fresh[r])
            extra.append(torch.cat([t[1] for t in fresh[r]]) if fresh[r] else hidden.new_zeros(0, hidden.shape[-1]))
            if added:
                ids = torch.cat([ids, *(t[0] for t in fresh[r])])
                position = torch.cat([position, *(t[2] for t in fresh[r])])
                source = torch.cat([source, size + torch.arange(added, device=slots.device)])
                # Sequence order: by position, a merged token after every token at its position (the image's last
                # placeholder) and before the next one, earlier merges first.
                order = torch.argsort((2 * position + (ids >= length)) * space + ids)
                ids, position, source = ids[order], position[order], source[order]
            rows.append(torch.stack([ids, position, source], dim=-1))  # [n_r, 3]
        table, kept_mask = stack_padded(rows, 0, uses_right_padding(call.full_mask))  # [B, L_s+1, 3], [B, L_s+1]
        ids, position, source = table.unbind(-1)
        kept_mask = kept_mask.to(call.full_mask.dtype)
        first_layer = self.layers[stage] + 1
        call.state.stages.append(StageState(first_layer, ids, kept_mask, position))
        call.current_index, call.current_position, call.current_mask = ids, position, kept_mask

        def gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # [1 or B, S, *] -> [B, L_s+1, *]
            return gather_rows(t, index.view(b, -1))

        if any(e.shape[0] for e in extra):
            hidden = torch.cat([hidden, stack_padded(extra, 0.0, right_pad=True)[0]], dim=1)  # merged after the slots
        kept_hidden = gather(hidden, source)
        kwargs: dict = {}
        if call.position_embeddings is not None:
            kwargs["position_embeddings"] = tuple(gather(t, position) for t in call.position_embeddings)
        kwargs["position_ids"] = position  # the gather index; applied to the ids each layer receives
        kwargs["attention_mask"] = self._mask(kept_hidden, kept_mask, call.cache, first_layer)
        call.stage_kwargs[stage] = kwargs
        return kept_hidden

    def _where(self, call: CallState) -> torch.Tensor:
        """``[B, ids]``: where each token id sits in the current sequence (-1: gone / padding)."""
        b = call.current_index.shape[0]
        size = call.state.prefill_length + max((m.shape[0] for m in call.merged or ()), default=0)
        where = torch.full((b, size), -1, dtype=torch.long, device=call.current_index.device)
        real = call.current_mask.bool()
        for row in range(b):
            where[row, call.current_index[row][real[row]]] = real[row].nonzero().squeeze(-1)
        return where

    def _targets(self, call: CallState, stage: int) -> list[int] | None:
        """Single stage: the pruner's budget. Several: `stage_targets`' geometric steps toward it."""
        stages = len(self.layers)
        if stages == 1 or self._final_budget is None:
            return None
        counts = [int(im.prunable.sum()) for im in call.images]
        return [stage_targets(n0, self._final_budget(n0), stages)[stage] for n0 in counts]

    def _finish(self, call: CallState) -> None:
        length = call.state.prefill_length
        if any(m.shape[0] for m in call.merged):
            call.state.merged = stack_padded(call.merged, 0.0, right_pad=True)[0]  # [B, M, D]
        if call.cache is not None:
            self._states[call.cache] = call.state
        final = []
        first = call.records[0]["selections"]
        for ids, (row, pos), sel0 in zip(call.members, call.spans, first):
            original = ids < length
            keep = torch.searchsorted(pos.to(ids.device), ids[original]).sort().values
            extra = call.merged[row][ids[~original] - length] if bool((~original).any()) else None
            final.append(ImageSelection(keep_index=keep, extra_tokens=extra, scores=sel0.scores))
        self._on_selection(
            {
                "selections": final,
                "spans": call.spans,
                "text_attention": call.records[0]["text_attention"],
                "raters": call.raters,
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
