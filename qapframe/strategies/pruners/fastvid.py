"""FastVID: segment a clip where its frames change, keep each frame's salient tokens, merge the rest onto anchors.

Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models" (2025), as the authors'
per-segment ("straightforward") code budgets it:

1. **Dynamic segmentation.** With ``g_t`` a frame's mean token (the authors' Qwen2.5-VL variant; on
   OneVision they use SigLIP's pooled frame vector, which the projected tokens do not carry), a segment
   ends after frame ``t`` when ``cos(g_t, g_t+1) < segment_threshold`` (tau, 0.9) or when that similarity
   is among the ``segments - 1`` lowest (so at least ``segments`` (8) segments when the clip has frames).
2. **Salient tokens.** Each frame keeps ``R - int(context_ratio * R)`` tokens by the paired scorer's
   scores (the paper: [CLS]-style attention, i.e. the `visionzip` scorer; 0.4 = d).
3. **Density merging.** A segment's ``sum int(context_ratio * R)`` contextual tokens go to its anchor frames
   (its last frame and every ``anchor_stride``-th (4) before it). In an anchor frame the anchors are the
   non-salient tokens with the highest DPC-kNN centre score (`density_peak_scores`, 4 neighbours); every
   other non-salient token of the segment, not an anchor of that frame, joins its most cosine-similar
   anchor, and an anchor with ``n`` members becomes ``w * anchor + (1 - w) * mean(members)`` with
   ``w = max(1 / (n + 1), anchor_weight)`` (0.6 = beta). A token may thus feed one anchor per anchor frame.

The budget is met exactly: it is spread over the frames (earlier frames first), a segment's contextual share
over its anchor frames (earlier first), and whatever an anchor frame cannot hold (it has only its
non-salient tokens) goes back to salient tokens of the segment's frames. Kept and merged tokens stay at
their own (the anchor's) positions. An image, or a unit without a frame layout, is one frame: salient tokens
plus density-merged context, VisionZip-like. Pre-LLM only (`Selection.kept_weights`).
"""

from __future__ import annotations

import torch
from pydantic import Field

from qapframe.strategies.base import PRUNERS, PrunerConfig
from qapframe.strategies.pruners.clips import ClipMergingPruner
from qapframe.strategies.pruners.selection import density_peak_scores


class FastVIDConfig(PrunerConfig):
    segments: int = Field(8, ge=1, description="c: at least this many segments (the lowest frame similarities cut)")
    segment_threshold: float = Field(0.9, ge=-1.0, le=1.0, description="tau: a frame similarity below it cuts")
    context_ratio: float = Field(0.4, ge=0.0, le=1.0, description="d: share of each frame's budget merged on anchors")
    anchor_stride: int = Field(4, ge=1, description="p: a segment's anchor frames, counted back from its last")
    anchor_weight: float = Field(0.6, ge=0.0, le=1.0, description="beta: an anchor's least weight in its merge")
    neighbours: int = Field(4, ge=1, description="DPC-kNN density: the nearest tokens (self included)")


def segment_spans(frame_means: torch.Tensor, segments: int, threshold: float) -> list[tuple[int, int]]:
    """``frame_means [F, D]`` -> contiguous segments ``[(start, stop), ...]`` covering the frames."""
    f = frame_means.shape[0]
    unit = torch.nn.functional.normalize(frame_means.double(), dim=-1)
    similarity = (unit[:-1] * unit[1:]).sum(dim=-1)  # [F - 1]: frame t against t + 1
    lowest = torch.sort(similarity, stable=True).indices[: max(0, min(segments - 1, f - 1))]
    cuts = sorted(set(lowest.tolist()) | set((similarity < threshold).nonzero().squeeze(-1).tolist()))
    bounds = [0] + [c + 1 for c in cuts] + [f]
    return list(zip(bounds[:-1], bounds[1:]))


