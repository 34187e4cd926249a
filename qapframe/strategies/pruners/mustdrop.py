"""MustDrop's vision-encoding stage: merge the most self-similar local windows, each into its mean, to a budget.

Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model" (2024).
Each frame's token grid is tiled by ``window x window`` windows (3 x 3 in the paper; edge windows are
smaller when the grid does not divide). A window's similarity is the mean cosine similarity over its
ordered pairs of distinct tokens, ``(||sum_i u_i||^2 - w) / (w (w - 1))`` for unit tokens ``u``. The most
similar windows merge first, each into the mean of its tokens at its top-left token's position
(`Selection.kept_weights`), until the budget is met: the paper merges every window above a threshold
(0.8), LightCompress a fixed count; here the count follows the budget, and the last window merges only
its first tokens (raster order) when a whole one would overshoot. Similarity is measured on the projected
tokens. The authors merge at the vision encoder's first layer and encode on; here the merge runs on the
encoder's output, as every pre-LLM pruner does. Merging every window leaves one token per window, so
retention must be at least windows / N (LLaVA-1.5's 24 x 24 grid: 64 of 576); below that the pruner
says so. Score-free. The prefilling stage (dual-attention filtering) is the `mustdrop` scorer.

Layout: ``context.token_layout`` (an anyres image's base crop and high-resolution grid, each tiled on its
own), else ``context.token_grid`` (a clip: each frame tiled), else a square ``sqrt(N)`` x ``sqrt(N)`` grid
(LLaVA's patch grid).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field

from qapframe.strategies.base import PRUNERS, Pruner, PrunerConfig, Selection
from qapframe.strategies.context import ScoringContext


class MustDropMergeConfig(PrunerConfig):
    window: int = Field(3, ge=2, description="window side in tokens (the paper's 3 x 3)")


def window_ids(pieces: tuple[tuple[int, int], ...], window: int) -> torch.Tensor:
    """``[N]``: each token's window; ``pieces`` ((rows, cols), ...) tile in turn, windows in raster order."""
    out, offset = [], 0
    for rows, cols in pieces:
        across = math.ceil(cols / window)
        local = (torch.arange(rows)[:, None] // window * across + torch.arange(cols)[None, :] // window).flatten()
        out.append(local + offset)
        offset += math.ceil(rows / window) * across
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def token_pieces(context: ScoringContext, n: int) -> tuple[tuple[int, int], ...]:
    """The 2-D pieces the ``n`` tokens form: the context's layout or frame grid, else one square grid."""
    if context.token_layout is not None:
        pieces = context.token_layout
    elif context.token_grid is not None:
        pieces = ((context.token_grid[1], context.token_grid[2]),) * context.token_grid[0]
    else:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"pruner 'mustdrop_merge' needs the tokens' 2-D layout: the adapter gave none (token_layout, "
                f"token_grid) and {n} tokens are not a square grid"
            )
        pieces = ((side, side),)
    if sum(r * c for r, c in pieces) != n:
        raise ValueError(f"pruner 'mustdrop_merge': layout {pieces} does not hold {n} tokens")
    return pieces


def window_similarity(x: torch.Tensor, ids: torch.Tensor, windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, N, D]`` -> each window's mean pairwise cosine ``[B, W]`` (-inf for 1-token windows), sizes ``[W]``."""
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    sums = unit.new_zeros(x.shape[0], windows, x.shape[-1]).index_add_(1, ids, unit)  # [B, W, D]
    size = torch.bincount(ids, minlength=windows).to(unit.dtype)  # [W]
    similarity = (sums.square().sum(dim=-1) - size) / (size * (size - 1)).clamp_min(1.0)
    return similarity.masked_fill(size < 2, -math.inf), size


@PRUNERS.register("mustdrop_merge")
class MustDropMergePruner(Pruner):
    """The most self-similar windows merged, each into its mean, until budget(N) tokens are left."""

    Config = MustDropMergeConfig
    config: MustDropMergeConfig
    pre_llm_only: ClassVar[bool] = True  # merged tokens are means of projected tokens (`Selection.kept_weights`)

    def select(self, scores: torch.Tensor, context: ScoringContext) -> Selection:
        b, n = scores.shape
        k = self.budget(n)
        if k >= n:
            return Selection.everything(b, n, scores.device)
        ids = window_ids(token_pieces(context, n), self.config.window)  # [N]
        windows = int(ids.max()) + 1
        if k < windows:
            raise ValueError(
                f"pruner 'mustdrop_merge' leaves at least one token per {self.config.window}x{self.config.window} "
                f"window: {windows} of {n} (retention >= {windows / n:.3f}), but its budget is {k}; raise "
                f"retention or lower window"
            )
        similarity, size = window_similarity(context.vision_embeds.cpu(), ids, windows)
        order = torch.sort(similarity, dim=-1, descending=True, stable=True).indices  # [B, W], ties: earlier
        saved = (size.long() - 1)[order].cumsum(dim=-1)  # [B, W] tokens saved merging the first i + 1 windows
        need = n - k
        whole = (saved <= need).sum(dim=-1)  # [B] windows merged whole (need <= N - W, so one more fits)
        # each token's place in its window (raster order: flat index order) and the window's first token
        counts = torch.bincount(ids, minlength=windows)  # [W]
        start = counts.cumsum(0) - counts  # [W] where each window begins in `by_window`
        by_window = torch.sort(ids, stable=True).indices  # [N] tokens grouped by window, in index order
        place = torch.empty(n, dtype=torch.long)
        place[by_window] = torch.arange(n) - start[ids[by_window]]
        first = by_window[start]  # [W] each window's first (top-left) token
        representative = torch.arange(n).expand(b, n).clone()  # [B, N]: the token each token merges into
        for i in range(b):
            merged = order[i, : int(whole[i])]
            in_whole = torch.isin(ids, merged)
            representative[i, in_whole] = first[ids[in_whole]]
            left = need - (int(saved[i, int(whole[i]) - 1]) if int(whole[i]) else 0)
            if left:  # the next window merges its first left + 1 tokens
                partial = (ids == order[i, int(whole[i])]) & (place <= left)
                representative[i, partial] = first[ids[partial]]
        keep = torch.stack([torch.unique(r) for r in representative])  # [B, k] sorted
        dtype = torch.promote_types(context.vision_embeds.dtype, torch.float32)
        weights = (representative[:, None, :] == keep[:, :, None]).to(dtype)  # [B, k, N]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        device = scores.device
        return Selection(keep_index=keep.to(device), kept_weights=weights.to(device))
