"""VisionZip pruner: dominant top-k plus contextual tokens that are exact cluster averages."""

import pytest
import torch

from qapframe.strategies.base import PRUNERS
from qapframe.strategies.context import ScoringContext


def test_dominant_and_contextual_split():
    pruner = PRUNERS.get("visionzip")(num_tokens=64)
    assert pruner.split(576) == (54, 10)  # VisionZip's 54 + 10 at 64 tokens
    assert PRUNERS.get("visionzip")(retention=1.0).split(16) == (16, 0)
    assert PRUNERS.get("visionzip")(num_tokens=8, dominant_ratio=1.0).split(20) == (8, 0)


def test_contextual_tokens_are_cluster_averages_by_key_similarity():
    g = torch.Generator().manual_seed(0)
    b, n, d = 2, 12, 6
    embeds = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    keys = torch.randn(b, n, 5, generator=g)
    scores = torch.rand(b, n, generator=g)
    pruner = PRUNERS.get("visionzip")(num_tokens=6, dominant_ratio=0.5)  # 3 dominant + 3 contextual
    sel = pruner.select(scores, ScoringContext(vision_embeds=embeds, vision_keys=keys))
    assert sel.keep_index.shape == (b, 3) and sel.extra_tokens.shape == (b, 3, d)
    for i in range(b):
        top = set(scores[i].argsort(descending=True)[:3].tolist())
        assert set(sel.keep_index[i].tolist()) == top
        remaining = [j for j in range(n) if j not in top]  # 9 tokens, step 3 -> targets at 0, 3, 6
        targets = [remaining[t] for t in (0, 3, 6)]
        clusters = {t: [t] for t in targets}
        for j in remaining:
            if j in targets:
                continue
            sims = [torch.nn.functional.cosine_similarity(keys[i, j], keys[i, t], dim=0) for t in targets]
            clusters[targets[int(torch.stack(sims).argmax())]].append(j)
        for c, t in enumerate(targets):
            expected = embeds[i, clusters[t]].mean(dim=0)
            assert torch.allclose(sel.extra_tokens[i, c], expected, atol=1e-6)


def test_keys_are_required_when_merging():
    pruner = PRUNERS.get("visionzip")(num_tokens=4)
    with pytest.raises(ValueError, match="vision_keys"):
        pruner.select(torch.rand(1, 10), ScoringContext(vision_embeds=torch.randn(1, 10, 3)))
