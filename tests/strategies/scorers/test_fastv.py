"""FastV scorer: reads the adapter-computed text attention row from the context."""

import pytest
import torch

from qapframe.strategies.base import SCORERS
from qapframe.strategies.context import ScoringContext


def test_fastv_returns_text_attention_and_asks_for_its_layer():
    scorer = SCORERS.get("fastv")(layer=5)
    assert scorer.requirements().text_attention_layer == 5
    attention = torch.rand(2, 7)
    ctx = ScoringContext(vision_embeds=torch.randn(2, 7, 4), text_attention=attention)
    assert torch.equal(scorer.score(ctx), attention)
    with pytest.raises(ValueError, match="text_attention"):
        scorer.score(ScoringContext(vision_embeds=torch.randn(2, 7, 4)))
