"""HoliTom's outer-LLM merging: segment a clip to remove the most still tokens, merge them over time, then space.

Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models" (2025), as the authors'
code runs it before the LLM (its inner-LLM merging at layer K is not part of this pruner):

1. **Segments that remove the most.** A position ``p`` is still over frames ``s..e`` when every consecutive
   pair's cosine similarity there exceeds ``static_threshold`` (tau, 0.8). Merging a segment's still
   positions removes ``|M_{s,e}| * (e - s)`` tokens; the clip's partition into contiguous segments (at most
   ``max_window`` frames each) that removes the most is found by dynamic programming (ties: shorter
   segments).
2. **Temporal merging.** In each segment a still position's tokens become one, their mean, at its first
   frame's position.
3. **Spatial merging.** Each frame keeps its highest-scored moving tokens (the paired scorer's; the authors
   use the mean attention each token receives in the vision encoder); each segment's still tokens are
   clustered by DPC-kNN (7 neighbours) and a centre with ``n`` members becomes ``beta * centre + (1 - beta)
   * mean(members)`` (beta = ``anchor_weight``, 0.6).

The budget is met exactly: HoliTom's count follows its thresholds, here the budget is shared over the
groups of step 3 in proportion to their sizes (largest remainders, as `prunevid` shares it), and when
step 2 alone leaves fewer tokens than the budget, the least still positions (lowest worst similarity) are
made moving again until enough are left. An image, or a unit without a frame layout, is one frame: the
top-k by score. Pre-LLM only (`Selection.kept_weights`).
"""

from __future__ import annotations

import torch
from pydantic import Field

from qapframe.strategies.base import PRUNERS, PrunerConfig
from qapframe.strategies.pruners.clips import ClipMergingPruner, item_means, shares, still_and_moving_groups
from qapframe.strategies.pruners.selection import density_peak_centres


class HoliTomConfig(PrunerConfig):
    static_threshold: float = Field(
        0.8, ge=-1.0, le=1.0, description="tau: a position is still while consecutive frames' cosine exceeds it"
    )
    max_window: int | None = Field(None, ge=1, description="the longest segment in frames (None: any)")
    anchor_weight: float = Field(0.6, ge=0.0, le=1.0, description="beta: a cluster centre's weight in its merge")
    neighbours: int = Field(7, ge=1, description="DPC-kNN density: the nearest tokens (self included)")


def still_segments(
    clip: torch.Tensor, threshold: float, max_window: int | None
) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
    """``clip [F, P, D]`` -> the segments removing the most tokens and each one's worst similarity ``[P]``.

    A position is still in segment ``(s, e)`` when its worst consecutive similarity there exceeds the
    threshold; single frames get ``-inf`` (nothing to merge).
    """
    f, p = clip.shape[:2]
    unit = torch.nn.functional.normalize(clip.double(), dim=-1)
    similarity = (unit[:-1] * unit[1:]).sum(dim=-1)  # [F - 1, P]: frame t against t + 1
    longest = f if max_window is None else max_window
    worst: dict[tuple[int, int], torch.Tensor] = {}
    for s in range(f):
        running = torch.full((p,), torch.inf, dtype=torch.float64)
        for e in range(s + 1, min(f, s + longest)):
            running = torch.minimum(running, similarity[e - 1])
            worst[(s, e)] = running
    best = [0] * (f + 1)  # best[i]: most tokens removed from frames 0..i-1
    start = [0] * (f + 1)
    for i in range(1, f + 1):
        best[i], start[i] = best[i - 1], i - 1  # frame i - 1 alone
        for s in range(i - 2, max(-1, i - 1 - longest), -1):  # longer windows later: ties keep the shorter
            gain = best[s] + int((worst[(s, i - 1)] > threshold).sum()) * (i - 1 - s)
            if gain > best[i]:
                best[i], start[i] = gain, s
    spans, i = [], f
    while i > 0:
        spans.append((start[i], i))
        i = start[i]
    spans.reverse()
    return spans, [worst.get((s, e - 1), torch.full((p,), -torch.inf, dtype=torch.float64)) for s, e in spans]


def holitom_rows(
    x: torch.Tensor, scores: torch.Tensor, grid: tuple[int, int, int], budget: int, config: HoliTomConfig
) -> tuple[list[int], list[dict[int, float]]]:
    """``x [N, D]``, ``scores [N]`` -> the kept tokens' positions and each one's weights ``{token: weight}``."""
    frames, per_frame = grid[0], grid[1] * grid[2]
    x = x.double()
    spans, worst = still_segments(x.view(frames, per_frame, -1), config.static_threshold, config.max_window)
    still = {  # (segment, position) -> its worst similarity
        (s, q): float(worst[s][q])
        for s in range(len(spans))
        for q in (worst[s] > config.static_threshold).nonzero().squeeze(-1).tolist()
    }
    groups = still_and_moving_groups(spans, per_frame, still, budget)
    rows: dict[int, dict[int, float]] = {}
    for (is_still, items), keep in zip(groups, shares([len(items) for _, items in groups], budget)):
        if keep == 0:
            continue
        if not is_still:
            tokens = [item[0] for item in items]
            top = torch.sort(scores[tokens].double(), descending=True, stable=True).indices[:keep]
            rows.update({tokens[i]: {tokens[i]: 1.0} for i in top.tolist()})
            continue
        if keep == len(items):
            rows.update({item[0]: {t: 1.0 / len(item) for t in item} for item in items})
            continue
        centres, assign = density_peak_centres(item_means(x, items), keep, config.neighbours)
        for c, centre in enumerate(centres.tolist()):
            members = [items[j] for j in (assign == c).nonzero().squeeze(-1).tolist() if j != centre]
            w = config.anchor_weight if members else 1.0
            row = {t: w / len(items[centre]) for t in items[centre]}
            for item in members:
                for t in item:
                    row[t] = (1.0 - w) / (len(members) * len(item))
            rows[items[centre][0]] = row
    keep_index = sorted(rows)
    return keep_index, [rows[k] for k in keep_index]


@PRUNERS.register("holitom")
class HoliTomPruner(ClipMergingPruner):
    """Per clip: still tokens merged over the segments that remove the most, then top moving tokens and
    DPC-kNN merged still tokens, budget(N) in total."""

    Config = HoliTomConfig
    config: HoliTomConfig

    def unit_rows(self, x, scores, grid, budget):
        return holitom_rows(x, scores, grid, budget, self.config)
