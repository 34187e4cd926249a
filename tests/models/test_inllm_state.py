"""The in-LLM stages' token schedule."""

from qapframe.models.inllm_state import stage_targets


def test_stage_targets_step_geometrically_to_the_budget():
    assert stage_targets(16, 2, 3) == [8, 4, 2]  # lambda = 0.5 per stage, PyramidDrop's setting
    assert stage_targets(576, 72, 3) == [288, 144, 72]
    assert stage_targets(64, 16, 1) == [16]
    assert stage_targets(10, 9, 4) == [10, 9, 9, 9]  # rounding never goes below the budget
    assert stage_targets(0, 0, 2) == [0, 0]
