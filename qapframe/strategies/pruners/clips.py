"""What the pruners that merge a clip's tokens share (PruneVid, FastVID, HoliTom): its grid, its merged selection."""

from __future__ import annotations

from typing import ClassVar

import torch

from qapframe.strategies.base import Pruner, Selection
from qapframe.strategies.context import ScoringContext


def clip_grid(context: ScoringContext, n: int, pruner: str) -> tuple[int, int, int]:
    """The units' ``(frames, rows, cols)``; without a frame layout (an image) one frame of ``n`` tokens."""
    grid = context.token_grid or (1, 1, n)
    if grid[0] * grid[1] * grid[2] != n:
        raise ValueError(f"pruner {pruner!r}: token_grid {grid} does not hold {n} tokens")
    return grid


def merged_selection(units: list[tuple[list[int], list[dict[int, float]]]], n: int, dtype, device) -> Selection:
    """Per unit ``(kept positions ascending, one {token: weight} row each)`` -> a `Selection` with ``kept_weights``."""
    b, k = len(units), len(units[0][0])
    keep = torch.tensor([kept for kept, _ in units], dtype=torch.long)  # [B, K]
    weights = torch.zeros(b, k, n, dtype=dtype)
    for i, (_, rows) in enumerate(units):
        at = [(j, t) for j, row in enumerate(rows) for t in row]  # one scatter for every weight of the unit
        values = torch.tensor([w for row in rows for w in row.values()], dtype=dtype)
        weights[i, torch.tensor([j for j, _ in at]), torch.tensor([t for _, t in at])] = values
    return Selection(keep_index=keep.to(device), kept_weights=weights.to(device))


class ClipMergingPruner(Pruner):
    """A pruner that turns each unit (a clip, or an image as one frame) into merged rows on its own.

    Subclasses give `unit_rows`; `select` runs it per unit and batches the rows into ``kept_weights``.
    """

    pre_llm_only: ClassVar[bool] = True  # merged tokens are weighted sums of projected tokens (`kept_weights`)

    def unit_rows(
        self, x: torch.Tensor, scores: torch.Tensor, grid: tuple[int, int, int], budget: int
    ) -> tuple[list[int], list[dict[int, float]]]:
        """``x [N, D]``, ``scores [N]`` of one unit -> ``budget`` kept positions (ascending) and their rows."""
        raise NotImplementedError

    def select(self, scores: torch.Tensor, context: ScoringContext) -> Selection:
        b, n = scores.shape
        k = self.budget(n)
        if k >= n:
            return Selection.everything(b, n, scores.device)
        grid = clip_grid(context, n, self.name)
        units = [self.unit_rows(context.vision_embeds[i].cpu(), scores[i].cpu(), grid, k) for i in range(b)]
        dtype = torch.promote_types(context.vision_embeds.dtype, torch.float32)
        return merged_selection(units, n, dtype, scores.device)
