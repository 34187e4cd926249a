"""VisionZip scorer: reads the adapter-computed [CLS] attention from the context."""

import torch

from qapframe.strategies.base import SCORERS
from qapframe.strategies.context import ScoringContext


def test_visionzip_returns_cls_attention_and_asks_for_keys():
    scorer = SCORERS.get("visionzip")()
    needs = scorer.requirements()
    assert needs.cls_attention and needs.vision_keys
    cls = torch.rand(3, 5)
    assert torch.equal(scorer.score(ScoringContext(vision_embeds=torch.randn(3, 5, 4), cls_attention=cls)), cls)
