"""DyCoke's temporal token merging (TTM): drop the tokens of a clip's frames that repeat an earlier frame.

Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models" (CVPR 2025).
The clip's frames are split into windows of ``window`` frames (4 in the paper). Each window's first frame
stays whole; every other frame is compared, position by position (cosine similarity of the projected
tokens at the same row and column), with a reference frame: an odd offset with the frame just before it,
an even offset with the window's first frame (window 4: 1 -> 0, 2 -> 0, 3 -> 2, as in the authors' two
passes). A compared frame keeps its least similar tokens, i.e. what changed. Nothing is averaged: despite
its name TTM prunes. Score-free, so any scorer may be paired with it (the zoo uses ``l2norm``).

The budget (retention or token count) replaces the paper's fixed per-frame ratio: the first frames are
kept whole and the rest of the budget is spread evenly over the compared frames, earlier frames first
when it does not divide. DyCoke's second stage (pruning the KV cache while decoding) is not part of this
pruner. The authors' code also leaves the last window's third frame whole (``range(0, F - 4, 4)``) and
drops a trailing odd frame; here every window follows the same rule and no frame is dropped.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from qapframe.strategies.base import PRUNERS, Pruner, PrunerConfig, Selection
from qapframe.strategies.context import ScoringContext


class DyCokeConfig(PrunerConfig):
    window: int = Field(4, ge=2, description="frames per window; the first frame of each is kept whole")


def reference_frames(num_frames: int, window: int) -> torch.Tensor:
    """``[F]``: the frame each frame is compared with; -1 for the windows' first frames (kept whole)."""
    frames = torch.arange(num_frames)
    offset = frames % window
    ref = torch.where(offset % 2 == 1, frames - 1, frames - offset)
    return torch.where(offset == 0, torch.full_like(frames, -1), ref)


def frame_budgets(reference: torch.Tensor, per_frame: int, budget: int) -> torch.Tensor:
    """``[F]`` tokens kept per frame: whole reference-free frames, the rest of ``budget`` spread evenly."""
    whole = reference < 0
    compared = int((~whole).sum())
    left = budget - int(whole.sum()) * per_frame  # 0 <= left <= compared * per_frame (checked by the caller)
    counts = torch.full_like(reference, per_frame)
    if compared:
        share = torch.full((compared,), left // compared, dtype=counts.dtype)
        share[: left % compared] += 1
        counts[~whole] = share
    return counts


@PRUNERS.register("dycoke")
class DyCokePruner(Pruner):
    """Per clip: windows' first frames whole, other frames keep the tokens least like their reference frame's."""

    Config = DyCokeConfig
    config: DyCokeConfig
    pre_llm_only: ClassVar[bool] = True  # the frame layout describes the tokens before any are pruned

    def select(self, scores: torch.Tensor, context: ScoringContext) -> Selection:
        b, n = scores.shape
        k = self.budget(n)
        if k >= n:
            return Selection.everything(b, n, scores.device)
        grid = context.token_grid
        if grid is None or grid[0] * grid[1] * grid[2] != n:
            raise ValueError(
                f"pruner 'dycoke' needs each unit's frame layout (a video clip on the llava_onevision or "
                f"qwen2_vl / qwen2_5_vl / qwen3_vl adapters); got token_grid={grid} for {n} tokens"
            )
        frames, per_frame = grid[0], grid[1] * grid[2]
        reference = reference_frames(frames, self.config.window)
        whole = int((reference < 0).sum())
        if k < whole * per_frame:
            raise ValueError(
                f"pruner 'dycoke' keeps the first frame of every {self.config.window}-frame window whole: a unit of "
                f"{frames} frame(s) x {per_frame} tokens keeps at least {whole * per_frame} of {n} "
                f"(retention >= {whole / frames:.3f}), but its budget is {k}; raise retention or use video clips"
            )
        counts = frame_budgets(reference, per_frame, k).to(scores.device)  # [F]
        unit = torch.nn.functional.normalize(context.vision_embeds.float().view(b, frames, per_frame, -1), dim=-1)
        ref = reference.clamp_min(0).to(scores.device)
        similarity = (unit * unit[:, ref]).sum(-1)  # [B, F, P]: each token against its reference frame's
        order = torch.sort(similarity, dim=-1, stable=True).indices  # least similar first, ties to the earlier
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(per_frame, device=order.device).expand_as(order))
        keep = (rank < counts[None, :, None]).view(b, n)
        return Selection(keep_index=keep.nonzero()[:, 1].view(b, k))
