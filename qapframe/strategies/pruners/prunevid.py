"""PruneVid's first stage: merge what stays still over a scene, then cluster each frame's tokens, to a budget.

Huang et al., "PruneVid: Visual Token Pruning for Efficient Video Large Language Models" (ACL 2025),
its pre-LLM stage as LightCompress implements it (the in-LLM question-attention stage is not part of it):

1. **Scenes.** The frames' mean tokens are clustered by DPC-kNN (`density_peak_clusters`, 7 neighbours)
   into ``int(segment_ratio * F)`` clusters; runs of frames with one label are the scenes, and every
   cluster keeps only its longest run: any other run joins the longer of its neighbouring runs.
2. **Static tokens.** In a scene of ``W >= 2`` frames a position is static when the mean cosine
   similarity of its tokens over all pairs of frames, ``(||sum_t u_t||^2 - W) / (W (W - 1))``, exceeds
   ``static_threshold``; its ``W`` tokens become one, their mean.
3. **Spatial merging.** Each scene's static tokens, and each frame's other tokens, are clustered by
   DPC-kNN and every cluster merged into its mean (the paper keeps ``cluster_ratio`` of them).

What the budget changes: PruneVid's count is whatever its thresholds leave; here the pruner's budget is
met exactly. The clusters are shared out over the groups of step 3 in proportion to their sizes
(largest remainders, earlier groups first; a group whose share rounds to 0 is dropped), and when step 2
alone leaves fewer tokens than the budget, the least static positions are made dynamic again until
enough are left. An image is a one-frame clip: DPC-kNN merging of its tokens. Each merged token sits at
its earliest member's position. Score-free; pre-LLM only (`Selection.kept_weights`).
"""

from __future__ import annotations

import torch
from pydantic import Field

from qapframe.strategies.base import PRUNERS, PrunerConfig
from qapframe.strategies.pruners.clips import ClipMergingPruner, item_means, shares, still_and_moving_groups
from qapframe.strategies.pruners.selection import density_peak_clusters


class PruneVidConfig(PrunerConfig):
    segment_ratio: float = Field(0.25, gt=0.0, le=1.0, description="scenes: int(segment_ratio * frames) clusters")
    static_threshold: float = Field(
        0.8, ge=-1.0, le=1.0, description="tau: a position is static when its mean pairwise cosine exceeds it"
    )
    neighbours: int = Field(7, ge=1, description="DPC-kNN density: the nearest tokens (self included)")


def scenes(frame_means: torch.Tensor, segment_ratio: float, neighbours: int) -> list[tuple[int, int]]:
    """``frame_means [F, D]`` -> contiguous scenes ``[(start, stop), ...]`` covering the frames in order."""
    f = frame_means.shape[0]
    clusters = max(1, min(f, int(segment_ratio * f)))
    runs: list[list[int]] = []  # [label, start, stop]
    for t, label in enumerate(density_peak_clusters(frame_means, clusters, neighbours).tolist()):
        if runs and runs[-1][0] == label:
            runs[-1][2] = t + 1
        else:
            runs.append([label, t, t + 1])
    while True:
        longest: dict[int, int] = {}  # label -> its longest run (ties: the earlier)
        for i, (label, start, stop) in enumerate(runs):
            if label not in longest or stop - start > runs[longest[label]][2] - runs[longest[label]][1]:
                longest[label] = i
        stray = next((i for i, r in enumerate(runs) if longest[r[0]] != i), None)
        if stray is None:
            return [(start, stop) for _, start, stop in runs]
        size = lambda j: runs[j][2] - runs[j][1] if 0 <= j < len(runs) else -1  # noqa: E731
        target = stray - 1 if size(stray - 1) >= size(stray + 1) else stray + 1  # the longer neighbour
        runs[target][1] = min(runs[target][1], runs[stray][1])
        runs[target][2] = max(runs[target][2], runs[stray][2])
        del runs[stray]
        merged: list[list[int]] = []  # neighbours that now share a label become one run
        for r in runs:
            if merged and merged[-1][0] == r[0]:
                merged[-1][2] = r[2]
            else:
                merged.append(r)
        runs = merged


def static_scores(clip: torch.Tensor) -> torch.Tensor:
    """``clip [W, P, D]`` -> each position's mean cosine similarity over all pairs of frames ``[P]``."""
    w = clip.shape[0]
    unit = torch.nn.functional.normalize(clip.double(), dim=-1)
    return (unit.sum(dim=0).square().sum(dim=-1) - w) / (w * (w - 1))


def prunevid_groups(clip: torch.Tensor, grid: tuple[int, int, int], budget: int, config: PruneVidConfig) -> list[list[int]]:
    """``clip [N, D]`` -> ``budget`` disjoint sets of token indices, each merged into one token."""
    frames, per_frame = grid[0], grid[1] * grid[2]
    x = clip.double().view(frames, per_frame, -1)
    spans = scenes(x.mean(dim=1), config.segment_ratio, config.neighbours)
    static = {}  # (scene, position) -> its mean pairwise cosine, for the positions above the threshold
    for s, (start, stop) in enumerate(spans):
        if stop - start >= 2:
            score = static_scores(x[start:stop])
            for p in (score > config.static_threshold).nonzero().squeeze(-1).tolist():
                static[(s, p)] = float(score[p])
    groups = [items for _, items in still_and_moving_groups(spans, per_frame, static, budget)]
    out = []
    for items, clusters in zip(groups, shares([len(g) for g in groups], budget)):
        if clusters == 0:
            continue
        if clusters == len(items):
            out.extend(items)
            continue
        vectors = item_means(x.view(frames * per_frame, -1), items)
        assign = density_peak_clusters(vectors, clusters, config.neighbours).tolist()
        members: list[list[int]] = [[] for _ in range(clusters)]
        for item, c in zip(items, assign):
            members[c].extend(item)
        out.extend(members)
    return out


@PRUNERS.register("prunevid")
class PruneVidPruner(ClipMergingPruner):
    """Scenes' still tokens merged over time, then DPC-kNN clusters per group merged, budget(N) in total."""

    Config = PruneVidConfig
    config: PruneVidConfig

    def unit_rows(self, x, scores, grid, budget):
        sets = sorted(prunevid_groups(x, grid, budget, self.config), key=min)
        return [min(m) for m in sets], [{t: 1.0 / len(m) for t in m} for m in sets]  # each set's mean
