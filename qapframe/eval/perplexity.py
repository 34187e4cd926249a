"""Perplexity of a causal LM on local text: fixed-length sliding windows, calibration windows held apart.

The token stream of a text is split once: the last ``eval_tokens`` tokens are the evaluation part, the
tokens before them the calibration part, so calibration and evaluation never share a token.
`perplexity` follows the usual sliding-window protocol: windows of ``seq_len`` tokens advance by
``stride`` tokens and each scores only its last ``stride`` tokens, which no earlier window scored. With
the default ``stride = seq_len - 1`` the windows share one token (the context of the next window's
first prediction), so each token is predicted from up to ``seq_len - 1`` tokens; a smaller stride gives
every scored token more context. Every token after the stream's first is scored exactly once.

This module needs only torch (the llm-compressor benchmark loads it from its own virtualenv).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

BUILTIN_CORPUS = "python-docs"  # the Python language and library reference shipped with CPython (pydoc_data)


def read_text(sources: Sequence[str | Path] | str) -> str:
    """The text of local files (joined by blank lines), or of the built-in corpus ``python-docs``."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    parts = []
    for source in sources:
        if str(source) == BUILTIN_CORPUS:
            from pydoc_data.topics import topics

            parts.extend(topics[key] for key in sorted(topics))
            continue
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text file {str(path)!r} does not exist; give a UTF-8 text file or {BUILTIN_CORPUS!r}")
        parts.append(path.read_text(encoding="utf-8"))
    return "\n\n".join(parts)


def token_stream(tokenizer, text: str) -> torch.Tensor:
    """``text`` -> token ids ``[N]`` (int64), without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class TextSplit:
    """``calibration [Nc]`` and ``evaluation [Ne]``: disjoint, consecutive parts of one token stream."""

    calibration: torch.Tensor
    evaluation: torch.Tensor


def split_stream(ids: torch.Tensor, eval_tokens: int) -> TextSplit:
    """The last ``eval_tokens`` tokens for evaluation, everything before them for calibration."""
    if not 1 < eval_tokens < ids.numel():
        raise ValueError(f"eval_tokens must be in 2..{ids.numel() - 1} for a stream of {ids.numel()} tokens, got {eval_tokens}")
    return TextSplit(ids[: ids.numel() - eval_tokens], ids[ids.numel() - eval_tokens :])


def calibration_windows(ids: torch.Tensor, count: int, seq_len: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` non-overlapping windows of ``seq_len`` tokens from ``ids [N]`` (seeded choice), as model
    inputs ``{input_ids [1, L], attention_mask [1, L]}``."""
    slots = ids.numel() // seq_len
    if count > slots:
        raise ValueError(f"{count} calibration windows of {seq_len} tokens need {count * seq_len} tokens; the "
                         f"calibration text has {ids.numel()}")
    chosen = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    windows = [ids[i * seq_len : (i + 1) * seq_len] for i in chosen.tolist()]
    return [{"input_ids": w[None].clone(), "attention_mask": torch.ones(1, seq_len, dtype=torch.long)} for w in windows]


@dataclass(frozen=True)
class Perplexity:
    """``exp(nll / tokens)``; ``tokens`` scored, in ``windows`` windows of at most ``seq_len``."""

    perplexity: float
    nll: float  # summed negative log-likelihood, nats
    tokens: int
    windows: int
    seq_len: int
    stride: int

    def as_dict(self) -> dict:
        return asdict(self)


def windows_of(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_target)`` of each window over ``n`` tokens: the window ``[begin, end)`` scores
    the tokens ``[first_target, end)``, ``stride`` of them (fewer in the last), each with every token of
    the window before it as context; together they score ``1..n-1`` once each.

    A window holds ``seq_len`` tokens (fewer only at the stream's start), so ``stride <= seq_len - 1``:
    each scored token's predecessor must be in its window.
    """
    if seq_len < 2 or not 1 <= stride <= seq_len - 1:
        raise ValueError(f"need seq_len >= 2 and 1 <= stride <= seq_len - 1, got seq_len={seq_len}, stride={stride}")
    spans = []
    for first in range(1, n, stride):
        end = min(first + stride, n)
        spans.append((max(0, end - seq_len), end, first))
    return spans


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, stride: int | None = None,
               batch_size: int = 4) -> Perplexity:
    """Perplexity of ``model`` (a causal LM returning ``.logits``) on the token stream ``ids [N]``."""
    stride = seq_len - 1 if stride is None else stride
    spans = windows_of(ids.numel(), seq_len, stride)
    device = next(model.parameters()).device
    # Windows of one shape batch together; only the logits of scored positions are computed.
    by_shape: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for span in spans:
        begin, end, first = span
        by_shape.setdefault((end - begin, end - first), []).append(span)
    nll, tokens = 0.0, 0
    for (length, keep), group in by_shape.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            inputs = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)  # [b, length]
            targets = torch.stack([ids[f:e] for _, e, f in chunk]).to(device)  # [b, keep]
            logits = _logits(model, inputs, keep + 1)  # [b, keep + 1, V]; position t predicts token t + 1
            for row, target in zip(logits, targets):  # one window at a time bounds the softmax's memory
                nll += float(torch.nn.functional.cross_entropy(row[:-1].float(), target, reduction="sum").double())
            tokens += targets.numel()
            del logits
    return Perplexity(math.exp(nll / tokens), nll, tokens, len(spans), seq_len, stride)


def _logits(model: torch.nn.Module, inputs: torch.Tensor, keep: int) -> torch.Tensor:
    """The last ``keep`` positions' logits ``[b, keep, V]`` (computing only those where the model can)."""
    mask = torch.ones_like(inputs)
    try:
        out = model(input_ids=inputs, attention_mask=mask, logits_to_keep=keep, use_cache=False)
    except TypeError:  # a model without logits_to_keep computes every position
        out = model(input_ids=inputs, attention_mask=mask, use_cache=False)
    return out.logits[:, -keep:]


def evaluate_texts(model, tokenizer, sources: Iterable[str | Path] | str, eval_tokens: int, seq_len: int,
                   stride: int | None = None) -> Perplexity:
    """Perplexity on the evaluation part of the text of ``sources`` (see `split_stream`)."""
    split = split_stream(token_stream(tokenizer, read_text(list(sources) if not isinstance(sources, str) else sources)), eval_tokens)
    return perplexity(model, split.evaluation, seq_len, stride)


__all__ = [
    "BUILTIN_CORPUS", "Perplexity", "TextSplit", "calibration_windows", "evaluate_texts", "perplexity", "read_text",
    "split_stream", "token_stream", "windows_of",
]
