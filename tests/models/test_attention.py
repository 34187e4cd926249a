"""Attention rows recomputed from projections, against a float64 loop over heads and queries."""

import math

import torch
from hypothesis import given, settings, strategies as st

from qapframe.models.attention import attention_probs


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.sampled_from([(4, 2), (4, 4), (6, 1)]), st.integers(1, 5), st.integers(0, 10_000))
def test_attention_probs_match_float64_loop(batch, heads, keys_len, seed):
    h, hkv = heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, h, 2, 8, generator=g)
    k = torch.randn(batch, hkv, keys_len, 8, generator=g)
    allowed = torch.rand(batch, 2, keys_len, generator=g) > 0.3
    allowed[..., 0] = True  # at least one visible key per row
    got = attention_probs(q, k, 0.35, allowed)
    for b in range(batch):
        for head in range(h):
            kv = head // (h // hkv)  # grouped-query: consecutive query heads share a key head
            for i in range(2):
                logits = [0.35 * float(q[b, head, i].double() @ k[b, kv, j].double()) for j in range(keys_len)]
                visible = [j for j in range(keys_len) if allowed[b, i, j]]
                top = max(logits[j] for j in visible)
                z = sum(math.exp(logits[j] - top) for j in visible)
                for j in range(keys_len):
                    want = math.exp(logits[j] - top) / z if j in visible else 0.0
                    assert abs(float(got[b, head, i, j]) - want) <= 1e-6
