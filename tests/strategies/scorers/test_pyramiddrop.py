"""PyramidDrop scorer: asks for one ranking layer per stage and reads the attention rows."""

import pytest
import torch
from pydantic import ValidationError

from qapframe.strategies.base import SCORERS
from qapframe.strategies.context import Requirements, ScoringContext


def test_stages_become_requirements_and_conflict_with_a_single_layer():
    scorer = SCORERS.get("pyramiddrop")(stages=[0.25, 0.5])
    assert scorer.requirements().stage_fractions == (0.25, 0.5)
    assert scorer.requirements().in_llm
    with pytest.raises(ValueError, match="different in-LLM pruning points"):
        scorer.requirements().union(Requirements(text_attention_layer=1))
    attention = torch.rand(2, 5)
    assert torch.equal(scorer.score(ScoringContext(vision_embeds=torch.randn(2, 5, 3), text_attention=attention)), attention)


@pytest.mark.parametrize("stages", [[0.5, 0.25], [0.0, 0.5], [0.5, 0.5], []])
def test_bad_stages_are_rejected(stages):
    with pytest.raises(ValidationError, match="stages"):
        SCORERS.get("pyramiddrop")(stages=stages)
