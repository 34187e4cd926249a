"""DyCoke's temporal token merging against a slow direct version of its rule, and its budget's limits."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qapframe.strategies.base import PRUNERS
from qapframe.strategies.context import ScoringContext
from qapframe.strategies.pruners.dycoke import reference_frames


def dycoke_slow(clip: torch.Tensor, grid: tuple[int, int, int], window: int, budget: int) -> list[int]:
    """One clip, ``clip [N, D]`` float64 -> the kept token indices, frame by frame as the rule reads."""
    frames, rows, cols = grid
    per_frame = rows * cols
    first = [f for f in range(frames) if f % window == 0]
    compared = [f for f in range(frames) if f % window != 0]
    left = budget - len(first) * per_frame
    share = {f: left // len(compared) + (i < left % len(compared)) for i, f in enumerate(compared)} if compared else {}
    kept = []
    for f in range(frames):
        if f in first:
            kept += range(f * per_frame, (f + 1) * per_frame)
            continue
        offset = f % window
        ref = f - 1 if offset % 2 else f - offset
        sims = []
        for p in range(per_frame):
            a, b = clip[f * per_frame + p], clip[ref * per_frame + p]
            sims.append((float(a @ b / (a.norm() * b.norm())), p))
        sims.sort()  # least similar first; ties: the earlier position
        kept += [f * per_frame + p for _, p in sims[: share[f]]]
    return sorted(kept)


def test_window_of_four_compares_as_the_authors_two_passes_do():
    assert reference_frames(8, 4).tolist() == [-1, 0, 0, 2, -1, 4, 4, 6]  # 1 -> 0, 3 -> 2; then 2 -> 0
    assert reference_frames(5, 2).tolist() == [-1, 0, -1, 2, -1]  # a trailing frame is kept, not dropped


@settings(max_examples=40, deadline=None)
@given(
    frames=st.integers(2, 9), rows=st.integers(1, 3), cols=st.integers(1, 4), window=st.integers(2, 5),
    fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
)
def test_batched_selection_matches_the_slow_rule(frames, rows, cols, window, fraction, seed):
    per_frame = rows * cols
    n = frames * per_frame
    first = len(range(0, frames, window)) * per_frame
    budget = first + round(fraction * (n - first))
    if budget >= n:
        budget = n - 1
    if budget < first:
        return
    clips = torch.randn(3, n, 6, generator=torch.Generator().manual_seed(seed))
    pruner = PRUNERS.get("dycoke")(num_tokens=budget, window=window)
    context = ScoringContext(vision_embeds=clips, token_grid=(frames, rows, cols))
    selection = pruner.select(torch.zeros(3, n), context)
    assert selection.keep_index.shape == (3, budget)
    for b in range(3):
        assert selection.keep_index[b].tolist() == dycoke_slow(clips[b].double(), (frames, rows, cols), window, budget)


def test_a_compared_frame_keeps_exactly_what_changed():
    generator = torch.Generator().manual_seed(0)
    still = torch.randn(1, 9, 8, generator=generator).expand(4, 9, 8).clone()  # 4 frames of 3 x 3, all alike
    changed = {1: [2, 7], 2: [0, 4], 3: [5, 8]}  # per compared frame: the positions that move
    for f, positions in changed.items():
        still[f, positions] = torch.randn(len(positions), 8, generator=generator)
    # Frame 3 is compared with frame 2, whose own moved tokens (0, 4) must not count as frame 3's changes.
    still[3, [0, 4]] = still[2, [0, 4]]
    clip = still.reshape(1, 36, 8)
    pruner = PRUNERS.get("dycoke")(num_tokens=9 + 6)
    selection = pruner.select(torch.zeros(1, 36), ScoringContext(vision_embeds=clip, token_grid=(4, 3, 3)))
    expected = list(range(9)) + [9 * f + p for f, ps in changed.items() for p in ps]
    assert selection.keep_index[0].tolist() == sorted(expected)


def test_full_retention_keeps_everything_and_needs_no_layout():
    clip = torch.randn(2, 12, 4)
    selection = PRUNERS.get("dycoke")(retention=1.0).select(torch.zeros(2, 12), ScoringContext(vision_embeds=clip))
    assert selection.keep_index.tolist() == [list(range(12))] * 2


def test_a_budget_below_the_whole_frames_or_a_unit_without_frames_is_refused():
    clip = torch.randn(1, 2 * 4, 4)
    with pytest.raises(ValueError, match=r"keeps at least 4 of 8 \(retention >= 0.500\), but its budget is 2"):
        PRUNERS.get("dycoke")(retention=0.25).select(torch.zeros(1, 8), ScoringContext(clip, token_grid=(2, 2, 2)))
    with pytest.raises(ValueError, match=r"needs each unit's frame layout.*token_grid=None for 8 tokens"):
        PRUNERS.get("dycoke")(retention=0.5).select(torch.zeros(1, 8), ScoringContext(clip))


def test_an_in_llm_scorer_is_refused():
    from qapframe.strategies.base import SCORERS, requirements_of

    with pytest.raises(ValueError, match="pruner 'dycoke' works only before the LLM"):
        requirements_of(SCORERS.get("fastv")(), PRUNERS.get("dycoke")())
