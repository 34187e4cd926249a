"""Architecture-neutral pruning steps shared by the adapters: per-image selection and sequence rebuilding.

Every adapter describes each image as an `ImageTokens` (its projected tokens as the LLM receives them,
plus what the scorers may need), calls `select_per_image`, and then either rebuilds the LLM input
(`rebuild_sequences`, pre-LLM pruning) or gathers hidden states inside the LLM (`qapframe.models.inllm`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qapframe.strategies.base import Pruner, Scorer, weighted_rows
from qapframe.strategies.context import QuantSettings, ScoringContext


@dataclass
class ImageTokens:
    """One image's vision tokens, in the order the LLM sees them."""

    features: torch.Tensor  # [N, D] projected embeddings
    prunable: torch.Tensor  # [N] bool; False = structural tokens that are always kept (LLaVA-NeXT newlines)
    cls_attention: torch.Tensor | None = None  # [N] vision-encoder [CLS] attention (0 where not prunable)
    keys: torch.Tensor | None = None  # [N, Dk] vision-encoder keys (0 where not prunable)
    text_embeds: torch.Tensor | None = None  # [T, D] LLM input embeddings of the image's prompt text tokens
    activation_error: torch.Tensor | None = None  # [N] error of the pipeline's first activation quantizer
    llm_hidden: torch.Tensor | None = None  # [N, D] in-LLM: hidden states after the ranking layer
    llm_keys: torch.Tensor | None = None  # [N, Hkv * Dh] in-LLM: keys at the ranking layer
    modality: str = "image"  # "image" or "video" (a clip's frames are one token set)
    per_token: dict[str, torch.Tensor] | None = None  # architecture data per token, [..., N, D] (Qwen3-VL deepstack)
    # (frames, rows, cols) of the prunable tokens, frame-major then row-major (a video clip's frames, a Qwen
    # image's single frame); None when they are not one grid (anyres packing). Temporal pruners need it.
    grid: tuple[int, int, int] | None = None
    # The prunable tokens as consecutive row-major 2-D pieces ``((rows, cols), ...)``: an anyres image's base
    # crop, then its unpadded high-resolution grid; derived from ``grid`` (one piece per frame) when None.
    layout: tuple[tuple[int, int], ...] | None = None

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    @property
    def pieces(self) -> tuple[tuple[int, int], ...] | None:
        if self.layout is not None:
            return self.layout
        return None if self.grid is None else ((self.grid[1], self.grid[2]),) * self.grid[0]


def anyres_layout(prunable: torch.Tensor, base_tokens: int) -> tuple[tuple[int, int], ...] | None:
    """``prunable [N]`` of an anyres packing (base crop, then grid rows each ending in a newline) -> its pieces.

    ``base_tokens``: one crop's tokens (a square). None when the packing is not of that form (a [CLS] kept).
    """
    side = math.isqrt(base_tokens)
    total = int(prunable.sum())
    if side * side != base_tokens or total < base_tokens or bool((~prunable[:base_tokens]).any()):
        return None
    newlines = (~prunable).nonzero().squeeze(-1)
    if total == base_tokens:  # the base view alone (its newline, if any, after it)
        return ((side, side),) if bool((newlines >= base_tokens).all()) else None
    rows = newlines.numel()
    cols = (total - base_tokens) // max(rows, 1)
    expected = base_tokens + (cols + 1) * torch.arange(rows, device=newlines.device) + cols
    if rows == 0 or cols * rows != total - base_tokens or not torch.equal(newlines, expected):
        return None
    return ((side, side), (rows, cols))


@dataclass
class ImageSelection:
    """What survived of one image: indices into its N tokens (ascending) and appended merged tokens."""

    keep_index: torch.Tensor  # [K] int64, ascending
    extra_tokens: torch.Tensor | None  # [M, D] pre-LLM: embeddings the LLM receives; in-LLM: merged hidden states
    scores: torch.Tensor  # [P] scores of the prunable tokens
    kept_weights: torch.Tensor | None = None  # [K, N] pre-LLM: each kept token as a weighted sum (ToMe's group means)

    @property
    def num_tokens(self) -> int:
        return self.keep_index.numel() + (0 if self.extra_tokens is None else self.extra_tokens.shape[0])

    def kept(self, per_token: torch.Tensor) -> torch.Tensor:
        """``per_token [..., N, D]`` (features, or data that follows them) -> the kept tokens' ``[..., K, D]``."""
        if self.kept_weights is None:
            return per_token[..., self.keep_index.to(per_token.device), :]
        return weighted_rows(self.kept_weights.to(per_token.device), per_token)

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        """``features [N, D]`` -> the LLM's tokens for this image ``[K + M, D]``."""
        kept = self.kept(features)
        if self.extra_tokens is None:
            return kept
        return torch.cat([kept, self.extra_tokens.to(kept.dtype)], dim=0)


