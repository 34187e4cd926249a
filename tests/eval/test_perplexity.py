"""Perplexity: the sliding-window protocol against a direct float64 computation on a tiny real LLaMA."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from qapframe.eval.perplexity import (
    BUILTIN_CORPUS, calibration_windows, perplexity, read_text, split_stream, windows_of,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def reference_nll(model: LlamaForCausalLM, ids: torch.Tensor, seq_len: int, stride: int) -> tuple[float, int]:
    """Token by token in float64: each token t >= 1 scored once, with the context the protocol gives it
    (the window that first contains it, truncated at t)."""
    model = model.double()
    nll, count = 0.0, 0
    for begin, end, first in windows_of(ids.numel(), seq_len, stride):
        logits = model(input_ids=ids[begin:end][None]).logits[0]  # full window, every position
        for t in range(first, end):
            logp = torch.log_softmax(logits[t - 1 - begin], dim=-1)
            nll -= float(logp[ids[t]])
            count += 1
    model.float()
    return nll, count


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 200), seq_len=st.integers(2, 64), data=st.data())
def test_windows_score_every_token_after_the_first_exactly_once(n, seq_len, data):
    stride = data.draw(st.integers(1, seq_len - 1))
    scored = [t for _, end, first in windows_of(n, seq_len, stride) for t in range(first, end)]
    assert scored == list(range(1, n))
    for begin, end, first in windows_of(n, seq_len, stride):
        assert 0 <= begin < first <= end <= n and end - begin <= seq_len


@pytest.mark.parametrize("seq_len,stride", [(16, 15), (16, 5), (7, 6), (100, 99), (3, 1)])
def test_perplexity_equals_direct_float64_reference(seq_len, stride):
    model = tiny_llama()
    ids = torch.randint(0, 50, (61,), generator=torch.Generator().manual_seed(1))
    result = perplexity(model, ids, seq_len, stride, batch_size=3)
    nll, count = reference_nll(model, ids, seq_len, stride)
    assert result.tokens == count == 60
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_smaller_stride_gives_more_context_and_lower_loss_on_a_repeating_stream():
    """A stream that repeats with period 12 is predictable only with context: overlapping windows help.

    The period is six tokens and then the same six reversed, so one token of context never tells the next
    (``a`` precedes both ``b`` and ``a``): a window's first tokens need the context only overlap gives."""
    torch.manual_seed(0)
    model = tiny_llama()
    half = torch.randperm(50)[:6]
    period = torch.cat([half, half.flip(0)])
    ids = period.repeat(8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(60):  # learn the period from 24-token windows
        start = int(torch.randint(0, 12, ()))
        window = ids[start : start + 24][None]
        loss = model(input_ids=window, labels=window).loss
        opt.zero_grad(), loss.backward(), opt.step()
    model.eval()
    disjoint = perplexity(model, ids, 24, 23)
    overlapping = perplexity(model, ids, 24, 4)
    assert disjoint.tokens == overlapping.tokens == ids.numel() - 1
    assert overlapping.nll < disjoint.nll


def test_split_keeps_calibration_and_evaluation_disjoint():
    ids = torch.arange(1000)
    split = split_stream(ids, 300)
    assert split.evaluation.tolist() == list(range(700, 1000))
    windows = calibration_windows(split.calibration, 5, 64, seed=3)
    seen = torch.cat([w["input_ids"][0] for w in windows])
    assert seen.max() < 700 and seen.unique().numel() == seen.numel() == 5 * 64  # no overlap, no eval token
    again = calibration_windows(split.calibration, 5, 64, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(windows, again))
    with pytest.raises(ValueError, match="need 768 tokens; the calibration text has 700"):
        calibration_windows(split.calibration, 12, 64, seed=0)
    with pytest.raises(ValueError, match="eval_tokens must be in 2..999"):
        split_stream(ids, 1000)


def test_read_text(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    assert read_text([tmp_path / "a.txt"]) == "first"
    assert "assert" in read_text(BUILTIN_CORPUS)  # the Python reference ships with CPython
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_text([tmp_path / "missing.txt"])
