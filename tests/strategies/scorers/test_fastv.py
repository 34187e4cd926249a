"""FastV scorer: K as in the paper (layer K-1 ranks), and the deprecated `layer` field's migration."""

import pytest
import torch
from pydantic import ValidationError

from qapframe.strategies.base import SCORERS
from qapframe.strategies.context import ScoringContext


def test_fastv_returns_text_attention_and_ranks_at_layer_k_minus_1():
    scorer = SCORERS.get("fastv")(k=5)
    assert scorer.requirements().text_attention_layer == 4
    assert SCORERS.get("fastv")().config.k == 2  # the paper's K=2: layers 0-1 see every token
    assert SCORERS.get("fastv")().requirements().text_attention_layer == 1
    attention = torch.rand(2, 7)
    ctx = ScoringContext(vision_embeds=torch.randn(2, 7, 4), text_attention=attention)
    assert torch.equal(scorer.score(ctx), attention)
    with pytest.raises(ValueError, match="text_attention"):
        scorer.score(ScoringContext(vision_embeds=torch.randn(2, 7, 4)))


def test_old_layer_field_keeps_its_meaning_and_warns():
    with pytest.warns(DeprecationWarning, match=r"use `k: 3`"):
        old = SCORERS.get("fastv")(layer=2)
    assert old.config.k == 3 and old.requirements().text_attention_layer == 2  # what `layer: 2` always meant
    with pytest.raises(ValidationError, match="give `k` only"):
        SCORERS.get("fastv")(layer=2, k=3)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        SCORERS.get("fastv")(k=0)