def select_per_image(
    scorer: Scorer,
    pruner: Pruner,
    images: list[ImageTokens],
    quant: QuantSettings | None,
    seed: int,
    text_attention: list[torch.Tensor] | None = None,  # per image [N]
    targets: list[int] | None = None,  # per image prunable tokens to keep; None = the pruner's budget
    rater_attention: list[torch.Tensor] | None = None,  # per image [R_i, N]: its text raters' attention rows
    adaptive: bool = False,  # the targets are a stage's plan, which the pruner may adapt per image
) -> list[ImageSelection]:
    """Score and select each image's prunable tokens; images with equal token counts share one batch.

    Scores are normalized per context row by the scorers, i.e. per image over all of its crops.
    ``targets`` (multi-stage in-LLM pruning) overrides the pruner's budget with a per-image count.
    ``adaptive`` selects each image on its own (``ScoringContext.adaptive_budget``), since a pruner that
    adapts the plan per image (SparseVLM) may keep different counts for images of one size.
    """
    out: list[ImageSelection | None] = [None] * len(images)
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        key = (int(image.prunable.sum()), None if targets is None else targets[i], i if adaptive else None,
               image.grid, image.pieces)
        groups.setdefault(key, []).append(i)
    for (count, target, _, grid, pieces), members in groups.items():
        idx = [images[i].prunable.nonzero().squeeze(-1) for i in members]  # [P] each

        def stack(get):
            values = [get(images[i]) for i in members]
            return None if any(v is None for v in values) else torch.stack([v[j] for v, j in zip(values, idx)])

        text, text_mask = None, None
        if all(images[i].text_embeds is not None for i in members):
            text, text_mask = stack_padded([images[i].text_embeds for i in members], 0.0, right_pad=True)
            text_mask = text_mask.bool()  # [G, T]
        raters, rater_mask = None, None
        if rater_attention is not None:
            rows = [rater_attention[i][:, j] for i, j in zip(members, idx)]  # [R_i, P] each
            raters, rater_mask = stack_padded(rows, 0.0, right_pad=True)  # [G, R, P], [G, R]
            rater_mask = rater_mask.bool()
        group_pruner = pruner if target is None else type(pruner)(
            pruner.config.model_copy(update={"num_tokens": max(1, target), "retention": 1.0})
        )
        context = ScoringContext(
            vision_embeds=stack(lambda im: im.features),  # [G, P, D]
            cls_attention=stack(lambda im: im.cls_attention),  # [G, P]
            vision_keys=stack(lambda im: im.keys),  # [G, P, Dk]
            text_attention=None if text_attention is None else torch.stack(
                [text_attention[i][j] for i, j in zip(members, idx)]
            ),
            text_embeds=text,  # [G, T, D]
            text_mask=text_mask,
            llm_hidden=stack(lambda im: im.llm_hidden),  # [G, P, D]
            llm_keys=stack(lambda im: im.llm_keys),  # [G, P, Dk]
            activation_error=stack(lambda im: im.activation_error),  # [G, P]
            rater_attention=raters,  # [G, R, P]
            rater_mask=rater_mask,  # [G, R]
            adaptive_budget=adaptive and target is not None,
            token_grid=grid,
            token_layout=pieces,
            quant=quant,
            seed=seed,
        )
        scores = scorer.score(context)  # [G, P]
        if scores.shape != (len(members), count):
            raise ValueError(
                f"scorer {scorer.name!r} returned scores of shape {tuple(scores.shape)}, expected {(len(members), count)}"
            )
        selection = group_pruner.select(scores, context)
        for g, i in enumerate(members):
            structural = (~images[i].prunable).nonzero().squeeze(-1)
            keep, order = torch.cat([idx[g][selection.keep_index[g].to(idx[g].device)], structural]).sort()
            extra = None if selection.extra_tokens is None else selection.extra_tokens[g]
            weights = None
            if selection.kept_weights is not None:  # [K, P] over the prunable tokens -> [K + S, N], in keep's order
                w = selection.kept_weights[g]
                weights = w.new_zeros(w.shape[0] + structural.numel(), images[i].num_tokens)
                weights[: w.shape[0], idx[g].to(w.device)] = w
                weights[torch.arange(w.shape[0], weights.shape[0], device=w.device), structural.to(w.device)] = 1.0
                weights = weights[order.to(w.device)]
            out[i] = ImageSelection(keep_index=keep, extra_tokens=extra, scores=scores[g].detach(), kept_weights=weights)
    return out  # type: ignore[return-value]