def spread(total: int, slots: int) -> list[int]:
    """``total`` over ``slots`` as evenly as possible, earlier slots first."""
    return [total // slots + (1 if i < total % slots else 0) for i in range(slots)]


def plan_counts(spans, frames: int, per_frame: int, budget: int, config: FastVIDConfig) -> tuple[list[int], list[int]]:
    """Per frame ``(salient, contextual)`` counts summing to ``budget``; contextual ones only on anchor frames."""
    share = spread(budget, frames)
    context_of = [int(config.context_ratio * r) for r in share]
    salient = [r - c for r, c in zip(share, context_of)]
    context = [0] * frames
    for start, stop in spans:
        anchors = sorted(range(stop - 1, start - 1, -config.anchor_stride))
        left = sum(context_of[start:stop])
        while left:  # earlier anchor frames first; a frame holds at most its non-salient tokens
            room = [a for a in anchors if salient[a] + context[a] < per_frame]
            if not room:
                break
            for a, extra in zip(room, spread(left, len(room))):
                take = min(extra, per_frame - salient[a] - context[a])
                context[a] += take
                left -= take
        frames_with_room = [t for t in range(start, stop) if salient[t] + context[t] < per_frame]
        while left:  # what anchor frames cannot hold: salient tokens of the segment's frames
            if not frames_with_room:  # cannot happen: a segment's share never exceeds its tokens
                raise RuntimeError(f"fastvid: segment {start}-{stop} cannot hold its {left} remaining tokens")
            for t in frames_with_room:
                if left and salient[t] + context[t] < per_frame:
                    salient[t] += 1
                    left -= 1
            frames_with_room = [t for t in frames_with_room if salient[t] + context[t] < per_frame]
    return salient, context


def fastvid_rows(
    x: torch.Tensor, scores: torch.Tensor, grid: tuple[int, int, int], budget: int, config: FastVIDConfig
) -> tuple[list[int], list[dict[int, float]]]:
    """``x [N, D]``, ``scores [N]`` -> the kept tokens' positions and each one's weights ``{token: weight}``."""
    frames, per_frame = grid[0], grid[1] * grid[2]
    x = x.double()
    clip = x.view(frames, per_frame, -1)
    spans = segment_spans(clip.mean(dim=1), config.segments, config.segment_threshold)
    salient_count, context_count = plan_counts(spans, frames, per_frame, budget, config)
    unit = torch.nn.functional.normalize(x, dim=-1)
    rows: dict[int, dict[int, float]] = {}
    salient: list[list[int]] = []
    for t in range(frames):
        order = torch.sort(scores[t * per_frame : (t + 1) * per_frame].double(), descending=True, stable=True).indices
        salient.append(sorted((order[: salient_count[t]] + t * per_frame).tolist()))
        for token in salient[t]:
            rows[token] = {token: 1.0}
    for start, stop in spans:
        kept_whole = {s for t in range(start, stop) for s in salient[t]}
        in_segment = set(range(start * per_frame, stop * per_frame)) - kept_whole
        for t in range(start, stop):
            if context_count[t] == 0:
                continue
            rest = sorted(set(range(t * per_frame, (t + 1) * per_frame)) - set(salient[t]))  # [R] candidates
            score, _ = density_peak_scores(x[rest], config.neighbours)
            picked = torch.sort(score, descending=True, stable=True).indices[: context_count[t]]
            anchors = sorted(rest[i] for i in picked.tolist())
            members = sorted(in_segment - set(anchors))
            groups: dict[int, list[int]] = {a: [] for a in anchors}
            if members:
                similarity = unit[members] @ unit[anchors].transpose(0, 1)  # [M, A]
                for m, a in zip(members, similarity.argmax(dim=-1).tolist()):  # ties: the earlier anchor
                    groups[anchors[a]].append(m)
            for a, group in groups.items():
                w = max(1.0 / (len(group) + 1), config.anchor_weight) if group else 1.0
                rows[a] = {a: w, **{m: (1.0 - w) / len(group) for m in group}}
    keep = sorted(rows)
    return keep, [rows[k] for k in keep]


@PRUNERS.register("fastvid")
class FastVIDPruner(ClipMergingPruner):
    """Per clip: segments where frames change, salient tokens by score, the rest merged onto density anchors."""

    Config = FastVIDConfig
    config: FastVIDConfig

    def unit_rows(self, x, scores, grid, budget):
        return fastvid_rows(x, scores, grid, budget, self.config)
