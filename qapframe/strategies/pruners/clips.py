"""What the pruners that merge a clip's tokens share (PruneVid, FastVID, HoliTom): the grid, the still/moving
groups and their shares of the budget, group means, the merged selection."""

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


def shares(sizes: list[int], total: int) -> list[int]:
    """Split ``total`` over groups in proportion to ``sizes`` (largest remainders, earlier groups first)."""
    whole = sum(sizes)
    quotas = [total * s / whole for s in sizes]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(sizes)), key=lambda g: (-(quotas[g] - counts[g]), g))
    for g in order[: total - sum(counts)]:
        counts[g] += 1
    return counts


def item_means(tokens: torch.Tensor, items: list[list[int]]) -> torch.Tensor:
    """``tokens [N, D]``, ``items``: token index sets -> each set's mean ``[len(items), D]`` (one index_add)."""
    sizes = torch.tensor([len(item) for item in items])
    rows = tokens.index_select(0, torch.tensor([t for item in items for t in item]))  # [sum(sizes), D]
    if len(rows) == len(items):  # single tokens (an image, or a scene with nothing still): no averaging
        return rows
    owner = torch.repeat_interleave(torch.arange(len(items)), sizes)  # [sum(sizes)]
    sums = tokens.new_zeros(len(items), tokens.shape[-1]).index_add_(0, owner, rows)
    return sums / sizes[:, None].to(tokens.dtype)


def still_and_moving_groups(
    spans: list[tuple[int, int]], per_frame: int, stillness: dict[tuple[int, int], float], budget: int
) -> list[tuple[bool, list[list[int]]]]:
    """Merge groups of a clip whose still positions merge over their segment (PruneVid, HoliTom).

    ``stillness``: ``(segment, position) -> score`` of the positions still over their segment. When
    merging them all leaves fewer than ``budget`` tokens, the least still (lowest score, then key) move
    again until enough are left. Returns ``(still, items)`` groups: per segment its still items (each the
    position's tokens over the segment's frames), then each frame's moving tokens as one-token items.
    """
    still = dict(stillness)
    count = sum(stop - start for start, stop in spans) * per_frame
    count -= sum(spans[s][1] - spans[s][0] - 1 for s, _ in still)
    for key in sorted(still, key=lambda k: (still[k], k)):
        if count >= budget:
            break
        count += spans[key[0]][1] - spans[key[0]][0] - 1
        del still[key]
    groups: list[tuple[bool, list[list[int]]]] = []
    for s, (start, stop) in enumerate(spans):
        positions = sorted(q for (segment, q) in still if segment == s)
        if positions:
            groups.append((True, [[t * per_frame + q for t in range(start, stop)] for q in positions]))
        moving = sorted(set(range(per_frame)) - set(positions))
        for t in range(start, stop):
            if moving:
                groups.append((False, [[t * per_frame + q] for q in moving]))
    return groups


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