def image_spans(vision_mask: torch.Tensor, lengths: list[int]) -> list[tuple[int, torch.Tensor]]:
    """Assign images to placeholder positions: ``vision_mask [B, L]`` (image tokens), images in row-major
    order with ``lengths`` tokens each -> ``(row, positions [N_i])`` per image."""
    rows, cols = vision_mask.nonzero(as_tuple=True)  # row-major order, as masked_scatter fills them
    if rows.numel() != sum(lengths):
        raise ValueError(f"the prompt has {rows.numel()} image tokens but the images have {sum(lengths)} features")
    spans, start = [], 0
    for n in lengths:
        row = rows[start : start + n]
        if n and (row != row[0]).any():
            raise ValueError("an image's placeholder tokens span two batch rows; check the prompt's image tokens")
        spans.append((int(row[0]) if n else 0, cols[start : start + n]))
        start += n
    return spans


def uses_right_padding(attention_mask: torch.Tensor | None) -> bool:
    """Right padding iff some row ends in padding (generate always left-pads decoder-only models)."""
    return attention_mask is not None and bool((attention_mask[:, -1] == 0).any())


def stack_padded(rows: list[torch.Tensor], fill: torch.Tensor | float, right_pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad rows ``[L_r, *]`` to a common length on one side -> ``([B, L', *], mask [B, L'] int64)``."""
    width = max(r.shape[0] for r in rows)
    out, mask = [], []
    for r in rows:
        pad = width - r.shape[0]
        filler = torch.as_tensor(fill, dtype=r.dtype, device=r.device).expand(pad, *r.shape[1:])
        ones = torch.ones(r.shape[0], dtype=torch.long, device=r.device)
        zeros = torch.zeros(pad, dtype=torch.long, device=r.device)
        out.append(torch.cat([r, filler] if right_pad else [filler, r]))
        mask.append(torch.cat([ones, zeros] if right_pad else [zeros, ones]))
    return torch.stack(out), torch.stack(mask)


def rebuild_sequences(
    text_embeds: torch.Tensor,  # [B, L, D] embeddings of the prompt (placeholders included)
    attention_mask: torch.Tensor | None,  # [B, L]
    spans: list[tuple[int, torch.Tensor]],  # per image (row, placeholder positions [N_i]), from `image_spans`
    image_tokens: list[torch.Tensor],  # per image the tokens that replace its placeholders [K_i, D]
    pad_embed: torch.Tensor,  # [D]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each image's placeholder run by its kept tokens -> ``(inputs_embeds [B, L', D], mask [B, L'])``.

    Padding is dropped and re-added on the same side, so rows may shrink by different amounts.
    """
    b, length = text_embeds.shape[:2]
    mask = torch.ones(b, length, dtype=torch.long, device=text_embeds.device) if attention_mask is None else attention_mask
    per_row: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(b)]
    for (row, positions), tokens in zip(spans, image_tokens):
        if positions.numel() and (positions.diff() != 1).any():
            raise ValueError(f"image placeholder tokens in row {row} are not contiguous")
        per_row[row].append((positions, tokens))
    rows = []
    for r in range(b):
        pieces, cursor = [], 0
        real = mask[r].bool()
        for positions, tokens in per_row[r]:
            start = int(positions[0]) if positions.numel() else cursor
            pieces.append(text_embeds[r, cursor:start][real[cursor:start]])
            pieces.append(tokens.to(text_embeds.dtype))
            cursor = start + positions.numel()
        pieces.append(text_embeds[r, cursor:][real[cursor:]])
        rows.append(torch.cat(pieces))
    embeds, new_mask = stack_padded(rows, pad_embed.to(text_embeds.dtype), uses_right_padding(attention_mask))
    return embeds, new_mask.to(mask.dtype)
